//! Where a conversion's bytes go in the store as they stream ([`Tee`]): written on a thread of their
//! own, cut into the tarball's parts, and published (the parts, their descriptor, the record) once
//! the last byte has left, while the key's lease and [`Publishing`] make the next request for the
//! same bytes wait for the record.

use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

use super::cached::descriptor;
use super::Converter;
use crate::store::fleet::{FleetLease, Leases};
use crate::store::{ArtifactKey, BlobWriter, Store, StoreError};

/// Where a conversion's bytes go in the store: [`Tee::start`] when the conversion starts, then
/// [`Tee::publish`] once they are all written. A writer dropped unpublished (a failure, a client
/// gone) leaves nothing visible.
pub(super) struct Tee {
    store: Store,
    key: ArtifactKey,
    /// Exact length the output must have, when announced ahead (a squash's `Content-Length`).
    expected: Option<u64>,
    /// The validator the output is sent with, kept for repeats of the stored bytes.
    etag: Option<String>,
    /// `--cache-max-bytes`: enforced after each tarball is stored, as after each registry-view
    /// conversion.
    max_bytes: Option<u64>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Whose turn eviction is, on a store shared by replicas.
    leases: Option<Arc<Leases>>,
    /// The key's fleet lease, held while the conversion runs and released once its record is
    /// published (or, unpublished, when the tee is dropped with the conversion): requests for the
    /// same bytes wait for the record meanwhile ([`super::fleet`]).
    converting: Option<FleetLease>,
    publishing: Arc<Publishing>,
}

/// The keys of this process whose bytes have all been sent and are being published: a lookup that
/// misses one waits for its record (a few ms, an `fsync`) instead of answering as if it were not
/// stored. A client that has every byte and asks again, even with a HEAD, which waits for no
/// lease, is then answered from the store, with the validator and bytes it had.
#[derive(Default)]
pub(super) struct Publishing(
    std::sync::Mutex<std::collections::HashMap<String, watch::Receiver<()>>>,
);

/// A key being published, until dropped.
pub(super) struct Announced {
    publishing: Arc<Publishing>,
    key: String,
    _done: watch::Sender<()>,
}

impl Drop for Announced {
    fn drop(&mut self) {
        self.publishing.lock().remove(&self.key);
    }
}

/// Test hook (tests/stored_tarballs.rs): milliseconds a tarball's publication waits before it
/// starts, so a test can ask while it is under way. Never set in a deployment.
const PUBLISH_HOLD_VAR: &str = "STRATA_TEST_PUBLISH_HOLD";

/// The longest a lookup waits for a record being published; past it, the store is too slow to
/// be worth the wait.
const PUBLISH_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Publishing {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, watch::Receiver<()>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `key` is no longer being published; whether it was.
    pub(super) async fn wait(&self, key: &ArtifactKey) -> bool {
        let Some(mut done) = self.lock().get(&key.to_string()).cloned() else {
            return false;
        };
        // Ends when the sender drops, published or not.
        let _ = tokio::time::timeout(PUBLISH_WAIT, done.changed()).await;
        true
    }
}

impl Tee {
    #[cfg(test)]
    pub(super) fn for_test(
        store: &Store,
        key: &ArtifactKey,
        expected: Option<u64>,
        etag: Option<String>,
    ) -> Tee {
        Tee {
            store: store.clone(),
            key: key.clone(),
            expected,
            etag,
            max_bytes: None,
            metrics: Arc::default(),
            leases: None,
            converting: None,
            publishing: Arc::default(),
        }
    }

    /// Marks the key as being published, until the returned guard is dropped: taken before the
    /// last bytes leave.
    pub(super) fn announce(&self) -> Announced {
        let (done, watched) = watch::channel(());
        let key = self.key.to_string();
        self.publishing.lock().insert(key.clone(), watched);
        Announced {
            publishing: self.publishing.clone(),
            key,
            _done: done,
        }
    }

    /// The thread that writes the bytes into the store; a store that cannot take them is logged
    /// and the conversion goes on unstored.
    pub(super) fn start(&self) -> Option<TeeThread> {
        let first = self
            .store
            .blob_writer(None)
            .inspect_err(|e| tracing::warn!(error = %e, key = %self.key, "cannot write into the store; not storing"))
            .ok()?;
        TeeThread::start(self.store.clone(), first)
    }

    /// Publishes the parts' blobs, then their descriptor and record. `parts`: `None` if writing
    /// into them failed; `written`: what the conversion wrote, to compare with what was announced.
    /// A store failure is logged, not the conversion's: the client has its bytes, and the next
    /// request converts again.
    pub(super) fn publish(self, parts: Option<Vec<BlobWriter>>, written: u64) {
        let Tee {
            store,
            key,
            expected,
            etag,
            max_bytes,
            metrics,
            leases,
            converting,
            publishing: _,
        } = self;
        if expected.is_some_and(|e| e != written) {
            tracing::error!(written, ?expected, %key, "output length differs from the announced one; not stored");
            return;
        }
        let Some(parts) = parts else {
            return; // what failed was logged when it did
        };
        let started = std::time::Instant::now();
        if let Some(ms) = std::env::var(PUBLISH_HOLD_VAR)
            .ok()
            .and_then(|v| v.parse().ok())
        {
            tracing::warn!(ms, "publish held ({PUBLISH_HOLD_VAR})");
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        let stored = (|| {
            let blobs = parts
                .into_iter()
                .map(BlobWriter::finish)
                .collect::<Result<Vec<_>, _>>()?;
            let named: Vec<_> = blobs.iter().map(|b| (b.digest.clone(), b.size)).collect();
            let descriptor = store.put_blob(&descriptor(&named, etag.as_deref()))?;
            store.put_derived(&key, &descriptor.digest)?;
            // The leases are held until the record that roots them all exists.
            drop((descriptor, blobs));
            Ok::<_, StoreError>(named)
        })();
        match stored {
            Ok(parts) => tracing::info!(
                parts = ?parts.iter().map(|(d, _)| d.to_string()).collect::<Vec<_>>(),
                bytes = written,
                %key,
                publish_ms = started.elapsed().as_millis() as u64,
                "stored tarball"
            ),
            Err(e) => {
                tracing::warn!(error = %e, %key, "storing the tarball failed");
                return;
            }
        }
        if converting.as_ref().is_some_and(FleetLease::lost) {
            tracing::warn!(%key, "converted under a lease another replica took over");
        }
        // Released now that the record exists, so the requests waiting for it find it.
        drop(converting);
        // Apart, so the last bytes are not held back by it.
        if let Some(max) = max_bytes {
            std::thread::spawn(move || {
                let Some(_lease) = super::space::space_turn(leases.as_deref()) else {
                    return;
                };
                match store.evict(max) {
                    Ok(r) if !r.removed.is_empty() => {
                        metrics.store_evicted(r.removed.len());
                        tracing::info!(
                            removed = r.removed.len(),
                            bytes_left = r.bytes,
                            "evicted least recently used blobs"
                        )
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "eviction failed"),
                }
            });
        }
    }
}

impl Converter {
    /// Where the output known by `key` goes in the store, if there is one; `converting` is the
    /// key's fleet lease, held until the output is published.
    pub(super) fn tee(
        &self,
        key: &ArtifactKey,
        expected: Option<u64>,
        etag: Option<&str>,
        converting: Option<FleetLease>,
    ) -> Option<Tee> {
        Some(Tee {
            store: self.images.clone()?,
            key: key.clone(),
            expected,
            etag: etag.map(str::to_string),
            max_bytes: self.config.store_max_bytes,
            metrics: self.metrics.clone(),
            leases: self.leases.clone(),
            converting,
            publishing: self.publishing.clone(),
        })
    }
}

/// Chunks queued for the store's writer thread: 4 MiB, enough to ride out a slow write.
const TEE_DEPTH: usize = 16;

enum ToTee {
    Chunk(Bytes),
    /// What follows goes into a blob of its own; `named`: one whose digest is computed elsewhere
    /// ([`crate::store::Store::named_blob_writer`]).
    Cut {
        named: bool,
    },
}

/// The store's copy of a body, written on a thread of its own: the disk write overlaps the merge,
/// and the chunks are shared with the body, not copied. The body may be cut into several blobs,
/// stored as the tarball's parts. A failing write stops only the storing.
pub(super) struct TeeThread {
    tx: std::sync::mpsc::SyncSender<ToTee>,
    thread: std::thread::JoinHandle<Option<Vec<BlobWriter>>>,
}

impl TeeThread {
    fn start(store: Store, first: BlobWriter) -> Option<TeeThread> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<ToTee>(TEE_DEPTH);
        let thread = std::thread::Builder::new()
            .name("strata-store".into())
            .spawn(move || {
                let mut parts = vec![first];
                for message in rx {
                    let done = match message {
                        ToTee::Chunk(chunk) => parts
                            .last_mut()
                            .expect("a part is open")
                            .write_all(&chunk)
                            .map_err(|e| e.to_string()),
                        ToTee::Cut { named } => {
                            let next = if named {
                                store.named_blob_writer()
                            } else {
                                store.blob_writer(None)
                            };
                            next.map(|w| parts.push(w)).map_err(|e| e.to_string())
                        }
                    };
                    if let Err(error) = done {
                        tracing::warn!(%error, "writing into the store failed; not storing");
                        return None;
                    }
                }
                Some(parts)
            })
            .inspect_err(
                |e| tracing::warn!(error = %e, "no thread to store the output; not storing"),
            )
            .ok()?;
        Some(TeeThread { tx, thread })
    }

    /// Queues a chunk; `false` once the writer has given up.
    pub(super) fn feed(&self, chunk: Bytes) -> bool {
        self.tx.send(ToTee::Chunk(chunk)).is_ok()
    }

    /// Starts the next part; `false` once the writer has given up.
    pub(super) fn cut(&self, named: bool) -> bool {
        self.tx.send(ToTee::Cut { named }).is_ok()
    }

    /// The parts' writers, every chunk fed written into them; `None` if a write failed.
    pub(super) fn finish(self) -> Option<Vec<BlobWriter>> {
        drop(self.tx);
        self.thread.join().ok().flatten()
    }
}
