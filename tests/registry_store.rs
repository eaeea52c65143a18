//! The registry view's store (issue 9): multi-platform sources served as an index whose platforms
//! the clients pick, DELETE and online GC (also racing pulls), a kill -9 mid-conversion, eviction
//! under `--cache-max-bytes`, private images kept from callers the upstream refuses, and the bounded
//! wait of a first pull (`--manifest-wait`). What is on disk is read from the store directory itself.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fixtures::{noise, sha, Image, Layer};
use common::images;
use common::proxy::{Fault, Proxy};
use common::pull::{self, Client};
use common::registry::Registry;
use common::view::*;
use common::*;
use serde_json::{json, Value};

#[test]
fn a_multi_platform_source_is_an_index_each_client_picks_its_platform_from() {
    let env = env();
    let name = "store-multiarch";
    let source = publish(&env, name, images::multiarch());
    let view = View::start(&env.registry);
    let (status, headers, body) =
        view.manifest(name, "v1", &format!("{OCI_INDEX}, {OCI_MANIFEST}"));
    assert_eq!(status, 200, "{headers}");
    assert_eq!(header(&headers, "content-type"), OCI_INDEX);
    assert_eq!(header(&headers, "docker-content-digest"), sha(&body));
    let index = json_body(&body);
    let entries = index["manifests"].as_array().unwrap();
    // The source's attestation entry (unknown/unknown) is no platform.
    let platforms: Vec<&Value> = entries.iter().map(|e| &e["platform"]).collect();
    assert_eq!(
        platforms,
        [
            &json!({"architecture": "amd64", "os": "linux"}),
            &json!({"architecture": "arm64", "os": "linux"})
        ],
        "{index}"
    );
    for entry in entries {
        let (digest, arch) = (
            entry["digest"].as_str().unwrap(),
            &entry["platform"]["architecture"],
        );
        let (status, headers, body) = view.manifest(name, digest, OCI_MANIFEST);
        assert_eq!(status, 200, "{arch}: {headers}");
        assert_eq!(sha(&body), digest);
        assert_eq!(body.len() as u64, entry["size"].as_u64().unwrap());
        let manifest = json_body(&body);
        assert_eq!(
            manifest["layers"].as_array().unwrap().len(),
            1,
            "{manifest}"
        );
        let layer = manifest["layers"][0]["digest"].as_str().unwrap();
        let (status, _, blob) = view.blob(name, layer, &[]);
        assert_eq!(status, 200);
        let arch = arch.as_str().unwrap();
        assert!(
            holds(&layer_listing(&blob), "arch", arch.as_bytes()),
            "{arch}"
        );
    }

    // Docker's own types for a client that takes only those: a manifest list of schema 2 manifests.
    let docker_types = format!("{DOCKER_LIST}, {DOCKER_MANIFEST}");
    let (status, headers, body) = view.manifest(name, "v1", &docker_types);
    assert_eq!(status, 200, "{headers}");
    assert_eq!(header(&headers, "content-type"), DOCKER_LIST);
    for entry in json_body(&body)["manifests"].as_array().unwrap() {
        let (status, headers, body) =
            view.manifest(name, entry["digest"].as_str().unwrap(), DOCKER_MANIFEST);
        assert_eq!(status, 200, "{entry}: {headers}");
        assert_eq!(json_body(&body)["mediaType"], DOCKER_MANIFEST);
    }

    // Each client as users run it, against `docker pull` of the source for the same platform.
    let reference = view.reference(name, "v1");
    let cases = [
        (Client::Docker, None, "amd64"),
        (Client::Containerd, Some("linux/arm64"), "arm64"),
        (Client::Skopeo, Some("linux/arm64"), "arm64"),
        (Client::Docker, Some("linux/arm64"), "arm64"),
    ];
    for (client, platform, arch) in cases {
        run(docker().args([
            "pull",
            "-q",
            "--platform",
            &format!("linux/{arch}"),
            &source,
        ]));
        let want = export_listing(&source);
        let local = format!("strata-store/multiarch:{client:?}-{arch}").to_lowercase();
        let layers = pull::pull_platform_into_docker(&env, client, &reference, &local, platform);
        assert_eq!(layers, 1, "{client:?} {platform:?}");
        let got = export_listing(&local);
        assert!(holds(&got, "arch", arch.as_bytes()), "{client:?}: {got:?}");
        assert_same(&want, &got, &format!("{client:?} {platform:?}"));
    }
}

#[test]
fn delete_unlinks_the_image_and_gc_leaves_no_orphan_blob() {
    let env = env();
    let (gone, kept) = ("store-delete", "store-delete-kept");
    publish(&env, gone, images::basic());
    retag(&env, gone, "v2");
    publish(&env, kept, images::hardlinks());
    let view = View::with(
        &env.registry,
        &["--enable-delete", "--gc-grace", "0"],
        "info",
    );
    let (manifest, digest) = view.converted(gone, "v1");
    assert_eq!(
        view.converted(gone, "v2").1,
        digest,
        "one source, one image"
    );
    view.converted(kept, "v1");
    let store = view.store();
    let tags = store.join(format!("repositories/squash/fixtures/{gone}/_tags"));
    assert_eq!(files_under(&tags), ["v1", "v2"]);
    let before = store_state(&store);
    assert!(
        before.missing.is_empty() && before.orphans.is_empty(),
        "{before:?}"
    );

    // By tag, only the tag goes.
    assert_eq!(view.delete(gone, "v2"), 202);
    assert_eq!(files_under(&tags), ["v1"]);
    assert_eq!(view.manifest(gone, &digest, OCI_MANIFEST).0, 200);

    let collections = view.logged("garbage collection");
    assert_eq!(view.delete(gone, &digest), 202);
    let code = v2_code(view.manifest(gone, &digest, OCI_MANIFEST), 404, "deleted");
    assert_eq!(code, "MANIFEST_UNKNOWN");
    assert_eq!(view.catalog(), json!([format!("squash/fixtures/{kept}")]));
    assert_eq!(files_under(&tags), Vec::<String>::new(), "no dangling tag");
    assert_eq!(view.delete(gone, &digest), 404, "deleted already");

    // The image was read within the last second, which GC spares even with no grace (the mtime
    // slack): the delete's GC passes must take its blobs once that is over, with no --gc-interval.
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let state = store_state(&store);
        assert!(state.missing.is_empty(), "blobs lost: {state:?}");
        if state.orphans.is_empty() {
            break state;
        }
        let log = view.server.log.lock().unwrap().clone();
        assert!(Instant::now() < deadline, "orphan blobs: {state:?}\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(view.logged("garbage collection") > collections);
    for blob in [&manifest["config"], &manifest["layers"][0]] {
        let digest = blob["digest"].as_str().unwrap();
        assert!(
            !after.blobs.contains(digest),
            "{digest} of the deleted image"
        );
    }
    assert!(!after.blobs.contains(&digest));
    let kept_layer = view.converted(kept, "v1").0["layers"][0]["digest"].clone();
    assert!(after.blobs.contains(kept_layer.as_str().unwrap()));
}

#[test]
fn delete_is_refused_without_enable_delete() {
    let env = env();
    let name = "store-no-delete";
    publish(&env, name, images::basic());
    let view = View::start(&env.registry);
    let (_, digest) = view.converted(name, "v1");
    let url = view.url(&format!("squash/fixtures/{name}/manifests/{digest}"));
    let code = v2_code(curl(&["-X", "DELETE", &url]), 405, "DELETE");
    assert_eq!(code, "UNSUPPORTED");
    assert_eq!(view.delete(name, "v1"), 405, "by tag");
    assert_eq!(view.manifest(name, &digest, OCI_MANIFEST).0, 200);
}

#[test]
fn gc_racing_eight_pulls_and_deletes_loses_nothing() {
    let env = env();
    let pulled = ["store-race-a", "store-race-b"];
    let churned = "store-race-c";
    let view = View::with(
        &env.registry,
        &["--enable-delete", "--gc-grace", "0", "--gc-interval", "1"],
        "info",
    );
    // What each image must be: its first pull checked against `docker pull` of the source.
    let mut want = Vec::new();
    for (name, image) in pulled.iter().chain([&churned]).zip([
        images::basic(),
        images::hardlinks(),
        images::whiteouts(),
    ]) {
        let oracle = oracle(&publish(&env, name, image));
        let local = format!("strata-store/{name}:first");
        let layers =
            pull::pull_into_docker(&env, Client::Skopeo, &view.reference(name, "v1"), &local);
        assert_eq!(layers, 1);
        assert_same(&oracle, &export_listing(&local), name);
        let (manifest, _) = view.converted(name, "v1");
        let layer = manifest["layers"][0]["digest"]
            .as_str()
            .unwrap()
            .to_string();
        let (status, _, blob) = view.blob(name, &layer, &[]);
        assert_eq!(status, 200);
        want.push((layer, layer_listing(&blob)));
    }
    let check = |i: usize, reference: &str, what: &str| {
        let (layers, blob) = pull::skopeo_first_layer(reference);
        assert_eq!(layers, 1, "{what}");
        assert_eq!(sha(&blob), want[i].0, "{what}: the layer");
        assert_eq!(layer_listing(&blob), want[i].1, "{what}");
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let (pulls, rounds) = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8)
            .map(|w| {
                let (check, view) = (&check, &view);
                s.spawn(move || {
                    let mut n = 0;
                    while Instant::now() < deadline {
                        let name = pulled[(w + n) % 2];
                        check(
                            (w + n) % 2,
                            &view.reference(name, "v1"),
                            &format!("{name} #{n}"),
                        );
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        // Deletes, then pulls again after a pause that varies, so that GC passes fall before,
        // during and after the conversion that each new pull of the deleted image starts.
        let mut rounds = 0;
        while Instant::now() < deadline {
            let (_, digest) = view.converted(churned, "v1");
            check(
                2,
                &view.reference(churned, "v1"),
                &format!("{churned} #{rounds}"),
            );
            assert_eq!(view.delete(churned, &digest), 202, "round {rounds}");
            let code = v2_code(
                view.manifest(churned, &digest, OCI_MANIFEST),
                404,
                "deleted",
            );
            assert_eq!(code, "MANIFEST_UNKNOWN");
            std::thread::sleep(Duration::from_millis([0, 400, 1200, 2200][rounds % 4]));
            rounds += 1;
        }
        let pulls: Vec<usize> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        (pulls, rounds)
    });
    assert!(pulls.iter().all(|&n| n >= 2), "pulls per worker: {pulls:?}");
    assert!(rounds >= 4, "{rounds} delete rounds");
    // Every round but the first converted the deleted image again, and GC took its blobs some times.
    assert!(
        view.conversions() >= 3 + rounds - 1,
        "{}",
        view.conversions()
    );
    let removals = view.gc_removals();
    assert!(
        removals.iter().any(|&n| n > 0),
        "GC never removed a blob: {removals:?}"
    );
    // What is left: nothing missing ever, and orphans only until a pass finds them old enough.
    let store = view.store();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = store_state(&store);
        assert!(state.missing.is_empty(), "blobs lost: {state:?}");
        if state.orphans.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "orphans stay: {state:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("pulls per worker {pulls:?}, {rounds} delete rounds, GC removals {removals:?}");
}

#[test]
fn kill_9_during_a_conversion_leaves_no_partial_blob_and_a_restart_converts_again() {
    let env = env();
    let name = "store-kill";
    // Incompressible, so the layer's upload grows while the throttled source blob comes.
    let big = noise(8 << 20, 9);
    let hex = publish_layer(&env, name, Layer::new().file("big", 0o644, &big));
    let want = oracle(&format!("{}/fixtures/{name}:v1", env.registry));
    let proxy = Proxy::start(&env.registry);
    proxy.rule(&hex, Fault::Throttle(2 << 20), None);
    let cache = scratch("store-kill-cache");
    let mut first = View::of(Server::start_with_cache(
        &proxy.addr,
        &cache,
        &["--default-registry", &proxy.addr],
        "info",
    ));
    let store = first.store();
    let tmp = store.join("tmp");
    let url = first.url(&format!("squash/fixtures/{name}/manifests/v1"));
    let pull = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", &url])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed once the layer's upload holds some of its bytes: mid-write.
    let deadline = Instant::now() + Duration::from_secs(30);
    let partial = loop {
        let sizes: Vec<u64> = files_under(&tmp)
            .iter()
            .filter_map(|f| std::fs::metadata(tmp.join(f)).ok().map(|m| m.len()))
            .collect();
        if sizes.iter().any(|&n| n > 1 << 20) {
            break sizes;
        }
        assert!(
            Instant::now() < deadline,
            "no upload grew in {}",
            tmp.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    first.server.kill_hard();
    let _ = pull.wait_with_output();
    assert_eq!(first.conversions(), 0, "killed before the conversion ended");
    drop(first);
    eprintln!("killed with uploads of {partial:?} bytes in tmp/");
    assert_blobs_verify(&store);
    let state = store_state(&store);
    assert!(state.missing.is_empty(), "{state:?}");
    assert!(
        !state
            .blobs
            .iter()
            .any(|b| std::fs::metadata(blob_path(&store, b)).unwrap().len() > 1 << 20),
        "no layer blob was published: {state:?}"
    );
    assert_eq!(files_under(&store.join("derived")), Vec::<String>::new());

    // Uploads are removed at start once nobody could still be writing them (a store may be shared
    // by processes): made that old here, as after a crash long ago.
    let old = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
    for f in files_under(&tmp) {
        let file = std::fs::File::options()
            .write(true)
            .open(tmp.join(f))
            .unwrap();
        file.set_modified(old).unwrap();
    }
    let second = View::of(Server::start_with_cache(
        &env.registry,
        &cache,
        &["--default-registry", &env.registry],
        "info",
    ));
    assert_eq!(
        files_under(&tmp),
        Vec::<String>::new(),
        "tmp/ after a restart"
    );
    let reference = second.reference(name, "v1");
    let layers = pull::pull_into_docker(&env, Client::Docker, &reference, "strata-store/kill:v1");
    assert_eq!(layers, 1);
    assert_same(&want, &export_listing("strata-store/kill:v1"), &reference);
    assert_eq!(second.conversions(), 1);
    assert_blobs_verify(&store);
    let state = store_state(&store);
    assert!(
        state.missing.is_empty() && state.orphans.is_empty(),
        "{state:?}"
    );
}

#[test]
fn eviction_under_cache_max_bytes_takes_the_least_recent_image_which_converts_again() {
    let env = env();
    let (a, b) = ("store-evict-a", "store-evict-b");
    // Two layers of a MiB of noise each (gzip cannot shrink them); the bound holds one and a half.
    let max = 3 << 19;
    for (name, seed) in [(a, 1), (b, 2)] {
        publish_layer(
            &env,
            name,
            Layer::new().file("noise", 0o644, &noise(1 << 20, seed)),
        );
    }
    let view = View::with(
        &env.registry,
        &["--cache-max-bytes", &max.to_string()],
        "info",
    );
    let store = view.store();
    let pull = |name: &str| -> (String, String) {
        let (manifest, digest) = view.converted(name, "v1");
        let layer = manifest["layers"][0]["digest"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(view.blob(name, &layer, &[]).0, 200, "{name}");
        (digest, layer)
    };
    let (a_manifest, a_layer) = pull(a);
    // LRU order is modification time: B's blobs must be clearly newer than A's last read.
    std::thread::sleep(Duration::from_millis(100));
    let (_, b_layer) = pull(b);
    assert!(!blob_path(&store, &a_layer).exists(), "A's layer evicted");
    assert!(blob_path(&store, &b_layer).exists(), "B's layer kept");
    assert_eq!(view.conversions(), 2);
    // An image missing a blob is unknown by digest; by tag it converts again.
    let code = v2_code(
        view.manifest(a, &a_manifest, OCI_MANIFEST),
        404,
        "A by digest",
    );
    assert_eq!(code, "MANIFEST_UNKNOWN");
    let source = format!("{}/fixtures/{a}:v1", env.registry);
    let want = oracle(&source);
    let reference = view.reference(a, "v1");
    let layers = pull::pull_into_docker(&env, Client::Docker, &reference, "strata-store/evict:a");
    assert_eq!(layers, 1);
    assert_same(&want, &export_listing("strata-store/evict:a"), &reference);
    assert_eq!(view.conversions(), 3, "A converted again");
    assert!(
        !blob_path(&store, &b_layer).exists(),
        "B's layer the least recent now"
    );
    let bytes = store_bytes(&store);
    assert!(bytes <= max, "{bytes} bytes stored, bound {max}");
}

#[test]
fn a_stored_private_image_is_refused_to_callers_the_upstream_refuses() {
    let _env = env();
    let (user, password) = ("alice", "s3cret-Pa55word");
    let registry = Registry::htpasswd(&scratch("store-private-registry"), user, password);
    let image = Image::new(vec![(
        Layer::new().file("secret-file", 0o600, b"private"),
        common::fixtures::Comp::Gzip,
    )]);
    registry.push(&format!("{user}:{password}"), vec![image], "private/app:v1");
    let view = View::of(Server::start_logging(
        &registry.addr,
        &["--default-registry", &registry.addr],
        "info",
    ));
    let by = |r: &str| view.url(&format!("squash/private/app/manifests/{r}"));
    let accept = format!("Accept: {OCI_MANIFEST}");

    // docker login to the view checks nothing (the token carries the credentials); the pull does.
    let config = scratch("store-private-docker-config");
    pull::docker_login(&config, &view.host, user, password);
    let reference = format!("{}/squash/private/app:v1", view.host);
    run(docker()
        .env("DOCKER_CONFIG", &config)
        .args(["pull", "-q", &reference]));
    assert_eq!(pull::docker_layers(&reference), 1);
    let listing = export_listing(&reference);
    assert!(
        listing["secret-file"].starts_with("Regular 600 "),
        "{listing:?}"
    );
    assert_eq!(view.conversions(), 1);

    let basic = format!("{user}:{password}");
    let (status, headers, body) = curl(&["-u", &basic, "-H", &accept, &by("v1")]);
    assert_eq!(status, 200, "{headers}");
    let digest = sha(&body);
    let manifest = json_body(&body);
    let blobs: Vec<String> = [&manifest["config"], &manifest["layers"][0]]
        .iter()
        .map(|d| {
            view.url(&format!(
                "squash/private/app/blobs/{}",
                d["digest"].as_str().unwrap()
            ))
        })
        .collect();
    // Tokens of the view's own endpoint: anonymous, and for wrong credentials.
    let (anonymous_token, wrong_token) = (view.token(&[]), view.token(&["-u", "alice:wrong"]));
    let callers: [(&str, Vec<&str>); 5] = [
        ("no credentials", vec![]),
        ("a wrong password", vec!["-u", "alice:wrong"]),
        ("an unknown user", vec!["-u", "mallory:s3cret-Pa55word"]),
        ("an anonymous token", vec!["-H", &anonymous_token]),
        ("a token of a wrong password", vec!["-H", &wrong_token]),
    ];
    for (who, creds) in &callers {
        let mut urls = vec![by(&digest), by("v1")];
        urls.extend(blobs.iter().cloned());
        for url in urls {
            let what = format!("{who}: {url}");
            let got = curl(&[creds.as_slice(), &["-H", &accept, &url]].concat());
            assert!(
                header_value(&got.1, "www-authenticate").is_some(),
                "{what}: {}",
                got.1
            );
            assert_eq!(v2_code(got, 401, &what), "UNAUTHORIZED", "{what}");
        }
    }
    // docker without the login is refused too (the image removed first, so it must ask).
    run(docker().args(["rmi", &reference]));
    let out = docker()
        .env("DOCKER_CONFIG", scratch("store-private-no-login"))
        .args([
            "pull",
            &format!("{}/squash/private/app@{digest}", view.host),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "docker pulled without credentials");
    assert!(
        stderr.to_lowercase().contains("unauthorized"),
        "docker said: {stderr}"
    );
    // The right caller still gets everything, by digest too.
    assert_eq!(curl(&["-u", &basic, "-H", &accept, &by(&digest)]).0, 200);
    for url in &blobs {
        assert_eq!(curl(&["-u", &basic, url]).0, 200, "{url}");
    }
    assert_eq!(view.conversions(), 1);
}

#[test]
fn a_first_pull_past_manifest_wait_is_asked_to_retry_and_the_conversion_goes_on() {
    let env = env();
    let name = "store-wait";
    let hex = publish_layer(&env, name, Layer::new().file("slow", 0o644, b"slow layer"));
    let want = oracle(&format!("{}/fixtures/{name}:v1", env.registry));
    // The layer's first request (the pre-pass) takes 4 s: the conversion takes longer than that.
    let proxy = Proxy::start(&env.registry);
    proxy.rule(&hex, Fault::Stall(Duration::from_secs(4)), Some(1));
    let retried = "store-wait-ctr";
    let hex = publish_layer(&env, retried, Layer::new().file("ctr", 0o644, b"retried"));
    proxy.rule(&hex, Fault::Stall(Duration::from_secs(3)), Some(1));
    let view = View::of(Server::start_logging(
        &proxy.addr,
        &["--default-registry", &proxy.addr, "--manifest-wait", "1"],
        "info",
    ));
    let started = Instant::now();
    let (status, headers, body) = view.manifest(name, "v1", OCI_MANIFEST);
    let waited = started.elapsed();
    assert_eq!(status, 429, "{headers}{}", String::from_utf8_lossy(&body));
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    let retry: u64 = header(&headers, "retry-after").parse().unwrap();
    assert!(retry > 0, "{headers}");
    assert_eq!(json_body(&body)["errors"][0]["code"], "TOOMANYREQUESTS");
    let mut answers = vec![status];
    let manifest = loop {
        std::thread::sleep(Duration::from_millis(500));
        let (status, headers, body) = view.manifest(name, "v1", OCI_MANIFEST);
        answers.push(status);
        if status == 200 {
            break json_body(&body);
        }
        assert_eq!(status, 429, "{headers}");
        assert!(started.elapsed() < Duration::from_secs(30), "{answers:?}");
    };
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "the stall applied: {answers:?}"
    );
    assert!(view.await_log("stored conversion", 0, 5));
    let reference = view.reference(name, "v1");
    let layers = pull::pull_into_docker(&env, Client::Docker, &reference, "strata-store/wait:v1");
    assert_eq!(layers, 1);
    assert_same(&want, &export_listing("strata-store/wait:v1"), &reference);
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 1);
    assert_eq!(
        view.conversions(),
        1,
        "every poll joined one conversion: {answers:?}"
    );

    // containerd retries a 429 at once, five times: with a 1 s wait that outlasts a 3 s conversion.
    let reference = view.reference(retried, "v1");
    let layers =
        pull::pull_into_docker(&env, Client::Containerd, &reference, "strata-store/ctr:v1");
    assert_eq!(layers, 1);
    assert!(holds(
        &export_listing("strata-store/ctr:v1"),
        "ctr",
        b"retried"
    ));
    let asked = view.log_lines(&format!("{retried}/manifests/v1"));
    let refused = asked.iter().filter(|l| l.contains("status=429")).count();
    assert!(refused > 0, "ctr was answered: {asked:#?}");
    assert_eq!(view.conversions(), 2);
}
