//! The tarball routes' outputs (docker-load archives, ACIs) kept in the content-addressed store: a
//! conversion's bytes are written into blobs as they stream ([`super::tee`]) and published only when
//! the conversion succeeded; a repeat finds them by their [`ArtifactKey`] and streams the blobs
//! instead of converting again.
//!
//! The derived record names a small descriptor, not the tarball itself: GC's mark and
//! [`Store::complete`] read a record's target as a manifest (bounded to a few MiB) and follow its
//! `layers`, so a descriptor listing the tarball's parts as its layers keeps them rooted, and an
//! evicted part makes the record a miss, with no change to the store. Recording the tarball's
//! digest directly would make the mark read a GiB blob as JSON and stop GC.

use std::io::{self, Read};
use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{AciRequest, ByteStream, Converter, Error, Planned, PlannedAci};
use crate::digest::Digest;
use crate::sign::Signer;
use crate::store::{ArtifactKey, BlobReader, Lease, Store, StoreError};

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
    /// The blobs whose bytes, one after the other, it is, with their sizes. A squash is three: its
    /// layer member's content (named by the diff_id its hashing for the config gave, so the store
    /// does not hash those bytes again) and what comes before and after; an ACI is one.
    pub parts: Vec<(Digest, u64)>,
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

/// Annotation of a descriptor: the validator its tarball was sent with.
const ETAG_ANNOTATION: &str = "org.strata.etag";

/// The descriptor of a tarball stored as `parts`, the blobs whose bytes, one after the other, it is.
pub(super) fn descriptor(parts: &[(Digest, u64)], etag: Option<&str>) -> Vec<u8> {
    let layers: Vec<Value> = parts
        .iter()
        .map(|(digest, size)| json!({"mediaType": "application/x-tar", "digest": digest.to_string(), "size": size}))
        .collect();
    let mut doc = json!({
        "schemaVersion": 2,
        "mediaType": DESCRIPTOR_TYPE,
        "layers": layers,
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
    let mut parts = Vec::new();
    for layer in doc["layers"]
        .as_array()
        .ok_or_else(|| damaged("no parts"))?
    {
        let digest = Digest::parse(layer["digest"].as_str().unwrap_or_default())?;
        let size = layer["size"].as_u64().ok_or_else(|| damaged("no size"))?;
        // Evicted (or, impossibly for a verified blob, of another size): convert again.
        match store.stat_blob(&digest)? {
            Some(meta) if meta.size == size => parts.push((digest, size)),
            _ => return Ok(None),
        }
    }
    if parts.is_empty() {
        return Err(damaged("no parts"));
    }
    Ok(Some(StoredTarball {
        size: parts.iter().map(|(_, size)| size).sum(),
        parts,
        etag: doc["annotations"][ETAG_ANNOTATION]
            .as_str()
            .map(str::to_string),
        descriptor: record,
    }))
}

/// A stored tarball's bytes (or a range of them) being read: its parts' readers, one after the
/// other, each leased while open.
pub(super) struct TarballReader {
    parts: std::collections::VecDeque<BlobReader>,
    /// The bytes it yields.
    pub(super) len: u64,
}

impl Read for TarballReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while let Some(part) = self.parts.front_mut() {
            match part.read(buf)? {
                0 if !buf.is_empty() => drop(self.parts.pop_front()),
                n => return Ok(n),
            }
        }
        Ok(0)
    }
}

/// The tarball opened for reading, and its descriptor leased: both are used, so both become recent
/// for eviction (the descriptor is read unleased, and an old one would be evicted first, making a
/// tarball read every minute a miss).
fn open(
    store: &Store,
    tarball: &StoredTarball,
    range: Option<Range<u64>>,
) -> Result<(TarballReader, Option<Lease>), StoreError> {
    let descriptor = store.lease(&tarball.descriptor)?;
    let range = range.unwrap_or(0..tarball.size);
    let mut parts = std::collections::VecDeque::new();
    let mut start = 0;
    for (digest, size) in &tarball.parts {
        let end = start + size;
        let (from, to) = (range.start.clamp(start, end), range.end.clamp(start, end));
        if from < to {
            parts.push_back(store.open_blob(digest, Some(from - start..to - start))?);
        }
        start = end;
    }
    let len = range.end.saturating_sub(range.start);
    Ok((TarballReader { parts, len }, descriptor))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::io("store task")(io::Error::other(e))))
}

impl Converter {
    async fn stored(&self, key: &ArtifactKey) -> Option<StoredTarball> {
        let store = self.images.clone()?;
        let key = key.clone();
        let shown = key.to_string();
        let look = || {
            let (store, key) = (store.clone(), key.clone());
            blocking(move || lookup(&store, &key))
        };
        let mut found = look().await;
        if matches!(found, Ok(None)) && self.publishing.wait(&key).await {
            found = look().await;
        }
        let found = match found {
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
            Ok((reader, descriptor)) => {
                let len = reader.len;
                Ok(Some(stream_blob(reader, len, descriptor)))
            }
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
            let (reader, _descriptor) = open(&store, &tarball, None)?;
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
fn sign_blob(mut reader: TarballReader, signer: &Arc<Signer>) -> io::Result<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(STORED_DEPTH);
    let signing = {
        let signer = signer.clone();
        std::thread::Builder::new()
            .name("strata-sign".into())
            .spawn(move || signer.sign_stream(rx))?
    };
    let mut left = reader.len;
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

/// `len` stored bytes as a body (tarball repeats and the registry view's blobs), read on a
/// blocking thread in [`STORED_CHUNK`]s, the reader (and `descriptor`) leased until the end. A read
/// failure or fewer bytes than `len` end the stream with an error, so the transfer is aborted,
/// never short.
pub fn stream_blob(
    mut reader: impl Read + Send + 'static,
    len: u64,
    descriptor: Option<Lease>,
) -> ByteStream {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(STORED_DEPTH);
    tokio::task::spawn_blocking(move || {
        let _leased = descriptor;
        let mut left = len;
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

#[cfg(test)]
#[path = "cached_tests.rs"]
mod tests;
