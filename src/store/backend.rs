//! The few operations the store needs from where its bytes live, kept narrow so that an object store
//! (S3 and the like, issue 10) can sit behind the same trait as the filesystem (`fs.rs`).
//!
//! Keys are `/`-separated relative paths built by the store itself from validated names
//! (`blobs/sha256/<hex>`, `repositories/<name>/_tags/<tag>`, …); a backend never sees user input raw.

use std::io::{self, Read, Write};
use std::ops::Range;
use std::time::{Duration, SystemTime};

/// What a stat tells: enough for `Content-Length`, LRU order and the GC's grace period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    pub size: u64,
    /// Last write or [`Backend::touch`]: the access time of LRU eviction and the age GC's grace checks.
    pub modified: SystemTime,
}

/// Bytes being written, invisible to every reader until [`Upload::create_if_absent`] or
/// [`Upload::replace`] publishes them whole. Dropping it (or the process dying) publishes nothing.
pub trait Upload: Write + Send {
    /// Publishes under `key` unless an object is already there: `Ok(false)` then, and these bytes
    /// are discarded. The conditional create that makes racing writers of one digest need no lock.
    fn create_if_absent(self: Box<Self>, key: &str) -> io::Result<bool>;
    /// Publishes under `key`, atomically replacing what was there (tags: a reader sees old or new).
    fn replace(self: Box<Self>, key: &str) -> io::Result<()>;
}

/// Where the store's objects live.
pub trait Backend: Send + Sync + 'static {
    /// Starts an upload (bytes are streamed into it, never held whole).
    fn upload(&self) -> io::Result<Box<dyn Upload>>;
    /// The object's bytes, or the part `range` names (checked against the size by the caller);
    /// `None` if there is no such object.
    fn get(&self, key: &str, range: Option<Range<u64>>)
        -> io::Result<Option<Box<dyn Read + Send>>>;
    fn stat(&self, key: &str) -> io::Result<Option<Meta>>;
    /// Removes the object; `Ok(false)` if there was none.
    fn delete(&self, key: &str) -> io::Result<bool>;
    /// Every key under `prefix` (which ends in `/`), at any depth, sorted.
    fn list(&self, prefix: &str) -> io::Result<Vec<String>>;
    /// Records an access: sets [`Meta::modified`] to now. Missing objects are not an error.
    fn touch(&self, key: &str) -> io::Result<()>;
    /// Whether the backend answers now (`GET /readyz`): one cheap request, failing within
    /// [`READY_TIMEOUT`] when it does not. A stat of a missing key would not do: it answers "absent"
    /// for a deleted directory or bucket too.
    fn ready(&self) -> io::Result<()>;
    /// A URL a client can GET the object from directly for `expires` (S3: presigned), or `None`
    /// when this backend has none (a directory).
    fn presigned_get(&self, key: &str, expires: Duration) -> Option<io::Result<String>> {
        let _ = (key, expires);
        None
    }
}

/// How long [`Backend::ready`] waits: a probe that hangs is a failed probe, and a load balancer
/// probes every few seconds.
pub const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
