//! One conversion per key across the replicas sharing a store (issue 10): before converting, a
//! replica takes the key's fleet lease ([`crate::store::fleet`]); finding it held, it waits for the
//! holder's stored result instead, polling the store with backoff, and converts itself only once
//! the lease is free or expired (the holder died or gave up).
//!
//! Two kinds of conversion wait here:
//! - the registry view's ([`super::stored`]): single flight within the process already makes one
//!   caller per key, and the conversion runs on a task of its own, not paced by any client, so a
//!   waiter waits as long as the holder lives;
//! - the tarball routes' ([`Converter::squash_turn`], [`Converter::aci_turn`]): each GET that
//!   missed the store is a caller, and the holder's conversion streams to its own client, which sets
//!   its pace. A waiter waits while the holder lives (a dead one is taken over after a TTL; one whose
//!   client left releases at once), but at most `--tarball-wait`, then converts beside it: a client
//!   gets its first byte within that bound whatever the holder's client does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared, WeakShared};

use super::{cached, Converter, Planned, PlannedAci, StoredTarball};
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
    /// This replica's: convert, holding the lease (`None` when the store has no leases, or when the
    /// wait was cut short) until the output is published.
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

    /// The turn of a tarball GET that missed the store: the stored tarball once another request
    /// (here or on another replica) has converted it, else `None`, and `lease` holds the key's
    /// lease for this request's conversion (or stays `None` if the wait ran out or the store has no
    /// leases). A store that fails is logged and converted around, as the lookups do: the store is
    /// an optimisation for the tarball routes.
    async fn tarball_turn(
        &self,
        key: &ArtifactKey,
        lease: &mut Option<FleetLease>,
    ) -> Option<StoredTarball> {
        match self.tarball_turn_inner(key).await {
            Ok(Turn::Done(stored)) => Some(stored),
            Ok(Turn::Mine(held)) => {
                *lease = held;
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, %key, "conversion lease unavailable; converting");
                None
            }
        }
    }

    async fn tarball_turn_inner(&self, key: &ArtifactKey) -> Result<Turn<StoredTarball>, String> {
        let (Some(store), Some(leases)) = (self.images.clone(), self.leases.clone()) else {
            return Ok(Turn::Mine(None));
        };
        let name = key.lease_name();
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.config.tarball_wait;
        let mut waited = false;
        loop {
            let attempt = {
                let (leases, name) = (leases.clone(), name.clone());
                blocking(move || leases.try_acquire(&name))
                    .await
                    .map_err(|e| e.to_string())?
            };
            let holder = match attempt {
                Acquired::Held(lease) => {
                    // The holder may have published and released since the caller's look.
                    let (store, k) = (store.clone(), key.clone());
                    if let Some(t) = blocking(move || cached::lookup(&store, &k))
                        .await
                        .map_err(|e| e.to_string())?
                    {
                        return Ok(Turn::Done(t));
                    }
                    if waited {
                        tracing::info!(%key, waited_ms = started.elapsed().as_millis() as u64, "converting after the other conversion's lease ended");
                    }
                    return Ok(Turn::Mine(Some(lease)));
                }
                Acquired::Busy { holder } => holder,
            };
            if !waited {
                waited = true;
                leases.count_wait();
                self.metrics.lease_wait();
                if holder == leases.owner() {
                    tracing::info!(%key, lease = %name, "another request here is converting; waiting for its result");
                } else {
                    tracing::info!(%key, %holder, lease = %name, "another replica is converting; waiting for its result");
                }
            }
            let watch = self.tarball_waits.join(key, || {
                let (store, k) = (store.clone(), key.clone());
                let (leases, name) = (leases.clone(), name.clone());
                watch(
                    move || cached::lookup(&store, &k),
                    move || leases.holder(&name),
                )
            });
            match tokio::time::timeout_at(deadline, watch).await {
                Err(_) => {
                    tracing::warn!(%key, %holder, wait_ms = self.config.tarball_wait.as_millis() as u64, "waited the longest a tarball request waits for another conversion; converting beside it");
                    return Ok(Turn::Mine(None));
                }
                Ok(Ok(Watched::Stored(t))) => {
                    tracing::info!(%key, waited_ms = started.elapsed().as_millis() as u64, "served another replica's conversion");
                    return Ok(Turn::Done(t));
                }
                // Free (released unpublished, or its holder died): whoever takes it converts.
                Ok(Ok(Watched::Free)) => {}
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// [`Converter::tarball_turn`] of a planned squash. The time it took is left out of the
    /// conversion's duration, should this request convert.
    pub async fn squash_turn(&self, planned: &mut Planned) -> Option<StoredTarball> {
        let (key, started) = (planned.key.clone(), Instant::now());
        let stored = self.tarball_turn(&key, &mut planned.lease).await;
        planned.alive.exclude(started.elapsed());
        stored
    }

    /// [`Converter::tarball_turn`] of a planned ACI, its time left out as for a squash.
    pub async fn aci_turn(&self, planned: &mut PlannedAci) -> Option<StoredTarball> {
        let (key, started) = (planned.key.clone(), Instant::now());
        let stored = self.tarball_turn(&key, &mut planned.lease).await;
        planned.alive.exclude(started.elapsed());
        stored
    }
}

/// What watching a held lease ended with.
#[derive(Clone)]
pub(super) enum Watched {
    Stored(StoredTarball),
    /// Nobody holds it any more (as far as this process can tell: released, or not renewed for a
    /// TTL).
    Free,
}

type Watch = BoxFuture<'static, Result<Watched, String>>;
type SharedWatch = Shared<Watch>;

/// The lease watches running in this process, by key text: the requests waiting for one key share
/// one watch, so a crowd of them costs the store what one waiter costs. Weak, so a watch whose
/// waiters all left (their clients gone) is dropped with the last of them.
#[derive(Default)]
pub(super) struct Watches(Mutex<HashMap<String, WeakShared<Watch>>>);

impl Watches {
    /// The watch of `key` running here, or a new one `start` makes.
    fn join(&self, key: &ArtifactKey, start: impl FnOnce() -> Watch) -> SharedWatch {
        let mut watches = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Entries whose waiters are all gone, or whose watch has ended.
        watches.retain(|_, w| w.upgrade().is_some_and(|p| p.peek().is_none()));
        let text = key.to_string();
        if let Some(running) = watches.get(&text).and_then(WeakShared::upgrade) {
            return running;
        }
        let watch = start().shared();
        if let Some(weak) = watch.downgrade() {
            watches.insert(text, weak);
        }
        watch
    }
}

/// Polls, with backoff, until `stored` finds the output or `holder` finds the lease free.
fn watch<T, H>(stored: T, holder: H) -> Watch
where
    T: Fn() -> Result<Option<StoredTarball>, StoreError> + Send + Sync + 'static,
    H: Fn() -> Result<Option<String>, StoreError> + Send + Sync + 'static,
{
    let (stored, holder) = (Arc::new(stored), Arc::new(holder));
    async move {
        let mut pause = FIRST_POLL;
        loop {
            tokio::time::sleep(pause).await;
            pause = (pause * 3 / 2).min(MAX_POLL);
            let look = stored.clone();
            if let Some(t) = blocking(move || look()).await.map_err(|e| e.to_string())? {
                return Ok(Watched::Stored(t));
            }
            let held = holder.clone();
            if blocking(move || held())
                .await
                .map_err(|e| e.to_string())?
                .is_none()
            {
                return Ok(Watched::Free);
            }
        }
    }
    .boxed()
}
