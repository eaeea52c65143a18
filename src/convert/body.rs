//! The body channel's writer: output bytes in bounded chunks to the response, with an optional tap
//! that hands one range of them to a thread of its own (a digest, a signature).

use std::io::{self, Write};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::cached::TeeThread;
use super::CHUNK;
use crate::store::BlobWriter;

/// `Write` into the body channel, in [`CHUNK`]-sized pieces. A closed channel (the client went away)
/// is a `BrokenPipe`, which stops the merge and with it the upstream fetches.
///
/// It can also hand one range of what it sends to a "tap" on a thread of its own (a digest, a
/// signature): the chunks are shared, not copied, and the hashing leaves the merge thread.
pub(super) struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: BytesMut,
    /// Bytes sent so far.
    sent: u64,
    tap: Option<Tap>,
    /// Where every byte sent also goes (the store).
    tee: Option<TeeThread>,
}

/// Chunks queued for a tap thread; it keeps pace with the body, so a few suffice.
const TAP_DEPTH: usize = 4;

struct Tap {
    /// Stream offsets of the range.
    start: u64,
    end: u64,
    /// Offset up to which the tap has been fed.
    fed: u64,
    tx: std::sync::mpsc::SyncSender<Bytes>,
    thread: std::thread::JoinHandle<io::Result<Vec<u8>>>,
}

impl Tap {
    /// Feeds the part of `chunk` (at stream offset `offset`) that lies in the range and beyond `fed`.
    fn feed(&mut self, chunk: &Bytes, offset: u64) -> io::Result<()> {
        let end = offset + chunk.len() as u64;
        let from = self.start.max(self.fed).clamp(offset, end) - offset;
        let to = self.end.clamp(offset, end) - offset;
        if from < to {
            self.tx
                .send(chunk.slice(from as usize..to as usize))
                .map_err(|_| io::Error::other("tap thread ended early"))?;
            self.fed = offset + to;
        }
        Ok(())
    }
}

impl ChannelWriter {
    pub(super) fn new(tx: mpsc::Sender<io::Result<Bytes>>) -> Self {
        ChannelWriter {
            tx,
            buf: BytesMut::with_capacity(CHUNK),
            sent: 0,
            tap: None,
            tee: None,
        }
    }

    /// Writes everything sent from now on into `writer` too.
    pub(super) fn set_tee(&mut self, writer: Option<BlobWriter>) {
        self.tee = writer.and_then(TeeThread::start);
    }

    /// The tee's writer with everything written so far, bytes not yet sent included: the caller
    /// can publish them before the client receives the last of them. `None` if writing failed.
    pub(super) fn take_tee(&mut self) -> Option<BlobWriter> {
        let tee = self.tee.take()?;
        if !self.buf.is_empty() && !tee.feed(Bytes::copy_from_slice(&self.buf)) {
            return None;
        }
        tee.finish()
    }

    /// Stream offset of the next byte written.
    pub(super) fn position(&self) -> u64 {
        self.sent + self.buf.len() as u64
    }

    /// Hands the next `len` bytes written (`u64::MAX`: all the rest) to `consume` on its own thread.
    pub(super) fn tap_next<F>(&mut self, len: u64, consume: F)
    where
        F: FnOnce(std::sync::mpsc::Receiver<Bytes>) -> io::Result<Vec<u8>> + Send + 'static,
    {
        let start = self.position();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(TAP_DEPTH);
        let thread = std::thread::Builder::new()
            .name("strata-tap".into())
            .spawn(move || consume(rx))
            .expect("a thread can be started");
        self.tap = Some(Tap {
            start,
            end: start.saturating_add(len),
            fed: start,
            tx,
            thread,
        });
    }

    /// The tap's result, once its range is written (or, for an open range, at this point). Bytes
    /// written but not yet sent are fed to it without being sent: a caller can act on the result
    /// before the client receives them.
    pub(super) fn finish_tap(&mut self) -> io::Result<Vec<u8>> {
        let mut tap = self.tap.take().expect("a range is being tapped");
        if tap.end != u64::MAX && self.position() < tap.end {
            return Err(io::Error::other("tapped range not fully written"));
        }
        if !self.buf.is_empty() {
            let pending = Bytes::copy_from_slice(&self.buf);
            tap.feed(&pending, self.sent)?;
        }
        let Tap { tx, thread, .. } = tap;
        drop(tx);
        thread
            .join()
            .map_err(|_| io::Error::other("tap thread panicked"))?
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.buf.reserve(CHUNK);
        let offset = self.sent;
        self.sent += chunk.len() as u64;
        if let Some(tap) = &mut self.tap {
            tap.feed(&chunk, offset)?;
        }
        if self.tee.as_ref().is_some_and(|t| !t.feed(chunk.clone())) {
            self.tee = None;
        }
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "client went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}
