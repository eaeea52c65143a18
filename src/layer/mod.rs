//! A layer blob's bytes, decompressed: gzip (every member, as eStargz and concatenated layers carry
//! several), zstd (every frame) or none.

use std::io::{BufRead, Read};

#[cfg(feature = "isal")]
mod gunzip;

/// How a layer blob is compressed, from its media type (OCI image-spec layer.md, Docker schema2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    /// Told by the first bytes, for layers whose manifest names no media type (schema 1), as
    /// docker's `archive.DecompressStream` tells it.
    Detect,
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
/// bzip2 and xz, which docker also detects but strata does not decode.
const UNSUPPORTED_MAGIC: [(&[u8], &str); 2] = [
    (b"BZh", "bzip2"),
    (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], "xz"),
];
/// Bytes read to tell the compression: the longest magic number.
const MAGIC_LEN: usize = 6;

impl Compression {
    /// `None` for media types that are not layers.
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        Some(match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Compression::None,
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Compression::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Compression::Zstd,
            _ => return None,
        })
    }
}

/// The decompressed tar stream of a layer.
pub fn decompress<'a>(
    compression: Compression,
    input: impl BufRead + Send + 'a,
) -> Box<dyn Read + Send + 'a> {
    match compression {
        Compression::None => Box::new(input),
        Compression::Gzip => gunzip(input),
        Compression::Zstd => match zstd::stream::read::Decoder::with_buffer(input) {
            Ok(d) => Box::new(d),
            Err(e) => Box::new(FailingReader(Some(e))),
        },
        Compression::Detect => detect(input),
    }
}

/// Every member of a gzip stream: ISA-L's inflate where it is built in (the `isal` feature, on by
/// default), zlib-rs's otherwise.
fn gunzip<'a>(input: impl BufRead + Send + 'a) -> Box<dyn Read + Send + 'a> {
    // Unbuffered: ISA-L decodes small reads (the tar reader's 512-byte headers) through a window of
    // its own; a 256 KiB buffer in front measured no faster (benches/inflate.rs, within noise).
    #[cfg(feature = "isal")]
    return Box::new(gunzip::Gunzip::new(input));
    #[cfg(not(feature = "isal"))]
    return Box::new(flate2::bufread::MultiGzDecoder::new(input));
}

fn detect<'a>(mut input: impl BufRead + Send + 'a) -> Box<dyn Read + Send + 'a> {
    let mut head = Vec::with_capacity(MAGIC_LEN);
    if let Err(e) = (&mut input).take(MAGIC_LEN as u64).read_to_end(&mut head) {
        return Box::new(FailingReader(Some(e)));
    }
    let compression = if head.starts_with(GZIP_MAGIC) {
        Compression::Gzip
    } else if head.starts_with(ZSTD_MAGIC) {
        Compression::Zstd
    } else if let Some((_, name)) = UNSUPPORTED_MAGIC.iter().find(|(m, _)| head.starts_with(m)) {
        return Box::new(FailingReader(Some(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a {name}-compressed layer (strata decodes gzip and zstd only)"),
        ))));
    } else {
        Compression::None
    };
    let input = std::io::Cursor::new(head).chain(input);
    match compression {
        Compression::Gzip => gunzip(input),
        Compression::Zstd => match zstd::stream::read::Decoder::with_buffer(input) {
            Ok(d) => Box::new(d),
            Err(e) => Box::new(FailingReader(Some(e))),
        },
        _ => Box::new(input),
    }
}

/// Bytes of a blob's start that [`told_size`] reads: a zstd frame header at its longest.
pub const HEAD_LEN: u64 = 18;
/// Bytes of a blob's end that [`told_size`] reads: the gzip trailer, and room to see an eStargz
/// footer (51 bytes) before it.
pub const TAIL_LEN: u64 = 64;

/// Highest ratio of decompressed to compressed size a layer is taken to have: a gzip ISIZE (the size
/// modulo 4 GiB) that a size 4 GiB larger within this ratio would also give is not trusted.
const PLAUSIBLE_RATIO: u64 = 8;

/// The decompressed size of a layer blob of `compressed` bytes, as its first bytes (`head`, up to
/// [`HEAD_LEN`]) and last bytes (`tail`, up to [`TAIL_LEN`]) tell it: the gzip trailer's ISIZE,
/// the zstd frame's content size, the blob's own size when it is not compressed. `None` when they
/// cannot tell it, or not unambiguously: no content size in the zstd frame, sizes that only several
/// gzip members or zstd frames could give (eStargz), a size past 4 GiB that ISIZE cannot pin down.
///
/// A size told here is what one gzip member or zstd frame holds, which a blob of several can
/// still exceed: it is an estimate for a bound, checked by the output, not a fact.
pub fn told_size(
    compression: Compression,
    compressed: u64,
    head: &[u8],
    tail: &[u8],
) -> Option<u64> {
    match compression {
        Compression::None => Some(compressed),
        Compression::Gzip => gzip_size(compressed, tail),
        Compression::Zstd => zstd_size(compressed, head),
        Compression::Detect if head.starts_with(GZIP_MAGIC) => gzip_size(compressed, tail),
        Compression::Detect if head.starts_with(ZSTD_MAGIC) => zstd_size(compressed, head),
        Compression::Detect => {
            let unsupported = UNSUPPORTED_MAGIC.iter().any(|(m, _)| head.starts_with(m));
            (!unsupported && head.len() as u64 == compressed.min(HEAD_LEN)).then_some(compressed)
        }
    }
}

/// Fewest bytes `compressed` bytes of one gzip member or zstd frame decompress to: stored blocks
/// grow by 5 bytes per block (zlib stores incompressible data 16 KiB at a time: 1/3277), headers by
/// at most a few hundred (file names, extra fields).
fn least_content(compressed: u64) -> u64 {
    compressed.saturating_sub(compressed / 2048 + 1024)
}

fn gzip_size(compressed: u64, tail: &[u8]) -> Option<u64> {
    // eStargz ends with a footer member whose extra field names it.
    if tail.len() < 8 || tail.windows(6).any(|w| w == b"STARGZ") {
        return None;
    }
    let size = u32::from_le_bytes(tail[tail.len() - 4..].try_into().expect("4 bytes")) as u64;
    // Fewer bytes than the blob: several members (the last one's size), or past 4 GiB (wrapped).
    // Either way ISIZE does not tell the size.
    if size < least_content(compressed) {
        return None;
    }
    // Or it is size + k·4 GiB: only a ratio no layer has rules that out.
    let next = size + (1 << 32);
    (next > compressed.saturating_mul(PLAUSIBLE_RATIO)).then_some(size)
}

fn zstd_size(compressed: u64, head: &[u8]) -> Option<u64> {
    if !head.starts_with(ZSTD_MAGIC) || head.len() < 6 {
        return None;
    }
    let descriptor = head[4];
    if descriptor & 0x08 != 0 {
        return None;
    }
    let single_segment = descriptor & 0x20 != 0;
    let mut at = 5 + usize::from(!single_segment) + [0, 1, 2, 4][usize::from(descriptor & 3)];
    let len = match descriptor >> 6 {
        0 if single_segment => 1,
        0 => return None,
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let field = head.get(at..at + len)?;
    at += len;
    debug_assert!(at <= HEAD_LEN as usize);
    let mut bytes = [0u8; 8];
    bytes[..len].copy_from_slice(field);
    let size = u64::from_le_bytes(bytes) + if len == 2 { 256 } else { 0 };
    // Smaller than its own compressed bytes: the blob holds more frames than this one.
    (size >= least_content(compressed)).then_some(size)
}

struct FailingReader(Option<std::io::Error>);

impl Read for FailingReader {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Err(self
            .0
            .take()
            .unwrap_or_else(|| std::io::Error::other("zstd decoder failed")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn read_all(c: Compression, data: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        decompress(c, std::io::BufReader::with_capacity(7, data)).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn every_gzip_member_and_zstd_frame() {
        let mut two = gz(b"first ");
        two.extend(gz(b"second"));
        assert_eq!(read_all(Compression::Gzip, &two).unwrap(), b"first second");
        let mut z = zstd::encode_all(&b"one "[..], 3).unwrap();
        z.extend(zstd::encode_all(&b"two"[..], 3).unwrap());
        assert_eq!(read_all(Compression::Zstd, &z).unwrap(), b"one two");
        assert_eq!(read_all(Compression::None, b"raw").unwrap(), b"raw");
    }

    #[test]
    fn detect_tells_gzip_zstd_and_plain_tar_apart() {
        let data = [9u8; 5000];
        assert_eq!(read_all(Compression::Detect, &gz(&data)).unwrap(), data);
        let z = zstd::bulk::compress(&data, 3).unwrap();
        assert_eq!(read_all(Compression::Detect, &z).unwrap(), data);
        assert_eq!(read_all(Compression::Detect, &data).unwrap(), data);
        assert_eq!(read_all(Compression::Detect, b"ab").unwrap(), b"ab");
        assert_eq!(read_all(Compression::Detect, b"").unwrap(), b"");
        let e = read_all(Compression::Detect, b"BZh91AY&SY").unwrap_err();
        assert!(e.to_string().contains("bzip2"), "{e}");
    }

    #[test]
    fn corrupt_or_truncated_input_is_an_error() {
        let good = gz(&[7u8; 10000]);
        assert!(read_all(Compression::Gzip, &good[..good.len() - 5]).is_err());
        let mut bad = good.clone();
        bad[20] ^= 0xff;
        assert!(read_all(Compression::Gzip, &bad).is_err());
        let z = zstd::encode_all(&[7u8; 10000][..], 3).unwrap();
        assert!(read_all(Compression::Zstd, &z[..z.len() - 3]).is_err());
    }

    #[test]
    fn told_sizes() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let blob = gz(&data);
        let tail = &blob[blob.len() - TAIL_LEN as usize..];
        let head = &blob[..HEAD_LEN as usize];
        let n = blob.len() as u64;
        assert_eq!(
            told_size(Compression::Gzip, n, head, tail),
            Some(data.len() as u64)
        );
        assert_eq!(
            told_size(Compression::Detect, n, head, tail),
            Some(data.len() as u64)
        );
        // A last member smaller than the blob: several members, not told.
        let mut two = blob.clone();
        two.extend(gz(b"x"));
        let t = &two[two.len() - TAIL_LEN as usize..];
        assert_eq!(
            told_size(Compression::Gzip, two.len() as u64, head, t),
            None
        );
        // Past 4 GiB: an incompressible 4.5 GiB blob's ISIZE wraps once; ISIZE 512 MiB from 600 MiB
        // could also be 4.5 GiB; from 300 MiB it could not, at the ratios layers have.
        let mut fake = vec![0u8; 60];
        fake.extend_from_slice(&((1u32 << 29).to_le_bytes()));
        assert_eq!(
            told_size(Compression::Gzip, (4 << 30) + (1 << 29) + 1000, head, &fake),
            None,
            "4.5 GiB or 8.5 GiB"
        );
        assert_eq!(told_size(Compression::Gzip, 600 << 20, head, &fake), None);
        let mut gib = fake.clone();
        gib[60..].copy_from_slice(&(1u32 << 30).to_le_bytes());
        assert_eq!(
            told_size(Compression::Gzip, 700 << 20, head, &gib),
            None,
            "1 or 5 GiB"
        );
        assert_eq!(
            told_size(Compression::Gzip, 500 << 20, head, &gib),
            Some(1 << 30)
        );
        assert_eq!(
            told_size(Compression::Gzip, 300 << 20, head, &fake),
            Some(1 << 29)
        );
        fake[10..16].copy_from_slice(b"STARGZ");
        assert_eq!(told_size(Compression::Gzip, 300 << 20, head, &fake), None);

        let z = zstd::bulk::compress(&data, 3).unwrap();
        let zh = &z[..HEAD_LEN as usize];
        assert_eq!(
            told_size(Compression::Zstd, z.len() as u64, zh, &[]),
            Some(data.len() as u64)
        );
        let mut small = zstd::bulk::compress(b"tiny", 3).unwrap();
        let small_len = small.len() as u64;
        small.resize(HEAD_LEN as usize, 0);
        assert_eq!(
            told_size(Compression::Zstd, small_len, &small, &[]),
            Some(4)
        );
        assert_eq!(
            told_size(Compression::Zstd, small_len + 4096, &small, &[]),
            None
        );
        // A stream written without its size pledged names none.
        let streamed = zstd::encode_all(&data[..], 3).unwrap();
        let sh = &streamed[..HEAD_LEN as usize];
        assert_eq!(
            told_size(Compression::Zstd, streamed.len() as u64, sh, &[]),
            None
        );
        assert_eq!(told_size(Compression::None, 77, &[], &[]), Some(77));
        assert_eq!(told_size(Compression::Detect, 5, b"plain", &[]), Some(5));
        assert_eq!(
            told_size(Compression::Detect, 100, b"BZh91AY&SY", &[]),
            None
        );
    }
}
