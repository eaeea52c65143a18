//! The fuzz targets' bodies (`strata::fuzzing`) over every committed input: the seeds, the minimized
//! corpus and the crash files of each target under `fuzz/`. No panic, no broken invariant, on any of
//! them. `write_seeds` (ignored) regenerates the seeds from the test fixtures; fuzz/README.md says how
//! the corpus was grown.

mod common;

use std::path::{Path, PathBuf};

use common::fixtures::{Comp, Image, Layer};
use serde_json::json;

/// A target's name (its directories under `fuzz/`) and body.
type Target = (&'static str, fn(&[u8]));

const TARGETS: [Target; 3] = [
    ("reference", strata::fuzzing::reference),
    ("manifest", strata::fuzzing::manifest),
    ("merge", |data| {
        strata::fuzzing::merge(data);
    }),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_committed_input_passes_its_target() {
    for (target, body) in TARGETS {
        let mut inputs = Vec::new();
        for kind in ["seeds", "corpus", "artifacts"] {
            inputs.extend(files(&fuzz_dir().join(kind).join(target)));
        }
        assert!(
            inputs.len() >= 5,
            "{target}: only {} inputs under fuzz/",
            inputs.len()
        );
        let mut failed = Vec::new();
        for input in &inputs {
            let data = std::fs::read(input).unwrap();
            if std::panic::catch_unwind(|| body(&data)).is_err() {
                failed.push(input.display().to_string());
            }
        }
        assert!(failed.is_empty(), "{target}: panicked on {failed:#?}");
    }
}

/// The layer seeds are images, so the merge target's invariants are checked on them, not skipped.
#[test]
fn the_layer_seeds_make_images() {
    let seeds = files(&fuzz_dir().join("seeds/merge"));
    assert!(!seeds.is_empty());
    for seed in seeds {
        let data = std::fs::read(&seed).unwrap();
        assert!(strata::fuzzing::merge(&data), "{}", seed.display());
    }
}

/// Writes `fuzz/seeds/<target>/`: real inputs of the kinds the tests use.
#[test]
#[ignore = "regenerates the committed seeds"]
fn write_seeds() {
    let seeds = fuzz_dir().join("seeds");
    let put = |target: &str, name: &str, data: &[u8]| {
        let dir = seeds.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    };

    let d = format!("sha256:{}", "b".repeat(64));
    let references = [
        "ubuntu".to_string(),
        "library/alpine:3.20".into(),
        "docker.io/user/app:v1.2-rc_1".into(),
        "index.docker.io/ubuntu".into(),
        "localhost:5000/a/b:t".into(),
        "127.0.0.1:5000/fix/basic".into(),
        "quay.io/a-b/c__d.e:1".into(),
        format!("alpine:3@{d}"),
        format!("registry.example.com:5000/team/app@{d}"),
        "/squash/localhost%3A5000/a".into(),
        format!("/squash/localhost:5000/a/b@{d}"),
        "/c1/squash/ns/team/repo/1.0".into(),
        "platform=linux/arm64&tag=x%3A1".into(),
        "linux/arm/v7".into(),
        "a/../b".into(),
    ];
    for (i, r) in references.iter().enumerate() {
        put("reference", &format!("seed-{i:02}"), r.as_bytes());
    }

    // Manifests, an index (with an attestation entry) and configs as the fixtures write them.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let layer = || {
        (
            Layer::new()
                .dir("etc", 0o755)
                .file("etc/hosts", 0o644, b"127.0.0.1 localhost\n"),
            Comp::Gzip,
        )
    };
    let mut arm = Image::new(vec![layer(), (Layer::new(), Comp::Zstd)]);
    arm.arch = "arm64";
    common::fixtures::write_layout(dir, &[Image::new(vec![layer()]), arm], "v1");
    for blob in std::fs::read_dir(dir.join("blobs/sha256")).unwrap() {
        let path = blob.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if serde_json::from_slice::<serde_json::Value>(&data).is_ok() {
            let name = path.file_name().unwrap().to_string_lossy();
            put("manifest", &format!("seed-{}", &name[..12]), &data);
        }
    }
    // Docker's schema 2 types, as skopeo --format v2s2 writes them, and a schema 1 manifest.
    let digest = |c: char| format!("sha256:{}", c.to_string().repeat(64));
    let docker = [
        json!({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 1469, "digest": digest('a')},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": 2811969, "digest": digest('b')}]}),
        json!({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
            "manifests": [
                {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "size": 528, "digest": digest('c'),
                 "platform": {"architecture": "arm", "os": "linux", "variant": "v6"}},
                {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "size": 528, "digest": digest('d'),
                 "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
                {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "size": 528, "digest": digest('e'),
                 "platform": {"architecture": "amd64", "os": "windows", "os.version": "10.0.17763.1"}}]}),
        json!({"schemaVersion": 1, "name": "x", "tag": "v1", "architecture": "amd64", "fsLayers": [], "history": []}),
        json!({"architecture": "arm", "variant": "v7", "os": "linux", "config": {"Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [digest('f'), digest('0')]}}),
    ];
    for (i, v) in docker.iter().enumerate() {
        put(
            "manifest",
            &format!("seed-docker-{i}"),
            &serde_json::to_vec(v).unwrap(),
        );
    }

    // Layers, bottom first, in the framing of `split_layers`.
    let base = Layer::new()
        .dir("etc", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0::/root:/bin/sh\n")
        .dir("usr/bin", 0o755)
        .file("usr/bin/tool", 0o755, b"#!/bin/sh\n")
        .hardlink("usr/bin/tool2", "usr/bin/tool", 0o755)
        .symlink("usr/bin/sh", "busybox");
    let cases: Vec<(&str, Vec<Layer>)> = vec![
        ("one-layer", vec![base.clone()]),
        (
            "whiteouts",
            vec![
                base.clone(),
                Layer::new().whiteout("etc/passwd").opaque("usr/bin").file(
                    "usr/bin/new",
                    0o755,
                    b"new",
                ),
            ],
        ),
        (
            "link-to-lower",
            vec![
                base.clone(),
                Layer::new().hardlink("etc/passwd-", "etc/passwd", 0o644),
            ],
        ),
        (
            "link-target-deleted",
            vec![
                base.clone(),
                Layer::new().hardlink("keep", "usr/bin/tool", 0o755),
                Layer::new().whiteout("usr/bin/tool"),
            ],
        ),
        (
            "pax-and-long-names",
            vec![Layer::new()
                .pax_file(
                    "x",
                    0o644,
                    b"xattrs",
                    &[("SCHILY.xattr.user.a", b"1"), ("uid", b"3000000")],
                )
                .file(&format!("{}/f", "d".repeat(150)), 0o644, b"long")
                .symlink(&format!("l{}", "n".repeat(120)), &"t".repeat(200))],
        ),
        (
            "devices-and-duplicates",
            vec![
                Layer::new()
                    .device("dev/null", true, 1, 3)
                    .fifo("run/fifo")
                    .file("dup", 0o644, b"first")
                    .file("dup", 0o600, b"second"),
                Layer::new().dir("dup", 0o755).file("dup/in", 0o644, b"x"),
            ],
        ),
    ];
    for (name, layers) in cases {
        let tars: Vec<Vec<u8>> = layers.iter().map(Layer::tar_bytes).collect();
        let refs: Vec<&[u8]> = tars.iter().map(Vec::as_slice).collect();
        put(
            "merge",
            &format!("seed-{name}"),
            &strata::fuzzing::join_layers(&refs),
        );
    }
}
