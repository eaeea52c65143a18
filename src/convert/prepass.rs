//! What the merge must know before it starts: each layer's summary (remembered, or read by a
//! counting pre-pass over the layer, several layers at once) and, from them, the merged size.

use std::io::{self, BufReader};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use tokio::runtime::Handle;
use tokio_util::io::{StreamReader, SyncIoBridge};

use super::error::{caused_by, image_fault, layer_error, source_error};
use super::{Converter, Error, READ_BUF};
use crate::entry::Item;
use crate::layer;
use crate::limits::{Budget, Guard, Limits};
use crate::manifest::ResolvedImage;
use crate::merge::{LayerHints, MergeError};
use crate::registry::Credentials;
use crate::source::{cancellable, read_ahead, TransferError};
use crate::stats::Alive;
use crate::summary;

impl Converter {
    pub(super) async fn analyse(
        &self,
        image: &ResolvedImage,
        credentials: &Credentials,
        sizing: bool,
        alive: &Alive,
    ) -> Result<(Option<u64>, Vec<LayerHints>), Error> {
        let summaries = self.summaries(image, credentials, alive).await?;
        let manifest_hex = image.manifest_digest.hex().to_string();
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || -> Result<_, Error> {
            let refs: Vec<&[Item]> = summaries.iter().map(|s| &s[..]).collect();
            let size = match store.load_size(&manifest_hex) {
                _ if !sizing => None,
                Some(size) => Some(size),
                None => {
                    let size = summary::merged_size(&refs)
                        .map_err(|e| Error::InvalidImage(e.to_string()))?;
                    store.save_size(&manifest_hex, size);
                    Some(size)
                }
            };
            let hints: Vec<LayerHints> = refs
                .iter()
                .map(|items| LayerHints::from_items(items))
                .collect();
            Ok((size, hints))
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
    }

    /// Each layer's summary, bottom first: remembered ones from disk, the others from a counting
    /// pre-pass over the layer, run for several layers at once.
    async fn summaries(
        &self,
        image: &ResolvedImage,
        credentials: &Credentials,
        alive: &Alive,
    ) -> Result<Vec<Vec<Item>>, Error> {
        let budget = Arc::new(Budget::default());
        let limits = self.config.limits;
        let parallel = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(2, 8);
        let scans: Vec<_> = image
            .layers
            .iter()
            .map(|layer| {
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
                        return Ok(items);
                    }
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
                    Ok::<_, Error>(items)
                }
            })
            .collect();
        futures::stream::iter(scans)
            .buffered(parallel)
            .try_collect()
            .await
    }
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
