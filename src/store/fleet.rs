//! Leases in the store, shared by every replica on it: one conversion per image across a fleet, and
//! one GC sweep at a time (issue 10). A lease is held by whoever wrote the newest *generation*
//! `leases/<name>/<n>` (`n` zero-padded, so keys sort by generation); every step is a conditional
//! create of the next generation, which one writer wins:
//!
//! - *take*: no generation exists → create `1`; a lease nobody renewed for a TTL → create `n+1`.
//! - *renew* (the heartbeat, every TTL/3): create `own+1`, then delete `own`. Failing to create it,
//!   or finding a newer generation than its own, the holder has lost the lease (it was too slow and
//!   was taken over); it says so and goes on: outputs are content-addressed, so two converters
//!   make the same bytes twice, never a wrong image.
//! - *release*: delete its own generation; what it guarded (the stored record) was published first.
//!
//! Why generations rather than an ETag compare-and-swap of one object (`If-Match`): the only
//! primitive it needs is the conditional create (`If-None-Match: *` / `link(2)`) the store already
//! relies on for blobs, so it is one mechanism, tested alike, on disk and on every S3 flavour
//! (`If-Match` on PUT came to AWS late and is missing from some S3-compatible servers).
//!
//! *Expired* is judged without comparing clocks across hosts: a waiter notes when it first saw the
//! current newest generation, by its own monotonic clock, and takes over once that generation has
//! stayed the newest for a whole TTL. A holder renews three times per TTL, so only a dead (or
//! stalled for a TTL) holder is taken over; a waiter that starts watching a dead lease waits one
//! TTL at most.

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::backend::Backend;
use super::{Store, StoreError};

const LEASES: &str = "leases/";
/// A lease record is a line of JSON; anything longer is not one.
const RECORD_LIMIT: u64 = 4096;

/// Lease duration unless configured (`--lease-ttl`): long enough that a busy replica's heartbeat
/// (every third of it) never misses, short enough that a dead replica's image converts again soon.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);

/// This replica's leases on one store: who it is, the TTL, and what it saw of other holders.
pub struct Leases {
    backend: Arc<dyn Backend>,
    /// Written into every generation it creates: `<pid>@<host>/<random>`.
    owner: String,
    ttl: Duration,
    /// Per lease name, the newest generation key seen and when it was first seen.
    seen: Mutex<HashMap<String, (String, Instant)>>,
    /// Times a caller found another holder and waited (the `lease_waits` metric).
    waits: AtomicU64,
}

/// The outcome of one attempt.
pub enum Acquired {
    Held(FleetLease),
    /// Someone else holds it (as far as can be told now).
    Busy {
        holder: String,
    },
}

impl Store {
    /// The leases this process takes on the store, each held for `ttl` past its last renewal.
    pub fn leases(&self, ttl: Duration) -> Leases {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        Leases {
            backend: self.backend.clone(),
            owner: format!(
                "{}@{}/{:08x}",
                std::process::id(),
                if host.is_empty() { "localhost" } else { &host },
                rand::random::<u32>()
            ),
            ttl,
            seen: Mutex::default(),
            waits: AtomicU64::new(0),
        }
    }
}

fn generation_key(name: &str, generation: u64) -> String {
    format!("{LEASES}{name}/{generation:020}")
}

fn generation_of(key: &str) -> Option<u64> {
    key.rsplit('/').next()?.parse().ok()
}

fn record(owner: &str, ttl: Duration) -> Vec<u8> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // The times are for people reading the bucket; takeover never compares them (module docs).
    serde_json::to_vec(&serde_json::json!({
        "owner": owner,
        "ttl_ms": ttl.as_millis() as u64,
        "written_unix_ms": now.as_millis() as u64,
    }))
    .expect("JSON serialises")
}

/// Creates `key` holding `bytes` unless it exists: `Ok(false)` then.
fn create(backend: &dyn Backend, key: &str, bytes: &[u8]) -> io::Result<bool> {
    let mut up = backend.upload()?;
    io::Write::write_all(&mut up, bytes)?;
    up.create_if_absent(key)
}

/// The generations of lease `name`, oldest first.
fn generations(backend: &dyn Backend, name: &str) -> io::Result<Vec<(u64, String)>> {
    let mut found: Vec<(u64, String)> = backend
        .list(&format!("{LEASES}{name}/"))?
        .into_iter()
        .filter_map(|k| Some((generation_of(&k)?, k)))
        .collect();
    found.sort();
    Ok(found)
}

fn owner_of(backend: &dyn Backend, key: &str) -> io::Result<Option<String>> {
    let Some(r) = backend.get(key, None)? else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    r.take(RECORD_LIMIT).read_to_end(&mut bytes)?;
    let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    Ok(Some(doc["owner"].as_str().unwrap_or("?").to_string()))
}

impl Leases {
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// How many times a caller waited for another holder so far.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    /// Counts one wait (once per caller that waits, not per poll).
    pub fn count_wait(&self) {
        self.waits.fetch_add(1, Ordering::Relaxed);
    }

    /// One attempt at lease `name` (a plain path component: a key's hash, `gc`). Blocking.
    pub fn try_acquire(&self, name: &str) -> Result<Acquired, StoreError> {
        let dir = format!("{LEASES}{name}/");
        let io = StoreError::io(&dir);
        let backend = &*self.backend;
        let found = generations(backend, name).map_err(io)?;
        let (next, previous) = match found.last() {
            None => (1, None),
            Some((generation, key)) => {
                let holder = owner_of(backend, key)
                    .map_err(StoreError::io(key))?
                    .unwrap_or_default();
                if !self.unchanged_for_ttl(name, key) {
                    return Ok(Acquired::Busy { holder });
                }
                tracing::warn!(lease = name, %holder, ttl_ms = self.ttl.as_millis() as u64, "lease not renewed for its TTL; taking over");
                (generation + 1, Some(found.clone()))
            }
        };
        let key = generation_key(name, next);
        if !create(backend, &key, &record(&self.owner, self.ttl)).map_err(StoreError::io(&key))? {
            let holder = owner_of(backend, &key)
                .map_err(StoreError::io(&key))?
                .unwrap_or_default();
            return Ok(Acquired::Busy { holder });
        }
        // The dead holder's generations: nobody reads them any more.
        for (_, old) in previous.into_iter().flatten() {
            let _ = backend.delete(&old);
        }
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        Ok(Acquired::Held(FleetLease::start(
            self.backend.clone(),
            name.to_string(),
            next,
            self.owner.clone(),
            self.ttl,
        )))
    }

    /// Who holds lease `name` now, if anyone does and has renewed it within a TTL (as far as this
    /// process has watched it): what a waiter polls without taking the lease. Blocking.
    pub fn holder(&self, name: &str) -> Result<Option<String>, StoreError> {
        let backend = &*self.backend;
        let found =
            generations(backend, name).map_err(StoreError::io(&format!("{LEASES}{name}/")))?;
        let Some((_, key)) = found.last() else {
            return Ok(None);
        };
        if self.unchanged_for_ttl(name, key) {
            return Ok(None);
        }
        // Released between the listing and the read: free.
        owner_of(backend, key).map_err(StoreError::io(key))
    }

    /// Removes generations last written `older_than` ago or earlier: left by holders that died
    /// when nobody asked for their key again (a live holder rewrites its lease every TTL/3, so
    /// `older_than` of many TTLs also covers the clocks' skew: the stat is the store's clock).
    /// How many. What the GC leader does after its sweep.
    pub fn remove_stale(&self, older_than: Duration) -> Result<usize, StoreError> {
        let keys = self.backend.list(LEASES).map_err(StoreError::io(LEASES))?;
        let cutoff = SystemTime::now()
            .checked_sub(older_than)
            .unwrap_or(UNIX_EPOCH);
        let mut removed = 0;
        for key in keys {
            let meta = self.backend.stat(&key).map_err(StoreError::io(&key))?;
            if meta.is_some_and(|m| m.modified < cutoff)
                && self.backend.delete(&key).map_err(StoreError::io(&key))?
            {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Whether `key` has been the newest generation of `name` for a TTL of this process's time.
    fn unchanged_for_ttl(&self, name: &str, key: &str) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let entry = seen
            .entry(name.to_string())
            .or_insert_with(|| (key.to_string(), Instant::now()));
        if entry.0 != key {
            *entry = (key.to_string(), Instant::now());
        }
        entry.1.elapsed() >= self.ttl
    }
}

/// A lease held: renewed on a thread of its own until dropped, then released.
pub struct FleetLease {
    stop: Option<mpsc::Sender<()>>,
    lost: Arc<AtomicBool>,
    name: String,
}

impl FleetLease {
    fn start(
        backend: Arc<dyn Backend>,
        name: String,
        generation: u64,
        owner: String,
        ttl: Duration,
    ) -> FleetLease {
        let (stop, stopped) = mpsc::channel::<()>();
        let lost = Arc::new(AtomicBool::new(false));
        let heartbeat = Heartbeat {
            backend,
            name: name.clone(),
            generation,
            owner,
            ttl,
            lost: lost.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name("strata-lease".into())
            .spawn(move || heartbeat.run(stopped));
        if let Err(e) = spawned {
            // Unrenewed, the lease expires after a TTL and a waiter converts too: duplicate work.
            tracing::warn!(error = %e, lease = %name, "no thread to renew the lease");
        }
        FleetLease {
            stop: Some(stop),
            lost,
            name,
        }
    }

    /// Whether another replica took it over (this holder's renewal was late by a TTL).
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for FleetLease {
    fn drop(&mut self) {
        // The heartbeat thread releases on its way out; dropping never waits on the store.
        drop(self.stop.take());
    }
}

struct Heartbeat {
    backend: Arc<dyn Backend>,
    name: String,
    generation: u64,
    owner: String,
    ttl: Duration,
    lost: Arc<AtomicBool>,
}

impl Heartbeat {
    fn run(mut self, stopped: mpsc::Receiver<()>) {
        let every = self.ttl / 3;
        // Anything but a timeout (the lease dropped, or a stray send) ends it: release.
        while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
            if self.lost.load(Ordering::Relaxed) {
                continue; // nothing to renew; wait to be dropped
            }
            if let Err(e) = self.renew() {
                // The next beat tries again; a TTL of failures lets a waiter take over.
                tracing::warn!(error = %e, lease = %self.name, "renewing the lease failed");
            }
        }
        if !self.lost.load(Ordering::Relaxed) {
            let key = generation_key(&self.name, self.generation);
            if let Err(e) = self.backend.delete(&key) {
                tracing::warn!(error = %e, lease = %self.name, "releasing the lease failed; it expires");
            }
        }
    }

    fn renew(&mut self) -> io::Result<()> {
        let newest = generations(&*self.backend, &self.name)?.last().map(|g| g.0);
        if newest != Some(self.generation) {
            self.lose(newest);
            return Ok(());
        }
        let next = generation_key(&self.name, self.generation + 1);
        if !create(&*self.backend, &next, &record(&self.owner, self.ttl))? {
            self.lose(Some(self.generation + 1));
            return Ok(());
        }
        let old = generation_key(&self.name, self.generation);
        self.generation += 1;
        self.backend.delete(&old).map(drop)
    }

    fn lose(&self, newest: Option<u64>) {
        self.lost.store(true, Ordering::Relaxed);
        tracing::warn!(
            lease = %self.name,
            own = self.generation,
            ?newest,
            "lease taken over by another replica (renewal too late); the work goes on, duplicated"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(a: Acquired) -> FleetLease {
        match a {
            Acquired::Held(l) => l,
            Acquired::Busy { holder } => panic!("busy, held by {holder}"),
        }
    }

    fn busy(a: Acquired) -> String {
        match a {
            Acquired::Held(l) => panic!("took {}", l.name()),
            Acquired::Busy { holder } => holder,
        }
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn one_holder_renewals_keep_it_and_release_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_dir(dir.path()).unwrap();
        let ttl = Duration::from_millis(300);
        let (a, b) = (store.leases(ttl), store.leases(ttl));
        let lease = held(a.try_acquire("k").unwrap());
        assert_eq!(busy(b.try_acquire("k").unwrap()), a.owner());
        // Three TTLs of renewals: b never sees one generation last a TTL.
        let until = Instant::now() + ttl * 3;
        while Instant::now() < until {
            busy(b.try_acquire("k").unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!lease.lost());
        let renewed = generations(&*store.backend, "k").unwrap();
        assert_eq!(renewed.len(), 1, "old generations removed: {renewed:?}");
        assert!(renewed[0].0 > 1, "renewed: {renewed:?}");
        drop(lease);
        wait_until("released", || {
            generations(&*store.backend, "k").unwrap().is_empty()
        });
        held(b.try_acquire("k").unwrap());
    }

    #[test]
    fn a_dead_holder_is_taken_over_after_a_ttl_and_the_late_one_learns_it_lost() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_dir(dir.path()).unwrap();
        let ttl = Duration::from_millis(200);
        let (a, b) = (store.leases(ttl), store.leases(ttl));
        // A holder that never renews: a generation written by hand, as a dead replica leaves it.
        assert!(create(
            &*store.backend,
            &generation_key("k", 7),
            &record("dead", ttl)
        )
        .unwrap());
        let started = Instant::now();
        assert_eq!(busy(a.try_acquire("k").unwrap()), "dead");
        let lease = loop {
            match a.try_acquire("k").unwrap() {
                Acquired::Held(l) => break l,
                Acquired::Busy { .. } => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        assert!(started.elapsed() >= ttl, "{:?}", started.elapsed());
        let now = generations(&*store.backend, "k").unwrap();
        assert_eq!(now.iter().map(|g| g.0).collect::<Vec<_>>(), vec![8]);
        // b takes it over too once a's renewals stop being seen: simulated by a's lease record
        // being overtaken by hand, after which a's next beat must notice.
        assert!(create(
            &*store.backend,
            &generation_key("k", 9),
            &record("other", ttl)
        )
        .unwrap());
        wait_until("lost", || lease.lost());
        drop(lease);
        std::thread::sleep(ttl / 2);
        assert_eq!(busy(b.try_acquire("k").unwrap()), "other");
    }

    #[test]
    fn racing_takers_make_one_holder() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_dir(dir.path()).unwrap();
        let leases: Vec<Leases> = (0..8)
            .map(|_| store.leases(Duration::from_secs(30)))
            .collect();
        let got: Vec<Acquired> = std::thread::scope(|s| {
            let tasks: Vec<_> = leases
                .iter()
                .map(|l| s.spawn(|| l.try_acquire("k").unwrap()))
                .collect();
            tasks.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let holders = got
            .iter()
            .filter(|a| matches!(a, Acquired::Held(_)))
            .count();
        assert_eq!(holders, 1);
    }
}
