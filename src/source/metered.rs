//! A blob's bytes counted as they arrive from upstream: into the `upstream_bytes` metric (which the
//! CLI's progress bar also follows), with a progress line every [`PROGRESS_EVERY`] while a long
//! transfer runs, and its failure counted once by kind.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;

use super::{BlobStream, SourceError};
use crate::digest::Digest;
use crate::metrics::Metrics;
use crate::registry::RegistryError;

/// How often a transfer still running says how far it got: often enough to show a big layer is
/// moving, rarely enough that a log of many conversions stays readable.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// What a transfer is of, for its progress lines.
pub(super) struct Transfer {
    pub(super) image: String,
    pub(super) digest: Digest,
    pub(super) size: u64,
}

pub(super) fn metered(inner: BlobStream, transfer: Transfer, metrics: Arc<Metrics>) -> BlobStream {
    let now = Instant::now();
    Box::pin(Metered {
        inner,
        transfer,
        metrics,
        read: 0,
        started: now,
        reported: now,
        ended: false,
    })
}

/// The metric label of an upstream failure.
pub(super) fn error_kind(e: &SourceError) -> &'static str {
    match e {
        RegistryError::Unauthorized(_) => "unauthorized",
        RegistryError::Denied(_) => "denied",
        RegistryError::NotFound(_) => "not_found",
        RegistryError::Upstream(_) => "upstream",
        RegistryError::Invalid(_) => "invalid",
        RegistryError::Limit { .. } => "limit",
    }
}

/// The kind of a transfer's failure: [`super::verify_stream`] reports a stall as `TimedOut` and
/// bytes that miss their digest or size as `InvalidData`.
fn transfer_kind(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::TimedOut => "stalled",
        io::ErrorKind::InvalidData => "digest_mismatch",
        _ => "transfer",
    }
}

struct Metered {
    inner: BlobStream,
    transfer: Transfer,
    metrics: Arc<Metrics>,
    read: u64,
    started: Instant,
    reported: Instant,
    /// Failed or read to its end: counted and reported once.
    ended: bool,
}

impl Metered {
    fn report(&self, message: &'static str) {
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 {
            self.read as f64 / elapsed
        } else {
            0.0
        };
        tracing::info!(
            image = %self.transfer.image,
            digest = %self.transfer.digest,
            bytes = self.read,
            size = self.transfer.size,
            // One decimal: enough to see a transfer slow down, short in a log line.
            mib_per_s = (rate / f64::from(1 << 20) * 10.0).round() / 10.0,
            elapsed_s = elapsed.round() as u64,
            "{message}"
        );
    }
}

impl Stream for Metered {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = self.inner.as_mut().poll_next(cx);
        match &item {
            Poll::Ready(Some(Ok(chunk))) => {
                self.read += chunk.len() as u64;
                self.metrics.upstream_bytes(chunk.len() as u64);
                if self.reported.elapsed() >= PROGRESS_EVERY {
                    self.reported = Instant::now();
                    self.report("layer progress");
                }
            }
            Poll::Ready(Some(Err(e))) if !self.ended => {
                self.ended = true;
                self.metrics.upstream_error(transfer_kind(e));
            }
            Poll::Ready(None) if !self.ended => {
                self.ended = true;
                // A transfer long enough to report progress says when it is done.
                if self.started.elapsed() >= PROGRESS_EVERY {
                    self.report("layer read");
                }
            }
            _ => {}
        }
        item
    }
}
