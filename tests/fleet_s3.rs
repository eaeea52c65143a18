//! Replicas sharing one store on object storage (the moto server `scripts/test.sh` starts), issue
//! 10: concurrent requests over two `strata serve` processes on one bucket prefix make one
//! conversion, the other replica serves it without reading the source's blobs, a replica killed
//! mid-conversion is taken over once its lease expires, and `--blob-redirect` sends layer bytes
//! from the bucket, none through strata. The tarball routes share the lease: concurrent squash
//! requests over both make one conversion too. A GC sweep on one replica never deletes a blob the
//! other is reusing.

mod common;

use std::time::{Duration, Instant};

use common::fixtures::sha;
use common::images;
use common::proxy::{Fault, Proxy};
use common::pull::{self, Client};
use common::view::*;
use common::*;

/// Requests spread over the two replicas at once.
const CONCURRENT: usize = 16;

fn bucket_prefix(what: &str) -> String {
    let base =
        std::env::var("STRATA_TEST_S3").expect("STRATA_TEST_S3 is unset: run scripts/test.sh");
    format!("{base}/{what}-{}-{}", std::process::id(), rand_suffix())
}

fn replica(proxy: &Proxy, store: &str, more: &[&str]) -> View {
    let args = [
        &["--default-registry", proxy.addr.as_str(), "--store", store][..],
        more,
    ]
    .concat();
    View::of(Server::start_logging(&proxy.addr, &args, "info"))
}

/// The upstream blob requests so far, by path.
fn blob_fetches(proxy: &Proxy) -> Vec<String> {
    proxy
        .settled_requests("/blobs/")
        .into_iter()
        .map(|r| r.path)
        .collect()
}

#[test]
fn concurrent_requests_over_two_replicas_make_one_conversion_the_other_serves_it() {
    let env = env();
    let name = "fleet-one";
    let source = publish(&env, name, images::whiteouts());
    let want = oracle(&source);
    let store = bucket_prefix("fleet-one");
    let proxy = Proxy::start(&env.registry);
    // The conversion's first source read is slowed, so every request arrives while it runs.
    proxy.rule("/blobs/", Fault::Stall(Duration::from_secs(1)), Some(1));
    let replicas = [replica(&proxy, &store, &[]), replica(&proxy, &store, &[])];

    let digests: Vec<String> = std::thread::scope(|s| {
        let asks: Vec<_> = (0..CONCURRENT)
            .map(|i| {
                let view = &replicas[i % 2];
                s.spawn(move || view.converted(name, "v1").1)
            })
            .collect();
        asks.into_iter().map(|a| a.join().unwrap()).collect()
    });
    assert!(
        digests.iter().all(|d| *d == digests[0]),
        "replicas served different manifests: {digests:?}"
    );
    let made: Vec<usize> = replicas.iter().map(View::conversions).collect();
    assert_eq!(
        made.iter().sum::<usize>(),
        1,
        "conversions per replica: {made:?}"
    );
    let idle = made.iter().position(|&n| n == 0).unwrap();
    // Single flight inside each process, the lease across them: the idle replica's one flight
    // found the lease held and waited.
    assert_eq!(
        replicas[idle].logged("waiting for its result"),
        1,
        "{}",
        replicas[idle].server.log.lock().unwrap()
    );
    assert_eq!(
        replicas[idle].logged("served another replica's conversion"),
        1
    );
    // One conversion's reads: a first conversion reads each layer twice (the sizing pre-pass, then
    // the merge), so a second conversion would make it four.
    let fetched = blob_fetches(&proxy);
    let layers = layer_digests(&env.registry, &format!("fixtures/{name}"), "v1");
    for layer in &layers {
        let n = fetched
            .iter()
            .filter(|p| p.ends_with(layer.as_str()))
            .count();
        assert!(
            (1..=2).contains(&n),
            "{layer} fetched {n} times: {fetched:?}"
        );
    }
    let converter = &replicas[1 - idle];
    println!(
        "{CONCURRENT} requests over two replicas: {} conversion(s), {} upstream blob fetches for {} layers, lease waits {}",
        made.iter().sum::<usize>(),
        fetched.len(),
        layers.len(),
        replicas[idle].logged("waiting for its result")
    );

    // The idle replica serves a docker pull from the bucket, reading nothing upstream.
    let reference = replicas[idle].reference(name, "v1");
    let local = "strata-fleet/fleet-one:pulled";
    assert_eq!(
        pull::pull_into_docker(&env, Client::Docker, &reference, local),
        1
    );
    assert_same(&want, &export_listing(local), &reference);
    assert_eq!(
        blob_fetches(&proxy),
        fetched,
        "source blobs read after the conversion"
    );
    assert_eq!(converter.conversions() + replicas[idle].conversions(), 1);
    run(docker().args(["rmi", "-f", local, reference.as_str()]));
}

/// The tarball routes under the same lease: concurrent `/squash` GETs of a new image over both
/// replicas make one conversion, and every other request waits for it and is served the stored
/// bytes (its validator included).
#[test]
fn concurrent_squash_requests_over_two_replicas_make_one_conversion() {
    let env = env();
    let name = "fleet-squash";
    let source = publish(&env, name, images::whiteouts());
    let want = oracle(&source);
    let store = bucket_prefix(name);
    let proxy = Proxy::start(&env.registry);
    let layers = layer_digests(&env.registry, &format!("fixtures/{name}"), "v1");
    // The converting request's first read of the top layer (its summary, before the first byte)
    // is held, so every other request arrives while that conversion runs.
    let top = layers.last().unwrap().clone();
    proxy.rule(&top, Fault::Stall(Duration::from_secs(2)), Some(1));
    let replicas = [replica(&proxy, &store, &[]), replica(&proxy, &store, &[])];
    let tag = "strata-fleet/fleet-squash:loaded";
    let path = format!("squash/fixtures/{name}:v1?tag={tag}");

    let answers: Vec<(u16, String, Vec<u8>)> = std::thread::scope(|s| {
        let asks: Vec<_> = (0..CONCURRENT)
            .map(|i| {
                let url = format!("{}/{path}", replicas[i % 2].server.url);
                s.spawn(move || curl(&[&url]))
            })
            .collect();
        asks.into_iter().map(|a| a.join().unwrap()).collect()
    });
    for (status, headers, _) in &answers {
        assert_eq!(*status, 200, "{headers}");
    }
    let body = &answers[0].2;
    let etag = header(&answers[0].1, "etag");
    for (_, headers, other) in &answers {
        assert!(
            other == body,
            "bodies differ ({} vs {} bytes)",
            other.len(),
            body.len()
        );
        assert_eq!(header(headers, "etag"), etag);
    }
    let stored: Vec<usize> = replicas
        .iter()
        .map(|r| r.logged("strata::convert::tee: stored tarball"))
        .collect();
    assert_eq!(
        stored.iter().sum::<usize>(),
        1,
        "tarballs stored per replica: {stored:?}"
    );
    let converter = stored.iter().position(|&n| n == 1).unwrap();
    let (here, there) = (
        replicas[converter].logged("another request here is converting; waiting for its result"),
        replicas[1 - converter].logged("another replica is converting; waiting for its result"),
    );
    let served: usize = replicas
        .iter()
        .map(|r| r.logged("served another replica's conversion"))
        .sum();
    assert_eq!(
        (here, there, served),
        (CONCURRENT / 2 - 1, CONCURRENT / 2, CONCURRENT - 1),
        "waits on the converting replica, on the other, requests served the stored bytes"
    );
    // One conversion's reads: each layer read by the sizing pass (the top layer's summary, or the
    // ends of a lower one's blob, which the proxy does not count) and by the merge.
    let fetched = blob_fetches(&proxy);
    for layer in &layers {
        let n = fetched
            .iter()
            .filter(|p| p.ends_with(layer.as_str()))
            .count();
        assert!(
            (1..=2).contains(&n),
            "{layer} fetched {n} times: {fetched:?}"
        );
    }
    let layer_fetches = fetched
        .iter()
        .filter(|p| layers.iter().any(|l| p.ends_with(l.as_str())))
        .count();
    println!(
        "{CONCURRENT} squash requests over two replicas: {} conversion(s), {layer_fetches} layer blob fetches for {} layers ({} blob fetches with each request's config), waits {here} here + {there} on the other replica",
        stored.iter().sum::<usize>(),
        layers.len(),
        fetched.len(),
    );

    let file = scratch("fleet-squash").join("image.tar");
    std::fs::write(&file, body).unwrap();
    let out = run(docker().arg("load").arg("-i").arg(&file));
    assert!(
        String::from_utf8_lossy(&out).contains(tag),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_same(&want, &export_listing(tag), tag);
    run(docker().args(["rmi", "-f", tag]));
}

#[test]
fn a_replica_killed_mid_conversion_is_taken_over_after_its_lease_expires() {
    let env = env();
    let name = "fleet-kill";
    let source = publish(&env, name, images::whiteouts());
    let want = oracle(&source);
    let store = bucket_prefix("fleet-kill");
    let proxy = Proxy::start(&env.registry);
    // The first source blob read stalls: the first replica converts until it is killed.
    proxy.rule("/blobs/", Fault::Stall(Duration::from_secs(60)), Some(1));
    let ttl = 1.5;
    let ttl_arg = ttl.to_string();
    let mut first = replica(&proxy, &store, &["--lease-ttl", &ttl_arg]);
    let second = replica(&proxy, &store, &["--lease-ttl", &ttl_arg]);

    let url = first.url(&format!("squash/fixtures/{name}/manifests/v1"));
    let hanging =
        std::thread::spawn(move || curl(&["-H", &format!("Accept: {OCI_MANIFEST}"), &url]));
    let deadline = Instant::now() + Duration::from_secs(20);
    while proxy.requests("/blobs/").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the first replica never read a blob"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let asked = Instant::now();
    let waiting = {
        let url = second.url(&format!("squash/fixtures/{name}/manifests/v1"));
        std::thread::spawn(move || curl(&["-H", &format!("Accept: {OCI_MANIFEST}"), &url]))
    };
    assert!(
        second.await_log("waiting for its result", 0, 10),
        "the second replica converted beside the first: {}",
        second.server.log.lock().unwrap()
    );
    // Two TTLs of the first replica alive and stalled: its renewals keep the second waiting.
    std::thread::sleep(Duration::from_secs_f64(ttl * 2.0));
    assert_eq!(
        second.logged("not renewed"),
        0,
        "taken over from a live replica"
    );
    assert_eq!(second.conversions(), 0);
    first.server.kill_hard();
    let killed = Instant::now();
    let (status, headers, body) = waiting.join().unwrap();
    assert_eq!(status, 200, "{headers}{}", String::from_utf8_lossy(&body));
    let takeover = killed.elapsed();
    assert_eq!(
        second.logged("not renewed"),
        1,
        "{}",
        second.server.log.lock().unwrap()
    );
    assert_eq!(second.conversions(), 1);
    assert_eq!(hanging.join().unwrap().0, 0, "the killed replica answered");
    println!(
        "takeover: the second replica's manifest {takeover:?} after the kill (lease TTL {ttl} s), {:?} after it asked",
        asked.elapsed()
    );
    // At most a TTL after its last renewal, plus a poll and the conversion itself.
    assert!(
        takeover < Duration::from_secs_f64(ttl + 8.0),
        "{takeover:?}"
    );

    let reference = second.reference(name, "v1");
    let local = "strata-fleet/fleet-kill:pulled";
    assert_eq!(
        pull::pull_into_docker(&env, Client::Docker, &reference, local),
        1
    );
    assert_same(&want, &export_listing(local), &reference);
    run(docker().args(["rmi", "-f", local, reference.as_str()]));
}

/// GC on one replica while the other reuses the very blobs it is sweeping. The sweeping replica
/// holds (a test hook, `STRATA_TEST_SWEEP_HOLD`) between its last look at the blobs a DELETE left
/// unreferenced and its delete of them, and the other converts the same image again then: its
/// writer finds those blobs stored. Without the use and doom marks (src/store/inuse.rs) it would
/// reuse them and link a manifest whose blobs the sweep then deletes; with them it waits for the
/// sweep and writes them anew.
#[test]
fn a_sweep_on_one_replica_never_deletes_what_the_other_reuses() {
    let env = env();
    let name = "fleet-gc";
    publish(&env, name, images::whiteouts());
    let store = bucket_prefix(name);
    let proxy = Proxy::start(&env.registry);
    let hold = scratch("fleet-gc").join("hold");
    let sweeper = View::of(Server::start_with_env(
        &proxy.addr,
        &scratch(&format!("cache-{}", rand_suffix())),
        &[
            "--default-registry",
            &proxy.addr,
            "--store",
            &store,
            "--enable-delete",
            "--gc-grace",
            "0",
        ],
        "info",
        &[("STRATA_TEST_SWEEP_HOLD", hold.to_str().unwrap())],
    ));
    let user = replica(&proxy, &store, &[]);
    let (_, digest) = user.converted(name, "v1");
    // Older than GC's one-second slack, on the store's whole-second clock.
    std::thread::sleep(Duration::from_millis(2500));

    std::fs::write(&hold, b"").unwrap();
    assert_eq!(sweeper.delete(name, &digest), 202);
    assert!(
        sweeper.await_log("sweep held before a delete", 0, 10),
        "the sweep deleted nothing: {}",
        sweeper.server.log.lock().unwrap()
    );
    let again = std::thread::spawn({
        let url = user.url(&format!("squash/fixtures/{name}/manifests/v1"));
        move || curl(&["-H", &format!("Accept: {OCI_MANIFEST}"), &url])
    });
    let waited = user.await_log("blob doomed by a sweep in progress; waiting for it", 0, 5);
    std::fs::remove_file(&hold).unwrap();
    let (status, headers, body) = again.join().unwrap();
    assert_eq!(status, 200, "{headers}");
    assert_eq!(sha(&body), digest, "another manifest");
    assert_eq!(user.conversions(), 2);
    assert!(
        sweeper.await_log("garbage collection", 0, 10)
            && sweeper.gc_removals().iter().any(|&n| n > 0),
        "the sweep removed nothing: {:?}",
        sweeper.gc_removals()
    );
    // Every blob the manifest names is stored, from either replica.
    let manifest = json_body(&body);
    let named = std::iter::once(&manifest["config"])
        .chain(manifest["layers"].as_array().unwrap())
        .map(|d| d["digest"].as_str().unwrap().to_string());
    for blob in named {
        for view in [&user, &sweeper] {
            let (status, headers, bytes) = view.blob(name, &blob, &[]);
            assert_eq!(status, 200, "{blob}: {headers}");
            assert_eq!(sha(&bytes), blob);
        }
    }
    assert!(
        waited,
        "the second conversion did not wait for the sweep: {}",
        user.server.log.lock().unwrap()
    );
}

#[test]
fn blob_redirect_sends_layer_bytes_from_the_bucket_not_through_strata() {
    let env = env();
    let name = "fleet-redirect";
    let source = publish(&env, name, images::whiteouts());
    let want = oracle(&source);
    let store = bucket_prefix("fleet-redirect");
    let upstream = Proxy::start(&env.registry);
    let view = replica(&upstream, &store, &["--blob-redirect"]);
    // Clients reach strata through a proxy that counts the bytes strata sends them.
    let front = Proxy::start(&view.host);
    let reference = format!("{}/squash/fixtures/{name}:v1", front.addr);
    let local = "strata-fleet/fleet-redirect:pulled";
    assert_eq!(
        pull::pull_into_docker(&env, Client::Docker, &reference, local),
        1
    );
    assert_same(&want, &export_listing(local), &reference);
    let blobs = front.settled_requests("/blobs/");
    // The config at least: docker skips a layer it already holds from another test's pull of
    // the same converted image.
    assert!(
        !blobs.is_empty(),
        "docker fetched no blob through strata: {blobs:?}"
    );
    for r in &blobs {
        assert_eq!(r.body_bytes, 0, "strata sent blob bytes: {r:?}");
    }

    // What docker was sent: a 307 to a presigned URL on the object store, which serves the bytes.
    let (manifest, _) = view.converted(name, "v1");
    let layer = &manifest["layers"][0];
    let digest = layer["digest"].as_str().unwrap();
    let (status, headers, body) = view.blob(name, digest, &[]);
    assert_eq!(status, 307, "{headers}");
    assert!(body.is_empty());
    let location = header(&headers, "location");
    let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap();
    assert!(
        location.starts_with(&endpoint) && location.contains("X-Amz-Signature="),
        "{location}"
    );
    let (status, _, bytes) = curl(&[&location]);
    assert_eq!(status, 200);
    assert_eq!(sha(&bytes), digest);
    assert_eq!(bytes.len() as u64, layer["size"].as_u64().unwrap());
    // HEAD is answered here (size and digest, no bytes), and without the flag GET streams.
    let (status, headers, _) = view.blob(name, digest, &["-I"]);
    assert_eq!(status, 200, "{headers}");
    run(docker().args(["rmi", "-f", local, reference.as_str()]));

    // A directory store has nothing to redirect to: refused at start-up.
    let out = strata()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--blob-redirect",
            "--store",
        ])
        .arg(scratch("redirect-dir"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--blob-redirect needs --store s3://"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
