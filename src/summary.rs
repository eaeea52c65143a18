//! Layer summaries: every member of a layer without its content, in order. A summary is what sizes the
//! merged layer before any of it is written (the merge is run over summaries into a counting sink, which
//! gives the exact size) and what tells the real merge about same-layer hardlinks ahead of time.
//!
//! Summaries come from a counting pre-pass over the layer, or from disk: a blob's digest fixes its bytes,
//! so a summary keyed by digest (its hex form here) never goes stale. The merged size of a whole image is remembered too,
//! keyed by manifest digest, so a repeat skips even the sizing run.

use std::collections::HashSet;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};

use crate::entry::{self, EntryMeta, Item, Kind};
use crate::merge::{CountingSink, LayerHints, MergeError, Merger};
use crate::version;

/// The encoding's own version; the output version follows it in every file, so a summary read by code
/// that would read the layer differently is ignored, not trusted.
const FORMAT: &[u8] = b"strata-summary-v2\n";

/// What every remembered file starts with.
fn header() -> Vec<u8> {
    let mut h = FORMAT.to_vec();
    h.extend_from_slice(version::OUTPUT.as_bytes());
    h.push(b'\n');
    h
}

/// Reads a whole layer tar (decompressed) into its summary, to its very end.
pub fn scan<R: Read>(tar: R) -> Result<Vec<Item>, MergeError> {
    let mut archive = tar::Archive::new(tar);
    let mut items = Vec::new();
    for e in archive.entries()? {
        let mut e = e?;
        if let Some(item) = entry::read_item(&mut e)? {
            items.push(item);
        }
    }
    io::copy(&mut archive.into_inner(), &mut io::sink())?;
    Ok(items)
}

/// Exact size of the merged layer tar (end-of-archive blocks included), layers given bottom first.
pub fn merged_size(layers: &[&[Item]]) -> Result<u64, MergeError> {
    let mut merger = Merger::new();
    let mut sink = CountingSink::default();
    for (depth, items) in layers.iter().rev().enumerate() {
        merger.begin_layer(depth as u32, LayerHints::from_items(items));
        for item in items.iter() {
            merger.item(item.clone(), &mut io::empty(), &mut sink)?;
        }
    }
    merger.finish(&mut sink)?;
    Ok(sink.0 + 2 * entry::BLOCK)
}

fn put_uint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_uint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Serialises a summary: compact, versioned, with a trailing checksum so a damaged file is not trusted.
pub fn encode(items: &[Item]) -> Vec<u8> {
    let mut out = header();
    put_uint(&mut out, items.len() as u64);
    for item in items {
        match item {
            Item::Whiteout(p) => {
                out.push(b'w');
                put_bytes(&mut out, p);
            }
            Item::Opaque(p) => {
                out.push(b'o');
                put_bytes(&mut out, p);
            }
            Item::Entry(m) => {
                out.push(m.kind.code());
                put_bytes(&mut out, &m.path);
                for v in [
                    m.mode as u64,
                    m.uid,
                    m.gid,
                    m.mtime,
                    m.mtime_nsec as u64,
                    m.size,
                    m.dev_major as u64,
                    m.dev_minor as u64,
                ] {
                    put_uint(&mut out, v);
                }
                put_bytes(&mut out, &m.link);
                put_uint(&mut out, m.xattrs.len() as u64);
                for (k, v) in &m.xattrs {
                    put_bytes(&mut out, k);
                    put_bytes(&mut out, v);
                }
            }
        }
    }
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn uint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    fn u32(&mut self) -> Option<u32> {
        self.uint()?.try_into().ok()
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = usize::try_from(self.uint()?).ok()?;
        if n > self.0.len() {
            return None;
        }
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(b.to_vec())
    }
}

/// Reads back [`encode`]'s output; `None` for anything damaged or from another format version.
pub fn decode(data: &[u8]) -> Option<Vec<Item>> {
    let body = data.strip_prefix(&header()[..])?;
    let (body, sum) = body.split_at(body.len().checked_sub(32)?);
    if Sha256::digest(&data[..data.len() - 32])[..] != *sum {
        return None;
    }
    let mut c = Cursor(body);
    let n = c.uint()?;
    let mut items = Vec::with_capacity(n.min(1 << 20) as usize);
    for _ in 0..n {
        let tag = c.byte()?;
        let item = match tag {
            b'w' => Item::Whiteout(c.bytes()?),
            b'o' => Item::Opaque(c.bytes()?),
            code => {
                let kind = Kind::from_code(code)?;
                let path = c.bytes()?;
                let mode = c.u32()?;
                let (uid, gid, mtime) = (c.uint()?, c.uint()?, c.uint()?);
                let (mtime_nsec, size) = (c.u32()?, c.uint()?);
                let (dev_major, dev_minor) = (c.u32()?, c.u32()?);
                let link = c.bytes()?;
                let mut xattrs = Vec::new();
                for _ in 0..c.uint()? {
                    xattrs.push((c.bytes()?, c.bytes()?));
                }
                Item::Entry(EntryMeta {
                    path,
                    kind,
                    mode,
                    uid,
                    gid,
                    mtime,
                    mtime_nsec,
                    size,
                    link,
                    dev_major,
                    dev_minor,
                    xattrs,
                })
            }
        };
        items.push(item);
    }
    c.0.is_empty().then_some(items)
}

/// Summaries and merged sizes remembered on disk; with no directory it remembers nothing but, in
/// memory, which images must be sized exactly.
#[derive(Debug, Clone)]
pub struct Store {
    dir: Option<PathBuf>,
    /// Manifests whose merged layer outgrew its bound once, by hex digest.
    exact: Arc<Mutex<HashSet<String>>>,
}

impl Store {
    pub fn new(dir: Option<PathBuf>) -> Store {
        Store {
            dir,
            exact: Arc::default(),
        }
    }

    /// Remembers that an image's merged layer outgrew the bound its archive announced: from now on
    /// it is sized exactly before its bytes start. Kept in memory even with no directory, so the
    /// retry a client makes is exact.
    pub fn mark_exact(&self, manifest_hex: &str) {
        self.exact
            .lock()
            .expect("not poisoned")
            .insert(manifest_hex.to_string());
        if let Some(path) = self.file("exact", manifest_hex) {
            write_atomic(&path, format!("{}\n", version::OUTPUT).as_bytes());
        }
    }

    /// Whether [`Store::mark_exact`] was called for this image (by this output version).
    pub fn needs_exact(&self, manifest_hex: &str) -> bool {
        if self
            .exact
            .lock()
            .expect("not poisoned")
            .contains(manifest_hex)
        {
            return true;
        }
        self.file("exact", manifest_hex)
            .and_then(|p| std::fs::read_to_string(p).ok())
            .is_some_and(|made_by| made_by.trim() == version::OUTPUT)
    }

    fn file(&self, kind: &str, key: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(kind).join(key))
    }

    pub fn load_summary(&self, blob_hex: &str) -> Option<Vec<Item>> {
        decode(&std::fs::read(self.file("summaries", blob_hex)?).ok()?)
    }

    pub fn save_summary(&self, blob_hex: &str, items: &[Item]) {
        if let Some(path) = self.file("summaries", blob_hex) {
            write_atomic(&path, &encode(items));
        }
    }

    /// Remembered exact merged-layer size for an image manifest.
    /// Made by this output version only: another version's merge may size the same image otherwise.
    pub fn load_size(&self, manifest_hex: &str) -> Option<u64> {
        let text = std::fs::read_to_string(self.file("sizes", manifest_hex)?).ok()?;
        let (made_by, size) = text.trim().split_once(' ')?;
        (made_by == version::OUTPUT).then(|| size.parse().ok())?
    }

    pub fn save_size(&self, manifest_hex: &str, size: u64) {
        if let Some(path) = self.file("sizes", manifest_hex) {
            write_atomic(&path, format!("{} {size}\n", version::OUTPUT).as_bytes());
        }
    }

    /// Drops what is remembered of an image whose output did not match it, so the next request re-sizes.
    pub fn forget(&self, manifest_hex: &str, blob_hexes: &[&str]) {
        let files = std::iter::once(self.file("sizes", manifest_hex))
            .chain(blob_hexes.iter().map(|b| self.file("summaries", b)));
        for f in files.flatten() {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Writes through a temporary file and a rename, so readers never see half a file. Failures only cost
/// the memory of the data: they are logged, not raised.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) {
    let result = (|| {
        let dir = path.parent().expect("cache files live in a directory");
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(
            ".{}.{}",
            std::process::id(),
            path.file_name().unwrap().to_string_lossy()
        ));
        std::fs::write(&tmp, data)?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "could not remember conversion data");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_roundtrip_and_damage() {
        let items = vec![
            Item::Whiteout(b"a/b".to_vec()),
            Item::Opaque(Vec::new()),
            Item::Entry(EntryMeta {
                path: b"x/y".to_vec(),
                kind: Kind::Char,
                mode: 0o4755,
                uid: 1 << 40,
                gid: 7,
                mtime: 1_700_000_000,
                mtime_nsec: 123_456_789,
                size: 0,
                link: Vec::new(),
                dev_major: 1,
                dev_minor: 3,
                xattrs: vec![(b"user.k".to_vec(), vec![0, 1, 2])],
            }),
        ];
        let data = encode(&items);
        assert_eq!(decode(&data).unwrap(), items);
        let mut bad = data.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 1;
        assert!(decode(&bad).is_none());
        assert!(decode(&data[..data.len() - 1]).is_none());
    }

    #[test]
    fn state_of_another_output_version_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(Some(dir.path().to_path_buf()));
        store.save_size("m", 4096);
        assert_eq!(store.load_size("m"), Some(4096));
        for older in ["4096\n", "strata-output-v1 4096\n"] {
            std::fs::write(dir.path().join("sizes/m"), older).unwrap();
            assert_eq!(store.load_size("m"), None, "{older:?}");
        }

        let items = vec![Item::Whiteout(b"a".to_vec())];
        store.save_summary("b", &items);
        assert_eq!(store.load_summary("b"), Some(items.clone()));
        // The same summary as another output version would have written it, checksum intact.
        let mut other = FORMAT.to_vec();
        other.extend_from_slice(b"strata-output-v1\n");
        let body = &encode(&items)[header().len()..encode(&items).len() - 32];
        other.extend_from_slice(body);
        let sum = Sha256::digest(&other);
        other.extend_from_slice(&sum);
        std::fs::write(dir.path().join("summaries/b"), &other).unwrap();
        assert_eq!(store.load_summary("b"), None);
    }
}
