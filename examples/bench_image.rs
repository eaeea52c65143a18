//! Writes the synthetic image of the end-to-end benchmark (`scripts/bench-e2e.sh`) as an OCI image
//! layout: six gzip layers, about 1.1 GiB uncompressed, ~60k small files plus large files, whiteouts
//! and an opaque directory in the upper layers. Deterministic: same bytes every run.
//!
//! `cargo run --release --example bench_image -- DIR [SCALE] [big]` (SCALE divides every size and
//! count; 1 is the benchmark image). With `big`: instead, one layer of 4.3 GiB uncompressed, mostly
//! zeros, past the 4 GiB where gzip's ISIZE wraps.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use flate2::{Compression, GzBuilder};
use serde_json::json;
use sha2::{Digest, Sha256};

/// Counts and hashes what passes through.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Bytes that deflate about as well as program text: random symbols from a small alphabet.
struct Content(u64);

impl Content {
    fn fill(&mut self, out: &mut [u8]) {
        const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz _\n{}=";
        for chunk in out.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            for (i, b) in chunk.iter_mut().enumerate() {
                *b = ALPHABET[((self.0 >> (i * 5)) & 31) as usize];
            }
        }
    }
}

enum Entry {
    Dir(String),
    File(String, u64),
    /// A file of zeros, streamed: it may be larger than memory.
    Zeros(String, u64),
    Whiteout(String),
}

fn write_layer(
    blobs: &Path,
    entries: impl Iterator<Item = Entry>,
    seed: u64,
) -> io::Result<(String, u64, String)> {
    let tmp = blobs.join("layer.tmp");
    let file = Hashing {
        inner: BufWriter::with_capacity(1 << 20, File::create(&tmp)?),
        hash: Sha256::new(),
        len: 0,
    };
    let gz = GzBuilder::new().mtime(0).write(file, Compression::new(6));
    let mut tar = tar::Builder::new(Hashing {
        inner: gz,
        hash: Sha256::new(),
        len: 0,
    });
    let mut content = Content(seed);
    let mut buf = Vec::new();
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            Entry::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                tar.append_data(&mut h, p, io::empty())?;
            }
            Entry::Whiteout(p) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(0);
                tar.append_data(&mut h, p, io::empty())?;
            }
            Entry::Zeros(p, size) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(size);
                tar.append_data(&mut h, p, io::Read::take(io::repeat(0), size))?;
            }
            Entry::File(p, size) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(size);
                buf.resize(size as usize, 0);
                content.fill(&mut buf);
                tar.append_data(&mut h, p, &buf[..])?;
            }
        }
    }
    let tar = tar.into_inner()?;
    let diff_id = format!("sha256:{}", hex::encode(tar.hash.finalize()));
    let mut file = tar.inner.finish()?;
    file.flush()?;
    let digest = hex::encode(file.hash.finalize());
    std::fs::rename(&tmp, blobs.join(&digest))?;
    Ok((format!("sha256:{digest}"), file.len, diff_id))
}

/// `count` small files of 1–8 KiB under `top/dNNN/`.
fn small_files(top: &str, count: u64, seed: u64) -> impl Iterator<Item = Entry> + '_ {
    let dirs = count.div_ceil(100);
    (0..dirs).flat_map(move |d| {
        std::iter::once(Entry::Dir(format!("{top}/d{d:03}"))).chain((0..100).filter_map(move |i| {
            let n = d * 100 + i;
            (n < count).then(|| {
                Entry::File(
                    format!("{top}/d{d:03}/f{i:02}"),
                    1024 + (n * 2654435761 + seed) % (7 * 1024),
                )
            })
        }))
    })
}

fn main() -> io::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: bench_image DIR [SCALE]");
    let scale: u64 = args.next().map_or(1, |s| s.parse().expect("SCALE"));
    let big = args.next().as_deref() == Some("big");
    let dir = Path::new(&dir);
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let mib = |n: u64| (n << 20) / scale;
    let n = |k: u64| k / scale;

    let layers: Vec<Vec<Entry>> = if big {
        // One layer past 4 GiB uncompressed, where gzip's ISIZE wraps: real content, then zeros.
        vec![std::iter::once(Entry::Dir("big".into()))
            .chain((0..2).map(|i| Entry::File(format!("big/data{i}"), mib(100))))
            .chain(std::iter::once(Entry::Zeros(
                "big/zeros".into(),
                mib(4 << 10) + mib(64),
            )))
            .collect()]
    } else {
        vec![
            // Base: a tree of small files.
            std::iter::once(Entry::Dir("usr".into()))
                .chain(small_files("usr", n(30_000), 1))
                .collect(),
            // Large files.
            std::iter::once(Entry::Dir("opt".into()))
                .chain((0..4).map(|i| Entry::File(format!("opt/big{i}"), mib(100))))
                .collect(),
            // More small files.
            std::iter::once(Entry::Dir("var".into()))
                .chain(small_files("var", n(30_000), 2))
                .collect(),
            std::iter::once(Entry::Dir("srv".into()))
                .chain((0..2).map(|i| Entry::File(format!("srv/data{i}"), mib(150))))
                .collect(),
            // Deletions: a hundred directories of the base, one whole tree made opaque and refilled.
            (0..n(100))
                .map(|d| Entry::Whiteout(format!("usr/.wh.d{d:03}")))
                .chain([
                    Entry::Dir("var".into()),
                    Entry::Whiteout("var/.wh..wh..opq".into()),
                ])
                .chain(small_files("var", n(2_000), 3))
                .collect(),
            // A large file replaced, another added.
            vec![
                Entry::Dir("opt".into()),
                Entry::Whiteout("opt/.wh.big3".into()),
                Entry::File("opt/big0".into(), mib(50)),
                Entry::File("opt/new".into(), mib(100)),
            ],
        ]
    };

    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, entries) in layers.into_iter().enumerate() {
        let (digest, size, diff_id) = write_layer(&blobs, entries.into_iter(), i as u64 + 7)?;
        eprintln!("layer {i}: {digest} {size} bytes");
        descs.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size}));
        diff_ids.push(diff_id);
    }
    let put = |data: &[u8]| -> io::Result<String> {
        let d = hex::encode(Sha256::digest(data));
        std::fs::write(blobs.join(&d), data)?;
        Ok(format!("sha256:{d}"))
    };
    let config = serde_json::to_vec(&json!({
        "created": "2025-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(&config)?, "size": config.len()},
        "layers": descs,
    }))?;
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": put(&manifest)?,
        "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": "bench"},
    }]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(())
}
