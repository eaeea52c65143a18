//! The body channel's writer: output bytes in bounded chunks to the response, with an optional tap
//! that hands one range of them to a thread of its own (a digest, a signature).

use std::collections::VecDeque;
use std::io::{self, Write};

use bytes::{Bytes, BytesMut};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use super::tee::TeeThread;
use super::CHUNK;
use crate::digest::Digest;
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
    /// Stream offsets where the tee starts another part, and whether that part is named by the
    /// tap's digest.
    cuts: VecDeque<(u64, bool)>,
    /// The digest of the tapped range, once known, when the tee stores that range as a part.
    part_name: Option<Digest>,
}

/// Chunks queued for a tap thread; it keeps pace with the body, so a few suffice.
const TAP_DEPTH: usize = 4;

struct Tap {
    /// Stream offsets of the range.
    start: u64,
    end: u64,
    /// Offset up to which the tap has been fed.
    fed: u64,
    /// Whether its result names the tee's part of the same range.
    names_part: bool,
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
            cuts: VecDeque::new(),
            part_name: None,
        }
    }

    /// Writes everything sent from now on into the store too.
    pub(super) fn set_tee(&mut self, tee: Option<TeeThread>) {
        self.tee = tee;
    }

    /// The tee's writers (its parts) with everything written so far, bytes not yet sent included.
    /// `None` if writing failed.
    pub(super) fn take_tee(&mut self) -> Option<Vec<BlobWriter>> {
        if !self.buf.is_empty() {
            let pending = Bytes::copy_from_slice(&self.buf);
            self.feed_tee(&pending, self.sent);
        }
        let mut parts = self.tee.take()?.finish()?;
        if let Some(name) = self.part_name.take() {
            parts.iter_mut().for_each(|p| p.name(name.clone()));
        }
        Some(parts)
    }

    /// Feeds `chunk` (at stream offset `offset`) to the tee, cut where its parts begin.
    fn feed_tee(&mut self, chunk: &Bytes, offset: u64) {
        let Some(tee) = &self.tee else {
            return;
        };
        let end = offset + chunk.len() as u64;
        let mut from = 0;
        let mut alive = true;
        while let Some(&(at, named)) = self.cuts.front().filter(|(at, _)| *at <= end) {
            debug_assert!(at >= offset, "a cut behind the bytes sent");
            let to = (at.max(offset) - offset) as usize;
            alive &= from == to || tee.feed(chunk.slice(from..to));
            alive &= tee.cut(named);
            from = to;
            self.cuts.pop_front();
        }
        alive &= from == chunk.len() || tee.feed(chunk.slice(from..));
        if !alive {
            self.tee = None;
        }
    }

    /// Stream offset of the next byte written.
    pub(super) fn position(&self) -> u64 {
        self.sent + self.buf.len() as u64
    }

    /// Taps the next `len` bytes for their sha256 (`sha256:…`, from [`ChannelWriter::finish_tap`]),
    /// and has the tee store them as a part of their own named by it, so the store does not hash
    /// them again.
    pub(super) fn tap_next_sha256(&mut self, len: u64) {
        self.tap_next(len, sha256_tap);
        if self.tee.is_some() {
            let start = self.position();
            self.cuts.push_back((start, true));
            self.cuts.push_back((start + len, false));
            self.tap.as_mut().expect("just set").names_part = true;
        }
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
            names_part: false,
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
        let Tap {
            tx,
            thread,
            names_part,
            ..
        } = tap;
        drop(tx);
        let result = thread
            .join()
            .map_err(|_| io::Error::other("tap thread panicked"))??;
        if names_part {
            let digest = std::str::from_utf8(&result)
                .ok()
                .and_then(|d| Digest::parse(d).ok());
            self.part_name =
                Some(digest.ok_or_else(|| io::Error::other("the tap gave no digest"))?);
        }
        Ok(result)
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
        self.feed_tee(&chunk, offset);
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

/// `sha256:…` of every chunk received.
fn sha256_tap(chunks: std::sync::mpsc::Receiver<Bytes>) -> io::Result<Vec<u8>> {
    let mut hasher = Sha256::new();
    for chunk in chunks {
        hasher.update(&chunk);
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())).into_bytes())
}
