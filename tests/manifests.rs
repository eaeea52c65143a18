//! Bad manifests and configs, served from a hand-written OCI image layout (`--oci-layout`): each is a
//! JSON 502 before the first byte that says what is wrong, never an image.

mod common;

use common::*;
use serde_json::json;
use sha2::{Digest as _, Sha256};

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Writes a layout whose `bad:v1` is `manifest` (with `CONFIG` standing for the config descriptor and
/// `LAYER` for a real gzip layer's); the config blob is stored under `config_name` if given (to make
/// its digest lie), else under its own digest.
fn layout(
    name: &str,
    manifest: &str,
    config: &[u8],
    config_name: Option<&str>,
) -> std::path::PathBuf {
    let dir = scratch(&format!("manifests-{name}"));
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(2);
    h.set_mode(0o644);
    tar.append_data(&mut h, "f", &b"hi"[..]).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar.into_inner().unwrap()).unwrap();
    let layer = gz.finish().unwrap();
    std::fs::write(blobs.join(&sha(&layer)[7..]), &layer).unwrap();
    let config_digest = sha(config);
    let stored = config_name.map_or(config_digest.clone(), str::to_string);
    std::fs::write(blobs.join(&stored[7..]), config).unwrap();
    let manifest = manifest
        .replace(
            "CONFIG",
            &json!({"mediaType": "application/vnd.oci.image.config.v1+json", "digest": stored, "size": config.len()}).to_string(),
        )
        .replace(
            "LAYER",
            &json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(&layer), "size": layer.len()}).to_string(),
        );
    let mdigest = sha(manifest.as_bytes());
    std::fs::write(blobs.join(&mdigest[7..]), &manifest).unwrap();
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest,
        "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": "v1"}}]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    dir
}

#[test]
fn bad_manifests_and_configs_are_json_errors() {
    let _env = env();
    let good_config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:00"]}}"#;
    let two_diff_ids = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:00","sha256:11"]}}"#;
    let oci = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":CONFIG,"layers":[LAYER]}"#;
    /// (name, manifest, config, config stored under this digest, what the error must say)
    type Case<'a> = (&'a str, String, &'a [u8], Option<String>, &'a str);
    let cases: Vec<Case> = vec![
        ("not-json", "this is not json".into(), good_config, None, "not JSON"),
        (
            "schema1",
            r#"{"schemaVersion":1,"name":"x","tag":"v1","fsLayers":[]}"#.into(),
            good_config,
            None,
            "schema 1 manifest: no fsLayers",
        ),
        (
            "no-layers",
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":CONFIG}"#.into(),
            good_config,
            None,
            "bad image manifest",
        ),
        (
            "unknown-layer-type",
            oci.replace("LAYER", r#"{"mediaType":"application/vnd.example.layer","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":1}"#),
            good_config,
            None,
            "unsupported layer media type",
        ),
        ("diff-ids", oci.into(), two_diff_ids, None, "2 diff_ids for 1 layers"),
        (
            "config-digest-lies",
            oci.into(),
            good_config,
            Some(sha(b"some other config")),
            "config blob",
        ),
        ("config-not-object", oci.into(), b"[1,2,3]", None, "not a JSON object"),
    ];
    for (name, manifest, config, stored_as, fragment) in cases {
        let dir = layout(name, &manifest, config, stored_as.as_deref());
        let server = Server::start("127.0.0.1:1", &["--oci-layout", dir.to_str().unwrap()]);
        let v = json_error(&format!("{}/squash/bad:v1", server.url), 502);
        assert!(
            v["error"]["message"].as_str().unwrap().contains(fragment),
            "{name}: {v}"
        );
        // Bytes that miss their digest are the registry's fault; the rest the image's.
        let code = if stored_as.is_some() {
            "UPSTREAM"
        } else {
            "INVALID_IMAGE"
        };
        assert_eq!(v["error"]["code"], code, "{name}: {v}");
    }
}
