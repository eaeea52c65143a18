//! Where images come from: a registry, or a local OCI image layout. Both hand out manifests as bytes
//! and blobs as byte streams that check their own digest, size and liveness while they flow, counted
//! into the metrics as they arrive (`metered`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tracing::Instrument;

use crate::digest::{Digest, Verifier};
use crate::metrics::Metrics;
use crate::oci_layout::OciLayout;
use crate::reference::Reference;
use crate::registry::{self, Credentials, RegistryError};

mod metered;

pub type SourceError = RegistryError;

/// A blob's bytes; an error item ends it (bad digest or size, a stall, a broken connection).
pub type BlobStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// A manifest as served, with the digest of exactly these bytes.
#[derive(Debug, Clone)]
pub struct RawManifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: Digest,
}

/// Where the bytes come from, and the metrics that count what is read there.
#[derive(Clone)]
pub struct Source {
    origin: Origin,
    metrics: Arc<Metrics>,
}

#[derive(Clone)]
pub enum Origin {
    Registry(Arc<registry::Client>),
    Layout(Arc<OciLayout>),
}

impl Source {
    pub fn new(origin: Origin, metrics: Arc<Metrics>) -> Source {
        Source { origin, metrics }
    }

    /// An OCI image layout: every reference names one of its images, whatever its registry.
    pub fn is_layout(&self) -> bool {
        matches!(self.origin, Origin::Layout(_))
    }

    fn counted<T>(&self, result: Result<T, SourceError>) -> Result<T, SourceError> {
        if let Err(e) = &result {
            self.metrics.upstream_error(metered::error_kind(e));
        }
        result
    }

    pub async fn manifest(
        &self,
        reference: &Reference,
        tag_or_digest: &str,
        credentials: &Credentials,
    ) -> Result<RawManifest, SourceError> {
        let result = match &self.origin {
            Origin::Registry(c) => c.manifest(reference, tag_or_digest, credentials).await,
            Origin::Layout(l) => l.manifest(reference, tag_or_digest).await,
        };
        self.counted(result)
    }

    /// A page of the repository's tags (or more: a registry may ignore `n` and `last`), and whether
    /// more follow. An OCI layout's tags are its index's ref names.
    pub async fn tags(
        &self,
        reference: &Reference,
        n: Option<usize>,
        last: Option<&str>,
        credentials: &Credentials,
    ) -> Result<(Vec<String>, bool), SourceError> {
        let result = match &self.origin {
            Origin::Registry(c) => c.tags(reference, n, last, credentials).await,
            // All of them: the caller pages (as it must for registries that ignore `n`/`last`).
            Origin::Layout(l) => l.tags().await.map(|t| (t, false)),
        };
        self.counted(result)
    }

    /// The blob's bytes, counted into the metrics as they arrive (and a long transfer's progress
    /// logged).
    pub async fn blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        size: u64,
        credentials: &Credentials,
    ) -> Result<BlobStream, SourceError> {
        let result = match &self.origin {
            Origin::Registry(c) => c.blob(reference, digest, size, credentials).await,
            Origin::Layout(l) => l.blob(digest, size).await,
        };
        let stream = self.counted(result)?;
        Ok(metered::metered(
            stream,
            metered::Transfer {
                image: reference.to_string(),
                digest: digest.clone(),
                size,
            },
            self.metrics.clone(),
        ))
    }
}

impl Source {
    /// Bytes `range` of a blob (within its size), unverified; `None` when they cannot be had
    /// alone (a registry that ignores `Range`).
    pub async fn blob_range(
        &self,
        reference: &Reference,
        digest: &Digest,
        range: std::ops::Range<u64>,
        credentials: &Credentials,
    ) -> Result<Option<Bytes>, SourceError> {
        let result = match &self.origin {
            Origin::Registry(c) => c.blob_range(reference, digest, range, credentials).await,
            Origin::Layout(l) => l.blob_range(digest, range).await,
        };
        self.counted(result)
    }
}

/// An error in a blob's transfer (network, stall, bytes that miss their digest or size), as opposed
/// to its content: the registry's fault, not the image's. Every error a blob stream yields is one.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TransferError(#[source] pub io::Error);

fn transfer_error(e: io::Error) -> io::Error {
    io::Error::new(e.kind(), TransferError(e))
}

/// Chunks of a blob read ahead of its consumer: enough to keep the network and the digest check a
/// step ahead (more bought no speed in the end-to-end bench), few enough that the chunks in flight,
/// which hyper sizes up to a few hundred KiB, stay a few MiB per blob.
const READ_AHEAD_CHUNKS: usize = 8;

/// Drives a blob's stream on a task of its own, at most [`READ_AHEAD_CHUNKS`] ahead of the returned
/// stream. The network reads and the digest check (in the stream) then run beside the decompressor
/// that consumes it, on another core. The task ends when the returned stream is dropped, even while
/// the upstream is silent, and with it the upstream connection.
pub fn read_ahead(mut inner: BlobStream) -> BlobStream {
    let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD_CHUNKS);
    tokio::spawn(
        async move {
            loop {
                let item = tokio::select! {
                    item = inner.next() => item,
                    () = tx.closed() => return,
                };
                let Some(item) = item else { return };
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        }
        // The caller's span: the blob's progress lines, logged as this task reads it, carry it.
        .in_current_span(),
    );
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Ties a blob stream to the async code that hands it to a blocking reader: once the returned
/// [`Cancel`] is dropped (with the request future that held it, when a client hangs up), the stream
/// fails at its next poll and drops the blob, which ends its read-ahead and upstream connection. A
/// blocking reader is not cancelled by dropping its join handle; without this it would read the whole
/// blob for a client that has left.
pub fn cancellable(inner: BlobStream) -> (BlobStream, Cancel) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let stream = Cancellable {
        inner: Some(inner),
        cancelled: rx,
    };
    (Box::pin(stream), Cancel { _tx: tx })
}

/// Fails its [`cancellable`] stream when dropped.
pub struct Cancel {
    _tx: tokio::sync::oneshot::Sender<()>,
}

struct Cancellable {
    inner: Option<BlobStream>,
    cancelled: tokio::sync::oneshot::Receiver<()>,
}

impl Stream for Cancellable {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.inner.is_none() {
            return Poll::Ready(None);
        }
        // Ready only with an error: nothing is ever sent, the sender is only dropped.
        if Pin::new(&mut self.cancelled).poll(cx).is_ready() {
            self.inner = None;
            return Poll::Ready(Some(Err(transfer_error(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the request was abandoned",
            )))));
        }
        self.inner
            .as_mut()
            .expect("checked above")
            .as_mut()
            .poll_next(cx)
    }
}

/// Wraps a blob's byte stream: each chunk is hashed and counted, a silence longer than `idle` is an
/// error, and the end is only reported once digest and size match.
pub fn verify_stream(inner: BlobStream, digest: Digest, size: u64, idle: Duration) -> BlobStream {
    Box::pin(Verified {
        inner,
        verifier: Some(Verifier::new(digest, size)),
        idle_timeout: idle,
        idle: Box::pin(tokio::time::sleep(idle)),
    })
}

struct Verified {
    inner: BlobStream,
    verifier: Option<Verifier>,
    idle_timeout: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
}

fn invalid(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl Stream for Verified {
    type Item = io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_verified(cx)
            .map(|item| item.map(|r| r.map_err(transfer_error)))
    }
}

impl Verified {
    fn poll_verified(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<io::Result<Bytes>>> {
        if self.verifier.is_none() {
            return Poll::Ready(None);
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Pending => {
                if self.idle.as_mut().poll(cx).is_ready() {
                    self.verifier = None;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "blob stalled: no data for {}s",
                            self.idle_timeout.as_secs_f32()
                        ),
                    ))));
                }
                Poll::Pending
            }
            Poll::Ready(Some(Ok(chunk))) => {
                let deadline = tokio::time::Instant::now() + self.idle_timeout;
                self.idle.as_mut().reset(deadline);
                let verifier = self.verifier.as_mut().expect("checked above");
                match verifier.update(&chunk) {
                    Ok(()) => Poll::Ready(Some(Ok(chunk))),
                    Err(e) => {
                        self.verifier = None;
                        Poll::Ready(Some(Err(invalid(e))))
                    }
                }
            }
            Poll::Ready(Some(Err(e))) => {
                self.verifier = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => match self.verifier.take().expect("checked above").finish() {
                Ok(()) => Poll::Ready(None),
                Err(e) => Poll::Ready(Some(Err(invalid(e)))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    async fn collect(chunks: Vec<&'static [u8]>, digest: Digest, size: u64) -> io::Result<Vec<u8>> {
        let inner: BlobStream = Box::pin(futures::stream::iter(
            chunks.into_iter().map(|c| Ok(Bytes::from_static(c))),
        ));
        let mut s = verify_stream(inner, digest, size, Duration::from_secs(5));
        let mut out = Vec::new();
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_cancelled_stream_fails_and_drops_the_blob() {
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(1);
        let inner: BlobStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
        let (mut s, cancel) = cancellable(inner);
        tx.send(Ok(Bytes::from_static(b"a"))).await.unwrap();
        assert_eq!(s.next().await.unwrap().unwrap(), "a");
        let next = tokio::spawn(async move {
            let item = s.next().await;
            (item, s.next().await)
        });
        tokio::task::yield_now().await;
        drop(cancel);
        let (item, after) = next.await.unwrap();
        let e = item.unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        assert!(after.is_none());
        assert!(tx.is_closed(), "the blob was dropped");
    }

    #[tokio::test]
    async fn verified_stream() {
        let d = Digest::of(b"hello world");
        assert_eq!(
            collect(vec![b"hello ", b"world"], d.clone(), 11)
                .await
                .unwrap(),
            b"hello world"
        );
        let e = collect(vec![b"hello ", b"World"], d.clone(), 11)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(collect(vec![b"hello ", b"world!"], d.clone(), 11)
            .await
            .is_err());
        assert!(collect(vec![b"hello "], d, 11).await.is_err());
    }
}
