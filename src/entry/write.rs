//! The write half: the canonical form of an entry (ustar, with a PAX header only where ustar cannot
//! hold a field), and its exact length.

use std::io::{self, Read, Write};

use super::{lossy, EntryMeta, BLOCK, MAX_OCTAL_12, MAX_OCTAL_8};

/// Name of the PAX extended header member; readers ignore it.
const PAX_NAME: &[u8] = b"././@PaxHeader";

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

/// A PAX time as Go's archive/tar writes it: seconds, and a fraction without trailing zeros if any.
fn pax_time(secs: u64, nanos: u32) -> String {
    if nanos == 0 {
        return secs.to_string();
    }
    let frac = format!("{nanos:09}");
    format!("{secs}.{}", frac.trim_end_matches('0'))
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
        if self.mtime > MAX_OCTAL_12 || self.mtime_nsec != 0 {
            pax_record(
                &mut pax,
                b"mtime",
                pax_time(self.mtime, self.mtime_nsec).as_bytes(),
            );
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
    use super::super::*;
    use super::*;

    fn meta(path: &str, kind: Kind) -> EntryMeta {
        EntryMeta {
            mtime: 1_700_000_000,
            mode: 0o644,
            ..EntryMeta::synthetic(path.as_bytes(), kind, 0o644, 0)
        }
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
        let mut frac = meta("frac", Kind::Dir);
        frac.mtime_nsec = 123_456_789;
        roundtrip(&frac);
        let mut half = meta("half", Kind::File);
        half.mtime_nsec = 500_000_000;
        half.size = 2;
        roundtrip(&half);
        // As Go's archive/tar writes it: trailing zeros of the fraction left out.
        let pax = String::from_utf8_lossy(&half.header_bytes()).into_owned();
        assert!(pax.contains(" mtime=1700000000.5\n"), "{pax}");
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
