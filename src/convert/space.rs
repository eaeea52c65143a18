//! Keeping the store within its bounds while it serves: least-recently-used eviction under
//! `--cache-max-bytes` after each stored conversion, deletes (`DELETE` of a converted image), and
//! online mark-and-sweep GC after a delete and every `--gc-interval`. All of it runs while pulls and
//! conversions go on: leases and the grace period (src/store/gc.rs) keep what they need. On a store
//! shared by replicas, only the holder of the fleet lease `gc` evicts or collects; the others skip
//! their pass (the holder's covers the store).

use std::sync::Arc;
use std::time::Duration;

use super::{Converter, Error};
use crate::digest::Digest;
use crate::store::fleet::{Acquired, FleetLease, Leases};
use crate::store::StoreError;

/// The fleet lease of eviction and GC.
pub(super) const SPACE_LEASE: &str = "gc";
/// Lease generations unwritten for this many TTLs are a dead holder's litter.
const STALE_LEASE_TTLS: u32 = 20;

/// The space lease if this replica may sweep now: `Some(None)` without fleet leases, `None` when
/// another replica (or another pass here) holds it. Blocking.
pub(super) fn space_turn(leases: Option<&Leases>) -> Option<Option<FleetLease>> {
    let Some(leases) = leases else {
        return Some(None);
    };
    match leases.try_acquire(SPACE_LEASE) {
        Ok(Acquired::Held(lease)) => Some(Some(lease)),
        Ok(Acquired::Busy { holder }) => {
            tracing::info!(%holder, "another holder of the GC lease is sweeping; pass skipped");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "GC lease unreadable; pass skipped");
            None
        }
    }
}

fn internal(e: StoreError) -> Error {
    Error::Internal(e.to_string())
}

impl Converter {
    /// Evicts least-recently-used blobs down to `--cache-max-bytes`, if set.
    pub(super) async fn evict(&self) {
        let (Some(store), Some(max)) = (self.images.clone(), self.config.store_max_bytes) else {
            return;
        };
        let leases = self.leases.clone();
        let evicted = tokio::task::spawn_blocking(move || {
            let Some(_lease) = space_turn(leases.as_deref()) else {
                return Ok(Default::default());
            };
            store.evict(max)
        });
        match evicted.await {
            Ok(Ok(report)) if !report.removed.is_empty() => {
                self.metrics.store_evicted(report.removed.len());
                tracing::info!(
                    removed = report.removed.len(),
                    bytes_left = report.bytes,
                    "evicted least recently used blobs"
                )
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "eviction failed"),
            Err(e) => tracing::warn!(error = %e, "eviction task failed"),
        }
    }

    /// Removes a converted image from a repository of the store, then collects in the background.
    /// `Ok(false)`: the repository holds no such manifest.
    pub async fn delete_image(
        self: &Arc<Self>,
        repository: &str,
        manifest: &Digest,
    ) -> Result<bool, Error> {
        let store = self.images.clone().ok_or_else(|| {
            Error::NotFound("the registry view needs a store (--store or a cache dir)".into())
        })?;
        let (repo, digest) = (repository.to_string(), manifest.clone());
        let deleted = tokio::task::spawn_blocking(move || store.delete_image(&repo, &digest))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map_err(internal)?;
        if deleted {
            tracing::info!(repository, %manifest, "deleted a converted image");
            let this = self.clone();
            tokio::spawn(async move {
                // Blobs read or written within the grace period are spared; once it is over, a
                // second pass takes those the delete left unreferenced.
                if this.collect().await > 0 {
                    let wait = this.config.gc_grace + crate::store::gc::MTIME_SLACK;
                    tokio::time::sleep(wait + Duration::from_secs(1)).await;
                    this.collect().await;
                }
            });
        }
        Ok(deleted)
    }

    /// One GC pass: blobs no manifest names, older than the grace period, are removed. Returns how
    /// many unreferenced blobs it spared for being too recent.
    pub async fn collect(&self) -> usize {
        let Some(store) = self.images.clone() else {
            return 0;
        };
        let grace = self.config.gc_grace;
        let leases = self.leases.clone();
        let collected = tokio::task::spawn_blocking(move || {
            let Some(_lease) = space_turn(leases.as_deref()) else {
                return Ok(None);
            };
            let report = store.gc(grace)?;
            if let Some(leases) = &leases {
                match leases.remove_stale(leases.ttl() * STALE_LEASE_TTLS) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "removed leases of dead replicas"),
                    Err(e) => tracing::warn!(error = %e, "removing stale leases failed"),
                }
            }
            Ok::<_, StoreError>(Some(report))
        });
        match collected.await {
            Ok(Ok(None)) => 0,
            Ok(Ok(Some(report))) => {
                self.metrics.store_gc_deleted(report.removed.len());
                tracing::info!(
                    removed = report.removed.len(),
                    spared = report.spared,
                    referenced = report.referenced,
                    "garbage collection"
                );
                report.spared
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "garbage collection failed");
                0
            }
            Err(e) => {
                tracing::warn!(error = %e, "garbage collection task failed");
                0
            }
        }
    }

    /// Collects every `interval` for as long as the process runs.
    pub async fn collect_every(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        loop {
            tick.tick().await;
            self.collect().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_sweeper_at_a_time_across_processes() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open_dir(dir.path()).unwrap();
        let ttl = Duration::from_secs(30);
        let (a, b) = (store.leases(ttl), store.leases(ttl));
        let sweeping = space_turn(Some(&a)).expect("free").expect("a lease");
        assert!(space_turn(Some(&b)).is_none(), "two sweepers");
        assert!(space_turn(Some(&a)).is_none(), "two passes in one process");
        drop(sweeping);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while space_turn(Some(&b)).is_none() {
            assert!(std::time::Instant::now() < deadline, "never released");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            space_turn(None).is_some_and(|l| l.is_none()),
            "no leases: always"
        );
    }
}
