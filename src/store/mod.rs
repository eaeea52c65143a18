//! The content-addressed store of derived images: blobs by digest, manifests and tags per repository,
//! derived-artifact keys, LRU eviction and online GC, on a directory or on S3-compatible object
//! storage (`--store s3://…`, what replicas share, issue 10). All of it is synchronous: the conversion
//! writes on a blocking thread, async callers use `spawn_blocking` (or `SyncIoBridge`).
//!
//! - [`backend`]: the narrow trait of object operations; [`fs`] implements it on a directory,
//!   [`s3`] on a bucket.
//! - [`blob`]: verifying writer, ranged reader, leases.
//! - [`names`]: repository and tag names, checked against the distribution spec.
//! - [`repo`]: manifest links, tags, listings.
//! - [`key`]: what fixes a derived artifact's bytes, as a stable key.
//! - [`gc`]: LRU eviction under a byte bound, mark-and-sweep with a grace period.
//! - [`inuse`]: use and doom marks, which keep a sweep off the blobs another replica relies on.
//! - [`fleet`]: leases shared by the replicas on one store (`leases/<name>/<generation>`): one
//!   conversion per key, one GC sweep at a time.
//!
//! Layout (object keys): `blobs/<alg>/<hex>`, `repositories/<name>/_manifests/<alg>/<hex>` (a link:
//! the manifest is a blob), `repositories/<name>/_tags/<tag>` (the digest's text), `derived/<sha256
//! of the key's text>`; for the replicas, `leases/`, `inuse/` and `doomed/`. The `_` prefix cannot begin a repository path component, so a repository
//! named `a/_tags` cannot exist and the layout is unambiguous.
//!
//! The guarantees, and how each maps onto an object store:
//! - *Visible only complete and verified*: here a temp file in `tmp/`, fsynced, then `link(2)`; on S3
//!   one `PutObject`, or a multipart upload of a staging object completed after the digest check and
//!   then copied to its key, with abandoned uploads removed by a bucket lifecycle rule (the `tmp/`
//!   cleaning).
//! - *One copy per digest, racing writers need no lock*: `link(2)` fails on an existing name; on S3
//!   `PutObject` with `If-None-Match: *`, or the staging object's copy completed with it (412 =
//!   already there = success; see [`s3`] for why a copy).
//! - *Tags replaced atomically*: `rename(2)`; a plain PUT on S3, which is atomic per object.
//! - *Publish order blobs → manifest link → tag*: [`Store::put_manifest`] refuses a manifest whose
//!   blobs are not stored, and [`Store::set_tag`] one that is not linked; per-object atomicity is all
//!   either backend needs for that.
//! - *Access time*: the modification time, set by [`backend::Backend::touch`]; on S3, where no
//!   object's time can be set short of rewriting it, an empty marker object written beside it
//!   (touching happens only when a lease ends, not per read).
//! - *Leases and GC*: blob leases ([`blob::Lease`]) are per process; across replicas a blob a
//!   replica is about to name (a writer publishing it, new or found stored; a manifest's first link)
//!   carries a use mark `inuse/…`, and a sweep dooms what it is about to delete (`doomed/…`) before
//!   it reads the use marks, so a sweep never deletes a blob another replica relies on ([`inuse`]).
//!   GC and eviction run on one replica at a time, the holder of the fleet lease `gc` ([`fleet`]),
//!   as distribution/distribution#3937 shows concurrent sweeps on S3 are unsafe.

pub mod backend;
pub mod blob;
mod delete;
pub mod fleet;
pub mod fs;
pub mod gc;
mod inuse;
pub mod key;
pub mod names;
pub mod repo;
pub mod s3;
mod sparse;

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::digest::{Digest, DigestError};
use backend::{Backend, Meta};
use blob::Pins;
pub use blob::{BlobReader, BlobWriter, Lease, Published};
pub use key::ArtifactKey;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O on {key}: {source}")]
    Io {
        key: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error("blob {0} is not stored")]
    BlobUnknown(Digest),
    #[error("bytes {start}-{end} are outside blob {digest} of {size} bytes")]
    Range {
        digest: Digest,
        start: u64,
        end: u64,
        size: u64,
    },
    #[error("invalid repository name {0:?} (distribution-spec path components)")]
    InvalidRepository(String),
    #[error("invalid tag {0:?} (distribution-spec: [A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})")]
    InvalidTag(String),
    #[error("manifest {manifest} refers to {missing}, which is not stored: publish blobs first")]
    MissingBlob { manifest: Digest, missing: Digest },
    #[error("manifest {digest} is not in repository {repository}")]
    ManifestUnknown { repository: String, digest: Digest },
    #[error("manifest {digest} cannot be read: {reason}")]
    InvalidManifest { digest: Digest, reason: String },
    #[error("stored record {key} is damaged: {reason}")]
    Damaged { key: String, reason: String },
}

impl StoreError {
    pub(crate) fn io(key: &str) -> impl FnOnce(io::Error) -> StoreError + '_ {
        move |source| StoreError::Io {
            key: key.to_string(),
            source,
        }
    }
}

pub(crate) fn blob_key(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.algorithm().name(), digest.hex())
}

/// Where the store lives: `--store DIR` or `--store s3://bucket/prefix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Dir(PathBuf),
    S3(s3::S3Url),
}

impl Location {
    /// An `s3://` URL names a bucket; anything else is a directory.
    pub fn parse(text: &str) -> Result<Location, String> {
        match s3::S3Url::parse(text) {
            Some(url) => url.map(Location::S3),
            None => Ok(Location::Dir(text.into())),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Dir(d) => write!(f, "{}", d.display()),
            Location::S3(url) => write!(f, "{url}"),
        }
    }
}

/// Called by a sweep between its last check of a blob and its delete: the tests' way to put
/// another replica's use of the blob exactly there.
pub type DeleteHold = Arc<dyn Fn(&Digest) + Send + Sync>;

/// Test hook of the replica tests (tests/fleet_s3.rs): while the file this names exists, a sweep
/// holds before each delete, for at most [`SWEEP_HOLD_MAX`]. Never set in a deployment.
const SWEEP_HOLD_VAR: &str = "STRATA_TEST_SWEEP_HOLD";
/// Within the doom window ([`inuse::DOOM_WINDOW`]), so a held sweep still deletes.
const SWEEP_HOLD_MAX: std::time::Duration = std::time::Duration::from_secs(6);

fn hold_while_exists(file: PathBuf) -> DeleteHold {
    Arc::new(move |digest| {
        let started = std::time::Instant::now();
        if file.exists() {
            tracing::warn!(%digest, file = %file.display(), "sweep held before a delete ({SWEEP_HOLD_VAR})");
        }
        while file.exists() && started.elapsed() < SWEEP_HOLD_MAX {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    })
}

/// The store: cheap to clone, shared by every request.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    pins: Arc<Pins>,
    delete_hold: Option<DeleteHold>,
}

impl Store {
    /// The store in a local directory (created if missing; stale uploads of a crash removed).
    pub fn open_dir(root: &Path) -> Result<Store, StoreError> {
        let fs = fs::FsBackend::open(root).map_err(StoreError::io("tmp/"))?;
        Ok(Store::with_backend(Arc::new(fs)))
    }

    /// The store at `location`; a bucket must be reachable (and listable) now.
    pub fn open(location: &Location) -> Result<Store, StoreError> {
        let store = match location {
            Location::Dir(dir) => Store::open_dir(dir)?,
            Location::S3(url) => {
                let bucket = format!("bucket {}", url.bucket);
                let backend = s3::S3Backend::open(url).map_err(StoreError::io(&bucket))?;
                Store::with_backend(Arc::new(backend))
            }
        };
        Ok(match std::env::var_os(SWEEP_HOLD_VAR) {
            Some(file) => store.with_delete_hold(hold_while_exists(file.into())),
            None => store,
        })
    }

    pub fn with_backend(backend: Arc<dyn Backend>) -> Store {
        Store {
            backend,
            pins: Arc::default(),
            delete_hold: None,
        }
    }

    /// Sweeps of this store call `hold` before each delete (tests only: see [`DeleteHold`]).
    #[doc(hidden)]
    pub fn with_delete_hold(mut self, hold: DeleteHold) -> Store {
        self.delete_hold = Some(hold);
        self
    }

    /// Whether the store answers now (`GET /readyz`), within [`backend::READY_TIMEOUT`].
    pub fn ready(&self) -> io::Result<()> {
        self.backend.ready()
    }

    /// A writer for a blob whose digest is known (a registry blob: digest and size, or
    /// [`crate::digest::SIZE_UNKNOWN`], verified at the end) or not (`None`: a conversion's output,
    /// sha256 of what is written).
    pub fn blob_writer(&self, expected: Option<(Digest, u64)>) -> Result<BlobWriter, StoreError> {
        BlobWriter::new(self.backend.clone(), self.pins.clone(), expected)
    }

    /// A writer for bytes whose sha256 the caller computes as it makes them and gives with
    /// [`BlobWriter::name`] before finishing: they are not hashed again. The name is trusted, so
    /// it must be the digest of exactly the bytes written.
    pub fn named_blob_writer(&self) -> Result<BlobWriter, StoreError> {
        BlobWriter::named(self.backend.clone(), self.pins.clone())
    }

    /// Stores a small blob held in memory (manifests, configs).
    pub fn put_blob(&self, bytes: &[u8]) -> Result<Published, StoreError> {
        let mut w = self.blob_writer(None)?;
        io::Write::write_all(&mut w, bytes).map_err(StoreError::io("upload"))?;
        w.finish()
    }

    pub fn stat_blob(&self, digest: &Digest) -> Result<Option<Meta>, StoreError> {
        let key = blob_key(digest);
        self.backend.stat(&key).map_err(StoreError::io(&key))
    }

    /// A URL the blob can be fetched from without this process for `expires` (`None`: the
    /// backend has none, a directory).
    pub fn blob_url(
        &self,
        digest: &Digest,
        expires: std::time::Duration,
    ) -> Result<Option<String>, StoreError> {
        let key = blob_key(digest);
        self.backend
            .presigned_get(&key, expires)
            .transpose()
            .map_err(StoreError::io(&key))
    }

    /// Leases a stored blob (`None` if it is not stored): what refers to an existing blob without
    /// writing it holds this until its own link is published.
    pub fn lease(&self, digest: &Digest) -> Result<Option<Lease>, StoreError> {
        let lease = Lease::take(&self.backend, &self.pins, digest);
        Ok(self.stat_blob(digest)?.map(|_| lease))
    }

    /// Opens a blob for reading, whole or the half-open byte `range` (HTTP `Range`, converted).
    pub fn open_blob(
        &self,
        digest: &Digest,
        range: Option<Range<u64>>,
    ) -> Result<BlobReader, StoreError> {
        let lease = Lease::take(&self.backend, &self.pins, digest);
        let key = blob_key(digest);
        let meta = self
            .stat_blob(digest)?
            .ok_or_else(|| StoreError::BlobUnknown(digest.clone()))?;
        let range = range.unwrap_or(0..meta.size);
        if range.start > range.end || range.end > meta.size {
            return Err(StoreError::Range {
                digest: digest.clone(),
                start: range.start,
                end: range.end,
                size: meta.size,
            });
        }
        let inner = self
            .backend
            .get(&key, Some(range.clone()))
            .map_err(StoreError::io(&key))?
            .ok_or_else(|| StoreError::BlobUnknown(digest.clone()))?;
        Ok(BlobReader {
            inner,
            size: meta.size,
            range,
            _lease: lease,
        })
    }

    /// A whole small blob in memory, at most `limit` bytes (manifests). Unleased, so not an access:
    /// GC's mark reads every manifest, and must not make them all recent for LRU eviction.
    pub(crate) fn read_small(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>, StoreError> {
        let key = blob_key(digest);
        let unknown = || StoreError::BlobUnknown(digest.clone());
        let meta = self.stat_blob(digest)?.ok_or_else(unknown)?;
        if meta.size > limit {
            return Err(StoreError::InvalidManifest {
                digest: digest.clone(),
                reason: format!("{} bytes, more than {limit}", meta.size),
            });
        }
        let r = self.backend.get(&key, None).map_err(StoreError::io(&key))?;
        let mut out = Vec::with_capacity(meta.size as usize);
        // take(): the blob is immutable, but a bound on what is read should not rest on that.
        io::Read::read_to_end(&mut io::Read::take(r.ok_or_else(unknown)?, limit), &mut out)
            .map_err(StoreError::io(&key))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_space;
