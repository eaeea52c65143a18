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
//!
//! Across replicas (no shared lock, no conditional delete) the same holds by marks in the store
//! ([`super::inuse`]): a sweep dooms each batch of candidates, lists the use marks, marks the roots
//! again, and deletes only what no use mark names and no root refers to, within the doom window.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use super::backend::Meta;
use super::inuse::{remove_stale_dooms, Doomed};
use super::repo::{references, MAX_MANIFEST_BYTES};
use super::{blob_key, Store, StoreError};
use crate::digest::Digest;

/// Kernel file timestamps come from a coarse clock that may lag `SystemTime::now()` by a tick (a few
/// ms): a blob written just after the mark began could look older than the mark. One second covers it.
pub const MTIME_SLACK: Duration = Duration::from_secs(1);

const BLOBS: &str = "blobs/";
/// Blobs doomed at once: a batch's deletes must all go out within the doom window
/// ([`super::inuse::DOOM_WINDOW`]), a few ms each.
const SWEEP_BATCH: usize = 256;

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
        if let Some(hold) = &self.delete_hold {
            hold(digest);
        }
        self.backend.delete(&key).map_err(StoreError::io(&key))?;
        drop(pins);
        Ok(Some(meta.size))
    }

    /// Deletes the blobs of `batch` that `keep` (given a blob's current stat) does not keep, once
    /// the batch is doomed for the other replicas ([`super::inuse`]): blobs a use mark names are
    /// spared, and so are those `roots_now` (asked after the listing of use marks) says something
    /// refers to, and the rest of the batch once the doom window has closed (a slow pass: the
    /// next one tries again). The deleted blobs and their sizes.
    fn sweep_batch(
        &self,
        batch: &[Digest],
        roots_now: impl FnOnce() -> Result<HashSet<Digest>, StoreError>,
        keep: impl Fn(&Digest, &Meta) -> bool,
    ) -> Result<Vec<(Digest, u64)>, StoreError> {
        let (doomed, used) =
            Doomed::write(&self.backend, batch).map_err(StoreError::io("doomed/"))?;
        let referenced = roots_now()?;
        let mut deleted = Vec::new();
        for digest in batch {
            if used.contains(digest) || referenced.contains(digest) || !doomed.open() {
                continue;
            }
            if let Some(size) = self.delete_unleased(digest, |m| keep(digest, m))? {
                deleted.push((digest.clone(), size));
            }
        }
        drop(doomed);
        Ok(deleted)
    }

    /// Removes least-recently-used blobs until at most `max_bytes` remain (leased ones, here or
    /// on another replica, are skipped, so the bound may be exceeded while they are in use).
    pub fn evict(&self, max_bytes: u64) -> Result<EvictReport, StoreError> {
        let mut blobs = self.blobs()?;
        let mut bytes: u64 = blobs.iter().map(|(_, m)| m.size).sum();
        blobs.sort_by_key(|(_, m)| m.modified);
        let mut report = EvictReport::default();
        // The least recent, until enough bytes would go; pinned ones here are not even doomed.
        let mut excess = bytes.saturating_sub(max_bytes);
        let mut victims = Vec::new();
        {
            let pins = self.pins.lock();
            for (digest, seen) in blobs {
                if excess == 0 {
                    break;
                }
                if !pins.contains_key(&digest) {
                    excess = excess.saturating_sub(seen.size);
                    victims.push((digest, seen));
                }
            }
        }
        for batch in victims.chunks(SWEEP_BATCH) {
            let digests: Vec<Digest> = batch.iter().map(|(d, _)| d.clone()).collect();
            let seen = |d: &Digest| batch.iter().find(|(v, _)| v == d).map(|(_, m)| m.modified);
            // Kept if accessed since the listing: it is no longer the least recent. Eviction
            // removes referenced blobs too (their records become misses), so no roots are read.
            let deleted = self.sweep_batch(
                &digests,
                || Ok(HashSet::new()),
                |digest, now| seen(digest).is_none_or(|seen| now.modified > seen),
            )?;
            for (digest, size) in deleted {
                bytes -= size;
                report.removed.push(digest);
            }
        }
        report.bytes = bytes;
        Ok(report)
    }

    /// Mark-and-sweep: removes blobs that no linked or derived manifest refers to and that have not
    /// been written or read for `grace`. Safe while writers and readers run, here and on other
    /// replicas (see the module docs).
    pub fn gc(&self, grace: Duration) -> Result<GcReport, StoreError> {
        let started = SystemTime::now();
        let cutoff = started
            .checked_sub(grace + MTIME_SLACK)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let marked = self.mark()?;
        let mut report = GcReport::default();
        let mut candidates = Vec::new();
        {
            let pins = self.pins.lock();
            for (digest, meta) in self.blobs()? {
                if marked.contains(&digest) {
                    report.referenced += 1;
                } else if meta.modified >= cutoff || pins.contains_key(&digest) {
                    report.spared += 1;
                } else {
                    candidates.push(digest);
                }
            }
        }
        for batch in candidates.chunks(SWEEP_BATCH) {
            // After the doom marks and the listing of use marks: roots published by users whose
            // marks were gone by then (module docs of `inuse`).
            let deleted =
                self.sweep_batch(batch, || self.mark(), |_, now| now.modified >= cutoff)?;
            report.spared += batch.len() - deleted.len();
            report.removed.extend(deleted.into_iter().map(|(d, _)| d));
        }
        if let Err(e) = remove_stale_dooms(&*self.backend) {
            tracing::warn!(error = %e, "removing a dead sweep's doom marks failed");
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
