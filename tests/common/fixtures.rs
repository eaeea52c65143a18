//! Test images built in Rust, byte for byte deterministic: layers written with the `tar` crate's
//! headers (independent of strata's own writer), compressed with fixed headers, stored as an OCI image
//! layout and pushed to the test registry with skopeo, which copies the blobs unchanged.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

#[derive(Clone, Copy)]
pub enum Comp {
    Gzip,
    /// Two gzip members, split in the middle, as eStargz and concatenating tools write.
    GzipMulti,
    Zstd,
    /// Two zstd frames.
    ZstdMulti,
    None,
}

/// One layer's tar, entries in the order given.
#[derive(Default, Clone)]
pub struct Layer {
    tar: Vec<u8>,
    /// A file of zeros too large to hold in memory, streamed after `tar` when the blob is written:
    /// (path, size).
    zeros: Option<(String, u64)>,
    /// No end-of-archive blocks: the tar stops where its bytes stop.
    unterminated: bool,
}

/// `Builder::into_inner` ends the archive with two zero blocks; entries are concatenated without them.
fn without_end(mut bytes: Vec<u8>) -> Vec<u8> {
    assert!(bytes.len() >= 1024 && bytes[bytes.len() - 1024..].iter().all(|&b| b == 0));
    bytes.truncate(bytes.len() - 1024);
    bytes
}

/// A PAX extended header (`x` member) holding `records`, as tar-rs writes it.
fn pax_header<'a>(records: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions(records).unwrap();
    without_end(b.into_inner().unwrap())
}

/// A 12-byte octal field.
fn octal12(v: u64) -> [u8; 12] {
    let mut f = [0u8; 12];
    f[..11].copy_from_slice(format!("{v:011o}").as_bytes());
    f
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_size(size);
    h
}

impl Layer {
    pub fn new() -> Layer {
        Layer::default()
    }

    fn raw(mut self, mut h: tar::Header, path: &str, link: Option<&str>, data: &[u8]) -> Layer {
        let mut b = tar::Builder::new(Vec::new());
        // append_link / append_data handle long names with GNU long-name entries.
        match link {
            Some(target) => b.append_link(&mut h, path, target).unwrap(),
            None => b.append_data(&mut h, path, data).unwrap(),
        }
        self.tar.extend(without_end(b.into_inner().unwrap()));
        self
    }

    pub fn dir(self, path: &str, mode: u32) -> Layer {
        self.raw(header(tar::EntryType::Directory, mode, 0), path, None, &[])
    }
    pub fn file(self, path: &str, mode: u32, data: &[u8]) -> Layer {
        self.raw(
            header(tar::EntryType::Regular, mode, data.len() as u64),
            path,
            None,
            data,
        )
    }
    pub fn file_owned(self, path: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> Layer {
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.raw(h, path, None, data)
    }
    pub fn symlink(self, path: &str, target: &str) -> Layer {
        self.raw(
            header(tar::EntryType::Symlink, 0o777, 0),
            path,
            Some(target),
            &[],
        )
    }
    /// Tar writers give a hardlink its target's mode, and extractors chmod the shared inode to it.
    pub fn hardlink(self, path: &str, target: &str, mode: u32) -> Layer {
        self.raw(
            header(tar::EntryType::Link, mode, 0),
            path,
            Some(target),
            &[],
        )
    }
    pub fn whiteout(self, path: &str) -> Layer {
        let (dir, name) = path.rsplit_once('/').map_or(("", path), |(d, n)| (d, n));
        let p = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&p, 0o600, b"")
    }
    pub fn opaque(self, dir: &str) -> Layer {
        self.file(&format!("{dir}/.wh..wh..opq"), 0o600, b"")
    }
    pub fn device(self, path: &str, char_dev: bool, major: u32, minor: u32) -> Layer {
        let kind = if char_dev {
            tar::EntryType::Char
        } else {
            tar::EntryType::Block
        };
        let mut h = header(kind, 0o666, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.raw(h, path, None, &[])
    }
    pub fn fifo(self, path: &str) -> Layer {
        self.raw(header(tar::EntryType::Fifo, 0o644, 0), path, None, &[])
    }
    /// A file with PAX records (xattrs, big ids), written as the PAX `x` header plus the entry.
    pub fn pax_file(self, path: &str, mode: u32, data: &[u8], records: &[(&str, &[u8])]) -> Layer {
        self.pax_entry(tar::EntryType::Regular, path, mode, data, records)
    }
    /// Any entry preceded by a PAX `x` header holding `records`.
    pub fn pax_entry(
        mut self,
        kind: tar::EntryType,
        path: &str,
        mode: u32,
        data: &[u8],
        records: &[(&str, &[u8])],
    ) -> Layer {
        self.tar
            .extend(pax_header(records.iter().map(|(k, v)| (*k, *v))));
        let mut b = tar::Builder::new(Vec::new());
        let mut h = header(kind, mode, data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
        self.tar.extend(without_end(b.into_inner().unwrap()));
        self
    }
    /// A PAX header with `records`, then a ustar file header whose size field says `field` while
    /// `data` follows (the header-desync shapes).
    pub fn pax_sized(
        mut self,
        path: &str,
        field: u64,
        data: &[u8],
        records: &[(&str, &[u8])],
    ) -> Layer {
        self.tar
            .extend(pax_header(records.iter().map(|(k, v)| (*k, *v))));
        let mut h = header(tar::EntryType::Regular, 0o644, field);
        h.set_path(path).unwrap();
        h.set_cksum();
        self.tar.extend_from_slice(h.as_bytes());
        self.push_data(data);
        self
    }
    /// An old V7 entry: typeflag NUL, a directory when the name ends in `/` (what pre-POSIX tars
    /// wrote), else a file.
    pub fn v7(mut self, name: &str, mode: u32, data: &[u8]) -> Layer {
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkflag = [0];
        h.set_cksum();
        self.tar.extend_from_slice(h.as_bytes());
        self.push_data(data);
        self
    }
    /// A sparse file as GNU tar `--sparse --format=pax` writes it (`version` 1.0: the map at the
    /// start of the data; 0.1: the map in a `GNU.sparse.map` record): `regions` (offset, bytes) of a
    /// file of `realsize` bytes, zeros elsewhere.
    pub fn pax_sparse(
        mut self,
        version: &str,
        name: &str,
        realsize: u64,
        regions: &[(u64, &[u8])],
    ) -> Layer {
        let map: Vec<String> = regions
            .iter()
            .flat_map(|(o, d)| [o.to_string(), d.len().to_string()])
            .collect();
        let mut data = Vec::new();
        let realsize_s = realsize.to_string();
        let mut records: Vec<(&str, Vec<u8>)> = vec![("GNU.sparse.name", name.as_bytes().to_vec())];
        match version {
            "1.0" => {
                records.push(("GNU.sparse.major", b"1".to_vec()));
                records.push(("GNU.sparse.minor", b"0".to_vec()));
                records.push(("GNU.sparse.realsize", realsize_s.clone().into_bytes()));
                data.extend(format!("{}\n", regions.len()).into_bytes());
                for m in &map {
                    data.extend(format!("{m}\n").into_bytes());
                }
                data.resize(data.len().div_ceil(512) * 512, 0);
            }
            "0.1" => {
                records.push(("GNU.sparse.size", realsize_s.clone().into_bytes()));
                records.push((
                    "GNU.sparse.numblocks",
                    regions.len().to_string().into_bytes(),
                ));
                records.push(("GNU.sparse.map", map.join(",").into_bytes()));
            }
            other => panic!("sparse version {other}"),
        }
        for (_, d) in regions {
            data.extend_from_slice(d);
        }
        self.tar
            .extend(pax_header(records.iter().map(|(k, v)| (*k, &v[..]))));
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        h.set_path(format!("GNUSparseFile.0/{name}")).unwrap();
        h.set_cksum();
        self.tar.extend_from_slice(h.as_bytes());
        self.push_data(&data);
        self
    }
    /// An old GNU sparse entry (typeflag `S`), regions in the header's own sparse map.
    pub fn gnu_sparse(mut self, name: &str, realsize: u64, regions: &[(u64, &[u8])]) -> Layer {
        assert!(regions.len() <= 4, "the header holds four regions");
        let data: Vec<u8> = regions.iter().flat_map(|(_, d)| d.to_vec()).collect();
        let mut h = header(tar::EntryType::GNUSparse, 0o644, data.len() as u64);
        h.set_path(name).unwrap();
        let gnu = h.as_gnu_mut().unwrap();
        for (slot, (o, d)) in gnu.sparse.iter_mut().zip(regions) {
            slot.offset = octal12(*o);
            slot.numbytes = octal12(d.len() as u64);
        }
        gnu.realsize = octal12(realsize);
        h.set_cksum();
        self.tar.extend_from_slice(h.as_bytes());
        self.push_data(&data);
        self
    }
    fn push_data(&mut self, data: &[u8]) {
        self.tar.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.tar.extend(std::iter::repeat_n(0u8, pad));
    }
    /// A hardlink whose target is written as given, unchecked (`../x`, `/etc/shadow`).
    pub fn raw_link(mut self, name: &str, target: &str) -> Layer {
        let mut h = header(tar::EntryType::Link, 0o644, 0);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        self.tar.extend_from_slice(h.as_bytes());
        self
    }

    /// A file entry announcing `size` bytes of which only `data` follows, and then nothing: the
    /// layer ends mid-entry, without end-of-archive blocks.
    pub fn truncated_file(mut self, name: &str, size: u64, data: &[u8]) -> Layer {
        let mut h = header(tar::EntryType::Regular, 0o644, size);
        h.set_path(name).unwrap();
        h.set_cksum();
        self.tar.extend_from_slice(h.as_bytes());
        self.tar.extend_from_slice(data);
        self.unterminated = true;
        self
    }

    /// Raw header bytes with a name the tar crate would clean (e.g. `./x`, duplicates).
    pub fn raw_name(mut self, name: &str, kind: tar::EntryType, mode: u32, data: &[u8]) -> Layer {
        let mut h = header(kind, mode, data.len() as u64);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        self.tar.extend_from_slice(h.as_bytes());
        self.tar.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.tar.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    /// Ends the layer with a file of `size` zeros, generated while the blob is written (gzip only).
    pub fn zeros_file(mut self, path: &str, size: u64) -> Layer {
        self.zeros = Some((path.to_string(), size));
        self
    }

    /// Streams the layer tar, end-of-archive blocks included.
    fn write_tar<W: Write>(&self, out: &mut W) {
        out.write_all(&self.tar).unwrap();
        if let Some((path, size)) = &self.zeros {
            let mut h = header(tar::EntryType::Regular, 0o644, *size);
            h.set_path(path).unwrap();
            h.set_cksum();
            out.write_all(h.as_bytes()).unwrap();
            let block = vec![0u8; 1 << 20];
            let mut left = size.div_ceil(512) * 512;
            while left > 0 {
                let n = left.min(block.len() as u64) as usize;
                out.write_all(&block[..n]).unwrap();
                left -= n as u64;
            }
        }
        out.write_all(&[0u8; 1024]).unwrap();
    }

    pub fn tar_bytes(&self) -> Vec<u8> {
        assert!(
            self.zeros.is_none(),
            "streamed layers have no tar in memory"
        );
        let mut t = self.tar.clone();
        if !self.unterminated {
            t.extend_from_slice(&[0u8; 1024]);
        }
        t
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn compress(tar: &[u8], comp: Comp) -> (Vec<u8>, &'static str) {
    let half = tar.len() / 2;
    match comp {
        Comp::Gzip => (gzip(tar), "application/vnd.oci.image.layer.v1.tar+gzip"),
        Comp::GzipMulti => {
            let mut out = gzip(&tar[..half]);
            out.extend(gzip(&tar[half..]));
            (out, "application/vnd.oci.image.layer.v1.tar+gzip")
        }
        Comp::Zstd => (
            zstd::encode_all(tar, 3).unwrap(),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
        Comp::ZstdMulti => {
            let mut out = zstd::encode_all(&tar[..half], 3).unwrap();
            out.extend(zstd::encode_all(&tar[half..], 3).unwrap());
            (out, "application/vnd.oci.image.layer.v1.tar+zstd")
        }
        Comp::None => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
    }
}

pub fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Counts and hashes what passes through.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a layer too large for memory as a gzip blob: (blob digest, blob size, diff_id).
fn write_streamed(layer: &Layer, blobs: &Path) -> (String, u64, String) {
    let tmp = blobs.join("streaming.tmp");
    let file = Hashing {
        inner: std::io::BufWriter::new(std::fs::File::create(&tmp).unwrap()),
        hash: Sha256::new(),
        len: 0,
    };
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(file, flate2::Compression::fast());
    let mut tar = Hashing {
        inner: gz,
        hash: Sha256::new(),
        len: 0,
    };
    layer.write_tar(&mut tar);
    let diff_id = format!("sha256:{}", hex::encode(tar.hash.finalize()));
    let mut file = tar.inner.finish().unwrap();
    file.flush().unwrap();
    let digest = format!("sha256:{}", hex::encode(file.hash.finalize()));
    std::fs::rename(&tmp, blobs.join(&digest[7..])).unwrap();
    (digest, file.len, diff_id)
}

/// An image: layers (bottom first) and the `config` part of its config.
pub struct Image {
    pub layers: Vec<(Layer, Comp)>,
    pub config: Value,
    pub arch: &'static str,
}

impl Image {
    pub fn new(layers: Vec<(Layer, Comp)>) -> Image {
        Image {
            layers,
            config: json!({"Cmd": ["/bin/sh"]}),
            arch: "amd64",
        }
    }

    /// Writes blobs into `dir/blobs/sha256` and returns the manifest descriptor.
    fn write(&self, dir: &Path) -> Value {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let put = |data: &[u8]| {
            let d = sha(data);
            std::fs::write(blobs.join(&d[7..]), data).unwrap();
            d
        };
        let mut descs = Vec::new();
        let mut diff_ids = Vec::new();
        for (layer, comp) in &self.layers {
            if layer.zeros.is_some() {
                let (digest, size, diff_id) = write_streamed(layer, &blobs);
                diff_ids.push(diff_id);
                descs.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size}));
                continue;
            }
            let tar = layer.tar_bytes();
            diff_ids.push(sha(&tar));
            let (blob, media) = compress(&tar, *comp);
            descs.push(json!({"mediaType": media, "digest": put(&blob), "size": blob.len()}));
        }
        let config = json!({
            "created": "2024-05-06T07:08:09Z",
            "architecture": self.arch,
            "os": "linux",
            "config": self.config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": self.layers.iter().map(|_| json!({"created_by": "fixture"})).collect::<Vec<_>>(),
        });
        let config = serde_json::to_vec(&config).unwrap();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(&config), "size": config.len()},
            "layers": descs,
        }))
        .unwrap();
        json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": put(&manifest),
            "size": manifest.len(),
            "platform": {"architecture": self.arch, "os": "linux"},
        })
    }
}

/// Writes an OCI layout holding `images` under the ref name `tag`: one image directly, several as an
/// index (plus an attestation-like entry that must be skipped).
pub fn write_layout(dir: &Path, images: &[Image], tag: &str) {
    let descs: Vec<Value> = images.iter().map(|i| i.write(dir)).collect();
    let blobs = dir.join("blobs/sha256");
    let top = if descs.len() == 1 {
        let mut d = descs[0].clone();
        d.as_object_mut().unwrap().remove("platform");
        d
    } else {
        let mut manifests = descs.clone();
        // An attestation manifest as buildkit writes them: platform unknown/unknown.
        manifests.push(json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": descs[0]["digest"],
            "size": descs[0]["size"],
            "platform": {"architecture": "unknown", "os": "unknown"},
            "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
        }));
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }))
        .unwrap();
        let d = sha(&index);
        std::fs::write(blobs.join(&d[7..]), &index).unwrap();
        json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": d, "size": index.len()})
    };
    let mut top = top;
    top["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    let index = json!({"schemaVersion": 2, "manifests": [top]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// Incompressible bytes (xorshift), so a layer's blob is as large as its content.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
