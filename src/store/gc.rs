//! Space: least-recently-used eviction under a byte bound (`--cache-max-bytes`), and online
//! mark-and-sweep of blobs no manifest refers to, with a grace period (zot's, not distribution's
//! stop-the-world GC).
//!
//! Why a blob published while GC runs survives: the sweep removes only blobs that are unmarked, not
//! leased and last modified before `mark start − grace − MTIME_SLACK`, checking the lease and
//! deleting under the lease lock. A writer leases its blobs (under that lock) before it looks for
//! them and holds the leases until its manifest link is published; dropping a lease touches the blob.
//! So a blob the mark missed because its link came later is either leased when the sweep reaches it,
//! or was touched after the mark started; and a blob deleted before its writer's lease is seen absent
//! by that writer, which then writes it.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use super::repo::{references, MAX_MANIFEST_BYTES};
use super::{blob_key, Store, StoreError};
use crate::digest::Digest;

/// Kernel file timestamps come from a coarse clock that may lag `SystemTime::now()` by a tick (a few
/// ms): a blob written just after the mark began could look older than the mark. One second covers it.
pub const MTIME_SLACK: Duration = Duration::from_secs(1);

const BLOBS: &str = "blobs/";

/// What one sweep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub removed: Vec<Digest>,
    /// Unreferenced but too young (or leased): left for a later sweep.
    pub spared: usize,
    pub referenced: usize,
}

/// What one eviction did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EvictReport {
    pub removed: Vec<Digest>,
    /// Bytes of blobs left.
    pub bytes: u64,
}

impl Store {
    /// Every stored blob with its size and access time.
    fn blobs(&self) -> Result<Vec<(Digest, super::backend::Meta)>, StoreError> {
        let mut out = Vec::new();
        for key in self.backend.list(BLOBS).map_err(StoreError::io(BLOBS))? {
            let text = key
                .strip_prefix(BLOBS)
                .unwrap_or(&key)
                .replacen('/', ":", 1);
            let digest = Digest::parse(&text).map_err(|e| StoreError::Damaged {
                key: key.clone(),
                reason: e.to_string(),
            })?;
            // Gone since the listing (another sweep): nothing to count.
            if let Some(meta) = self.backend.stat(&key).map_err(StoreError::io(&key))? {
                out.push((digest, meta));
            }
        }
        Ok(out)
    }

    /// Deletes `digest` unless it is leased or `keep` says otherwise (given its current stat), all
    /// under the lease lock, so no lease can be taken between the check and the delete.
    fn delete_unleased(
        &self,
        digest: &Digest,
        keep: impl FnOnce(&super::backend::Meta) -> bool,
    ) -> Result<Option<u64>, StoreError> {
        let pins = self.pins.lock();
        if pins.contains_key(digest) {
            return Ok(None);
        }
        let key = blob_key(digest);
        // Fail closed: a stat error stops the sweep rather than deleting blindly.
        let Some(meta) = self.backend.stat(&key).map_err(StoreError::io(&key))? else {
            return Ok(None);
        };
        if keep(&meta) {
            return Ok(None);
        }
        self.backend.delete(&key).map_err(StoreError::io(&key))?;
        drop(pins);
        Ok(Some(meta.size))
    }

    /// Removes least-recently-used blobs until at most `max_bytes` remain (leased ones are skipped,
    /// so the bound may be exceeded while they are in use).
    pub fn evict(&self, max_bytes: u64) -> Result<EvictReport, StoreError> {
        let mut blobs = self.blobs()?;
        let mut bytes: u64 = blobs.iter().map(|(_, m)| m.size).sum();
        blobs.sort_by_key(|(_, m)| m.modified);
        let mut report = EvictReport::default();
        for (digest, seen) in blobs {
            if bytes <= max_bytes {
                break;
            }
            // Keep it if it was accessed since the listing: it is no longer the least recent.
            if let Some(size) = self.delete_unleased(&digest, |now| now.modified > seen.modified)? {
                bytes -= size;
                report.removed.push(digest);
            }
        }
        report.bytes = bytes;
        Ok(report)
    }

    /// Mark-and-sweep: removes blobs that no linked or derived manifest refers to and that have not
    /// been written or read for `grace`. Safe while writers and readers run (see the module docs).
    pub fn gc(&self, grace: Duration) -> Result<GcReport, StoreError> {
        let started = SystemTime::now();
        let cutoff = started
            .checked_sub(grace + MTIME_SLACK)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let marked = self.mark()?;
        let mut report = GcReport::default();
        for (digest, _) in self.blobs()? {
            if marked.contains(&digest) {
                report.referenced += 1;
                continue;
            }
            match self.delete_unleased(&digest, |m| m.modified >= cutoff)? {
                Some(_) => report.removed.push(digest),
                None => report.spared += 1,
            }
        }
        Ok(report)
    }

    /// Every blob reachable from a root: linked manifests, derived records, and (through indexes)
    /// the manifests they name.
    fn mark(&self) -> Result<HashSet<Digest>, StoreError> {
        let mut pending: Vec<Digest> = self.manifest_links()?.into_iter().map(|(_, d)| d).collect();
        pending.extend(self.derived_manifests()?);
        let mut marked = HashSet::new();
        while let Some(manifest) = pending.pop() {
            if !marked.insert(manifest.clone()) {
                continue;
            }
            let bytes = match self.read_small(&manifest, MAX_MANIFEST_BYTES) {
                Ok(b) => b,
                // Evicted: the link dangles, and marks nothing.
                Err(StoreError::BlobUnknown(_)) => continue,
                Err(e) => return Err(e),
            };
            // An unreadable manifest stops GC: what it refers to cannot be known (fail closed).
            let refs = references(&manifest, &bytes)?;
            marked.extend(refs.blobs);
            pending.extend(refs.manifests);
        }
        Ok(marked)
    }
}
