//! Limits on what one image may make strata read and hold, and [`Guard`], the reader that enforces the
//! tar ones on a layer's decompressed tar before the tar parser sees it. (The manifest, config and
//! layer-count limits are checked where those are read: the sources and [`crate::manifest`].) The parser reads PAX and GNU long-name
//! members whole into memory and an inflater turns a small blob into any number of bytes, so these
//! are checked on the raw stream: the guard walks the same header structure the parser does (headers,
//! sizes, PAX `size` records), a step ahead of it.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Entries (tar members other than PAX and long-name headers) in all layers of one image.
pub const DEFAULT_MAX_ENTRIES: u64 = 2_000_000;
/// Bytes of one path or link target: Linux's PATH_MAX.
pub const DEFAULT_MAX_PATH_BYTES: u64 = 4096;
/// Bytes of one PAX extended header (or GNU long-name member): room for many xattrs.
pub const DEFAULT_MAX_PAX_BYTES: u64 = 1 << 20;
/// Uncompressed bytes of all layers of one image: well past real images, far short of a bomb's
/// terabytes.
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 64 << 30;
/// Bytes of one manifest or index: real ones are a few KiB, a big multi-platform index some tens.
pub const DEFAULT_MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Bytes of one image config: real ones are a few KiB, ones with a long history tens.
pub const DEFAULT_MAX_CONFIG_BYTES: u64 = 8 << 20;
/// Layers of one image: docker refuses to build past 125 and distribution's stores rarely see more
/// than 128; twice that leaves room and still bounds the fetches one request starts.
pub const DEFAULT_MAX_LAYERS: u64 = 256;

const BLOCK: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_entries: u64,
    pub max_path_bytes: u64,
    pub max_pax_bytes: u64,
    pub max_image_bytes: u64,
    pub max_manifest_bytes: u64,
    pub max_config_bytes: u64,
    pub max_layers: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_path_bytes: DEFAULT_MAX_PATH_BYTES,
            max_pax_bytes: DEFAULT_MAX_PAX_BYTES,
            max_image_bytes: DEFAULT_MAX_IMAGE_BYTES,
            max_manifest_bytes: DEFAULT_MAX_MANIFEST_BYTES,
            max_config_bytes: DEFAULT_MAX_CONFIG_BYTES,
            max_layers: DEFAULT_MAX_LAYERS,
        }
    }
}

/// A limit the image went past.
#[derive(Debug, thiserror::Error)]
#[error("{what} exceeds the limit of {limit} (--{flag})")]
pub struct LimitExceeded {
    pub what: &'static str,
    pub limit: u64,
    pub flag: &'static str,
}

/// What all layers of one image have used so far; shared by the layers' guards.
#[derive(Debug, Default)]
pub struct Budget {
    entries: AtomicU64,
    bytes: AtomicU64,
}

enum State {
    /// Collecting a header block.
    Header,
    /// Passing `left` bytes of member data (padding included); `keep` collects a PAX header's.
    Data { left: u64, keep: bool },
    /// After the end-of-archive block: the parser stops; the rest only counts as bytes.
    End,
}

/// Enforces [`Limits`] on a layer's tar stream as it is read.
pub struct Guard<R> {
    inner: R,
    limits: Limits,
    budget: Arc<Budget>,
    state: State,
    header: Vec<u8>,
    /// A PAX header's records, collected to learn the `size` it gives the next member.
    pax: Vec<u8>,
    /// The size a PAX record gave the next member.
    pax_size: Option<u64>,
}

fn exceeded(what: &'static str, limit: u64, flag: &'static str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        LimitExceeded { what, limit, flag },
    )
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// A ustar numeric field: octal text, or base-256 when the top bit is set.
fn numeric(field: &[u8]) -> io::Result<u64> {
    if field[0] & 0x80 != 0 {
        let mut v: u64 = (field[0] & 0x7f) as u64;
        for &b in &field[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(b as u64))
                .ok_or_else(|| invalid("tar size field overflows"))?;
        }
        return Ok(v);
    }
    let text: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ' || b == 0)
        .take_while(|&b| b != b' ' && b != 0)
        .collect();
    if text.is_empty() {
        return Ok(0);
    }
    let text = std::str::from_utf8(&text).map_err(|_| invalid("tar size field is not octal"))?;
    u64::from_str_radix(text, 8).map_err(|_| invalid("tar size field is not octal"))
}

/// The records of a PAX header: `len key=value\n`, each.
fn pax_records(data: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let mut rest = data;
    std::iter::from_fn(move || {
        let space = rest.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
        if len <= space + 1 || len > rest.len() {
            return None;
        }
        let record = &rest[space + 1..len - 1];
        rest = &rest[len..];
        let eq = record.iter().position(|&b| b == b'=')?;
        Some((&record[..eq], &record[eq + 1..]))
    })
}

impl<R: Read> Guard<R> {
    pub fn new(inner: R, limits: Limits, budget: Arc<Budget>) -> Self {
        Guard {
            inner,
            limits,
            budget,
            state: State::Header,
            header: Vec::with_capacity(BLOCK),
            pax: Vec::new(),
            pax_size: None,
        }
    }

    /// A complete header block: decides how much member data follows.
    fn on_header(&mut self) -> io::Result<()> {
        let h = std::mem::take(&mut self.header);
        if h.iter().all(|&b| b == 0) {
            self.state = State::End;
            return Ok(());
        }
        let typeflag = h[156];
        let field = numeric(&h[124..136])?;
        let l = &self.limits;
        let size = match typeflag {
            b'x' | b'g' | b'L' | b'K' => {
                if field > l.max_pax_bytes {
                    return Err(exceeded(
                        "an extended header (PAX or GNU long name)",
                        l.max_pax_bytes,
                        "max-pax-bytes",
                    ));
                }
                if matches!(typeflag, b'L' | b'K') && field > l.max_path_bytes + 1 {
                    return Err(exceeded("a path", l.max_path_bytes, "max-path-bytes"));
                }
                field
            }
            // Old GNU sparse entries: docker refuses them ("unhandled tar header type 83"), so strata
            // does too, here, before the extension blocks of their map could cost the guard its place.
            // (PAX-sparse files, which docker expands, are plain members to the guard.)
            b'S' => {
                return Err(invalid(
                    "GNU sparse entry (type S): docker refuses these too; write sparse files \
                     with --format=pax",
                ))
            }
            _ => {
                let entries = self.budget.entries.fetch_add(1, Ordering::Relaxed) + 1;
                if entries > l.max_entries {
                    return Err(exceeded("entries", l.max_entries, "max-entries"));
                }
                self.pax_size.take().unwrap_or(field)
            }
        };
        self.pax.clear();
        self.state = State::Data {
            left: size.div_ceil(BLOCK as u64) * BLOCK as u64,
            keep: typeflag == b'x',
        };
        if size == 0 {
            self.state = State::Header;
        }
        Ok(())
    }

    /// A PAX header's data is complete: checks its paths and notes the size it gives the next member.
    fn on_pax(&mut self) -> io::Result<()> {
        for (key, value) in pax_records(&self.pax) {
            match key {
                b"path" | b"linkpath" | b"GNU.sparse.name"
                    if value.len() as u64 > self.limits.max_path_bytes =>
                {
                    return Err(exceeded(
                        "a path",
                        self.limits.max_path_bytes,
                        "max-path-bytes",
                    ));
                }
                b"size" => {
                    let text = std::str::from_utf8(value).map_err(|_| invalid("PAX size"))?;
                    self.pax_size = Some(text.parse().map_err(|_| invalid("PAX size"))?);
                }
                _ => {}
            }
        }
        self.pax.clear();
        Ok(())
    }

    /// Walks the structure over bytes the parser is about to get.
    fn track(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            match &mut self.state {
                State::End => return Ok(()),
                State::Header => {
                    let n = (BLOCK - self.header.len()).min(data.len());
                    self.header.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if self.header.len() == BLOCK {
                        self.on_header()?;
                    }
                }
                State::Data { left, keep } => {
                    let n = (*left).min(data.len() as u64) as usize;
                    if *keep {
                        self.pax.extend_from_slice(&data[..n]);
                    }
                    *left -= n as u64;
                    data = &data[n..];
                    if *left == 0 {
                        let was_pax = *keep;
                        self.state = State::Header;
                        if was_pax {
                            self.on_pax()?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl<R: Read> Read for Guard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let total = self.budget.bytes.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if total > self.limits.max_image_bytes {
            return Err(exceeded(
                "the image's uncompressed size",
                self.limits.max_image_bytes,
                "max-image-bytes",
            ));
        }
        self.track(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (path, content, PAX records)
    type Member<'a> = (&'a str, &'a [u8], &'a [(&'a str, &'a [u8])]);

    fn tar(entries: &[Member]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data, pax) in entries {
            if !pax.is_empty() {
                b.append_pax_extensions(pax.iter().map(|(k, v)| (*k, *v)))
                    .unwrap();
            }
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, path, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn read_all(bytes: &[u8], limits: Limits) -> io::Result<u64> {
        let budget = Arc::new(Budget::default());
        let mut g = Guard::new(bytes, limits, budget.clone());
        // Short reads, so every state boundary falls mid-read somewhere.
        let mut buf = [0u8; 77];
        while g.read(&mut buf)? > 0 {}
        Ok(budget.entries.load(Ordering::Relaxed))
    }

    fn limit_hit(r: io::Result<u64>) -> &'static str {
        let e = r.unwrap_err();
        e.get_ref()
            .and_then(|i| i.downcast_ref::<LimitExceeded>())
            .map(|l| l.flag)
            .unwrap_or("other")
    }

    #[test]
    fn counts_entries_across_pax_and_long_names() {
        let long = format!("{}/f", "d".repeat(300));
        let bytes = tar(&[
            ("a", b"xyz", &[]),
            (&long, b"long name", &[]),
            ("x", b"12345", &[("SCHILY.xattr.user.a", b"1")]),
        ]);
        assert_eq!(read_all(&bytes, Limits::default()).unwrap(), 3);
    }

    #[test]
    fn limits_table() {
        let big_pax = vec![b'v'; 3000];
        let cases: Vec<(Vec<u8>, Limits, &str)> = vec![
            (
                tar(&[("a", b"", &[]), ("b", b"", &[]), ("c", b"", &[])]),
                Limits {
                    max_entries: 2,
                    ..Limits::default()
                },
                "max-entries",
            ),
            (
                tar(&[("x", b"", &[("SCHILY.xattr.user.big", &big_pax)])]),
                Limits {
                    max_pax_bytes: 1024,
                    ..Limits::default()
                },
                "max-pax-bytes",
            ),
            (
                tar(&[(&"p/".repeat(200), b"", &[])]),
                Limits {
                    max_path_bytes: 100,
                    ..Limits::default()
                },
                "max-path-bytes",
            ),
            (
                tar(&[("x", b"", &[("path", "q".repeat(200).as_bytes())])]),
                Limits {
                    max_path_bytes: 100,
                    ..Limits::default()
                },
                "max-path-bytes",
            ),
            (
                tar(&[("z", &[0u8; 10_000], &[])]),
                Limits {
                    max_image_bytes: 8192,
                    ..Limits::default()
                },
                "max-image-bytes",
            ),
        ];
        for (bytes, limits, flag) in cases {
            assert_eq!(limit_hit(read_all(&bytes, limits)), flag, "{limits:?}");
        }
    }

    #[test]
    fn follows_pax_sizes_and_base256() {
        // A member whose size only a PAX record gives (ustar field zero), then another member: the
        // guard must land on the second header to count it.
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("size", b"1000".as_slice())])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(0);
        h.set_path("big").unwrap();
        h.set_cksum();
        let mut bytes = b.into_inner().unwrap();
        bytes.truncate(bytes.len() - 1024);
        bytes.extend_from_slice(h.as_bytes());
        bytes.extend_from_slice(&[7u8; 1024]);
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_path("after").unwrap();
        h.as_gnu_mut().unwrap().size = [0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
        h.set_cksum();
        bytes.extend_from_slice(h.as_bytes());
        bytes.extend_from_slice(&[1u8; 512]);
        bytes.extend_from_slice(&[0u8; 1024]);
        assert_eq!(read_all(&bytes, Limits::default()).unwrap(), 2);
        assert_eq!(
            numeric(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]).unwrap(),
            256
        );
        assert_eq!(numeric(b"00000001750\0").unwrap(), 1000);
    }
}
