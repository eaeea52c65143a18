//! A layer blob's bytes, decompressed: gzip (every member, as eStargz and concatenated layers carry
//! several), zstd (every frame) or none.

use std::io::{BufRead, Read};

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
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
        Compression::Zstd => match zstd::stream::read::Decoder::with_buffer(input) {
            Ok(d) => Box::new(d),
            Err(e) => Box::new(FailingReader(Some(e))),
        },
        Compression::Detect => detect(input),
    }
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
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
        Compression::Zstd => match zstd::stream::read::Decoder::with_buffer(input) {
            Ok(d) => Box::new(d),
            Err(e) => Box::new(FailingReader(Some(e))),
        },
        _ => Box::new(input),
    }
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
        let z = zstd::encode_all(&data[..], 3).unwrap();
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
}
