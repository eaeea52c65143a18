//! A small generated image written as an OCI image layout, so strata can be tried with no registry
//! and no network: `strata sample-layout DIR`, then `strata serve --oci-layout DIR`. Its three layers
//! exercise what squashing is about: a replaced file, a whiteout, an opaque directory, a hardlink.

use std::io::{self, Write};
use std::path::Path;

use flate2::{write::GzEncoder, Compression, GzBuilder};
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::entry::{write_end, write_entry, EntryMeta, Kind};

/// The tag the sample image is served under.
pub const SAMPLE_TAG: &str = "latest";

fn meta(path: &str, kind: Kind, size: u64, link: &str) -> EntryMeta {
    EntryMeta {
        path: path.as_bytes().to_vec(),
        kind,
        mode: match kind {
            Kind::Dir => 0o755,
            Kind::Symlink => 0o777,
            _ => 0o644,
        },
        uid: 0,
        gid: 0,
        mtime: 1_700_000_000,
        mtime_nsec: 0,
        size,
        link: link.as_bytes().to_vec(),
        dev_major: 0,
        dev_minor: 0,
        xattrs: Vec::new(),
    }
}

enum E<'a> {
    Dir(&'a str),
    File(&'a str, &'a str),
    Link(&'a str, &'a str),
    Sym(&'a str, &'a str),
}

/// A gzip-compressed layer; returns (blob, diff_id).
fn layer(entries: &[E]) -> io::Result<(Vec<u8>, String)> {
    let mut tar = Vec::new();
    for e in entries {
        let (m, content) = match *e {
            E::Dir(p) => (meta(p, Kind::Dir, 0, ""), ""),
            E::File(p, c) => (meta(p, Kind::File, c.len() as u64, ""), c),
            E::Link(p, t) => (meta(p, Kind::Hardlink, 0, t), ""),
            E::Sym(p, t) => (meta(p, Kind::Symlink, 0, t), ""),
        };
        write_entry(&mut tar, &m, &mut content.as_bytes())?;
    }
    write_end(&mut tar)?;
    let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
    // A fixed header (no name, mtime 0) keeps the blob, and so the image digest, reproducible.
    let mut gz: GzEncoder<Vec<u8>> = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::default());
    gz.write_all(&tar)?;
    Ok((gz.finish()?, diff_id))
}

fn put_blob(dir: &Path, data: &[u8]) -> io::Result<String> {
    let hex = hex::encode(Sha256::digest(data));
    std::fs::write(dir.join("blobs/sha256").join(&hex), data)?;
    Ok(format!("sha256:{hex}"))
}

/// Writes the sample image into `dir` (created if needed) as an OCI image layout.
pub fn write_layout(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    let layers = [
        layer(&[
            E::Dir("etc"),
            E::File("etc/motd", "from the base layer\n"),
            E::File("etc/old.conf", "removed by layer 2\n"),
            E::Dir("var"),
            E::Dir("var/cache"),
            E::File("var/cache/stale", "hidden by an opaque directory\n"),
            E::Dir("usr"),
            E::Dir("usr/bin"),
            E::File("usr/bin/tool", "#!/bin/sh\necho tool\n"),
            E::Sym("bin", "usr/bin"),
        ])?,
        layer(&[
            E::File("etc/motd", "replaced in layer 2\n"),
            E::File("etc/.wh.old.conf", ""),
            E::Link("usr/bin/tool-alias", "usr/bin/tool"),
        ])?,
        layer(&[
            E::Dir("var/cache"),
            E::File("var/cache/.wh..wh..opq", ""),
            E::File("var/cache/fresh", "new\n"),
        ])?,
    ];
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (blob, diff_id) in &layers {
        let digest = put_blob(dir, blob)?;
        layer_descs.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest,
            "size": blob.len(),
        }));
        diff_ids.push(diff_id.clone());
    }
    let config = json!({
        "created": "2024-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=a=b"],
            "Cmd": ["/bin/tool"],
            "WorkingDir": "/etc",
            "Labels": {"org.opencontainers.image.title": "strata sample"},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "base"}, {"created_by": "edit"}, {"created_by": "cache"}],
    });
    let config = serde_json::to_vec(&config)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": put_blob(dir, &config)?,
            "size": config.len(),
        },
        "layers": layer_descs,
    });
    let manifest = serde_json::to_vec(&manifest)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": put_blob(dir, &manifest)?,
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": SAMPLE_TAG},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(())
}
