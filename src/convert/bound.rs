//! How big the docker-load archive's layer member is announced, before its content exists: the exact
//! merged size when it is remembered, else an upper bound from what the registry tells cheaply (each
//! layer's decompressed size from a few bytes at the blob's ends), with the summaries of the layers
//! that do not tell it. The content is zero-padded to the bound; content that would outgrow it aborts
//! the transfer and makes the image sized exactly (from every layer's summary) from then on.

use futures::StreamExt;

use super::prepass::prepass_parallelism;
use super::{Converter, Error};
use crate::entry::{Item, BLOCK};
use crate::layer::{self, Compression, HEAD_LEN, TAIL_LEN};
use crate::limits::LimitExceeded;
use crate::manifest::{LayerDescriptor, ResolvedImage};
use crate::registry::Credentials;
use crate::stats::Alive;

/// How the layer member of an image's archive is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sizing {
    /// Its exact size, remembered.
    Known(u64),
    /// Its exact size, from every layer's summary before the first byte, and merged with them (the
    /// image outgrew its bound once, or its merge without summaries stopped).
    Exact,
    /// An upper bound, the content zero-padded to it.
    Bound,
}

impl Sizing {
    /// Part of the validator: each sizing gives its own bytes (a merge with summaries may place an
    /// entry elsewhere than one without).
    pub(super) fn tag(self) -> &'static str {
        match self {
            Sizing::Known(_) => "exact",
            Sizing::Exact => "summarised",
            Sizing::Bound => "bound",
        }
    }
}

/// Layers probed at once.
const PROBES: usize = 8;

/// Room a bound leaves for what the merged tar can add to the layers' own bytes: parent directories
/// no layer lists, and headers the writer's canonical form makes longer (a PAX record for a name a
/// layer kept in a raw ustar field). Most merges need none of it (whiteouts and shadowed entries
/// are not written, and each layer's own end blocks are slack); a merge that needs more is caught.
fn margin(layers: u64) -> u64 {
    layers / 256 + 64 * 1024
}

/// The bound for layers of `sizes` decompressed bytes each: all their bytes, the merged tar's end
/// blocks and the margin.
pub(super) fn bound_of(sizes: &[u64]) -> u64 {
    let total: u64 = sizes.iter().sum();
    total + 2 * BLOCK + margin(total)
}

/// Bytes a layer's entries take written by the merge's writer, whatever the merge keeps of them.
fn written_len(items: &[Item]) -> u64 {
    items
        .iter()
        .map(|item| match item {
            Item::Entry(meta) => meta.encoded_len(),
            Item::Whiteout(_) | Item::Opaque(_) => 0,
        })
        .sum::<u64>()
        + 2 * BLOCK
}

impl Converter {
    /// How this image's layer member is sized, known without reading anything upstream.
    pub(super) fn sizing(&self, image: &ResolvedImage) -> Sizing {
        let hex = image.manifest_digest.hex();
        if self.store.needs_exact(hex) {
            return Sizing::Exact;
        }
        match self.store.load_size(hex) {
            Some(size) => Sizing::Known(size),
            None => Sizing::Bound,
        }
    }

    /// An upper bound on the merged layer: the layers' decompressed sizes as their blobs tell them,
    /// and for those whose blobs do not tell, their summaries' written size (read first).
    pub(super) async fn bound(
        &self,
        image: &ResolvedImage,
        credentials: &Credentials,
        alive: &Alive,
    ) -> Result<u64, Error> {
        let probes: Vec<_> = image
            .layers
            .iter()
            .map(|l| self.told_size(image, l, credentials))
            .collect();
        let told: Vec<Option<u64>> = futures::stream::iter(probes)
            .buffered(PROBES)
            .collect()
            .await;
        // A bomb is refused before the first byte when its blob says what it would make.
        let limit = self.config.limits.max_image_bytes;
        let total: u64 = told.iter().flatten().sum();
        if total > limit {
            return Err(Error::InvalidImage(
                LimitExceeded {
                    what: "the image's uncompressed size",
                    limit,
                    flag: "max-image-bytes",
                }
                .to_string(),
            ));
        }
        let untold: Vec<bool> = told.iter().map(Option::is_none).collect();
        let summaries = untold.contains(&true).then(|| {
            self.summaries(
                image,
                credentials,
                alive,
                prepass_parallelism(),
                Some(untold),
            )
        });
        let mut sizes = Vec::with_capacity(told.len());
        for (i, size) in told.into_iter().enumerate() {
            sizes.push(match (size, &summaries) {
                (Some(size), _) => size,
                (None, Some(summaries)) => written_len(&summaries.wait(i).await?),
                (None, None) => unreachable!("summaries are read for every untold layer"),
            });
        }
        Ok(bound_of(&sizes))
    }

    /// A layer's decompressed size from a few bytes at its blob's ends; `None` when they do not tell
    /// it (or cannot be had alone).
    async fn told_size(
        &self,
        image: &ResolvedImage,
        layer: &LayerDescriptor,
        credentials: &Credentials,
    ) -> Option<u64> {
        let size = layer.size;
        if layer.compression == Compression::None {
            return Some(size);
        }
        let (source, reference) = (&self.source, &image.reference);
        let head = match layer.compression {
            Compression::Zstd | Compression::Detect => {
                let range = 0..size.min(HEAD_LEN);
                source
                    .blob_range(reference, &layer.digest, range, credentials)
                    .await
            }
            _ => Ok(Some(Default::default())),
        };
        let tail = match layer.compression {
            Compression::Gzip | Compression::Detect => {
                let range = size.saturating_sub(TAIL_LEN)..size;
                source
                    .blob_range(reference, &layer.digest, range, credentials)
                    .await
            }
            _ => Ok(Some(Default::default())),
        };
        let (head, tail) = (head.ok().flatten()?, tail.ok().flatten()?);
        let told = layer::told_size(layer.compression, size, &head, &tail);
        tracing::debug!(digest = %layer.digest, size, ?told, "layer size told by its blob");
        told
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{EntryMeta, Kind};

    #[test]
    fn bound_covers_layers_end_and_margin() {
        assert_eq!(bound_of(&[]), 1024 + 64 * 1024);
        assert_eq!(
            bound_of(&[256_000, 256_000]),
            512_000 + 1024 + 2000 + 64 * 1024
        );
    }

    #[test]
    fn written_len_counts_entries_not_whiteouts() {
        let items = vec![
            Item::Entry(EntryMeta::synthetic(b"a", Kind::File, 0o644, 10)),
            Item::Whiteout(b"b".to_vec()),
            Item::Opaque(b"c".to_vec()),
        ];
        assert_eq!(written_len(&items), 512 + 512 + 1024);
    }
}
