//! The output version guards every key of derived bytes and remembered state (`strata::version`). This
//! test converts a fixed set of images, in process from an OCI layout (no services), and compares the
//! digests of what came out (the squash archive, the ACI, each layer's remembered summary) with the ones
//! recorded for the current version in `tests/golden/output-versions.txt`. Output that changes under an
//! old version fails here; a new version needs its own line.

mod common;

use std::path::Path;

use common::fixtures::{sha, write_layout, Comp, Image, Layer};
use futures::StreamExt;
use serde_json::json;
use strata::convert::{AciRequest, ByteStream, Converter, ConverterConfig, SquashRequest};
use strata::manifest::Platform;
use strata::registry::Credentials;

const TABLE: &str = "tests/golden/output-versions.txt";

/// Layers that touch every part of the output: whiteouts and opaque directories, hardlinks within and
/// across layers, replaced directories, special files, PAX records (long names, xattrs, big ids,
/// fractional mtimes), all three compressions.
fn golden_image() -> Image {
    let long = format!("long/{}/{}", "d".repeat(120), "f".repeat(150));
    let base = Layer::new()
        .dir("etc", 0o755)
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0::/root:/bin/sh\napp:x:1001:1001::/home/app:/bin/sh\n",
        )
        .file(
            "etc/group",
            0o644,
            b"root:x:0:\napp:x:1001:\nextra:x:2000:app\n",
        )
        .file("etc/old", 0o600, b"whited out above")
        .dir("var", 0o755)
        .dir("var/cache", 0o755)
        .file("var/cache/stale", 0o644, b"hidden by an opaque dir")
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .file("usr/bin/tool", 0o755, b"#!/bin/sh\necho tool\n")
        .symlink("bin", "usr/bin")
        .dir("tree", 0o755)
        .file("tree/leaf", 0o644, b"replaced by a file above")
        .file("target", 0o644, b"linked from above");
    let middle = Layer::new()
        .whiteout("etc/old")
        .file("etc/motd", 0o644, b"middle\n")
        .hardlink("usr/bin/alias", "usr/bin/tool", 0o755)
        .hardlink("link-to-lower", "target", 0o644)
        .file("tree", 0o644, b"now a file")
        .dir("dev", 0o755)
        .device("dev/null2", true, 1, 3)
        .device("dev/blk", false, 7, 0)
        .fifo("fifo")
        .dir("long", 0o755)
        .dir(&long[..long.rfind('/').unwrap()], 0o755)
        .file(&long, 0o644, b"long name")
        .symlink("long/abs", &format!("/{}", "t".repeat(200)));
    let top = Layer::new()
        .dir("var/cache", 0o755)
        .opaque("var/cache")
        .file("var/cache/fresh", 0o644, b"new\n")
        .whiteout("target")
        .pax_file(
            "xattrs",
            0o644,
            b"x",
            &[
                ("SCHILY.xattr.user.strata", b"yes"),
                ("SCHILY.xattr.user.bin", &[0, 1, 2]),
                ("mtime", b"1700000000.123456789"),
            ],
        )
        .file_owned("bigids", 0o4755, 3_000_000, 2_500_000, b"suid")
        .dir("sticky", 0o1777)
        .file("été", 0o644, b"utf8");
    let mut image = Image::new(vec![
        (base, Comp::Gzip),
        (middle, Comp::Zstd),
        (top, Comp::None),
    ]);
    image.config = json!({
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ["echo \"$GREETING\""],
        "Env": ["PATH=/usr/bin:/bin", "GREETING=a=b=c"],
        "User": "app",
        "WorkingDir": "/etc",
        "ExposedPorts": {"80/tcp": {}, "8000-8010/tcp": {}},
        "Volumes": {"/data": {}},
        "Labels": {"org.opencontainers.image.title": "golden"},
    });
    image
}

async fn collect(mut body: ByteStream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk.expect("the conversion completes"));
    }
    out
}

/// `squash=<digest> aci=<digest> summaries=<digest>` of the golden conversions.
async fn conversions(layout: &Path) -> String {
    let converter = Converter::new(ConverterConfig {
        oci_layout: Some(layout.to_path_buf()),
        ..Default::default()
    })
    .unwrap();
    let reference = converter.parse_reference("golden:v1").unwrap();
    let squash = converter
        .prepare(SquashRequest {
            reference: reference.clone(),
            platform: Platform::default(),
            tag: None,
            credentials: Credentials(None),
        })
        .await
        .unwrap();
    let squash = collect(squash.body).await;
    let aci = converter
        .prepare_aci(AciRequest {
            reference,
            platform: Platform::default(),
            credentials: Credentials(None),
            name: "example.com/golden".into(),
            version: None,
        })
        .await
        .unwrap();
    let aci = collect(aci.body).await;

    let mut summaries = Vec::new();
    for (layer, _) in &golden_image().layers {
        let items = strata::summary::scan(&layer.tar_bytes()[..]).unwrap();
        summaries.extend(strata::summary::encode(&items));
    }
    format!(
        "squash={} aci={} summaries={}",
        sha(&squash),
        sha(&aci),
        sha(&summaries)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn output_changes_only_with_the_output_version() {
    let dir = tempfile::tempdir().unwrap();
    write_layout(dir.path(), &[golden_image()], "v1");
    let got = conversions(dir.path()).await;
    // Deterministic, or no digest could be recorded.
    assert_eq!(
        got,
        conversions(dir.path()).await,
        "same input, other bytes"
    );

    let table = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(TABLE)).unwrap();
    let version = strata::version::OUTPUT;
    let recorded = table
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(version)?.strip_prefix(' '));
    let line = format!("{version} {got}");
    match recorded {
        None => panic!("no digests recorded for {version}: add this line to {TABLE}:\n{line}"),
        Some(recorded) => assert!(
            recorded == got,
            "the output changed under {version}: bump strata::version::OUTPUT and add a line to \
             {TABLE} for the new version (keep the old lines):\nrecorded {recorded}\ngot      {got}"
        ),
    }
}
