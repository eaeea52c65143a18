//! Schema 1 manifests end to end: pushed to a real distribution registry that takes them (signed, as
//! docker 1.x pushed them), compared with what the real `docker pull` (20.10 still pulls schema 1)
//! makes of the same image; unsigned ones, which distribution cannot store, served by a small front
//! and compared with their signed twin.

mod common;

use std::process::Command;

use common::fixtures::{self, Layer};
use common::schema1::*;
use common::*;
use serde_json::{json, Value};

const REPO: &str = "s1/app";
const SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
const UNSIGNED: &str = "application/vnd.docker.distribution.manifest.v1+json";

/// The run config docker writes into the newest v1 JSON (and every one before, as of its step).
fn run_config() -> Value {
    json!({
        "Env": ["PATH=/usr/bin:/bin", "GREETING=a=b=c"],
        "Entrypoint": ["/bin/entry"],
        "Cmd": ["--flag", "two words"],
        "WorkingDir": "/work",
        "ExposedPorts": {"8080/tcp": {}},
        "Labels": {"org.example.flavour": "old"},
    })
}

/// Newest last: a base layer, a throwaway ENV step, a layer that overwrites and deletes, the base's
/// blob again (it restores what the one below changed), and a throwaway CMD step whose empty blob
/// is the ENV step's too.
fn entries() -> Vec<Entry> {
    let base = layer_blob(
        &Layer::new()
            .dir("etc", 0o755)
            .file("etc/removed", 0o644, b"deleted by the middle layer")
            .file("a", 0o644, b"from the base")
            .dir("work", 0o755)
            .tar_bytes(),
    );
    let middle = layer_blob(
        &Layer::new()
            .file("a", 0o600, b"from the middle")
            .whiteout("etc/removed")
            .file("b", 0o755, b"only in the middle")
            .symlink("link", "b")
            .tar_bytes(),
    );
    let empty = layer_blob(&Layer::new().tar_bytes());
    let step = |blob: &Vec<u8>, throwaway, cmd: &'static str, created| Entry {
        blob: blob.clone(),
        throwaway,
        created_by: vec!["/bin/sh", "-c", cmd],
        config: run_config(),
        created,
    };
    vec![
        step(
            &base,
            false,
            "#(nop) ADD file:base in /",
            "2016-01-02T03:04:05.123456789Z",
        ),
        step(
            &empty,
            true,
            "#(nop) ENV GREETING=a=b=c",
            "2016-01-02T03:04:06Z",
        ),
        step(&middle, false, "echo middle", "2016-01-02T03:04:07Z"),
        step(
            &base,
            false,
            "#(nop) ADD file:base again",
            "2016-01-02T03:04:08Z",
        ),
        step(
            &empty,
            true,
            "#(nop) CMD [\"--flag\"]",
            "2016-01-02T03:04:09Z",
        ),
    ]
}

/// A registry holding `entries` as `s1/app:<tag>`, signed; returns the digest the registry gives it.
fn push_signed(registry: &Schema1Registry, tag: &str, entries: &[Entry]) -> String {
    for e in entries {
        push_blob(&registry.addr, REPO, &e.blob, &sha256(&e.blob));
    }
    let payload = manifest(REPO, tag, entries, sha256);
    put_manifest(&registry.addr, REPO, tag, SIGNED, &sign(&payload))
}

/// Squashes `reference` through `server`, loads it into docker as `tag`; the loaded image's inspect.
fn squash_and_load(server: &Server, reference: &str, query: &str, tag: &str) -> Value {
    let dir = scratch(&format!("s1-out-{}", rand_suffix()));
    let file = dir.join("image.tar");
    let sep = if query.is_empty() { "?" } else { "&" };
    download_to(
        &format!("{}/squash/{reference}{query}{sep}tag={tag}", server.url),
        &file,
    );
    let out = run(docker().arg("load").arg("-i").arg(&file));
    assert!(
        String::from_utf8_lossy(&out).contains(tag),
        "{}",
        String::from_utf8_lossy(&out)
    );
    serde_json::from_slice(&run(docker().args(["image", "inspect", tag]))).unwrap()
}

fn inspect(image: &str) -> Value {
    serde_json::from_slice(&run(docker().args(["image", "inspect", image]))).unwrap()
}

/// The file system and the config docker shows must be what `docker pull` of `twin` gives.
fn assert_like_docker_pull(loaded: &Value, tag: &str, twin: &str) {
    let original = inspect(twin);
    assert_same(&export_listing(twin), &export_listing(tag), tag);
    for field in ["Config", "Architecture", "Os", "Created", "Author"] {
        assert_eq!(loaded[0][field], original[0][field], "{field} of {tag}");
    }
}

#[test]
fn signed_schema1_with_throwaway_and_repeated_layers_matches_docker_pull() {
    let _env = env();
    let registry = Schema1Registry::start();
    let entries = entries();
    let digest = push_signed(&registry, "v1", &entries);
    let server = Server::start(&registry.addr, &[]);
    let reference = format!("{}/{REPO}:v1", registry.addr);
    let pulled = run(docker().args(["pull", &reference]));
    let pulled = String::from_utf8_lossy(&pulled);
    // The digest docker reports and verifies is the payload's, as distribution announces it.
    assert!(pulled.contains(&format!("Digest: {digest}")), "{pulled}");
    let loaded = squash_and_load(&server, &reference, "", "strata-test/s1-signed:squashed");
    assert_like_docker_pull(&loaded, "strata-test/s1-signed:squashed", &reference);
    assert_eq!(loaded[0]["Config"]["Cmd"], json!(["--flag", "two words"]));

    // distribution signs the manifest anew each time it serves it: the bytes' digest is not the
    // manifest's, and the digest it announces is that of the payload without the signatures.
    let (status, headers, body) = curl(&[
        "-H",
        &format!("Accept: {SIGNED}"),
        &format!("http://{}/v2/{REPO}/manifests/v1", registry.addr),
    ]);
    assert_eq!(status, 200);
    assert_eq!(
        header_value(&headers, "docker-content-digest").unwrap(),
        digest
    );
    assert_ne!(sha256(&body), digest);
    let by_digest = format!("{}/{REPO}@{digest}", registry.addr);
    let loaded = squash_and_load(&server, &by_digest, "", "strata-test/s1-signed:by-digest");
    assert_like_docker_pull(&loaded, "strata-test/s1-signed:by-digest", &reference);
}

#[test]
fn unsigned_schema1_matches_its_signed_twin() {
    let _env = env();
    let registry = Schema1Registry::start();
    let entries = entries();
    push_signed(&registry, "v1", &entries);
    let twin = format!("{}/{REPO}:v1", registry.addr);
    run(docker().args(["pull", "-q", &twin]));
    let payload = manifest(REPO, "unsigned", &entries, sha256);
    let front = manifest_front(
        &registry.addr,
        &format!("/v2/{REPO}/manifests/unsigned"),
        UNSIGNED,
        payload,
    );
    let server = Server::start(&registry.addr, &["--insecure-registry", &front]);
    let tag = "strata-test/s1-unsigned:squashed";
    let loaded = squash_and_load(&server, &format!("{front}/{REPO}:unsigned"), "", tag);
    assert_like_docker_pull(&loaded, tag, &twin);
}

/// Schema 1 has no platform selection: as docker 20.10 pulls it, the architecture a request names is
/// not compared, the operating system is.
#[test]
fn schema1_platform_requests_compare_the_os_only() {
    let _env = env();
    let registry = Schema1Registry::start();
    push_signed(&registry, "v1", &entries());
    let server = Server::start(&registry.addr, &[]);
    let reference = format!("{}/{REPO}:v1", registry.addr);
    let loaded = squash_and_load(
        &server,
        &reference,
        "?platform=linux/arm64",
        "strata-test/s1-platform:arm64",
    );
    assert_eq!(loaded[0]["Architecture"], "amd64", "the image's own");
    let v = json_error(
        &format!("{}/squash/{reference}?platform=windows/amd64", server.url),
        404,
    );
    assert!(
        v["error"]["message"].as_str().unwrap().contains("windows"),
        "{v}"
    );
}

#[test]
fn schema1_aci_takes_its_app_from_the_newest_v1_config() {
    let _env = env();
    let registry = Schema1Registry::start();
    push_signed(&registry, "v1", &entries());
    let dir = scratch("s1-aci");
    let file = dir.join("app.aci");
    run(strata()
        .args(["aci", &format!("{}/{REPO}:v1", registry.addr), "-o"])
        .arg(&file)
        .args(["--insecure-registry", &registry.addr, "--no-cache"]));
    run(Command::new("actool").arg("validate").arg(&file));
    let m: Value =
        serde_json::from_slice(&run(Command::new("actool").arg("cat-manifest").arg(&file)))
            .unwrap();
    let app = &m["app"];
    assert_eq!(
        app["exec"],
        json!(["/bin/entry", "--flag", "two words"]),
        "{m}"
    );
    assert_eq!(app["workingDirectory"], "/work");
    assert!(app["environment"]
        .as_array()
        .unwrap()
        .contains(&json!({"name": "GREETING", "value": "a=b=c"})));
    assert_eq!(
        app["ports"],
        json!([{"name": "8080-tcp", "protocol": "tcp", "port": 8080, "count": 1, "socketActivated": false}])
    );
    let annotations = m["annotations"].as_array().unwrap();
    assert!(
        annotations.contains(&json!({"name": "created", "value": "2016-01-02T03:04:09Z"})),
        "{m}"
    );
    let labels = m["labels"].as_array().unwrap();
    assert!(
        labels.contains(&json!({"name": "arch", "value": "amd64"})),
        "{m}"
    );
    let tree = listing_under(std::fs::File::open(&file).unwrap(), "rootfs/");
    assert!(
        tree["a"].contains("Regular 644"),
        "the base's, restored: {}",
        tree["a"]
    );
    // The middle layer deleted it; the base's blob, applied again above, brought it back.
    assert!(
        tree.contains_key("b") && tree.contains_key("etc/removed"),
        "{tree:?}"
    );
}

/// Manifests docker refuses to pull (moby `fixManifestLayers`, `verifySchema1Manifest`) are refused
/// with docker's reason as an `INVALID_IMAGE` before the first byte.
#[test]
fn schema1_manifests_docker_refuses_are_refused() {
    let _env = env();
    let registry = Schema1Registry::start();
    let server = Server::start(&registry.addr, &[]);
    let entries = entries();
    for e in &entries {
        push_blob(&registry.addr, REPO, &e.blob, &sha256(&e.blob));
    }
    let good = String::from_utf8(manifest(REPO, "v1", &entries, sha256)).unwrap();
    let parsed: Value = serde_json::from_str(&good).unwrap();
    let v1 = |i: usize| -> Value {
        serde_json::from_str(parsed["history"][i]["v1Compatibility"].as_str().unwrap()).unwrap()
    };
    let with_v1 = |i: usize, v: Value| -> Vec<u8> {
        let mut m = parsed.clone();
        m["history"][i]["v1Compatibility"] = json!(v.to_string());
        serde_json::to_vec_pretty(&m).unwrap()
    };
    let mut orphan = v1(1);
    orphan["parent"] = json!("f".repeat(64));
    let mut repeated = v1(0);
    repeated["id"] = v1(3)["id"].clone();
    let mut bad_id = v1(2);
    bad_id["id"] = json!("not-an-id");
    let cases = [
        ("parent", with_v1(1, orphan), "invalid parent ID"),
        ("repeated", with_v1(0, repeated), "appears multiple times"),
        ("bad-id", with_v1(2, bad_id), "invalid image ID"),
    ];
    for (tag, manifest, fragment) in cases {
        put_manifest(&registry.addr, REPO, tag, SIGNED, &sign(&manifest));
        let reference = format!("{}/{REPO}:{tag}", registry.addr);
        let out = docker().args(["pull", &reference]).output().unwrap();
        assert!(!out.status.success(), "docker pulls {tag}");
        let v = json_error(&format!("{}/squash/{reference}", server.url), 502);
        assert_eq!(v["error"]["code"], "INVALID_IMAGE", "{tag}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(fragment),
            "{tag}: {v}"
        );
    }
}

/// distribution converts a schema 2 manifest to schema 1 for a client that names schema 1 only;
/// strata names both, schema 2 first, and so gets the image as pushed.
#[test]
fn schema2_is_preferred_to_a_conversion() {
    let env = env();
    let registry = Schema1Registry::start();
    let dir = scratch("s1-schema2");
    fixtures::write_layout(&dir, &common::images::basic(), "v1");
    push(&dir, "v1", &registry.addr, "s1/two", "v1", "v2s2");
    let _ = env;
    let url = format!("http://{}/v2/s1/two/manifests/v1", registry.addr);
    let (_, headers, body) = curl(&["-H", &format!("Accept: {SIGNED}"), &url]);
    let converted: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        converted["schemaVersion"], 1,
        "the registry converts: {headers}"
    );
    let (_, headers, _) = curl(&[
        "-H",
        "Accept: application/vnd.docker.distribution.manifest.v2+json",
        &url,
    ]);
    let schema2 = header_value(&headers, "docker-content-digest").unwrap();
    let server = Server::start(&registry.addr, &[]);
    let file = scratch("s1-schema2-out").join("image.tar");
    download_to(
        &format!("{}/squash/{}/s1/two:v1", server.url, registry.addr),
        &file,
    );
    let mut archive = tar::Archive::new(std::fs::File::open(&file).unwrap());
    let mut config = None;
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().to_string();
        if path.ends_with(".json") && !path.contains('/') && path != "manifest.json" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut e, &mut s).unwrap();
            config = Some(s);
        }
    }
    let config: Value = serde_json::from_str(&config.unwrap()).unwrap();
    let comment = config["history"][0]["comment"].as_str().unwrap();
    assert!(comment.contains(&schema2), "{comment} names {schema2}");
}

/// The registry view takes a schema 1 source as the tarball routes do: `docker pull` of
/// `squash/s1/app` is one layer with the file system `docker pull` of the source gives.
#[test]
fn schema1_through_the_registry_view_matches_docker_pull() {
    let _env = env();
    let registry = Schema1Registry::start();
    push_signed(&registry, "view", &entries());
    let server = Server::start(&registry.addr, &["--default-registry", &registry.addr]);
    let source = format!("{}/{REPO}:view", registry.addr);
    run(docker().args(["pull", "-q", &source]));
    let view = format!(
        "{}/squash/{REPO}:view",
        server.url.trim_start_matches("http://")
    );
    run(docker().args(["pull", "-q", &view]));
    let layers = run(docker().args(["image", "inspect", "-f", "{{len .RootFS.Layers}}", &view]));
    assert_eq!(String::from_utf8_lossy(&layers).trim(), "1");
    assert_same(&export_listing(&source), &export_listing(&view), &view);
    for field in ["Config", "Architecture", "Os", "Created"] {
        assert_eq!(
            inspect(&view)[0][field],
            inspect(&source)[0][field],
            "{field}"
        );
    }
}
