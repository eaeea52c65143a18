//! Blobs in use across the replicas on one store, so that a sweep (GC or eviction) on one replica
//! never deletes a blob that another replica found present and is about to name in a manifest or
//! record (issue 10). Per process, [`super::blob::Pins`] do this under a lock; across processes
//! there is no lock and no conditional delete, so two marks and an order of steps do it instead:
//!
//! - A *use mark* `inuse/<alg>-<hex>-<token>` is written by whoever is about to rely on a blob
//!   being there (a writer publishing it, new or already stored; a manifest link naming it),
//!   **before** it looks for the blob, and removed once what names the blob is published.
//! - A *doom mark* `doomed/<alg>-<hex>` is written by the sweeper **before** it lists the use marks
//!   and takes its last look at the roots, and removed after its deletes.
//! - A user that, after writing its use mark, finds a doom mark waits until it is gone, then looks
//!   for the blob (and writes it if it was deleted). A sweeper deletes a blob only if it found no
//!   use mark for it, after writing the doom mark.
//!
//! Why that is enough (every object operation is atomic and strongly consistent, as on S3 since
//! 2020 and on a file system): the user writes U then reads D; the sweeper writes D then reads U.
//! One of the two reads sees the other's write. If the sweeper sees U, it spares the blob. If the
//! user sees D, it waits for the sweeper's decision and looks afterwards. If the user's mark was
//! already gone when the sweeper listed the marks, what names the blob was published before that,
//! and the sweeper's last look at the roots (after the listing) finds it.
//!
//! Timing enters only where a party may be dead: a use mark older than [`USE_MARK_STALE`] is a dead
//! user's litter (a publication takes seconds); a sweeper deletes only within [`DOOM_WINDOW`] of
//! writing its doom marks (else it spares the batch for its next pass), and a user stops waiting for
//! a doom mark once it has waited [`DOOM_WAIT`] or the mark is that old (a dead sweeper's). The
//! margin between the two covers a slow delete request (the S3 client gives up after 30 s).

use std::collections::HashSet;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::backend::Backend;
use crate::digest::Digest;

const IN_USE: &str = "inuse/";
const DOOMED: &str = "doomed/";

/// A use mark older than this is a dead replica's: no publication holds its blobs that long.
pub const USE_MARK_STALE: Duration = Duration::from_secs(3600);
/// How long after writing its doom marks a sweeper may still delete what they name.
pub const DOOM_WINDOW: Duration = Duration::from_secs(10);
/// The longest a user waits for a doom mark to go: far beyond [`DOOM_WINDOW`] plus a delete
/// request's retries.
pub const DOOM_WAIT: Duration = Duration::from_secs(120);
/// Pauses between looks at a doom mark: the first short (a sweep's batch takes milliseconds on a
/// directory), growing to this.
const DOOM_POLL_MAX: Duration = Duration::from_millis(500);

/// `sha256-<hex>`: one path component, so each kind of mark is one flat prefix (no directory per
/// digest left behind on a file system).
fn flat(digest: &Digest) -> String {
    format!("{}-{}", digest.algorithm().name(), digest.hex())
}

fn doom_key(digest: &Digest) -> String {
    format!("{DOOMED}{}", flat(digest))
}

/// Writes an empty object at `key` (replacing one there).
fn put_mark(backend: &dyn Backend, key: &str) -> io::Result<()> {
    backend.upload()?.replace(key)
}

/// A use mark held: removed when dropped.
pub(super) struct UseMark {
    backend: Arc<dyn Backend>,
    key: String,
}

impl Drop for UseMark {
    fn drop(&mut self) {
        if let Err(e) = self.backend.delete(&self.key) {
            // Left, it only keeps its blob from sweeps until it is stale.
            tracing::warn!(error = %e, key = %self.key, "removing a use mark failed");
        }
    }
}

/// Marks `digest` in use, then waits while a sweep has it doomed: once this returns, no sweep
/// deletes the blob until the mark is dropped, and if one deleted it just before, the caller's look
/// (after this) finds it absent.
pub(super) fn mark_in_use(backend: &Arc<dyn Backend>, digest: &Digest) -> io::Result<UseMark> {
    let key = format!("{IN_USE}{}-{:016x}", flat(digest), rand::random::<u64>());
    put_mark(&**backend, &key)?;
    let mark = UseMark {
        backend: backend.clone(),
        key,
    };
    wait_not_doomed(&**backend, digest)?;
    Ok(mark)
}

fn wait_not_doomed(backend: &dyn Backend, digest: &Digest) -> io::Result<()> {
    let key = doom_key(digest);
    let started = Instant::now();
    let mut pause = Duration::from_millis(20);
    let mut said = false;
    while let Some(meta) = backend.stat(&key)? {
        let age = SystemTime::now()
            .duration_since(meta.modified)
            .unwrap_or_default();
        if age >= DOOM_WAIT || started.elapsed() >= DOOM_WAIT {
            tracing::warn!(%digest, "a sweep's doom mark outlived it; going on");
            let _ = backend.delete(&key);
            break;
        }
        if !said {
            said = true;
            tracing::info!(%digest, "blob doomed by a sweep in progress; waiting for it");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(DOOM_POLL_MAX);
    }
    if said {
        tracing::info!(%digest, waited_ms = started.elapsed().as_millis() as u64, "sweep done; looking for the blob again");
    }
    Ok(())
}

/// A sweeper's doom marks on one batch of blobs: removed when dropped.
pub(super) struct Doomed {
    backend: Arc<dyn Backend>,
    keys: Vec<String>,
    written: Instant,
}

impl Doomed {
    /// Dooms `digests`, then lists the use marks: the blobs among them that someone uses.
    pub(super) fn write(
        backend: &Arc<dyn Backend>,
        digests: &[Digest],
    ) -> io::Result<(Doomed, HashSet<Digest>)> {
        let mut doomed = Doomed {
            backend: backend.clone(),
            keys: Vec::with_capacity(digests.len()),
            written: Instant::now(),
        };
        for d in digests {
            let key = doom_key(d);
            put_mark(&**backend, &key)?;
            doomed.keys.push(key);
        }
        let used = in_use(&**backend)?;
        Ok((doomed, used))
    }

    /// Whether deletes of this batch may still go ahead ([`DOOM_WINDOW`]).
    pub(super) fn open(&self) -> bool {
        self.written.elapsed() < DOOM_WINDOW
    }
}

impl Drop for Doomed {
    fn drop(&mut self) {
        for key in &self.keys {
            if let Err(e) = self.backend.delete(key) {
                // Its users wait until it is DOOM_WAIT old.
                tracing::warn!(error = %e, %key, "removing a doom mark failed");
            }
        }
    }
}

/// The digests with a live use mark; stale ones (dead users') are removed on the way.
fn in_use(backend: &dyn Backend) -> io::Result<HashSet<Digest>> {
    let mut used = HashSet::new();
    for key in backend.list(IN_USE)? {
        let Some(digest) = key
            .strip_prefix(IN_USE)
            .and_then(|name| name.rsplit_once('-'))
            .and_then(|(flat, _token)| Digest::parse(&flat.replacen('-', ":", 1)).ok())
        else {
            continue; // not a mark this code wrote
        };
        let stale = backend.stat(&key)?.is_some_and(|m| {
            SystemTime::now()
                .duration_since(m.modified)
                .is_ok_and(|age| age >= USE_MARK_STALE)
        });
        if stale {
            let _ = backend.delete(&key);
        } else {
            used.insert(digest);
        }
    }
    Ok(used)
}

/// Removes doom marks left by a sweeper that died mid-pass (older than [`DOOM_WAIT`]): users ignore
/// them by then anyway, but each costs them a look.
pub(super) fn remove_stale_dooms(backend: &dyn Backend) -> io::Result<usize> {
    let mut removed = 0;
    for key in backend.list(DOOMED)? {
        let stale = backend.stat(&key)?.is_some_and(|m| {
            SystemTime::now()
                .duration_since(m.modified)
                .is_ok_and(|age| age >= DOOM_WAIT)
        });
        if stale && backend.delete(&key)? {
            removed += 1;
        }
    }
    Ok(removed)
}
