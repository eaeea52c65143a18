//! `sha512:` digests (OCI image-spec `descriptor.md` registers them beside sha256): layer and config
//! blobs pushed to the real registry under sha512 digests, compared with what the real `docker pull`
//! gives; manifests and references by sha512 through an OCI image layout (distribution addresses
//! manifests by sha256 only).

mod common;

use common::fixtures::Layer;
use common::schema1::{gzip, layout_blob, push_blob, put_manifest, sha256, sha512};
use common::*;
use serde_json::{json, Value};

const SCHEMA2: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Two layers (the upper deletes and replaces) and a config, as blobs.
fn blobs() -> (Vec<Vec<u8>>, Vec<u8>) {
    let lower = Layer::new()
        .dir("etc", 0o755)
        .file("etc/gone", 0o644, b"deleted above")
        .file("kept", 0o640, b"kept")
        .tar_bytes();
    let upper = Layer::new()
        .whiteout("etc/gone")
        .file("new", 0o755, b"added above")
        .symlink("etc/link", "../kept")
        .tar_bytes();
    let config = json!({
        "created": "2025-01-02T03:04:05Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/new"], "Env": ["A=1"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(&lower), sha256(&upper)]},
        "history": [{"created_by": "lower"}, {"created_by": "upper"}],
    });
    (
        vec![gzip(&lower), gzip(&upper)],
        serde_json::to_vec(&config).unwrap(),
    )
}

/// The schema 2 manifest of [`blobs`] with every blob named by `digest`.
fn manifest_with(digest: fn(&[u8]) -> String) -> Vec<u8> {
    let (layers, config) = blobs();
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": SCHEMA2,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "size": config.len(), "digest": digest(&config)},
        "layers": layers.iter().map(|l| json!({
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "size": l.len(), "digest": digest(l)})).collect::<Vec<_>>(),
    }))
    .unwrap()
}

/// Pushes [`blobs`] under sha512 digests as `fixtures/sha512:<tag>`; returns the reference.
fn push_sha512(env: &Env, tag: &str) -> String {
    let (layers, config) = blobs();
    for blob in layers.iter().chain([&config]) {
        push_blob(&env.registry, "fixtures/sha512", blob, &sha512(blob));
    }
    put_manifest(
        &env.registry,
        "fixtures/sha512",
        tag,
        SCHEMA2,
        &manifest_with(sha512),
    );
    format!("{}/fixtures/sha512:{tag}", env.registry)
}

fn squash_into_docker(url: &str, tag: &str) -> Value {
    let file = scratch(&format!("sha512-out-{}", rand_suffix())).join("image.tar");
    download_to(&format!("{url}?tag={tag}"), &file);
    run(docker().arg("load").arg("-i").arg(&file));
    serde_json::from_slice(&run(docker().args(["image", "inspect", tag]))).unwrap()
}

#[test]
fn sha512_layers_and_config_match_docker_pull() {
    let env = env();
    let reference = push_sha512(&env, &format!("v{}", rand_suffix()));
    let want = oracle(&reference);
    let server = Server::start(&env.registry, &[]);
    let tag = "strata-test/sha512:squashed";
    let loaded = squash_into_docker(&format!("{}/squash/{reference}", server.url), tag);
    assert_same(&want, &export_listing(tag), &reference);
    let original: Value =
        serde_json::from_slice(&run(docker().args(["image", "inspect", &reference]))).unwrap();
    assert_eq!(loaded[0]["Config"], original[0]["Config"]);
}

/// An OCI layout whose blobs and manifest live under `blobs/sha512/`: by tag, by `@sha512:` digest,
/// and refusals for a digest it does not hold, a blob that is not what its name says, and a
/// malformed sha512 reference.
#[test]
fn sha512_manifests_and_references_in_an_oci_layout() {
    let env = env();
    let twin = push_sha512(&env, &format!("twin{}", rand_suffix()));
    let want = oracle(&twin);
    let dir = scratch("sha512-layout");
    let (layers, config) = blobs();
    for blob in layers.iter().chain([&config]) {
        layout_blob(&dir, blob, sha512);
    }
    let manifest = manifest_with(sha512);
    let digest = layout_blob(&dir, &manifest, sha512);
    let liar = format!("sha512:{}", "0".repeat(128));
    std::fs::write(dir.join("blobs/sha512").join(&liar[7..]), &manifest).unwrap();
    let descriptor = |d: &str, name: &str| {
        json!({"mediaType": SCHEMA2, "digest": d, "size": manifest.len(),
               "annotations": {"org.opencontainers.image.ref.name": name}})
    };
    std::fs::write(
        dir.join("index.json"),
        json!({"schemaVersion": 2, "manifests": [descriptor(&digest, "v1"), descriptor(&liar, "liar")]})
            .to_string(),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let server = Server::start("127.0.0.1:1", &["--oci-layout", dir.to_str().unwrap()]);
    for (reference, tag) in [
        ("img:v1".to_string(), "strata-test/sha512-layout:tag"),
        (format!("img@{digest}"), "strata-test/sha512-layout:digest"),
    ] {
        squash_into_docker(&format!("{}/squash/{reference}", server.url), tag);
        assert_same(&want, &export_listing(tag), &reference);
    }
    let missing = format!("sha512:{}", "1".repeat(128));
    json_error(&format!("{}/squash/img@{missing}", server.url), 404);
    let v = json_error(&format!("{}/squash/img:liar", server.url), 502);
    assert!(
        v["error"]["message"].as_str().unwrap().contains(&digest),
        "names what the blob holds: {v}"
    );
    let v = json_error(
        &format!("{}/squash/img@sha512:{}", server.url, "a".repeat(64)),
        400,
    );
    assert_eq!(v["error"]["code"], "BAD_REQUEST", "{v}");
}
