//! The registry view's layer blob: the merged tar, hashed for its diff_id on the merge thread and
//! compressed for the wire on a thread of its own (deflate costs about what the merge's inflate does,
//! so on two cores the two overlap), straight into a store upload. The upload is published only when
//! the merge ended well: a failed or abandoned merge leaves nothing.

use std::io::{self, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use sha2::{Digest as _, Sha256};
use tokio::runtime::Handle;

use super::job::Job;
use crate::format::image::WireCompression;
use crate::store::{BlobWriter, Published, Store};

/// gzip level of the wire layer: zlib-rs's fastest, since a first pull waits for the whole layer.
const GZIP_LEVEL: u32 = 1;
const ZSTD_LEVEL: i32 = 3;
/// Bytes per chunk handed to the compressing thread, and chunks queued: a few MiB in flight.
const CHUNK: usize = 256 * 1024;
const DEPTH: usize = 8;

enum Piece {
    Bytes(Vec<u8>),
    /// The merge ended well: publish.
    End,
}

/// Merges `job`'s layers into a stored blob; returns it and the uncompressed tar's digest.
pub(super) fn write_layer(
    job: &Job,
    store: &Store,
    compression: WireCompression,
    handle: &Handle,
) -> io::Result<(Published, String)> {
    let upload = store.blob_writer(None).map_err(io::Error::other)?;
    let (tx, rx) = sync_channel(DEPTH);
    std::thread::scope(|scope| {
        let compressing = scope.spawn(move || compress(rx, compression, upload));
        let mut out = Hashing {
            inner: Pipe {
                tx,
                buf: Vec::with_capacity(CHUNK),
            },
            hasher: Sha256::new(),
        };
        let merged = job.write_layer(&mut out, handle).and_then(|()| {
            out.inner.send_buf()?;
            out.inner.send(Piece::End)
        });
        let diff_id = format!("sha256:{}", hex::encode(out.hasher.finalize_reset()));
        // Closes the channel: the compressing thread ends, publishing only after `End`.
        drop(out);
        let compressed = compressing
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the compressing thread panicked")));
        match (merged, compressed) {
            (Ok(()), Ok(published)) => Ok((published, diff_id)),
            // A store failure shows on the merge side as a closed pipe: the store's error is the cause.
            (Err(e), Err(store)) if e.kind() == io::ErrorKind::BrokenPipe => Err(store),
            (Err(e), _) | (Ok(()), Err(e)) => Err(e),
        }
    })
}

fn compress(
    rx: Receiver<Piece>,
    compression: WireCompression,
    upload: BlobWriter,
) -> io::Result<Published> {
    let mut out = Compressor::new(compression, upload)?;
    for piece in rx {
        match piece {
            Piece::Bytes(b) => out.write_all(&b)?,
            Piece::End => return out.finish()?.finish().map_err(io::Error::other),
        }
    }
    Err(io::Error::other("the merge stopped; nothing stored"))
}

/// Chunks to the compressing thread.
struct Pipe {
    tx: SyncSender<Piece>,
    buf: Vec<u8>,
}

impl Pipe {
    fn send(&self, piece: Piece) -> io::Result<()> {
        self.tx.send(piece).map_err(|_| {
            io::Error::new(io::ErrorKind::BrokenPipe, "the compressing thread stopped")
        })
    }

    fn send_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.send(Piece::Bytes(full))
    }
}

impl Write for Pipe {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send_buf()?;
        }
        Ok(n)
    }

    /// Chunks go when full; the merge's flushes (meant for an HTTP body) need not cut them short.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Takes the sha256 of what passes (the uncompressed layer: its diff_id).
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Compressor {
    Gzip(flate2::write::GzEncoder<BlobWriter>),
    Zstd(zstd::stream::write::Encoder<'static, BlobWriter>),
    None(BlobWriter),
}

impl Compressor {
    fn new(compression: WireCompression, out: BlobWriter) -> io::Result<Compressor> {
        Ok(match compression {
            WireCompression::Gzip => Compressor::Gzip(flate2::write::GzEncoder::new(
                out,
                flate2::Compression::new(GZIP_LEVEL),
            )),
            WireCompression::Zstd => {
                Compressor::Zstd(zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)?)
            }
            WireCompression::None => Compressor::None(out),
        })
    }

    fn finish(self) -> io::Result<BlobWriter> {
        match self {
            Compressor::Gzip(e) => e.finish(),
            Compressor::Zstd(e) => e.finish(),
            Compressor::None(w) => Ok(w),
        }
    }
}

impl Write for Compressor {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::Gzip(e) => e.write(buf),
            Compressor::Zstd(e) => e.write(buf),
            Compressor::None(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::Gzip(e) => e.flush(),
            Compressor::Zstd(e) => e.flush(),
            Compressor::None(w) => w.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the compressing thread publishes: only after `End`, and then the compressed bytes of
    /// exactly what was sent.
    #[test]
    fn publishes_only_a_completed_stream() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_dir(dir.path()).unwrap();
        for compression in [
            WireCompression::Gzip,
            WireCompression::Zstd,
            WireCompression::None,
        ] {
            let (tx, rx) = sync_channel(2);
            let upload = store.blob_writer(None).unwrap();
            let t = std::thread::spawn(move || compress(rx, compression, upload));
            tx.send(Piece::Bytes(b"half".to_vec())).unwrap();
            drop(tx);
            assert!(t.join().unwrap().is_err(), "{compression:?}");

            let (tx, rx) = sync_channel(2);
            let upload = store.blob_writer(None).unwrap();
            let t = std::thread::spawn(move || compress(rx, compression, upload));
            tx.send(Piece::Bytes(b"whole ".to_vec())).unwrap();
            tx.send(Piece::Bytes(b"layer".to_vec())).unwrap();
            tx.send(Piece::End).unwrap();
            let published = t.join().unwrap().unwrap();
            let mut stored = Vec::new();
            io::Read::read_to_end(
                &mut store.open_blob(&published.digest, None).unwrap(),
                &mut stored,
            )
            .unwrap();
            let plain = match compression {
                WireCompression::Gzip => {
                    let mut out = Vec::new();
                    io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&stored[..]), &mut out)
                        .unwrap();
                    out
                }
                WireCompression::Zstd => zstd::decode_all(&stored[..]).unwrap(),
                WireCompression::None => stored,
            };
            assert_eq!(plain, b"whole layer");
        }
        // Nothing but the three published blobs.
        let blobs = std::fs::read_dir(dir.path().join("blobs/sha256"))
            .unwrap()
            .count();
        assert_eq!(blobs, 3);
    }
}
