//! One tar entry of a layer, as the merger sees it: read from a layer's `tar::Entry` (PAX and GNU long
//! names resolved, the path cleaned), classified as a file-system entry or a whiteout, and written back
//! in one canonical form (ustar, with a PAX header only where ustar cannot hold a field).
//!
//! The canonical writer is also what sizes the merged layer: [`EntryMeta::encoded_len`] is exactly what
//! [`write_entry`] writes, so a listing of entries (see [`crate::summary`]) gives the output size without
//! the content.

mod read;
mod sparse;
mod write;

pub use read::{read_item, read_member};
pub use sparse::{Expand, Sparse};
pub use write::{padded, write_end, write_entry, write_zeros};

use std::io;

/// Tar block size.
pub const BLOCK: u64 = 512;

/// Marker of an opaque directory (OCI image-spec, layer.md, "Opaque Whiteout").
const OPAQUE: &[u8] = b".wh..wh..opq";
/// Prefix of a whiteout file (OCI image-spec, layer.md, "Whiteouts").
pub(crate) const WHITEOUT: &[u8] = b".wh.";

/// Largest value of an 8-byte octal ustar field (uid, gid, mode, devices).
pub(crate) const MAX_OCTAL_8: u64 = 0o7777777;
/// Largest value of a 12-byte octal ustar field (size, mtime).
pub(crate) const MAX_OCTAL_12: u64 = 0o77777777777;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
}

impl Kind {
    fn typeflag(self) -> u8 {
        match self {
            Kind::File => b'0',
            Kind::Hardlink => b'1',
            Kind::Symlink => b'2',
            Kind::Char => b'3',
            Kind::Block => b'4',
            Kind::Dir => b'5',
            Kind::Fifo => b'6',
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Kind> {
        Some(match code {
            b'0' => Kind::File,
            b'1' => Kind::Hardlink,
            b'2' => Kind::Symlink,
            b'3' => Kind::Char,
            b'4' => Kind::Block,
            b'5' => Kind::Dir,
            b'6' => Kind::Fifo,
            _ => return None,
        })
    }

    pub(crate) fn code(self) -> u8 {
        self.typeflag()
    }
}

/// A file-system entry, path cleaned, everything but the content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryMeta {
    /// Cleaned path: no leading `./` or `/`, no trailing `/`, no `//` or `.` components.
    pub path: Vec<u8>,
    pub kind: Kind,
    /// Permission bits with setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    /// Nanoseconds past `mtime`, from a fractional PAX `mtime` record.
    pub mtime_nsec: u32,
    /// Content length; 0 for all but regular files.
    pub size: u64,
    /// Symlink target verbatim, or cleaned hardlink target path.
    pub link: Vec<u8>,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// `SCHILY.xattr.` records, name without the prefix, in input order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// What one layer member means to the merge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Entry(EntryMeta),
    /// `.wh.<name>`: `path` and its subtree are gone from lower layers.
    Whiteout(Vec<u8>),
    /// `.wh..wh..opq` in `path`: lower layers' children of `path` are gone.
    Opaque(Vec<u8>),
}

#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("tar entry {path:?}: path escapes the image root")]
    Escape { path: String },
    #[error("tar entry {path:?}: {what}")]
    Invalid { path: String, what: &'static str },
    #[error("tar entry {path:?}: unsupported entry type {typeflag:?}")]
    Unsupported { path: String, typeflag: char },
    #[error("reading layer tar: {0}")]
    Io(#[from] io::Error),
}

impl From<EntryError> for io::Error {
    fn from(e: EntryError) -> io::Error {
        match e {
            EntryError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

fn lossy(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

/// Cleans a member name: `./a//b/` → `a/b`; `/` and `.` → empty (the root). `..` is refused: a layer
/// must not reach outside the root, whatever an extractor would do with it.
pub fn clean_path(raw: &[u8]) -> Result<Vec<u8>, EntryError> {
    if raw.contains(&0) {
        return Err(EntryError::Invalid {
            path: lossy(raw),
            what: "NUL byte in name",
        });
    }
    let mut out = Vec::with_capacity(raw.len());
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(EntryError::Escape { path: lossy(raw) }),
            _ => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(part);
            }
        }
    }
    Ok(out)
}

/// Splits `a/b/c` into (`a/b`, `c`); a top-level name has an empty parent.
pub fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(parent.len() + 1 + name.len());
    if !parent.is_empty() {
        p.extend_from_slice(parent);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Classifies a cleaned path by its last component (OCI layer.md whiteout rules).
pub fn classify_whiteout(path: &[u8]) -> Result<Option<Item>, EntryError> {
    let (parent, name) = split_parent(path);
    if name == OPAQUE {
        return Ok(Some(Item::Opaque(parent.to_vec())));
    }
    if let Some(hidden) = name.strip_prefix(WHITEOUT) {
        if hidden.is_empty() {
            return Err(EntryError::Invalid {
                path: lossy(path),
                what: "bare whiteout `.wh.`",
            });
        }
        if hidden == b"." || hidden == b".." {
            return Err(EntryError::Escape { path: lossy(path) });
        }
        return Ok(Some(Item::Whiteout(join(parent, hidden))));
    }
    Ok(None)
}

impl EntryMeta {
    /// A member strata makes itself (archive metadata, an ACI's `rootfs`): owned by root, time 0.
    pub fn synthetic(path: &[u8], kind: Kind, mode: u32, size: u64) -> EntryMeta {
        EntryMeta {
            path: path.to_vec(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size,
            link: Vec::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_path_table() {
        let good = [
            ("a", "a"),
            ("./a", "a"),
            ("/a/b/", "a/b"),
            ("a//b", "a/b"),
            ("./", ""),
            ("/", ""),
            (".", ""),
            ("a/./b", "a/b"),
            ("..a/b..", "..a/b.."),
        ];
        for (raw, want) in good {
            assert_eq!(
                clean_path(raw.as_bytes()).unwrap(),
                want.as_bytes(),
                "{raw}"
            );
        }
        for bad in ["..", "../a", "a/../../b", "a/..", "/../etc", "a\0b"] {
            assert!(clean_path(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn whiteout_table() {
        let cases: [(&str, Option<Item>); 6] = [
            ("a/.wh.b", Some(Item::Whiteout(b"a/b".to_vec()))),
            (".wh.b", Some(Item::Whiteout(b"b".to_vec()))),
            ("a/.wh..wh..opq", Some(Item::Opaque(b"a".to_vec()))),
            (".wh..wh..opq", Some(Item::Opaque(Vec::new()))),
            ("a/b.wh.c", None),
            ("a/x", None),
        ];
        for (path, want) in cases {
            assert_eq!(classify_whiteout(path.as_bytes()).unwrap(), want, "{path}");
        }
        assert!(classify_whiteout(b"a/.wh.").is_err());
        assert!(classify_whiteout(b".wh..").is_err());
    }
}
