//! A layer blob's bytes, decompressed: gzip (every member, as eStargz and concatenated layers carry
//! several), zstd (every frame) or none.

use std::io::{BufRead, Read};

/// How a layer blob is compressed, from its media type (OCI image-spec layer.md, Docker schema2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

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
