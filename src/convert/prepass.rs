//! What the merge of a layer must know before it starts: the layer's summary (remembered, or read by
//! a counting pass over the layer, top layer first, ahead of the merge) and, from all of them, the
//! exact merged size.

use std::io::{self, BufReader};
use std::sync::Arc;

use futures::StreamExt;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio_util::io::{StreamReader, SyncIoBridge};
use tracing::Instrument;

use super::error::{caused_by, image_fault, layer_error, source_error};
use super::{Converter, Error, READ_BUF};
use crate::entry::Item;
use crate::layer;
use crate::limits::{Budget, Guard, Limits};
use crate::manifest::ResolvedImage;
use crate::merge::MergeError;
use crate::registry::Credentials;
use crate::source::{cancellable, read_ahead, TransferError};
use crate::stats::Alive;
use crate::summary;

/// A layer's summary, or why it could not be read.
type Scanned = Result<Arc<Vec<Item>>, Error>;

/// The image's layer summaries (indexed bottom first, as the manifest lists the layers): the
/// remembered ones at once, the others read on a task of its own, top layer first, so the merge of a
/// layer can start as soon as its own summary is in while the ones below are still being read.
/// Dropping it stops the reading.
pub(super) struct Summaries {
    slots: Vec<watch::Receiver<Option<Scanned>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Summaries {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Outcome of waiting for a slot whose scan task has gone.
fn stopped() -> Error {
    Error::Internal("layer summaries stopped being read".into())
}

impl Summaries {
    /// The summary of layer `i` (bottom first), once read.
    pub(super) async fn wait(&self, i: usize) -> Scanned {
        let mut rx = self.slots[i].clone();
        let result = rx.wait_for(Option::is_some).await.map_err(|_| stopped())?;
        result.clone().expect("waited for")
    }

    /// [`Summaries::wait`] from a blocking thread.
    pub(super) fn wait_blocking(&self, i: usize, handle: &Handle) -> io::Result<Arc<Vec<Item>>> {
        handle.block_on(self.wait(i)).map_err(|e| match e {
            Error::InvalidImage(m) => io::Error::new(io::ErrorKind::InvalidData, m),
            other => io::Error::other(other.to_string()),
        })
    }

    /// Waits for the top layer's summary: the merge's first need, and the one layer whose faults
    /// are still told with an HTTP status (before the first byte).
    pub(super) async fn top(&self) -> Result<(), Error> {
        match self.slots.len() {
            0 => Ok(()),
            n => self.wait(n - 1).await.map(drop),
        }
    }

    /// Every summary, bottom first.
    pub(super) async fn all(&self) -> Result<Vec<Arc<Vec<Item>>>, Error> {
        let mut out = Vec::with_capacity(self.slots.len());
        for i in 0..self.slots.len() {
            out.push(self.wait(i).await?);
        }
        Ok(out)
    }
}

impl Converter {
    /// Starts reading the image's layer summaries (those `only` marks, or all), `parallel` layers at
    /// a time, top layer first: one at a time when a merge runs beside them (the merge needs the
    /// cores), more when nothing else does. The slots of layers left out are never filled.
    pub(super) fn summaries(
        &self,
        image: &ResolvedImage,
        credentials: &Credentials,
        alive: &Alive,
        parallel: usize,
        only: Option<Vec<bool>>,
    ) -> Summaries {
        let n = image.layers.len();
        let (txs, slots): (Vec<_>, Vec<_>) = (0..n).map(|_| watch::channel(None)).unzip();
        let budget = Arc::new(Budget::default());
        let limits = self.config.limits;
        let scans: Vec<_> = image
            .layers
            .iter()
            .enumerate()
            .rev()
            .filter(|(i, _)| only.as_ref().is_none_or(|only| only[*i]))
            .map(|(i, layer)| {
                // Owned per layer, so each scan is a 'static future.
                let (source, store, reference) = (
                    self.source.clone(),
                    self.store.clone(),
                    image.reference.clone(),
                );
                let (layer, credentials, budget, alive) = (
                    layer.clone(),
                    credentials.clone(),
                    budget.clone(),
                    alive.clone(),
                );
                async move {
                    let hex = layer.digest.hex().to_string();
                    if let Some(items) = store.load_summary(&hex) {
                        return (i, Ok(Arc::new(items)));
                    }
                    let scanned = async {
                        let stream = source
                            .blob(&reference, &layer.digest, layer.size, &credentials)
                            .await
                            .map_err(source_error)?;
                        let (stream, _cancel) = cancellable(read_ahead(stream));
                        let handle = Handle::current();
                        let items = tokio::task::spawn_blocking(move || {
                            let _alive = alive;
                            let reader =
                                SyncIoBridge::new_with_handle(StreamReader::new(stream), handle);
                            scan_layer(layer.compression, reader, limits, budget)
                        })
                        .await
                        .map_err(|e| Error::Internal(e.to_string()))?
                        .map_err(|e| layer_error(&layer.digest, e))?;
                        store.save_summary(&hex, &items);
                        Ok::<_, Error>(Arc::new(items))
                    };
                    (i, scanned.await)
                }
            })
            .collect();
        // In the request's span: its layer progress lines carry the request id.
        let task = tokio::spawn(
            async move {
                let mut results = futures::stream::iter(scans).buffered(parallel.max(1));
                while let Some((i, result)) = results.next().await {
                    let failed = result.is_err();
                    let _ = txs[i].send(Some(result));
                    if failed {
                        return;
                    }
                }
            }
            .in_current_span(),
        );
        Summaries {
            slots,
            task: Some(task),
        }
    }

    /// The summaries a merge beside them reads one layer ahead, for an image whose merge without
    /// them stopped once; `None` for the others, merged as their layers are read.
    pub(super) fn summaries_if_needed(
        &self,
        image: &ResolvedImage,
        credentials: &Credentials,
        alive: &Alive,
    ) -> Option<Summaries> {
        self.store
            .needs_exact(image.manifest_digest.hex())
            .then(|| self.summaries(image, credentials, alive, 1, None))
    }

    /// The exact merged size: remembered, or from every layer's summary (read `parallel` at a time).
    pub(super) async fn exact_size(
        &self,
        image: &ResolvedImage,
        summaries: &Summaries,
    ) -> Result<u64, Error> {
        // Kept apart from the sizes merges without summaries counted: the two merges may place an
        // entry differently.
        let manifest_hex = format!("{}-summarised", image.manifest_digest.hex());
        if let Some(size) = self.store.load_size(&manifest_hex) {
            return Ok(size);
        }
        let all = summaries.all().await?;
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&[Item]> = all.iter().map(|s| &s[..]).collect();
            let size =
                summary::merged_size(&refs).map_err(|e| Error::InvalidImage(e.to_string()))?;
            store.save_size(&manifest_hex, size);
            Ok(size)
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
    }
}

/// Layers read at once by a sizing pre-pass that runs alone.
pub(super) fn prepass_parallelism() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 8)
}

/// Scans a layer blob's decompressed tar into its summary. When the content is at fault, the rest of
/// the blob is read first: bytes that miss their digest (which only the blob's end reveals) are the
/// transfer's fault, and are reported as such rather than as a broken image.
fn scan_layer(
    compression: layer::Compression,
    blob: impl io::Read + Send,
    limits: Limits,
    budget: Arc<Budget>,
) -> Result<Vec<Item>, MergeError> {
    let mut raw = BufReader::with_capacity(READ_BUF, blob);
    let tar = Guard::new(layer::decompress(compression, &mut raw), limits, budget);
    let result = summary::scan(tar);
    match result {
        Err(MergeError::Io(e)) if !image_fault(&e) => Err(MergeError::Io(e)),
        Err(content) => match io::copy(&mut raw, &mut io::sink()) {
            Err(transfer) if caused_by::<TransferError>(&transfer) => Err(MergeError::Io(transfer)),
            _ => Err(content),
        },
        ok => ok,
    }
}
