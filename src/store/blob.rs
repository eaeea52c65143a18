//! Blobs by digest: the writer that hashes (and, given an expected digest and size, verifies) the bytes
//! as they stream and publishes them only when they check out, the reader with an optional byte range,
//! and the leases that keep a blob from eviction and GC while a reader or a publishing writer holds it.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use sha2::{Digest as _, Sha256};

use super::backend::{Backend, Upload};
use super::inuse::{mark_in_use, UseMark};
use super::{blob_key, StoreError};
use crate::digest::{Digest, Verifier};

/// Open leases per digest. Eviction and GC check it and delete while holding the lock, and a lease is
/// taken under the same lock before its holder looks for the blob, so a blob is either deleted before
/// the lease (the holder sees it absent) or kept.
#[derive(Default)]
pub(super) struct Pins(Mutex<HashMap<Digest, usize>>);

impl Pins {
    pub(super) fn lock(&self) -> MutexGuard<'_, HashMap<Digest, usize>> {
        // A panic elsewhere while holding it leaves the counts consistent (each change is one step).
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Keeps one blob from eviction and GC while held. Dropping it records an access (the blob's
/// modification time becomes now), which is both the LRU order and what GC's grace period measures: a
/// writer that holds the lease until its manifest link is published leaves the blob younger than any
/// GC mark that could have missed the link.
pub struct Lease {
    pub(super) backend: Arc<dyn Backend>,
    pub(super) pins: Arc<Pins>,
    pub(super) digest: Digest,
    /// The same for the other replicas on the store, when the holder is about to name the blob
    /// in what it publishes ([`super::inuse`]); readers need none.
    pub(super) used: Option<UseMark>,
}

impl Lease {
    pub(super) fn take(backend: &Arc<dyn Backend>, pins: &Arc<Pins>, digest: &Digest) -> Lease {
        *pins.lock().entry(digest.clone()).or_insert(0) += 1;
        Lease {
            backend: backend.clone(),
            pins: pins.clone(),
            digest: digest.clone(),
            used: None,
        }
    }

    /// [`Lease::take`], and a use mark every replica's sweeps respect, for a holder that will
    /// publish something naming the blob: taken before the holder looks for the blob.
    pub(super) fn take_for_use(
        backend: &Arc<dyn Backend>,
        pins: &Arc<Pins>,
        digest: &Digest,
    ) -> Result<Lease, StoreError> {
        let mut lease = Lease::take(backend, pins, digest);
        let key = blob_key(digest);
        lease.used = Some(mark_in_use(backend, digest).map_err(StoreError::io(&key))?);
        Ok(lease)
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Touch before unpinning, so no sweep sees it unpinned and old.
        let _ = self.backend.touch(&blob_key(&self.digest));
        drop(self.used.take());
        let mut pins = self.pins.lock();
        if let Some(n) = pins.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.digest);
            }
        }
    }
}

/// What the bytes are checked against as they pass.
enum Check {
    /// Expected digest (and size, or [`crate::digest::SIZE_UNKNOWN`]): a registry blob.
    Expected(Box<Verifier>, Digest),
    /// Unknown until the end (a conversion's output): sha256 of whatever arrives.
    Computed(Sha256),
    /// Given by the caller before the end ([`BlobWriter::name`]): the sha256 of the same bytes,
    /// computed where they were made (a squash's layer, hashed for its diff_id), so they are not
    /// hashed twice.
    Named(Option<Digest>),
}

/// A blob being written. `io::Write`, so the blocking conversion thread writes into it directly; an
/// async body is fed through `tokio_util::io::SyncIoBridge` on a blocking thread. Nothing is visible
/// until [`BlobWriter::finish`] succeeds; dropping it discards the bytes.
pub struct BlobWriter {
    upload: Box<dyn Upload>,
    check: Check,
    size: u64,
    backend: Arc<dyn Backend>,
    pins: Arc<Pins>,
}

/// A published blob, leased: hold the lease until whatever refers to it (the manifest link) is
/// published, so a GC running meanwhile cannot take it.
pub struct Published {
    pub digest: Digest,
    pub size: u64,
    /// Whether these bytes made the blob (false: it was already there, and these were discarded).
    pub created: bool,
    pub lease: Lease,
}

impl BlobWriter {
    pub(super) fn new(
        backend: Arc<dyn Backend>,
        pins: Arc<Pins>,
        expected: Option<(Digest, u64)>,
    ) -> Result<BlobWriter, StoreError> {
        let check = match expected {
            Some((digest, size)) => {
                Check::Expected(Box::new(Verifier::new(digest.clone(), size)), digest)
            }
            None => Check::Computed(Sha256::new()),
        };
        BlobWriter::with_check(backend, pins, check)
    }

    /// A writer whose digest its caller names before [`BlobWriter::finish`], having hashed the same
    /// bytes as they were made.
    pub(super) fn named(
        backend: Arc<dyn Backend>,
        pins: Arc<Pins>,
    ) -> Result<BlobWriter, StoreError> {
        BlobWriter::with_check(backend, pins, Check::Named(None))
    }

    fn with_check(
        backend: Arc<dyn Backend>,
        pins: Arc<Pins>,
        check: Check,
    ) -> Result<BlobWriter, StoreError> {
        let upload = backend
            .upload()
            .map_err(StoreError::io("starting an upload"))?;
        Ok(BlobWriter {
            upload,
            check,
            size: 0,
            backend,
            pins,
        })
    }

    /// The digest of what a [`BlobWriter::named`] writer was given; ignored by the others.
    pub fn name(&mut self, digest: Digest) {
        if let Check::Named(name) = &mut self.check {
            *name = Some(digest);
        }
    }

    /// Verifies the bytes and publishes them under their digest (a cheap success if that blob exists).
    pub fn finish(self) -> Result<Published, StoreError> {
        let digest = match self.check {
            Check::Expected(verifier, digest) => {
                verifier.finish()?;
                digest
            }
            Check::Computed(hasher) => {
                Digest::parse(&format!("sha256:{}", hex::encode(hasher.finalize())))?
            }
            Check::Named(Some(digest)) => digest,
            Check::Named(None) => {
                return Err(StoreError::io("publishing a blob")(io::Error::other(
                    "the writer of a named blob was not given its digest",
                )))
            }
        };
        let key = blob_key(&digest);
        let lease = Lease::take_for_use(&self.backend, &self.pins, &digest)?;
        let created = self
            .upload
            .create_if_absent(&key)
            .map_err(StoreError::io(&key))?;
        if !created {
            // The existing copy serves; its age must now count from this publication (see Lease).
            self.backend.touch(&key).map_err(StoreError::io(&key))?;
        }
        Ok(Published {
            digest,
            size: self.size,
            created,
            lease,
        })
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.upload.write(buf)?;
        match &mut self.check {
            Check::Expected(v, _) => v
                .update(&buf[..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
            Check::Computed(h) => h.update(&buf[..n]),
            Check::Named(_) => {}
        }
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.upload.flush()
    }
}

/// A stored blob (or a range of it) being read; leased while open.
pub struct BlobReader {
    pub(super) inner: Box<dyn Read + Send>,
    /// The whole blob's size (for `Content-Range`), not the range's.
    pub size: u64,
    /// The bytes this reader yields.
    pub range: Range<u64>,
    pub(super) _lease: Lease,
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}
