//! The tarball routes' outputs (docker-load archives, ACIs) kept in the content-addressed store: a
//! conversion's bytes are written into a blob as they stream ([`Tee`]) and published only when the
//! conversion succeeded; a repeat finds them by their [`ArtifactKey`] and streams the blob instead of
//! converting again.
//!
//! The derived record names a small descriptor, not the tarball itself: GC's mark and
//! [`Store::complete`] read a record's target as a manifest (bounded to a few MiB) and follow its
//! `layers`, so a descriptor listing the tarball as its one layer keeps the tarball rooted, and an
//! evicted tarball makes the record a miss, with no change to the store. Recording the tarball's
//! digest directly would make the mark read a GiB blob as JSON and stop GC.

use std::io::{self, Read, Write};
use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{AciRequest, ByteStream, Converter, Error, Planned, PlannedAci};
use crate::digest::Digest;
use crate::sign::Signer;
use crate::store::fleet::{FleetLease, Leases};
use crate::store::{ArtifactKey, BlobReader, BlobWriter, Lease, Store, StoreError};

/// Media type of the descriptor a tarball's record names.
const DESCRIPTOR_TYPE: &str = "application/vnd.strata.tarball.v1+json";
/// A descriptor is a few hundred bytes; anything larger is not one.
const DESCRIPTOR_LIMIT: u64 = 64 << 10;
/// Bytes per read of a stored tarball: large reads keep the syscalls and the body's frames few.
const STORED_CHUNK: usize = 1 << 20;
/// Chunks read ahead of the client; a slow client holds at most this many MiB.
const STORED_DEPTH: usize = 4;

/// A stored conversion output.
#[derive(Debug, Clone)]
pub struct StoredTarball {
    pub digest: Digest,
    /// Exact length of the bytes.
    pub size: u64,
    /// The validator the bytes were sent with when they were made (a squash's depends on how its
    /// layer was sized then); `None` from a descriptor that kept none.
    pub etag: Option<String>,
    /// The descriptor the record names.
    descriptor: Digest,
}

/// The key of a squash's bytes: the source manifest (which fixes the platform, config and layers),
/// the name `docker load` gives it, and the source name its history entry quotes.
pub(super) fn squash_key(
    manifest: &Digest,
    repo_tag: Option<&str>,
    source_name: &str,
) -> ArtifactKey {
    let key = ArtifactKey::new(manifest.clone(), "docker-archive").option("source", source_name);
    match repo_tag {
        Some(tag) => key.option("tag", tag),
        None => key,
    }
}

/// The key of an ACI's bytes: the source manifest and everything of its identity its manifest holds.
pub(super) fn aci_key(identity: &crate::format::aci::Identity) -> ArtifactKey {
    let manifest = Digest::parse(&identity.manifest_digest).expect("a resolved manifest's digest");
    ArtifactKey::new(manifest, "aci")
        .option("name", &identity.name)
        .option("version", &identity.version)
        .option("os", &identity.os)
        .option("arch", &identity.arch)
        .option("registry", &identity.registry)
        .option("repository", &identity.repository)
}

/// Where a conversion's bytes go in the store: [`Tee::writer`] when the conversion starts, then
/// [`Tee::publish`] once they are all written. A writer dropped unpublished (a failure, a client
/// gone) leaves nothing visible.
pub(super) struct Tee {
    store: Store,
    key: ArtifactKey,
    /// Exact length the output must have, when announced ahead (a squash's `Content-Length`).
    expected: Option<u64>,
    /// The validator the output is sent with, kept for repeats of the stored bytes.
    etag: Option<String>,
    /// `--cache-max-bytes`: enforced after each tarball is stored, as after each registry-view
    /// conversion.
    max_bytes: Option<u64>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Whose turn eviction is, on a store shared by replicas.
    leases: Option<Arc<Leases>>,
    /// The key's fleet lease, held while the conversion runs and released once its record is
    /// published (or, unpublished, when the tee is dropped with the conversion): requests for the
    /// same bytes wait for the record meanwhile ([`super::fleet`]).
    converting: Option<FleetLease>,
}

impl Tee {
    /// A new blob for the bytes; a store that cannot take it is logged and the conversion goes on
    /// unstored.
    pub(super) fn writer(&self) -> Option<BlobWriter> {
        self.store
            .blob_writer(None)
            .inspect_err(|e| tracing::warn!(error = %e, key = %self.key, "cannot write into the store; not storing"))
            .ok()
    }

    /// Publishes the blob, then its descriptor and record. `writer`: `None` if writing into it
    /// failed; `written`: what the conversion wrote, to compare with what was announced. A store
    /// failure is logged, not the conversion's: the client has its bytes, and the next request
    /// converts again.
    pub(super) fn publish(self, writer: Option<BlobWriter>, written: u64) {
        let Tee {
            store,
            key,
            expected,
            etag,
            max_bytes,
            metrics,
            leases,
            converting,
        } = self;
        if expected.is_some_and(|e| e != written) {
            tracing::error!(written, ?expected, %key, "output length differs from the announced one; not stored");
            return;
        }
        let Some(writer) = writer else {
            return; // what failed was logged when it did
        };
        let started = std::time::Instant::now();
        let stored = (|| {
            let blob = writer.finish()?;
            let descriptor =
                store.put_blob(&descriptor(&blob.digest, blob.size, etag.as_deref()))?;
            store.put_derived(&key, &descriptor.digest)?;
            // The leases are held until the record that roots both exists.
            drop(descriptor);
            Ok::<_, StoreError>(blob)
        })();
        match stored {
            Ok(blob) => tracing::info!(
                digest = %blob.digest,
                bytes = blob.size,
                %key,
                publish_ms = started.elapsed().as_millis() as u64,
                "stored tarball"
            ),
            Err(e) => {
                tracing::warn!(error = %e, %key, "storing the tarball failed");
                return;
            }
        }
        if converting.as_ref().is_some_and(FleetLease::lost) {
            tracing::warn!(%key, "converted under a lease another replica took over");
        }
        // Released now that the record exists, so the requests waiting for it find it.
        drop(converting);
        // Apart, so the last bytes are not held back by it.
        if let Some(max) = max_bytes {
            std::thread::spawn(move || {
                let Some(_lease) = super::space::space_turn(leases.as_deref()) else {
                    return;
                };
                match store.evict(max) {
                    Ok(r) if !r.removed.is_empty() => {
                        metrics.store_evicted(r.removed.len());
                        tracing::info!(
                            removed = r.removed.len(),
                            bytes_left = r.bytes,
                            "evicted least recently used blobs"
                        )
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "eviction failed"),
                }
            });
        }
    }
}

/// Annotation of a descriptor: the validator its tarball was sent with.
const ETAG_ANNOTATION: &str = "org.strata.etag";

fn descriptor(digest: &Digest, size: u64, etag: Option<&str>) -> Vec<u8> {
    let mut doc = json!({
        "schemaVersion": 2,
        "mediaType": DESCRIPTOR_TYPE,
        "layers": [{"mediaType": "application/x-tar", "digest": digest.to_string(), "size": size}],
    });
    if let Some(etag) = etag {
        doc["annotations"] = json!({ ETAG_ANNOTATION: etag });
    }
    serde_json::to_vec(&doc).expect("JSON serialises")
}

/// The tarball a record names, if it is still stored whole.
pub(super) fn lookup(
    store: &Store,
    key: &ArtifactKey,
) -> Result<Option<StoredTarball>, StoreError> {
    let Some(record) = store.derived(key)? else {
        return Ok(None);
    };
    let bytes = match store.read_small(&record, DESCRIPTOR_LIMIT) {
        Ok(b) => b,
        Err(StoreError::BlobUnknown(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let damaged = |reason: &str| StoreError::Damaged {
        key: record.to_string(),
        reason: reason.to_string(),
    };
    let doc: Value = serde_json::from_slice(&bytes).map_err(|e| damaged(&e.to_string()))?;
    if doc["mediaType"] != DESCRIPTOR_TYPE {
        return Err(damaged("not a tarball descriptor"));
    }
    let layer = &doc["layers"][0];
    let digest = Digest::parse(layer["digest"].as_str().unwrap_or_default())?;
    let size = layer["size"].as_u64().ok_or_else(|| damaged("no size"))?;
    // Evicted (or, impossibly for a verified blob, of another size): convert again.
    Ok(match store.stat_blob(&digest)? {
        Some(meta) if meta.size == size => Some(StoredTarball {
            digest,
            size,
            etag: doc["annotations"][ETAG_ANNOTATION]
                .as_str()
                .map(str::to_string),
            descriptor: record,
        }),
        _ => None,
    })
}

/// The tarball opened for reading, and its descriptor leased: both are used, so both become recent
/// for eviction (the descriptor is read unleased, and an old one would be evicted first, making a
/// tarball read every minute a miss).
fn open(
    store: &Store,
    tarball: &StoredTarball,
    range: Option<Range<u64>>,
) -> Result<(BlobReader, Option<Lease>), StoreError> {
    let descriptor = store.lease(&tarball.descriptor)?;
    Ok((store.open_blob(&tarball.digest, range)?, descriptor))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::io("store task")(io::Error::other(e))))
}

impl Converter {
    /// Where the output known by `key` goes in the store, if there is one; `converting` is the
    /// key's fleet lease, held until the output is published.
    pub(super) fn tee(
        &self,
        key: &ArtifactKey,
        expected: Option<u64>,
        etag: Option<&str>,
        converting: Option<FleetLease>,
    ) -> Option<Tee> {
        Some(Tee {
            store: self.images.clone()?,
            key: key.clone(),
            expected,
            etag: etag.map(str::to_string),
            max_bytes: self.config.store_max_bytes,
            metrics: self.metrics.clone(),
            leases: self.leases.clone(),
            converting,
        })
    }

    async fn stored(&self, key: &ArtifactKey) -> Option<StoredTarball> {
        let store = self.images.clone()?;
        let key = key.clone();
        let shown = key.to_string();
        let found = match blocking(move || lookup(&store, &key)).await {
            Ok(found) => found,
            // The store is an optimisation here: a damaged record is converted again, not an error.
            Err(e) => {
                tracing::warn!(error = %e, key = %shown, "stored tarball unreadable; converting");
                None
            }
        };
        self.metrics.store_lookup("tarball", found.is_some());
        found
    }

    /// The stored bytes of a planned squash, if converted before and still stored.
    pub async fn stored_squash(&self, planned: &Planned) -> Option<StoredTarball> {
        self.stored(&planned.key).await
    }

    /// The stored bytes of a planned ACI, if converted before and still stored.
    pub async fn stored_aci(&self, planned: &PlannedAci) -> Option<StoredTarball> {
        self.stored(&planned.key).await
    }

    /// The stored bytes (or the part `range` names), streamed from a blocking thread; `Ok(None)` if
    /// they were evicted since [`Converter::stored_squash`] found them (convert instead). The blob is
    /// leased until the stream ends, so it is not removed under a reader.
    pub async fn open_stored(
        &self,
        tarball: &StoredTarball,
        range: Option<Range<u64>>,
    ) -> Result<Option<ByteStream>, Error> {
        let Some(store) = self.images.clone() else {
            return Ok(None);
        };
        let tarball = tarball.clone();
        match blocking(move || open(&store, &tarball, range)).await {
            Ok((reader, descriptor)) => Ok(Some(stream_blob(reader, descriptor))),
            Err(StoreError::BlobUnknown(_)) => Ok(None),
            Err(e) => Err(Error::Internal(e.to_string())),
        }
    }

    /// Signs a stored ACI's bytes and keeps the signature, when the ACI is stored but no signature
    /// of it is kept (a new key, lost signatures); otherwise converts it, which signs as it goes.
    /// What a `202` for a signature starts in the background.
    pub async fn sign_in_background(&self, request: AciRequest) -> Result<(), Error> {
        let mut planned = self.plan_aci(request).await?;
        let (Some(signer), Some(store)) = (self.config.signer.clone(), self.images.clone()) else {
            return self.convert_to_sign(planned).await;
        };
        let tarball = match self.stored_aci(&planned).await {
            Some(t) => t,
            // Converted by another request meanwhile, or this one's to convert.
            None => match self.aci_turn(&mut planned).await {
                Some(t) => t,
                None => return self.convert_to_sign(planned).await,
            },
        };
        let signed = blocking(move || {
            let reader = store.open_blob(&tarball.digest, None)?;
            sign_blob(reader, &signer).map_err(StoreError::io("signing a stored ACI"))
        })
        .await;
        match signed {
            Ok(signature) => {
                let key = self
                    .config
                    .signer
                    .as_ref()
                    .expect("checked above")
                    .key_id(&planned.etag);
                self.signatures
                    .save(&key, &String::from_utf8_lossy(&signature));
                Ok(())
            }
            // Evicted since the lookup.
            Err(StoreError::BlobUnknown(_)) => self.convert_to_sign(planned).await,
            Err(e) => Err(Error::Internal(e.to_string())),
        }
    }

    async fn convert_to_sign(&self, planned: PlannedAci) -> Result<(), Error> {
        let mut body = self.prepare_planned_aci(planned).await?.body;
        while let Some(chunk) = futures::StreamExt::next(&mut body).await {
            chunk.map_err(|e| Error::Upstream(e.to_string()))?;
        }
        Ok(())
    }
}

/// A stored ACI's signature: the blob read here, hashed and signed on a thread of its own.
fn sign_blob(mut reader: BlobReader, signer: &Arc<Signer>) -> io::Result<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(STORED_DEPTH);
    let signing = {
        let signer = signer.clone();
        std::thread::Builder::new()
            .name("strata-sign".into())
            .spawn(move || signer.sign_stream(rx))?
    };
    let mut left = reader.range.end - reader.range.start;
    while left > 0 {
        let chunk = read_chunk(&mut reader, left.min(STORED_CHUNK as u64) as usize)?;
        left -= chunk.len() as u64;
        if tx.send(chunk).is_err() {
            break; // the signer failed: its error is the one to report
        }
    }
    drop(tx);
    signing
        .join()
        .map_err(|_| io::Error::other("signing thread panicked"))?
}

/// A stored blob's bytes as a body (tarball repeats and the registry view's blobs), read on a
/// blocking thread in [`STORED_CHUNK`]s, leased until the end. A read failure or a blob
/// shorter than its range ends the stream with an error, so the transfer is aborted, never short.
pub fn stream_blob(mut reader: BlobReader, descriptor: Option<Lease>) -> ByteStream {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(STORED_DEPTH);
    tokio::task::spawn_blocking(move || {
        let _leased = descriptor;
        let mut left = reader.range.end - reader.range.start;
        while left > 0 {
            let want = left.min(STORED_CHUNK as u64) as usize;
            let chunk = match read_chunk(&mut reader, want) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "reading a stored blob failed");
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            };
            left -= chunk.len() as u64;
            if tx.blocking_send(Ok(chunk)).is_err() {
                return; // the client went away
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

fn read_chunk(reader: &mut impl Read, want: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::zeroed(want);
    let mut filled = 0;
    while filled < want {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(buf.freeze())
}

/// The part `range` (of stream offsets) of a body, for a ranged request that must convert: the bytes
/// before it are converted and stored but not sent. The body is dropped once the range is through,
/// which, before its end, stops the conversion as a client hang-up does.
pub fn window(inner: ByteStream, range: Range<u64>) -> ByteStream {
    let mut inner = Some(inner);
    let mut offset = 0u64;
    Box::pin(futures::stream::poll_fn(move |cx| loop {
        let Some(body) = inner.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        if offset >= range.end {
            inner = None;
            return std::task::Poll::Ready(None);
        }
        let chunk = match std::task::ready!(body.as_mut().poll_next(cx)) {
            Some(Ok(chunk)) => chunk,
            other => return std::task::Poll::Ready(other),
        };
        let (start, end) = (offset, offset + chunk.len() as u64);
        offset = end;
        let from = range.start.clamp(start, end) - start;
        let to = range.end.clamp(start, end) - start;
        if from < to {
            return std::task::Poll::Ready(Some(Ok(chunk.slice(from as usize..to as usize))));
        }
    }))
}

/// Chunks queued for the store's writer thread: 4 MiB, enough to ride out a slow write.
const TEE_DEPTH: usize = 16;

/// The store's copy of a body, written on a thread of its own: the disk write overlaps the merge,
/// and the chunks are shared with the body, not copied. A failing write stops only the storing.
pub(super) struct TeeThread {
    tx: std::sync::mpsc::SyncSender<Bytes>,
    thread: std::thread::JoinHandle<Option<BlobWriter>>,
}

impl TeeThread {
    pub(super) fn start(mut writer: BlobWriter) -> Option<TeeThread> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(TEE_DEPTH);
        let thread = std::thread::Builder::new()
            .name("strata-store".into())
            .spawn(move || {
                for chunk in rx {
                    if let Err(e) = writer.write_all(&chunk) {
                        tracing::warn!(error = %e, "writing into the store failed; not storing");
                        return None;
                    }
                }
                Some(writer)
            })
            .inspect_err(
                |e| tracing::warn!(error = %e, "no thread to store the output; not storing"),
            )
            .ok()?;
        Some(TeeThread { tx, thread })
    }

    /// Queues a chunk; `false` once the writer has given up.
    pub(super) fn feed(&self, chunk: Bytes) -> bool {
        self.tx.send(chunk).is_ok()
    }

    /// The writer, every chunk fed written into it; `None` if a write failed.
    pub(super) fn finish(self) -> Option<BlobWriter> {
        drop(self.tx);
        self.thread.join().ok().flatten()
    }
}

#[cfg(test)]
#[path = "cached_tests.rs"]
mod tests;
