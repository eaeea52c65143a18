//! One tar entry of a layer, as the merger sees it: read from a layer's `tar::Entry` (PAX and GNU long
//! names resolved, the path cleaned), classified as a file-system entry or a whiteout, and written back
//! in one canonical form (ustar, with a PAX header only where ustar cannot hold a field).
//!
//! The canonical writer is also what sizes the merged layer: [`EntryMeta::encoded_len`] is exactly what
//! [`write_entry`] writes, so a listing of entries (see [`crate::summary`]) gives the output size without
//! the content.

use std::io::{self, Read, Write};

/// Tar block size.
pub const BLOCK: u64 = 512;

/// Marker of an opaque directory (OCI image-spec, layer.md, "Opaque Whiteout").
const OPAQUE: &[u8] = b".wh..wh..opq";
/// Prefix of a whiteout file (OCI image-spec, layer.md, "Whiteouts").
pub(crate) const WHITEOUT: &[u8] = b".wh.";
/// Name of the PAX extended header member; readers ignore it.
const PAX_NAME: &[u8] = b"././@PaxHeader";
/// The largest size an 11-digit octal ustar size field holds; writers put it there when the real
/// size goes in a PAX record.
const USTAR_SIZE_MAX: u64 = 0o77777777777;

/// Largest value of an 8-byte octal ustar field (uid, gid, mode, devices).
const MAX_OCTAL_8: u64 = 0o7777777;
/// Largest value of a 12-byte octal ustar field (size, mtime).
const MAX_OCTAL_12: u64 = 0o77777777777;

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

/// Reads one member of a layer. `Ok(None)` for members that mean nothing to the file system: the root
/// directory itself, global PAX headers, aufs metadata (`.wh..wh.*` other than the opaque marker).
pub fn read_item<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Option<Item>, EntryError> {
    let header = entry.header();
    let typeflag = header.entry_type().as_byte();
    if typeflag == b'g' {
        return Ok(None);
    }
    let raw_path = entry.path_bytes().into_owned();
    let path = clean_path(&raw_path)?;
    if path.is_empty() {
        return Ok(None);
    }
    if let Some(item) = classify_whiteout(&path)? {
        return Ok(Some(item));
    }
    if split_parent(&path).1.starts_with(b".wh..wh.") {
        return Ok(None);
    }
    let kind = match typeflag {
        b'0' | 0 | b'7' => Kind::File,
        other => Kind::from_code(other).ok_or_else(|| EntryError::Unsupported {
            path: lossy(&path),
            typeflag: other as char,
        })?,
    };
    let header = entry.header();
    // A PAX `size` that disagrees with the header's own size field is the parser differential behind
    // the tar header-desync CVEs: readers that honour one or the other see different next headers.
    // Only a zero field, or a saturated one for a file too large for it, may stand for the PAX size.
    let field = header.size().map_err(EntryError::Io)?;
    if field != entry.size() && field != 0 && field != USTAR_SIZE_MAX {
        return Err(EntryError::Invalid {
            path: lossy(&path),
            what: "PAX size contradicts the header's size field",
        });
    }
    let mut meta = EntryMeta {
        kind,
        mode: header.mode().map_err(EntryError::Io)? & 0o7777,
        uid: header.uid().map_err(EntryError::Io)?,
        gid: header.gid().map_err(EntryError::Io)?,
        mtime: header.mtime().map_err(EntryError::Io)?,
        size: if kind == Kind::File { entry.size() } else { 0 },
        link: Vec::new(),
        dev_major: 0,
        dev_minor: 0,
        xattrs: Vec::new(),
        path: Vec::new(),
    };
    if matches!(kind, Kind::Char | Kind::Block) {
        meta.dev_major = header.device_major().ok().flatten().unwrap_or(0);
        meta.dev_minor = header.device_minor().ok().flatten().unwrap_or(0);
    }
    match kind {
        Kind::Symlink | Kind::Hardlink => {
            let target = entry
                .link_name_bytes()
                .ok_or(EntryError::Invalid {
                    path: lossy(&path),
                    what: "link without a target",
                })?
                .into_owned();
            meta.link = if kind == Kind::Hardlink {
                let t = clean_path(&target)?;
                if t.is_empty() {
                    return Err(EntryError::Invalid {
                        path: lossy(&path),
                        what: "hardlink to the root",
                    });
                }
                t
            } else {
                if target.is_empty() || target.contains(&0) {
                    return Err(EntryError::Invalid {
                        path: lossy(&path),
                        what: "bad symlink target",
                    });
                }
                target
            };
        }
        _ => {}
    }
    if let Some(exts) = entry.pax_extensions().map_err(EntryError::Io)? {
        for ext in exts {
            let ext = ext.map_err(EntryError::Io)?;
            let (key, value) = (ext.key_bytes(), ext.value_bytes());
            let number = || -> Result<u64, EntryError> {
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.split('.').next())
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or(EntryError::Invalid {
                        path: lossy(&path),
                        what: "bad numeric PAX record",
                    })
            };
            match key {
                b"uid" => meta.uid = number()?,
                b"gid" => meta.gid = number()?,
                b"mtime" => meta.mtime = number().unwrap_or(meta.mtime),
                _ => {
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        meta.xattrs.push((name.to_vec(), value.to_vec()));
                    }
                }
            }
        }
    }
    meta.path = path;
    Ok(Some(Item::Entry(meta)))
}

/// Rounds up to whole blocks.
pub fn padded(n: u64) -> u64 {
    n.div_ceil(BLOCK) * BLOCK
}

/// One `"<len> key=value\n"` record; the length counts itself.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = 1 + key.len() + 1 + value.len() + 1;
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    let s = s.as_bytes();
    field[..digits].copy_from_slice(&s[s.len() - digits..]);
    field[digits] = 0;
}

/// Splits a path into ustar (prefix, name) if it fits.
fn ustar_split(path: &[u8]) -> Option<(&[u8], &[u8])> {
    if path.len() <= 100 {
        return Some((&[], path));
    }
    if path.len() > 256 {
        return None;
    }
    // The prefix takes as much as it can; the name must be non-empty and ≤ 100.
    (0..path.len())
        .rev()
        .filter(|&i| path[i] == b'/')
        .find(|&i| i <= 155 && path.len() - i - 1 <= 100 && i + 1 < path.len())
        .map(|i| (&path[..i], &path[i + 1..]))
}

struct Ustar<'a> {
    name: &'a [u8],
    prefix: &'a [u8],
    mode: u64,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: u64,
    typeflag: u8,
    link: &'a [u8],
    dev: (u64, u64),
}

impl Ustar<'_> {
    fn block(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..self.name.len()].copy_from_slice(self.name);
        octal(&mut b[100..108], self.mode);
        octal(&mut b[108..116], self.uid.min(MAX_OCTAL_8));
        octal(&mut b[116..124], self.gid.min(MAX_OCTAL_8));
        octal(&mut b[124..136], self.size.min(MAX_OCTAL_12));
        octal(&mut b[136..148], self.mtime.min(MAX_OCTAL_12));
        b[156] = self.typeflag;
        b[157..157 + self.link.len()].copy_from_slice(self.link);
        b[257..263].copy_from_slice(b"ustar\0");
        b[263..265].copy_from_slice(b"00");
        if self.dev != (0, 0) {
            octal(&mut b[329..337], self.dev.0.min(MAX_OCTAL_8));
            octal(&mut b[337..345], self.dev.1.min(MAX_OCTAL_8));
        }
        b[345..345 + self.prefix.len()].copy_from_slice(self.prefix);
        b[148..156].fill(b' ');
        let sum: u64 = b.iter().map(|&x| x as u64).sum();
        octal(&mut b[148..155], sum);
        b[155] = b' ';
        b
    }
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
            size,
            link: Vec::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: Vec::new(),
        }
    }

    /// The header blocks (PAX member if needed, then the ustar header) of the canonical form.
    pub fn header_bytes(&self) -> Vec<u8> {
        let mut pax = Vec::new();
        let split = ustar_split(&self.path);
        if split.is_none() || !self.path.is_ascii() {
            pax_record(&mut pax, b"path", &self.path);
        }
        let link_fits = self.link.len() <= 100 && self.link.is_ascii();
        if !link_fits {
            pax_record(&mut pax, b"linkpath", &self.link);
        }
        if self.size > MAX_OCTAL_12 {
            pax_record(&mut pax, b"size", self.size.to_string().as_bytes());
        }
        if self.uid > MAX_OCTAL_8 {
            pax_record(&mut pax, b"uid", self.uid.to_string().as_bytes());
        }
        if self.gid > MAX_OCTAL_8 {
            pax_record(&mut pax, b"gid", self.gid.to_string().as_bytes());
        }
        if self.mtime > MAX_OCTAL_12 {
            pax_record(&mut pax, b"mtime", self.mtime.to_string().as_bytes());
        }
        for (name, value) in &self.xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(name);
            pax_record(&mut pax, &key, value);
        }
        let (prefix, name) = match split {
            Some(s) if self.path.is_ascii() => s,
            // The ustar fields hold a truncated name; readers take the PAX `path`.
            _ => (&[][..], &self.path[self.path.len().saturating_sub(100)..]),
        };
        let link = if link_fits {
            &self.link[..]
        } else {
            &self.link[..0]
        };
        let ustar = Ustar {
            name,
            prefix,
            mode: self.mode as u64,
            uid: self.uid,
            gid: self.gid,
            size: self.size,
            mtime: self.mtime,
            typeflag: self.kind.typeflag(),
            link,
            dev: (self.dev_major as u64, self.dev_minor as u64),
        };
        let mut out = Vec::with_capacity(if pax.is_empty() {
            512
        } else {
            1024 + pax.len()
        });
        if !pax.is_empty() {
            let pax_header = Ustar {
                name: PAX_NAME,
                prefix: &[],
                mode: 0o644,
                uid: 0,
                gid: 0,
                size: pax.len() as u64,
                mtime: self.mtime.min(MAX_OCTAL_12),
                typeflag: b'x',
                link: &[],
                dev: (0, 0),
            };
            out.extend_from_slice(&pax_header.block());
            let start = out.len();
            out.extend_from_slice(&pax);
            out.resize(start + padded(pax.len() as u64) as usize, 0);
        }
        out.extend_from_slice(&ustar.block());
        out
    }

    /// Bytes [`write_entry`] writes for this entry: headers plus padded content.
    pub fn encoded_len(&self) -> u64 {
        self.header_bytes().len() as u64 + padded(self.size)
    }
}

/// Zeros for padding, shared.
const ZEROS: [u8; 1024] = [0; 1024];

/// Writes `n` zero bytes.
pub fn write_zeros<W: Write + ?Sized>(out: &mut W, mut n: u64) -> io::Result<()> {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        out.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

/// Writes one entry canonically; `content` must hold exactly `meta.size` bytes.
pub fn write_entry<W: Write + ?Sized>(
    out: &mut W,
    meta: &EntryMeta,
    content: &mut dyn Read,
) -> io::Result<()> {
    out.write_all(&meta.header_bytes())?;
    if meta.size > 0 {
        let copied = copy_exact(content, out, meta.size)?;
        if copied != meta.size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "tar entry {:?}: content ended after {copied} of {} bytes",
                    lossy(&meta.path),
                    meta.size
                ),
            ));
        }
        write_zeros(out, padded(meta.size) - meta.size)?;
    }
    Ok(())
}

/// Copy buffer for entry contents.
const COPY_BUF: usize = 128 * 1024;

fn copy_exact<W: Write + ?Sized>(from: &mut dyn Read, to: &mut W, len: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; COPY_BUF.min(len as usize).max(1)];
    let mut done = 0u64;
    while done < len {
        let want = buf.len().min((len - done) as usize);
        let n = match from.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        done += n as u64;
    }
    Ok(done)
}

/// The end-of-archive marker: two zero blocks.
pub fn write_end<W: Write + ?Sized>(out: &mut W) -> io::Result<()> {
    write_zeros(out, 2 * BLOCK)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(path: &str, kind: Kind) -> EntryMeta {
        EntryMeta {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
            size: 0,
            link: Vec::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: Vec::new(),
        }
    }

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

    /// Reads back what `write_entry` wrote with the tar crate and checks every field and the length.
    fn roundtrip(m: &EntryMeta) {
        let content = vec![7u8; m.size as usize];
        let mut out = Vec::new();
        write_entry(&mut out, m, &mut &content[..]).unwrap();
        assert_eq!(out.len() as u64, m.encoded_len());
        write_end(&mut out).unwrap();
        let mut archive = tar::Archive::new(&out[..]);
        let mut entries = archive.entries().unwrap();
        let mut e = entries.next().unwrap().unwrap();
        let Some(Item::Entry(back)) = read_item(&mut e).unwrap() else {
            panic!("not an entry")
        };
        let mut got = Vec::new();
        e.read_to_end(&mut got).unwrap();
        assert_eq!(&back, m);
        assert_eq!(got, content);
        assert!(entries.next().is_none());
    }

    #[test]
    fn canonical_form_roundtrips() {
        let mut file = meta("etc/hosts", Kind::File);
        file.size = 1000;
        roundtrip(&file);
        let mut long = meta(&"d/".repeat(80), Kind::Dir);
        long.path.pop();
        roundtrip(&long);
        let mut very_long = meta(&format!("{}/f", "x".repeat(300)), Kind::File);
        very_long.size = 3;
        roundtrip(&very_long);
        let mut link = meta("a/sym", Kind::Symlink);
        link.link = format!("/{}", "t".repeat(200)).into_bytes();
        roundtrip(&link);
        let mut hard = meta("b", Kind::Hardlink);
        hard.link = b"a/file".to_vec();
        roundtrip(&hard);
        let mut big_ids = meta("ids", Kind::File);
        big_ids.uid = 5_000_000;
        big_ids.gid = 4_000_000;
        big_ids.mode = 0o4755;
        roundtrip(&big_ids);
        let mut dev = meta("dev/null", Kind::Char);
        dev.dev_major = 1;
        dev.dev_minor = 3;
        roundtrip(&dev);
        let mut fifo = meta("run/fifo", Kind::Fifo);
        fifo.xattrs = vec![
            (b"user.a".to_vec(), b"1".to_vec()),
            (b"security.capability".to_vec(), vec![1, 0, 0, 2]),
        ];
        roundtrip(&fifo);
        let mut utf8 = meta("été/ü", Kind::File);
        utf8.size = 1;
        roundtrip(&utf8);
    }

    #[test]
    fn pax_record_length_counts_itself() {
        for n in [0usize, 1, 5, 80, 86, 87, 88, 990, 995, 996, 997, 1000] {
            let mut out = Vec::new();
            pax_record(&mut out, b"path", &vec![b'a'; n]);
            let (len, _) = std::str::from_utf8(&out).unwrap().split_once(' ').unwrap();
            assert_eq!(len.parse::<usize>().unwrap(), out.len(), "value length {n}");
        }
    }
}
