//! One conversion per key across the replicas sharing a store (issue 10): before converting, a
//! replica takes the key's fleet lease ([`crate::store::fleet`]); finding it held, it waits for the
//! holder's stored result instead, polling the store with backoff, and converts itself only once
//! the lease is free or expired (the holder died). Within one process single flight
//! ([`super::stored`]) already makes one caller per key, so only one task per replica polls.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Converter;
use crate::store::fleet::{Acquired, FleetLease};
use crate::store::{ArtifactKey, StoreError};

/// The first pause between looks at the store while another replica converts: a small image's
/// conversion takes about this long.
const FIRST_POLL: Duration = Duration::from_millis(100);
/// The longest pause: a waiter learns of the result (or of a dead holder) at most this late, and a
/// fleet of waiters costs the store a few requests per second each.
const MAX_POLL: Duration = Duration::from_secs(1);

/// Whose turn it is to make an output.
pub(super) enum Turn<T> {
    /// It is stored (by another replica, or found on a look just before).
    Done(T),
    /// This replica's: convert, holding the lease (`None` when the store has no leases) until the
    /// output is published.
    Mine(Option<FleetLease>),
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::io("lease task")(std::io::Error::other(e))))
}

impl Converter {
    /// Waits until `stored` finds `key`'s output or this replica holds the key's lease.
    pub(super) async fn turn<T, F>(
        &self,
        key: &ArtifactKey,
        stored: F,
    ) -> Result<Turn<T>, StoreError>
    where
        T: Send + 'static,
        F: Fn() -> Result<Option<T>, StoreError> + Send + Sync + 'static,
    {
        let stored = Arc::new(stored);
        let look = || {
            let stored = stored.clone();
            blocking(move || stored())
        };
        let Some(leases) = self.leases.clone() else {
            return Ok(match look().await? {
                Some(t) => Turn::Done(t),
                None => Turn::Mine(None),
            });
        };
        let name = key.lease_name();
        let (started, mut pause, mut waited) = (Instant::now(), FIRST_POLL, false);
        loop {
            if let Some(t) = look().await? {
                if waited {
                    tracing::info!(%key, waited_ms = started.elapsed().as_millis() as u64, "served another replica's conversion");
                }
                return Ok(Turn::Done(t));
            }
            let attempt = {
                let (leases, name) = (leases.clone(), name.clone());
                blocking(move || leases.try_acquire(&name)).await?
            };
            match attempt {
                Acquired::Held(lease) => {
                    // The holder may have published and released between the look and the take.
                    if let Some(t) = look().await? {
                        return Ok(Turn::Done(t));
                    }
                    if waited {
                        tracing::info!(%key, waited_ms = started.elapsed().as_millis() as u64, "converting after another replica's lease ended");
                    }
                    return Ok(Turn::Mine(Some(lease)));
                }
                Acquired::Busy { holder } => {
                    if !waited {
                        waited = true;
                        leases.count_wait();
                        self.metrics.lease_wait();
                        tracing::info!(%key, %holder, lease = %name, "another replica is converting; waiting for its result");
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 3 / 2).min(MAX_POLL);
                }
            }
        }
    }
}
