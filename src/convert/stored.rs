//! The registry view's conversions: the squashed layer streamed into the content-addressed store
//! (compressed for the wire, its diff_id and digest taken as it passes), then its config and an image
//! manifest, and a record of what source and options made them. One conversion per key at a time
//! (single flight): later requests for the same key wait for the one running, and a conversion goes
//! on when the request that started it is gone, so a retry finds it stored. Across the replicas on
//! one store, a conversion waits its turn ([`super::fleet`]).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::runtime::Handle;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::error::caused_by;
use super::fleet::Turn;
use super::job::{Job, Output};
use super::wire::write_layer;
use super::{Converter, Error};
use crate::digest::Digest;
use crate::format::image::{
    declared_type, image_index, image_manifest, squashed_config, Blob, Flavour, IndexEntry,
    WireCompression,
};
use crate::manifest::{self, Platform};
use crate::merge::NeedsSummary;
use crate::reference::Reference;
use crate::registry::Credentials;
use crate::source::RawManifest;
use crate::store::{ArtifactKey, Published, Store, StoreError};

/// What a pull asks for.
#[derive(Debug, Clone)]
pub struct ViewRequest {
    /// The upstream image, by tag or digest.
    pub reference: Reference,
    pub credentials: Credentials,
    /// The store repository the result is linked into (`squash/<name>`).
    pub repository: String,
    /// Whether the client takes an index (a multi-platform source then gives one); if not, the
    /// image for this platform.
    pub accepts_index: bool,
    pub platform: Platform,
    pub flavour: Flavour,
}

/// A manifest or index as stored.
#[derive(Debug, Clone)]
pub struct StoredManifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Vec<u8>,
}

type Flight = Shared<BoxFuture<'static, Result<Digest, Error>>>;

/// Conversions running, by key text.
#[derive(Default)]
pub(super) struct Flights(Mutex<HashMap<String, Flight>>);

fn store_error(e: StoreError) -> Error {
    Error::Internal(e.to_string())
}

fn joined<T>(r: Result<T, tokio::task::JoinError>) -> Result<T, Error> {
    r.map_err(|e| Error::Internal(format!("conversion task: {e}")))
}

impl Converter {
    /// The store the registry view serves from; `None` without `--store` or a cache dir.
    pub fn image_store(&self) -> Option<&Store> {
        self.images.as_ref()
    }

    fn images(&self) -> Result<&Store, Error> {
        self.images.as_ref().ok_or_else(|| {
            Error::NotFound("the registry view needs a store (--store or a cache dir)".into())
        })
    }

    /// The manifest (or index) of the squashed image `request` names, converted first if it is not
    /// stored, and linked into its repository (and its tag, when asked by tag). A tag is resolved
    /// upstream afresh every time. `slot` is taken only if a conversion must start.
    pub async fn stored_manifest(
        self: &Arc<Self>,
        request: &ViewRequest,
        slot: &(dyn Fn() -> Result<OwnedSemaphorePermit, Error> + Sync),
    ) -> Result<StoredManifest, Error> {
        let store = self.images()?.clone();
        let reference = &request.reference;
        self.check_allowed(reference)?;
        let raw = self
            .source
            .manifest(reference, &reference.manifest_ref(), &request.credentials)
            .await
            .map_err(super::error::source_error)?;
        let by_digest = |digest: &str| -> Result<Reference, Error> {
            let digest = Digest::parse(digest).map_err(|e| Error::Upstream(e.to_string()))?;
            Ok(Reference {
                tag: None,
                digest: Some(digest),
                ..reference.clone()
            })
        };
        let choices = manifest::index_platforms(reference, &raw.bytes, &raw.media_type)
            .map_err(super::error::source_error)?;
        let stored = match choices {
            Some(choices) if request.accepts_index => {
                let converting = choices.iter().map(|c| async {
                    let m = self
                        .converted(&store, by_digest(&c.digest)?, None, request, slot)
                        .await?;
                    Ok::<_, Error>(IndexEntry {
                        manifest: Blob {
                            digest: m.digest,
                            size: m.bytes.len() as u64,
                        },
                        platform: c.raw_platform.clone(),
                    })
                });
                let entries = futures::future::try_join_all(converting).await?;
                if entries.is_empty() {
                    return Err(Error::NotFound(format!(
                        "{reference}: the index names no platform's image"
                    )));
                }
                let bytes = image_index(request.flavour, &entries);
                let repo = request.repository.clone();
                let children: Vec<Digest> =
                    entries.into_iter().map(|e| e.manifest.digest).collect();
                let stored = blocking(move || {
                    for child in &children {
                        let bytes =
                            store.read_small(child, crate::store::repo::MAX_MANIFEST_BYTES)?;
                        store.put_manifest(&repo, &bytes)?;
                    }
                    store.put_blob(&bytes)?;
                    Ok(bytes)
                })
                .await?;
                StoredManifest {
                    digest: Digest::of(&stored),
                    media_type: request.flavour.index_type().to_string(),
                    bytes: stored,
                }
            }
            Some(choices) => {
                let choice = choices
                    .iter()
                    .find(|c| request.platform.matches(&c.platform))
                    .ok_or_else(|| {
                        Error::NotFound(format!(
                            "{reference}: no image for platform {}",
                            request.platform
                        ))
                    })?;
                self.converted(&store, by_digest(&choice.digest)?, None, request, slot)
                    .await?
            }
            // Not fetched again: a signed schema 1 manifest is known by its payload's digest, which
            // a registry need not serve it by.
            None => {
                let image = by_digest(&raw.digest.to_string())?;
                self.converted(&store, image, Some(raw), request, slot)
                    .await?
            }
        };
        let (repo, tag, bytes) = (
            request.repository.clone(),
            reference.tag.clone(),
            stored.bytes.clone(),
        );
        let store = self.images()?.clone();
        blocking(move || {
            let published = store.put_manifest(&repo, &bytes)?;
            if let Some(tag) = tag {
                store.set_tag(&repo, &tag, &published.digest)?;
            }
            Ok(())
        })
        .await?;
        // After the link: the bound never takes what this request is about to serve first.
        self.evict().await;
        Ok(stored)
    }

    /// A page of the upstream repository's tags, and whether more follow.
    pub async fn upstream_tags(
        &self,
        reference: &Reference,
        n: Option<usize>,
        last: Option<&str>,
        credentials: &Credentials,
    ) -> Result<(Vec<String>, bool), Error> {
        self.check_allowed(reference)?;
        let (mut tags, more) = self
            .source
            .tags(reference, n, last, credentials)
            .await
            .map_err(super::error::source_error)?;
        // Some registries (distribution 2.8 among them) ignore `n` and `last`: applied again here.
        tags.sort();
        tags.retain(|t| last.is_none_or(|l| t.as_str() > l));
        let more = more || n.is_some_and(|n| tags.len() > n);
        tags.truncate(n.unwrap_or(usize::MAX));
        Ok((tags, more))
    }

    /// The key of an image manifest's conversion: its digest fixes the source's bytes, so nothing
    /// else of the source (its config, its layers) is read to find a stored conversion.
    fn key(&self, manifest: &Digest) -> ArtifactKey {
        ArtifactKey::new(manifest.clone(), "squash-image")
            .option("compression", self.config.wire_compression.name())
    }

    /// The stored manifest of one image's conversion in `request`'s flavour: stored already, or
    /// converted now (or joined, if a conversion of the same key is running).
    async fn converted(
        self: &Arc<Self>,
        store: &Store,
        image: Reference,
        fetched: Option<RawManifest>,
        request: &ViewRequest,
        slot: &(dyn Fn() -> Result<OwnedSemaphorePermit, Error> + Sync),
    ) -> Result<StoredManifest, Error> {
        let manifest = image.digest.clone().expect("an image named by digest");
        let key = self.key(&manifest);
        let found = {
            let (store, key) = (store.clone(), key.clone());
            blocking(move || stored_record(&store, &key)).await?
        };
        self.metrics.store_lookup("view", found.is_some());
        let digest = match found {
            Some(d) => d,
            None => {
                self.flight(key, image, fetched, request.credentials.clone(), slot)?
                    .await?
            }
        };
        let (store, flavour, compression) =
            (store.clone(), request.flavour, self.config.wire_compression);
        blocking(move || {
            // Served, so recent: without the lease's touch it would look old to LRU eviction,
            // which reads it unleased, whatever flavour the clients take.
            drop(store.lease(&digest)?);
            let bytes = store.read_small(&digest, crate::store::repo::MAX_MANIFEST_BYTES)?;
            let bytes = match flavour {
                Flavour::Oci => bytes,
                Flavour::Docker => reflavoured(&store, &digest, &bytes, compression)?,
            };
            let media_type = declared_type(&bytes).unwrap_or_default();
            Ok(StoredManifest {
                digest: Digest::of(&bytes),
                media_type,
                bytes,
            })
        })
        .await
    }

    /// Joins the conversion of `key` running, or starts it on its own task.
    fn flight(
        self: &Arc<Self>,
        key: ArtifactKey,
        image: Reference,
        fetched: Option<RawManifest>,
        credentials: Credentials,
        slot: &(dyn Fn() -> Result<OwnedSemaphorePermit, Error> + Sync),
    ) -> Result<Flight, Error> {
        let text = key.to_string();
        let mut flights = self.flights.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = flights.get(&text) {
            return Ok(f.clone());
        }
        let permit = slot()?;
        let this = self.clone();
        let task_text = text.clone();
        // In the span of the request that started it: its log lines carry that request's id.
        let task = tokio::spawn(
            async move {
                let result = this
                    .clone()
                    .convert_into_store(key, image, fetched, credentials)
                    .await;
                this.flights
                    .0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&task_text);
                drop(permit);
                result
            }
            .in_current_span(),
        );
        let flight = async move { joined(task.await)? }.boxed().shared();
        flights.insert(text, flight.clone());
        Ok(flight)
    }

    /// Converts `image` (named by digest) into the store: the layer blob, the config, the
    /// manifest, then the record.
    async fn convert_into_store(
        self: Arc<Self>,
        key: ArtifactKey,
        image: Reference,
        fetched: Option<RawManifest>,
        credentials: Credentials,
    ) -> Result<Digest, Error> {
        let store = self.images()?.clone();
        // Another flight (here or on another replica) may have finished since this one's lookup;
        // one running on another replica is waited for. Held until the record is published.
        let lease = {
            let (store, k) = (store.clone(), key.clone());
            match self
                .turn(&key, move || stored_record(&store, &k))
                .await
                .map_err(store_error)?
            {
                Turn::Done(d) => return Ok(d),
                Turn::Mine(lease) => lease,
            }
        };
        let started = std::time::Instant::now();
        let alive = self.conversions.start();
        // From the image's resolution to its record: the whole conversion.
        let timed = alive.time("view");
        let limits = &self.config.limits;
        let image = match fetched {
            Some(raw) => {
                manifest::resolve_raw(&self.source, &image, raw, None, &credentials, limits).await
            }
            None => manifest::resolve_for(&self.source, &image, None, &credentials, limits).await,
        }
        .map_err(super::error::source_error)?;
        let summaries = self.summaries_if_needed(&image, &credentials, &alive);
        let compression = self.config.wire_compression;
        let source = format!("{}@{}", image.reference.name(), image.manifest_digest);
        let config = image.config.clone();
        let job = Job {
            source: self.source.clone(),
            store: self.store.clone(),
            reference: image.reference.clone(),
            credentials,
            image,
            summaries,
            output: Output::Layer,
            limits: self.config.limits,
            _alive: alive,
        };
        let handle = Handle::current();
        let layer_store = store.clone();
        let converter = self.clone();
        let span = tracing::Span::current();
        let (layer, diff_id) = joined(
            tokio::task::spawn_blocking(move || {
                let _entered = span.enter();
                let mut job = job;
                match write_layer(&job, &layer_store, compression, &handle) {
                    // Nothing has left yet: merged again, with summaries, the conversion succeeds.
                    Err(e) if job.summaries.is_none() && caused_by::<NeedsSummary>(&e) => {
                        tracing::warn!(error = %e, "merging again with the layers' summaries");
                        converter.store.mark_exact(job.image.manifest_digest.hex());
                        let _enter = handle.enter();
                        job.summaries = Some(converter.summaries(
                            &job.image,
                            &job.credentials,
                            &job._alive,
                            1,
                            None,
                        ));
                        write_layer(&job, &layer_store, compression, &handle)
                    }
                    done => done,
                }
            })
            .await,
        )?
        .map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => Error::InvalidImage(e.to_string()),
            _ => Error::Upstream(e.to_string()),
        })?;
        let layer_size = layer.size;
        let shown = key.to_string();
        let digest = blocking(move || {
            let config = store.put_blob(&squashed_config(&config, &diff_id, &source))?;
            let blob = |p: &Published| Blob {
                digest: p.digest.clone(),
                size: p.size,
            };
            let manifest = image_manifest(Flavour::Oci, &blob(&config), &blob(&layer), compression)
                .expect("every compression has an OCI media type");
            let manifest = store.put_blob(&manifest)?;
            store.put_derived(&key, &manifest.digest)?;
            // The leases are held until the record that roots them exists.
            drop((config, layer));
            Ok(manifest.digest)
        })
        .await?;
        drop(timed);
        if lease.as_ref().is_some_and(|l| l.lost()) {
            tracing::warn!(key = %shown, "converted under a lease another replica took over");
        }
        drop(lease);
        tracing::info!(
            manifest = %digest,
            layer_bytes = layer_size,
            compression = compression.name(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "stored conversion"
        );
        Ok(digest)
    }
}

/// The manifest a derived record names, if it and everything it names are still stored.
fn stored_record(store: &Store, key: &ArtifactKey) -> Result<Option<Digest>, StoreError> {
    match store.derived(key)? {
        Some(d) if store.complete(&d)? => Ok(Some(d)),
        _ => Ok(None),
    }
}

/// The Docker schema 2 twin of a stored OCI manifest (same blobs), stored too.
fn reflavoured(
    store: &Store,
    digest: &Digest,
    oci: &[u8],
    compression: WireCompression,
) -> Result<Vec<u8>, StoreError> {
    let doc: serde_json::Value =
        serde_json::from_slice(oci).map_err(|e| StoreError::InvalidManifest {
            digest: digest.clone(),
            reason: e.to_string(),
        })?;
    let blob = |d: &serde_json::Value| -> Result<Blob, StoreError> {
        Ok(Blob {
            digest: Digest::parse(d["digest"].as_str().unwrap_or(""))?,
            size: d["size"].as_u64().unwrap_or(0),
        })
    };
    let bytes = image_manifest(
        Flavour::Docker,
        &blob(&doc["config"])?,
        &blob(&doc["layers"][0])?,
        compression,
    )
    .ok_or_else(|| StoreError::InvalidManifest {
        digest: digest.clone(),
        reason: format!(
            "a {} layer has no Docker schema 2 media type; ask for OCI",
            compression.name()
        ),
    })?;
    store.put_blob(&bytes)?;
    Ok(bytes)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Error> {
    joined(tokio::task::spawn_blocking(f).await)?.map_err(store_error)
}
