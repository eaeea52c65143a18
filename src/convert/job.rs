//! The streaming half of a conversion: on a blocking thread, layers fetched top-down (the next one
//! while the current one merges), merged into the output format, written into the body channel.

use std::io::{self, BufReader, Write};
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::io::{StreamReader, SyncIoBridge};
use tracing::Instrument;

use super::body::ChannelWriter;
use super::error::{caused_by, layer_error_io, source_error, FetchFailed};
use super::prepass::Summaries;
use super::tee::Tee;
use super::{ByteStream, CHANNEL_DEPTH, READ_BUF};
use crate::entry;
use crate::format::aci::{AciArchive, RootfsSink};
use crate::format::docker_archive::{DockerArchive, LayerWriter, SizeExceeded};
use crate::layer;
use crate::limits::{Budget, Guard, Limits};
use crate::manifest::{LayerDescriptor, ResolvedImage};
use crate::merge::{merge_tar, LayerHints, Merger, NeedsSummary, Sink, TarSink};
use crate::reference::Reference;
use crate::registry::Credentials;
use crate::sign::{InFlight, Signatures, Signer};
use crate::source::{read_ahead, BlobStream, Source};
use crate::stats::Alive;
use crate::summary::Store;

/// The streaming half of a conversion, run on a blocking thread.
pub(super) struct Job {
    pub(super) source: Source,
    pub(super) store: Store,
    pub(super) reference: Reference,
    pub(super) credentials: Credentials,
    pub(super) image: ResolvedImage,
    /// The layers' summaries, read ahead of their merge, for an image that needs them (one whose
    /// merge without them stopped once); `None`: each layer is merged as it is read.
    pub(super) summaries: Option<Summaries>,
    pub(super) output: Output,
    pub(super) limits: Limits,
    /// Dropped with the job, when its thread ends.
    pub(super) _alive: Alive,
}

pub(super) enum Output {
    /// `bounded`: the layer member's announced size is an upper bound, not the exact size.
    Docker {
        archive: DockerArchive,
        bounded: bool,
    },
    /// The merged tar alone, written by [`Job::write_layer`] (the registry view's blob).
    Layer,
    Aci {
        archive: Box<AciArchive>,
        signing: Option<Signing>,
    },
}

/// Signing an ACI while it streams, and keeping the signature.
pub(super) struct Signing {
    pub(super) signer: Arc<Signer>,
    pub(super) signatures: Signatures,
    pub(super) in_flight: InFlight,
}

impl Job {
    /// The body: the conversion starts when it is first polled, so a response that sends no body
    /// (HEAD, or a client gone before the first byte) fetches no layer.
    /// `tee`, when given, also writes the bytes into the store and publishes them there if the
    /// conversion succeeds.
    pub(super) fn start(self, tee: Option<Tee>) -> ByteStream {
        let mut job = Some((self, tee));
        let mut running: Option<ByteStream> = None;
        Box::pin(futures::stream::poll_fn(move |cx| {
            let body = running.get_or_insert_with(|| {
                let (job, tee) = job.take().expect("started once");
                job.spawn(tee)
            });
            body.as_mut().poll_next(cx)
        }))
    }

    fn spawn(self, tee: Option<Tee>) -> ByteStream {
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let handle = Handle::current();
        let format = match self.output {
            Output::Docker { .. } => "squash",
            Output::Layer => "layer",
            Output::Aci { .. } => "aci",
        };
        let span = tracing::info_span!("convert", format, image = %self.reference, manifest = %self.image.manifest_digest);
        tokio::task::spawn_blocking(move || {
            let _enter = span.enter();
            let _timed = self._alive.time(format);
            let mut out = ChannelWriter::new(tx.clone());
            out.set_tee(tee.as_ref().and_then(Tee::start));
            let result = self.run(&mut out, &handle).and_then(|merged| {
                // Remembered before the last bytes leave, not before the conversion has
                // succeeded: a cut first download must find the same (bound) bytes to resume.
                if let (Some(size), Output::Docker { bounded: true, .. }) = (merged, &self.output) {
                    self.store.save_size(self.image.manifest_digest.hex(), size);
                }
                let announced = tee.as_ref().map(Tee::announce);
                out.flush()?;
                Ok(announced)
            });
            let e = match result {
                Ok(_announced) => {
                    // Published after the last bytes left, so the client does not wait for the
                    // store's writes and fsync. The tee holds the key's lease until the record
                    // exists: a request for the same bytes meanwhile waits for it and is served
                    // the stored copy, not a conversion of its own (which would be sized exactly).
                    let (tee, written) = (tee.map(|t| (t, out.take_tee())), out.position());
                    drop((out, tx));
                    if let Some((tee, writer)) = tee {
                        tee.publish(writer, written);
                    }
                    return;
                }
                Err(e) => e,
            };
            if caused_by::<SizeExceeded>(&e) {
                self.outgrown();
            }
            if caused_by::<NeedsSummary>(&e) {
                self.needs_summaries(&e);
            }
            if e.kind() == io::ErrorKind::BrokenPipe {
                tracing::info!("client went away; conversion stopped");
            } else {
                tracing::error!(error = %e, "conversion failed after the response started");
                let _ = tx.blocking_send(Err(e));
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }

    /// The merged layer outgrew its announced size. An exact size that was wrong is forgotten, with
    /// the summaries it came from; a bound that was too small makes the image sized exactly from now
    /// on, so the client's retry gets it whole.
    fn outgrown(&self) {
        let manifest = self.image.manifest_digest.hex();
        if matches!(self.output, Output::Docker { bounded: true, .. }) {
            tracing::warn!(
                "merged layer outgrew the bound its header announced; transfer aborted, the next \
                 request for this image is sized exactly"
            );
            self.store.mark_exact(manifest);
            return;
        }
        let blobs: Vec<String> = self
            .image
            .layers
            .iter()
            .map(|l| l.digest.hex().to_string())
            .collect();
        let blobs: Vec<&str> = blobs.iter().map(String::as_str).collect();
        self.store.forget(manifest, &blobs);
    }

    /// A layer could not be merged without its summary: the transfer is aborted, and the image is
    /// merged with summaries (and sized exactly) from now on, so the client's retry gets it whole.
    fn needs_summaries(&self, e: &io::Error) {
        tracing::warn!(error = %e, "transfer aborted; the next request for this image reads the layers' summaries first");
        self.store.mark_exact(self.image.manifest_digest.hex());
    }

    /// Starts fetching a layer on the runtime: the request, then [`read_ahead`].
    fn fetch(&self, layer: &LayerDescriptor, handle: &Handle) -> Fetch {
        let (source, reference, credentials) = (
            self.source.clone(),
            self.reference.clone(),
            self.credentials.clone(),
        );
        let (digest, size) = (layer.digest.clone(), layer.size);
        // In the conversion's span (and so the request's): the transfer's progress lines name it.
        let fetch = async move {
            let stream = source
                .blob(&reference, &digest, size, &credentials)
                .await
                .map_err(|e| {
                    let error = source_error(e);
                    io::Error::other(FetchFailed(error.with_context(&format!("layer {digest}"))))
                })?;
            Ok(read_ahead(stream))
        };
        Fetch(handle.spawn(fetch.instrument(tracing::Span::current())))
    }

    /// Writes the output; for a docker archive, returns the merged layer's exact size (its content
    /// before the padding).
    fn run(&self, out: &mut ChannelWriter, handle: &Handle) -> io::Result<Option<u64>> {
        match &self.output {
            Output::Docker { archive, .. } => self.run_docker(archive, out, handle).map(Some),
            Output::Layer => self.write_layer(out, handle).map(|()| None),
            Output::Aci { archive, signing } => self
                .run_aci(archive, signing.as_ref(), out, handle)
                .map(|()| None),
        }
    }

    fn run_docker(
        &self,
        archive: &DockerArchive,
        out: &mut ChannelWriter,
        handle: &Handle,
    ) -> io::Result<u64> {
        archive.write_head(out)?;
        // The first byte leaves now, not when a chunk fills: the client learns the transfer has begun.
        out.flush()?;
        out.tap_next_sha256(archive.layer_size());
        let mut layer_out = LayerWriter::new(&mut *out, archive.layer_size());
        let mut sink = TarSink(&mut layer_out);
        self.merge_layers(&mut sink, handle)?;
        entry::write_end(&mut sink.0)?;
        let merged = layer_out.written();
        layer_out.finish()?;
        let diff_id = String::from_utf8(out.finish_tap()?).expect("hex digest");
        archive.write_tail(out, &diff_id)?;
        Ok(merged)
    }

    /// The merged layer as a tar, ended, into `out`.
    pub(super) fn write_layer(&self, out: &mut dyn Write, handle: &Handle) -> io::Result<()> {
        let mut sink = TarSink(out);
        self.merge_layers(&mut sink, handle)?;
        entry::write_end(&mut sink.0)
    }

    fn run_aci(
        &self,
        archive: &AciArchive,
        signing: Option<&Signing>,
        out: &mut ChannelWriter,
        handle: &Handle,
    ) -> io::Result<()> {
        if let Some(s) = signing {
            let signer = s.signer.clone();
            out.tap_next(u64::MAX, move |chunks| signer.sign_stream(chunks));
        }
        archive.write_head(out)?;
        out.flush()?;
        let mut sink = RootfsSink::new(TarSink(&mut *out));
        self.merge_layers(&mut sink, handle)?;
        let accounts = std::mem::take(&mut sink.accounts);
        drop(sink);
        archive.write_tail(out, &accounts)?;
        if let Some(s) = signing {
            // Kept before the last bytes leave: a client that asks for the signature as soon as its
            // download ends finds it.
            let signature = out.finish_tap()?;
            s.signatures
                .save(s.in_flight.key(), &String::from_utf8_lossy(&signature));
        }
        Ok(())
    }

    /// Merges the layers top-down into `sink`.
    fn merge_layers(&self, sink: &mut dyn Sink, handle: &Handle) -> io::Result<()> {
        let mut merger = Merger::new();
        let budget = Arc::new(Budget::default());
        let layers: Vec<_> = self.image.layers.iter().enumerate().rev().collect();
        // One layer is fetched ahead: its request and first chunks overlap the merge of the one above.
        let mut next = layers.first().map(|(_, layer)| self.fetch(layer, handle));
        for (depth, (i, layer)) in layers.iter().enumerate() {
            let _span =
                tracing::debug_span!("layer", digest = %layer.digest, size = layer.size).entered();
            // What is ready goes out while this layer's summary or fetch may still be coming.
            sink.flush()?;
            match &self.summaries {
                Some(summaries) => {
                    let items = summaries.wait_blocking(*i, handle)?;
                    merger.begin_layer(depth as u32, LayerHints::from_items(&items));
                }
                None => merger.begin_watched(depth as u32),
            }
            let this = next.take().expect("fetched ahead");
            next = layers.get(depth + 1).map(|(_, l)| self.fetch(l, handle));
            let stream = this.wait(handle)?;
            let reader = SyncIoBridge::new_with_handle(StreamReader::new(stream), handle.clone());
            // No draining as in `scan_layer` here: once the response has started, any failure aborts
            // it alike, and draining the blob would keep a fetch going after the client left.
            let tar = Guard::new(
                layer::decompress(
                    layer.compression,
                    BufReader::with_capacity(READ_BUF, reader),
                ),
                self.limits,
                budget.clone(),
            );
            merge_tar(&mut merger, tar, sink).map_err(|e| layer_error_io(&layer.digest, e))?;
        }
        merger.finish(sink).map_err(io::Error::from)
    }
}

/// A layer fetch started on the runtime; aborted if dropped before it is waited for.
struct Fetch(tokio::task::JoinHandle<io::Result<BlobStream>>);

impl Fetch {
    fn wait(mut self, handle: &Handle) -> io::Result<BlobStream> {
        handle
            .block_on(&mut self.0)
            .map_err(|e| io::Error::other(format!("layer fetch failed: {e}")))?
    }
}

impl Drop for Fetch {
    fn drop(&mut self) {
        self.0.abort();
    }
}
