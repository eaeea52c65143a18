//! strata as a registry of its converted images (issue 9): `/v2/squash/<name>` pulled by the real
//! clients (docker, podman, skopeo, containerd) and compared with `docker pull` of the source, and the
//! read side of the distribution API as those clients and curl see it.

mod common;

use std::io::Read;
use std::time::Duration;

use common::fixtures::sha;
use common::images;
use common::proxy::{Fault, Proxy};
use common::pull::{self, Client};
use common::view::*;
use common::*;
use serde_json::{json, Value};

/// The image config of a manifest the test registry serves (the source of a conversion).
fn source_config(registry: &str, repo: &str) -> Value {
    let (status, _, body) = curl(&[
        "-H",
        &format!("Accept: {OCI_MANIFEST}"),
        &format!("http://{registry}/v2/{repo}/manifests/v1"),
    ]);
    assert_eq!(status, 200);
    let digest = json_body(&body)["config"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _, body) = curl(&[&format!("http://{registry}/v2/{repo}/blobs/{digest}")]);
    assert_eq!(status, 200);
    json_body(&body)
}

/// Pulls the conversion of `fixtures/<name>:v1` with `client` and checks it against `docker pull` of
/// the source: one layer, the same file system.
fn check_client(client: Client, name: &str, image: Vec<common::fixtures::Image>) {
    let env = env();
    let source = publish(&env, name, image);
    let want = oracle(&source);
    let view = View::start(&env.registry);
    let reference = view.reference(name, "v1");
    let local = format!("strata-view/{name}:{client:?}").to_lowercase();
    let layers = pull::pull_into_docker(&env, client, &reference, &local);
    assert_eq!(layers, 1, "{client:?} pulled {reference}");
    assert_eq!(pull::docker_layers(&local), 1, "{client:?}: docker loaded");
    assert_same(&want, &export_listing(&local), &reference);
}

#[test]
fn docker_pull_is_one_layer_with_the_source_file_system() {
    check_client(Client::Docker, "view-docker", images::whiteouts());
    // The config is the source's, but for the layers: what `docker run` does is unchanged.
    let inspect = |image: &str| -> Value {
        serde_json::from_slice(&run(docker().args(["image", "inspect", image]))).unwrap()
    };
    let env = env();
    let got = inspect("strata-view/view-docker:docker");
    let want = inspect(&format!("{}/fixtures/view-docker:v1", env.registry));
    assert_eq!(got[0]["Config"], want[0]["Config"]);
    assert_eq!(got[0]["Architecture"], want[0]["Architecture"]);
    assert_eq!(got[0]["Os"], want[0]["Os"]);
}

#[test]
fn podman_pull_is_one_layer_with_the_source_file_system() {
    check_client(Client::Podman, "view-podman", images::hardlinks());
}

#[test]
fn skopeo_copy_is_one_layer_with_the_source_file_system() {
    check_client(Client::Skopeo, "view-skopeo", images::special());
}

#[test]
fn containerd_pull_is_one_layer_with_the_source_file_system() {
    check_client(Client::Containerd, "view-ctr", images::whiteouts());
}

#[test]
fn docker_pulls_by_the_digest_a_head_announces() {
    let env = env();
    let name = "view-digest";
    let want = oracle(&publish(&env, name, images::basic()));
    let view = View::start(&env.registry);
    let (status, headers, _) = curl(&[
        "-I",
        "-H",
        &format!("Accept: {OCI_MANIFEST}"),
        &view.url(&format!("squash/fixtures/{name}/manifests/v1")),
    ]);
    assert_eq!(status, 200, "{headers}");
    let digest = header(&headers, "docker-content-digest");
    let reference = format!("{}/squash/fixtures/{name}@{digest}", view.host);
    // docker checks the manifest it gets against the digest it asked for.
    let layers = pull::pull_into_docker(&env, Client::Docker, &reference, "strata-view/digest:v1");
    assert_eq!(layers, 1);
    assert_same(&want, &export_listing("strata-view/digest:v1"), &reference);
}

/// What a converted image's manifest must be for `accept`: consistent headers on HEAD and GET (exact
/// length, the body's digest), one gzip layer and a config with one diff_id, in that format's media
/// types. Returns the manifest and its digest.
fn check_manifest(view: &View, name: &str, accept: &str) -> (Value, String) {
    let (layer_type, config_type) = match accept {
        OCI_MANIFEST => (
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.config.v1+json",
        ),
        _ => (
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "application/vnd.docker.container.image.v1+json",
        ),
    };
    let url = view.url(&format!("squash/fixtures/{name}/manifests/v1"));
    let accept_header = format!("Accept: {accept}");
    // curl -I reads no body (and writes the headers where the body would go).
    let (status, head, _) = curl(&["-I", "-H", &accept_header, &url]);
    assert_eq!(status, 200, "HEAD {url}: {head}");
    let (status, get, body) = view.manifest(name, "v1", accept);
    assert_eq!(status, 200, "GET {url}: {}", String::from_utf8_lossy(&body));
    for headers in [&head, &get] {
        assert_eq!(header(headers, "content-type"), accept, "{headers}");
        assert_eq!(header(headers, "docker-content-digest"), sha(&body));
        assert_eq!(header(headers, "content-length"), body.len().to_string());
    }
    let manifest = json_body(&body);
    assert_eq!(manifest["schemaVersion"], 2, "{manifest}");
    if accept == DOCKER_MANIFEST || manifest.get("mediaType").is_some() {
        assert_eq!(manifest["mediaType"], accept, "{manifest}");
    }
    assert_eq!(manifest["config"]["mediaType"], config_type, "{manifest}");
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest}");
    assert_eq!(layers[0]["mediaType"], layer_type, "{manifest}");
    (manifest, sha(&body))
}

/// Fetches a descriptor's blob from the view and checks its size and digest; returns the bytes.
fn fetch_blob(view: &View, name: &str, desc: &Value) -> Vec<u8> {
    let digest = desc["digest"].as_str().unwrap();
    let (status, headers, body) = view.blob(name, digest, &[]);
    assert_eq!(status, 200, "{digest}: {headers}");
    assert_eq!(sha(&body), digest);
    assert_eq!(body.len() as u64, desc["size"].as_u64().unwrap(), "{desc}");
    assert_eq!(header(&headers, "content-length"), body.len().to_string());
    body
}

#[test]
fn manifests_carry_exact_headers_and_one_layer_in_both_formats() {
    let env = env();
    let name = "view-manifest";
    publish(&env, name, images::hardlinks());
    let view = View::start(&env.registry);
    let source = source_config(&env.registry, &format!("fixtures/{name}"));
    for accept in [OCI_MANIFEST, DOCKER_MANIFEST] {
        let (manifest, _) = check_manifest(&view, name, accept);
        let layer = fetch_blob(&view, name, &manifest["layers"][0]);
        assert_eq!(&layer[..2], &[0x1f, 0x8b], "{accept}: a gzip layer");
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&layer[..])
            .read_to_end(&mut tar)
            .unwrap();
        let config = json_body(&fetch_blob(&view, name, &manifest["config"]));
        assert_eq!(config["rootfs"]["diff_ids"], json!([sha(&tar)]), "{accept}");
        for field in ["config", "architecture", "os"] {
            assert_eq!(config[field], source[field], "{accept}: {field}");
        }
    }
}

#[test]
fn blobs_answer_head_and_ranges() {
    let env = env();
    let name = "view-range";
    publish(&env, name, images::basic());
    let view = View::start(&env.registry);
    let (manifest, _) = check_manifest(&view, name, OCI_MANIFEST);
    let desc = &manifest["layers"][0];
    let digest = desc["digest"].as_str().unwrap();
    let full = fetch_blob(&view, name, desc);
    let size = full.len();
    assert!(size > 30, "{size}");

    let (status, headers, _) = view.blob(name, digest, &["-I"]);
    assert_eq!(status, 200, "{headers}");
    assert_eq!(header(&headers, "content-length"), size.to_string());
    assert_eq!(header(&headers, "docker-content-digest"), digest);

    for (range, from, to) in [("0-9", 0, 9), ("5-20", 5, 20), ("10-", 10, size - 1)] {
        let (status, headers, body) =
            view.blob(name, digest, &["-H", &format!("Range: bytes={range}")]);
        assert_eq!(status, 206, "bytes={range}: {headers}");
        assert_eq!(
            header(&headers, "content-range"),
            format!("bytes {from}-{to}/{size}")
        );
        assert_eq!(
            header(&headers, "content-length"),
            (to + 1 - from).to_string()
        );
        assert_eq!(body, &full[from..=to], "bytes={range}");
    }
}

#[test]
fn ping_answers_as_a_registry() {
    let env = env();
    let view = View::start(&env.registry);
    // Anonymous: the token challenge that makes every client fetch a token (with its credentials
    // if it has any), as Docker Hub does; a Basic challenge would fail anonymous docker pulls.
    let (status, headers, body) = curl(&[&view.url("")]);
    assert_eq!(status, 401, "{headers}");
    assert_eq!(json_body(&body)["errors"][0]["code"], "UNAUTHORIZED");
    assert_eq!(
        header(&headers, "docker-distribution-api-version"),
        "registry/2.0"
    );
    let challenge = header(&headers, "www-authenticate");
    let realm = challenge
        .strip_prefix("Bearer realm=\"")
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("not a bearer challenge: {challenge}"));
    assert!(challenge.contains("service=\"strata\""), "{challenge}");
    // An anonymous token, then the ping with it.
    let (status, _, body) = curl(&[&format!(
        "{realm}?service=strata&scope=repository:squash/x:pull"
    )]);
    assert_eq!(status, 200);
    let token = json_body(&body)["token"].as_str().unwrap().to_string();
    let bearer = format!("Authorization: Bearer {token}");
    let (status, headers, body) = curl(&["-H", &bearer, &view.url("")]);
    assert_eq!(status, 200, "{headers}");
    assert_eq!(json_body(&body), json!({}));
    assert_eq!(
        header(&headers, "docker-distribution-api-version"),
        "registry/2.0"
    );
    // A token this service did not issue is refused.
    let (status, _, _) = curl(&["-H", "Authorization: Bearer forged", &view.url("")]);
    assert_eq!(status, 401);
}

#[test]
fn tags_list_is_the_upstream_tags_paginated() {
    let env = env();
    let name = "view-tags";
    publish(&env, name, images::basic());
    for tag in ["v2", "v3"] {
        retag(&env, name, tag);
    }
    let view = View::start(&env.registry);
    let list = |query: &str| -> Value {
        let url = view.url(&format!("squash/fixtures/{name}/tags/list{query}"));
        let (status, headers, body) = curl(&[&url]);
        assert_eq!(status, 200, "{url}: {headers}");
        let v = json_body(&body);
        assert_eq!(v["name"], format!("squash/fixtures/{name}"), "{v}");
        v["tags"].clone()
    };
    assert_eq!(list(""), json!(["v1", "v2", "v3"]));
    assert_eq!(list("?n=1"), json!(["v1"]));
    assert_eq!(list("?n=1&last=v1"), json!(["v2"]));
    assert_eq!(list("?n=5&last=v1"), json!(["v2", "v3"]));
}

#[test]
fn catalog_lists_the_repositories_converted() {
    let env = env();
    let name = "view-catalog";
    publish(&env, name, images::basic());
    let view = View::start(&env.registry);
    let catalog = || -> Value {
        let (status, headers, body) = curl(&[&view.url("_catalog")]);
        assert_eq!(status, 200, "{headers}");
        json_body(&body)["repositories"].clone()
    };
    assert_eq!(catalog(), json!([]), "a new store holds nothing");
    let (status, _, body) = view.manifest(name, "v1", OCI_MANIFEST);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(catalog(), json!([format!("squash/fixtures/{name}")]));
}

/// An error in the distribution spec's shape, which docker and podman print; returns its code.
fn error_code(url: &str, status: u16) -> String {
    let (got, headers, body) = curl(&["-H", &format!("Accept: {OCI_MANIFEST}"), url]);
    assert_eq!(got, status, "{url}: {}", String::from_utf8_lossy(&body));
    assert!(
        header(&headers, "content-type").starts_with("application/json"),
        "{headers}"
    );
    let v = json_body(&body);
    let error = &v["errors"][0];
    assert!(error["message"].is_string(), "{url}: {v}");
    error["code"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_string()
}

#[test]
fn unknown_tags_repositories_and_blobs_are_spec_errors() {
    let env = env();
    let name = "view-errors";
    publish(&env, name, images::basic());
    let view = View::start(&env.registry);
    let repo = format!("squash/fixtures/{name}");
    assert_eq!(
        error_code(&view.url(&format!("{repo}/manifests/nope")), 404),
        "MANIFEST_UNKNOWN"
    );
    let missing = "squash/fixtures/view-no-such-repository";
    assert_eq!(
        error_code(&view.url(&format!("{missing}/tags/list")), 404),
        "NAME_UNKNOWN"
    );
    // The registry itself answers MANIFEST_UNKNOWN for a manifest of a repository it does not hold.
    let code = error_code(&view.url(&format!("{missing}/manifests/v1")), 404);
    assert!(
        code == "NAME_UNKNOWN" || code == "MANIFEST_UNKNOWN",
        "{code}"
    );
    let zeros = format!("sha256:{}", "0".repeat(64));
    assert_eq!(
        error_code(&view.url(&format!("{repo}/blobs/{zeros}")), 404),
        "BLOB_UNKNOWN"
    );
    // The source's own layer is upstream, not in the store: the view serves converted blobs only.
    let source_layer = &layer_digests(&env.registry, &format!("fixtures/{name}"), "v1")[0];
    assert_eq!(
        error_code(&view.url(&format!("{repo}/blobs/{source_layer}")), 404),
        "BLOB_UNKNOWN"
    );

    let out = docker()
        .args(["pull", &view.reference(name, "nope")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("manifest unknown"), "docker said: {stderr}");
}

#[test]
fn a_restart_serves_the_store_without_fetching_blobs_again() {
    let env = env();
    let name = "view-restart";
    publish(&env, name, images::whiteouts());
    // strata reaches the registry through a proxy that records what it fetched.
    let proxy = Proxy::start(&env.registry);
    let cache = scratch("view-restart-cache");
    let extra = ["--default-registry", proxy.addr.as_str()];
    let mut first = View::of(Server::start_with_cache(
        &proxy.addr,
        &cache,
        &extra,
        "info",
    ));
    let reference = first.reference(name, "v1");
    let layers = pull::pull_into_docker(&env, Client::Docker, &reference, "strata-view/restart:v1");
    assert_eq!(layers, 1);
    let (status, _, body) = first.manifest(name, "v1", OCI_MANIFEST);
    assert_eq!(status, 200);
    let digest = sha(&body);
    first.server.terminate();
    assert!(first.server.wait_exit(Duration::from_secs(30)).is_some());
    drop(first);

    let fetched = proxy.requests("/blobs/").len();
    assert!(fetched > 0, "the first conversion read the source's blobs");
    let second = View::of(Server::start_with_cache(
        &proxy.addr,
        &cache,
        &extra,
        "info",
    ));
    let (status, headers, stored) = second.manifest(name, &digest, OCI_MANIFEST);
    assert_eq!(status, 200, "{headers}");
    assert_eq!(stored, body, "the manifest by digest, as stored");
    let manifest = json_body(&stored);
    fetch_blob(&second, name, &manifest["layers"][0]);
    fetch_blob(&second, name, &manifest["config"]);
    let since = |fetched: usize| -> Vec<String> {
        let blobs = proxy.requests("/blobs/");
        blobs[fetched..].iter().map(|r| r.path.clone()).collect()
    };
    assert_eq!(since(fetched), Vec::<String>::new(), "by digest");
    // By tag, the tag is resolved upstream again, to the same source manifest: that names the
    // conversion stored, so no source blob (layer or config) is needed.
    let (status, _, by_tag) = second.manifest(name, "v1", OCI_MANIFEST);
    assert_eq!(status, 200);
    assert_eq!(by_tag, body);
    assert_eq!(second.conversions(), 0, "a restart converts nothing again");
    assert_eq!(since(fetched), Vec::<String>::new(), "by tag");
}

#[test]
fn concurrent_first_pulls_share_one_conversion() {
    let env = env();
    let name = "view-flight";
    publish(&env, name, images::hardlinks());
    // Every source blob takes a second to come, so the conversion is still running when all eight
    // requests have arrived: without single flight each would convert.
    let proxy = Proxy::start(&env.registry);
    proxy.rule("/blobs/", Fault::Stall(Duration::from_secs(1)), None);
    let view = View::of(Server::start_logging(
        &proxy.addr,
        &["--default-registry", &proxy.addr],
        "info",
    ));
    let bodies: Vec<(u16, Vec<u8>)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let (status, _, body) = view.manifest(name, "v1", OCI_MANIFEST);
                    (status, body)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    for (status, body) in &bodies {
        assert_eq!(*status, 200, "{}", String::from_utf8_lossy(body));
        assert_eq!(body, &bodies[0].1, "every pull gets the same manifest");
    }
    // The log is read by another thread: give it a moment to catch up with the responses.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while view.conversions() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(view.conversions(), 1, "{}", view.server.log.lock().unwrap());
}
