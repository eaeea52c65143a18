//! One conversion, from a request to a byte stream: resolve the image, size the merged layer (remembered
//! summaries or a counting pre-pass), then run the merge and the output writer on a blocking thread that
//! feeds a bounded channel the HTTP body (or the CLI's file) reads from.
//!
//! Everything that can fail before the first byte happens in [`Converter::prepare`]; after that, a failure
//! ends the stream with an error, which the server turns into an aborted connection.

use std::io::{self, BufReader, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt, TryStreamExt};
use sha2::{Digest as _, Sha256};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::digest::Digest;
use crate::entry::{self, Item};
use crate::format::aci::{self, AciArchive, Identity, ManifestPlan, RootfsSink};
use crate::format::docker_archive::{DockerArchive, LayerWriter, SizeExceeded};
use crate::layer;
use crate::limits::{Budget, Guard, Limits};
use crate::manifest::{self, LayerDescriptor, Platform, ResolvedImage};
use crate::merge::{merge_tar, LayerHints, MergeError, Merger, Sink, TarSink};
use crate::oci_layout::OciLayout;
use crate::reference::Reference;
use crate::registry::{self, Credentials};
use crate::sign::{InFlight, Signatures, Signer};
use crate::source::{cancellable, read_ahead, BlobStream, Source, SourceError, TransferError};
use crate::stats::{Alive, Conversions};
use crate::summary::{self, Store};

/// What a caller asks for.
#[derive(Debug, Clone)]
pub struct SquashRequest {
    pub reference: Reference,
    pub platform: Platform,
    /// The name `docker load` gives the image; `None` means the requested reference.
    pub tag: Option<String>,
    /// The caller's own credentials, passed through to the upstream registry.
    pub credentials: Credentials,
}

/// An ACI of an image, named and labelled as appc discovery asked for it.
#[derive(Debug, Clone)]
pub struct AciRequest {
    pub reference: Reference,
    pub platform: Platform,
    pub credentials: Credentials,
    /// The ACIdentifier the image is fetched by (`<public name>/<repository>`).
    pub name: String,
    /// The `version` label; `None` takes the reference's tag (or, by digest, the manifest digest).
    pub version: Option<String>,
}

/// The output bytes, as the HTTP body or the CLI's file reads them.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// A conversion whose size is fixed and whose bytes have not started.
pub struct Prepared {
    /// Exact length of the stream.
    pub content_length: u64,
    /// Strong validator: same image and options, same bytes.
    pub etag: String,
    /// Body; dropping it stops the conversion and its upstream fetches.
    pub body: ByteStream,
}

/// An ACI whose bytes have not started; its length is not known ahead.
pub struct PreparedAci {
    /// Strong validator, and the key its signature is kept under.
    pub etag: String,
    pub name: String,
    /// Body; when it has run to its end the signature (if a key is configured) is kept.
    pub body: ByteStream,
}

/// The detached signature of an ACI.
#[derive(Debug)]
pub enum AciSignature {
    /// ASCII-armored, ready.
    Ready(String),
    /// Not computed yet: no conversion of these bytes has finished. `key` names the signature.
    Pending { key: String },
}

/// Errors before the first byte, each with the HTTP status a caller should see.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error("registry {0} is not allowed by this service")]
    RegistryNotAllowed(String),
    #[error("authentication required: {0}")]
    Unauthorized(String),
    #[error("access denied: {0}")]
    Denied(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("upstream failure: {0}")]
    Upstream(String),
    #[error("invalid image: {0}")]
    InvalidImage(String),
    #[error("too many conversions in progress")]
    Overloaded,
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            Error::BadRequest(_) => 400,
            Error::Unauthorized(_) => 401,
            Error::RegistryNotAllowed(_) | Error::Denied(_) => 403,
            Error::NotFound(_) => 404,
            Error::Upstream(_) | Error::InvalidImage(_) => 502,
            Error::Overloaded => 503,
            Error::Internal(_) => 500,
        }
    }

    /// Stable machine-readable code for the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "BAD_REQUEST",
            Error::RegistryNotAllowed(_) => "REGISTRY_NOT_ALLOWED",
            Error::Unauthorized(_) => "UNAUTHORIZED",
            Error::Denied(_) => "DENIED",
            Error::NotFound(_) => "NOT_FOUND",
            Error::Upstream(_) => "UPSTREAM",
            Error::InvalidImage(_) => "INVALID_IMAGE",
            Error::Overloaded => "OVERLOADED",
            Error::Internal(_) => "INTERNAL",
        }
    }
}

/// Settings a [`Converter`] needs, validated by the CLI.
#[derive(Debug, Clone)]
pub struct ConverterConfig {
    /// Registry for references that name none (`docker.io`).
    pub default_registry: String,
    /// Registries reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Registries besides the default (and the insecure ones) that may be fetched from.
    pub allowed_registries: Vec<String>,
    /// Where sizes and layer summaries are remembered across conversions; `None` keeps nothing.
    pub cache_dir: Option<PathBuf>,
    /// Serve images from this OCI image layout instead of registries.
    pub oci_layout: Option<PathBuf>,
    /// What one image may make strata read.
    pub limits: Limits,
    /// How long a registry may send nothing in the middle of a blob.
    pub upstream_idle_timeout: std::time::Duration,
    /// Signs ACIs when set.
    pub signer: Option<Arc<Signer>>,
}

/// Output bytes buffered per chunk sent to the body: large enough to amortise the channel, small
/// enough that the chunks in flight stay a few MiB.
const CHUNK: usize = 256 * 1024;
/// Chunks queued between the merge thread and the response: bounds memory per conversion and lets
/// a slow client push back on the merge, and the merge on the registry.
const CHANNEL_DEPTH: usize = 8;
/// Read buffer in front of each layer's decompressor.
const READ_BUF: usize = 256 * 1024;
/// Bump when the output bytes change for the same input, so ETags and layer ids change with them.
const OUTPUT_VERSION: &str = "strata-squash-v2";
/// The same for ACIs (and the signatures kept for them).
const ACI_VERSION: &str = "strata-aci-v2";
/// How long a signature request waits for a conversion of the same bytes that is under way.
const SIGNATURE_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Shared by all requests of a server (or the one request of the CLI).
pub struct Converter {
    config: ConverterConfig,
    source: Source,
    store: Store,
    signatures: Signatures,
    conversions: Conversions,
}

impl Converter {
    pub fn new(config: ConverterConfig) -> Result<Self, Error> {
        let source = match &config.oci_layout {
            Some(dir) => Source::Layout(Arc::new(
                OciLayout::open(dir, config.limits.max_manifest_bytes)
                    .map_err(|e| Error::Internal(format!("OCI layout {}: {e}", dir.display())))?,
            )),
            None => Source::Registry(Arc::new(registry::Client::new(registry::ClientConfig {
                insecure: config.insecure_registries.clone(),
                idle_timeout: config.upstream_idle_timeout,
                max_manifest_bytes: config.limits.max_manifest_bytes,
                ..Default::default()
            }))),
        };
        let store = Store::new(config.cache_dir.clone());
        let signatures = Signatures::new(config.cache_dir.clone());
        Ok(Converter {
            config,
            source,
            store,
            signatures,
            conversions: Conversions::default(),
        })
    }

    /// Conversions with any part still running.
    pub fn live_conversions(&self) -> usize {
        self.conversions.live()
    }

    /// Parses a reference the way requests name images (default registry, `library/`, `latest`).
    pub fn parse_reference(&self, s: &str) -> Result<Reference, Error> {
        Reference::parse(s, &self.config.default_registry)
            .map_err(|e| Error::BadRequest(e.to_string()))
    }

    /// A conversion service must not be a way to reach arbitrary hosts.
    fn check_allowed(&self, reference: &Reference) -> Result<(), Error> {
        if matches!(self.source, Source::Layout(_)) {
            return Ok(());
        }
        let default = Reference::parse("x", &self.config.default_registry)
            .map(|r| r.registry)
            .ok();
        let allowed = default.as_deref() == Some(reference.registry.as_str())
            || self
                .config
                .insecure_registries
                .iter()
                .chain(&self.config.allowed_registries)
                .any(|r| *r == reference.registry);
        if allowed {
            Ok(())
        } else {
            Err(Error::RegistryNotAllowed(reference.registry.clone()))
        }
    }

    /// Resolves and sizes the image; the returned body streams the bytes.
    pub async fn prepare(&self, request: SquashRequest) -> Result<Prepared, Error> {
        let SquashRequest {
            reference,
            platform,
            tag,
            credentials,
        } = request;
        let alive = self.conversions.start();
        let image = self.resolve(&reference, &platform, &credentials).await?;
        let (layer_size, hints) = self.analyse(&image, &credentials, true, &alive).await?;
        let layer_size = layer_size.expect("sized when asked");

        let id = hex::encode(Sha256::digest(format!(
            "{OUTPUT_VERSION}\n{}",
            image.manifest_digest
        )));
        let repo_tag = match tag {
            Some(t) => {
                let parsed = self.parse_reference(&t)?;
                if parsed.digest.is_some()
                    || !t.contains(':')
                    || t.rsplit(':').next().is_some_and(|s| s.contains('/'))
                {
                    return Err(Error::BadRequest(format!("tag {t:?} must be name:tag")));
                }
                Some(t)
            }
            None => reference.tag.as_ref().map(|_| reference.familiar()),
        };
        let etag = hex::encode(Sha256::digest(format!(
            "{id}\n{}",
            repo_tag.as_deref().unwrap_or("")
        )));
        let source = format!("{}@{}", reference.name(), image.manifest_digest);
        let archive = DockerArchive::new(id, layer_size, image.config.clone(), repo_tag, source);
        let content_length = archive.total_len();
        tracing::info!(
            image = %reference,
            manifest = %image.manifest_digest,
            layers = image.layers.len(),
            layer_size,
            content_length,
            "prepared"
        );

        let job = Job {
            source: self.source.clone(),
            store: self.store.clone(),
            reference,
            credentials,
            image,
            hints,
            output: Output::Docker(archive),
            limits: self.config.limits,
            _alive: alive,
        };
        Ok(Prepared {
            content_length,
            etag,
            body: job.start(),
        })
    }

    async fn resolve(
        &self,
        reference: &Reference,
        platform: &Platform,
        credentials: &Credentials,
    ) -> Result<ResolvedImage, Error> {
        self.check_allowed(reference)?;
        manifest::resolve(
            &self.source,
            reference,
            platform,
            credentials,
            &self.config.limits,
        )
        .await
        .map_err(source_error)
    }

    /// The merge hints of every layer and, when `sizing`, the exact merged-layer size.
    async fn analyse(
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

    /// The ACI's identity: its name, labels and the key its bytes (and signature) are known by.
    fn aci_identity(
        &self,
        request: &AciRequest,
        image: &ResolvedImage,
    ) -> Result<(Identity, String), Error> {
        let name = if aci::names::is_ac_identifier(&request.name) {
            request.name.clone()
        } else {
            aci::names::sanitize_ac_identifier(&request.name).ok_or_else(|| {
                Error::BadRequest(format!("{:?} cannot be an appc name", request.name))
            })?
        };
        let version = request
            .version
            .clone()
            .or_else(|| request.reference.tag.clone())
            // A reference by digest alone names no tag; the digest is what it is known by.
            .unwrap_or_else(|| image.manifest_digest.to_string());
        let arch = aci::names::appc_arch(
            &image.platform.architecture,
            image.platform.variant.as_deref(),
        )
        .ok_or_else(|| {
            Error::NotFound(format!(
                "{}: appc has no name for the architecture {}",
                request.reference, image.platform
            ))
        })?;
        if image.platform.os != "linux" {
            return Err(Error::NotFound(format!(
                "{}: only linux images become ACIs, not {}",
                request.reference, image.platform.os
            )));
        }
        let identity = Identity {
            name,
            version,
            os: image.platform.os.clone(),
            arch: arch.to_string(),
            registry: request.reference.registry.clone(),
            repository: request.reference.repository.clone(),
            manifest_digest: image.manifest_digest.to_string(),
            config_digest: image.config_digest.to_string(),
        };
        let etag = hex::encode(Sha256::digest(format!(
            "{ACI_VERSION}\n{}\n{}\n{}\n{}\n{}",
            identity.manifest_digest, identity.name, identity.version, identity.os, identity.arch
        )));
        Ok((identity, etag))
    }

    /// Resolves the image and plans its manifest; the returned body streams the ACI and, at its end,
    /// keeps its signature.
    pub async fn prepare_aci(&self, request: AciRequest) -> Result<PreparedAci, Error> {
        let alive = self.conversions.start();
        let image = self
            .resolve(&request.reference, &request.platform, &request.credentials)
            .await?;
        let (identity, etag) = self.aci_identity(&request, &image)?;
        let plan = ManifestPlan::new(&image.config, identity.clone())
            .map_err(|e| Error::InvalidImage(format!("{}: as an ACI: {e}", request.reference)))?;
        let (_, hints) = self
            .analyse(&image, &request.credentials, false, &alive)
            .await?;
        tracing::info!(
            image = %request.reference,
            manifest = %image.manifest_digest,
            name = %identity.name,
            layers = image.layers.len(),
            "prepared ACI"
        );
        let signing = self.config.signer.as_ref().map(|signer| Signing {
            signer: signer.clone(),
            signatures: self.signatures.clone(),
            in_flight: self.signatures.start(&signer.key_id(&etag)),
        });
        let job = Job {
            source: self.source.clone(),
            store: self.store.clone(),
            reference: request.reference,
            credentials: request.credentials,
            image,
            hints,
            output: Output::Aci {
                archive: Box::new(AciArchive::new(plan)),
                signing,
            },
            limits: self.config.limits,
            _alive: alive,
        };
        Ok(PreparedAci {
            etag,
            name: identity.name,
            body: job.start(),
        })
    }

    /// The ACI's detached signature: kept from an earlier conversion, or awaited from one under way.
    /// `Ok(None)` when this service signs nothing.
    pub async fn aci_signature(&self, request: &AciRequest) -> Result<Option<AciSignature>, Error> {
        let Some(signer) = &self.config.signer else {
            return Ok(None);
        };
        let image = self
            .resolve(&request.reference, &request.platform, &request.credentials)
            .await?;
        let (_, etag) = self.aci_identity(request, &image)?;
        let key = signer.key_id(&etag);
        let deadline = tokio::time::Instant::now() + SIGNATURE_WAIT;
        loop {
            if let Some(sig) = self.signatures.load(&key) {
                return Ok(Some(AciSignature::Ready(sig)));
            }
            if !self.signatures.in_flight(&key) || tokio::time::Instant::now() >= deadline {
                return Ok(Some(AciSignature::Pending { key }));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Marks the signature under `key` as coming: requests for it wait while the guard lives.
    pub fn signature_in_flight(&self, key: &str) -> InFlight {
        self.signatures.start(key)
    }

    /// The public half of the signing key, armored.
    pub fn public_key(&self) -> Option<&str> {
        self.config.signer.as_deref().map(Signer::public_key)
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

fn source_error(e: SourceError) -> Error {
    let message = e.to_string();
    if matches!(e, SourceError::Limit { .. } | SourceError::Invalid(_)) {
        return Error::InvalidImage(message);
    }
    match e.status() {
        400 => Error::BadRequest(message),
        401 => Error::Unauthorized(message),
        403 => Error::Denied(message),
        404 => Error::NotFound(message),
        _ => Error::Upstream(message),
    }
}

/// A layer that cannot be read: a failed transfer is the upstream's fault; anything else (broken
/// compression or tar, a hostile entry, a limit) is the image's.
fn layer_error(digest: &Digest, e: MergeError) -> Error {
    match e {
        MergeError::Io(io) if !image_fault(&io) => Error::Upstream(format!("layer {digest}: {io}")),
        other => Error::InvalidImage(format!("layer {digest}: {other}")),
    }
}

/// Whether a read error is the layer's own fault (its compressed stream or the tar inside is broken
/// or ends early) rather than its transfer's.
fn image_fault(e: &io::Error) -> bool {
    !caused_by::<TransferError>(e)
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

/// Whether an error of type `E` is somewhere in the chain of `e` (readers on the way wrap errors).
fn caused_by<E: std::error::Error + 'static>(e: &io::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|r| r as _);
    while let Some(err) = cur {
        if err.is::<E>() {
            return true;
        }
        cur = match err.downcast_ref::<io::Error>() {
            Some(io) => io.get_ref().map(|r| r as _),
            None => err.source(),
        };
    }
    false
}

/// The streaming half of a conversion, run on a blocking thread.
struct Job {
    source: Source,
    store: Store,
    reference: Reference,
    credentials: Credentials,
    image: ResolvedImage,
    hints: Vec<LayerHints>,
    output: Output,
    limits: Limits,
    /// Dropped with the job, when its thread ends.
    _alive: Alive,
}

enum Output {
    Docker(DockerArchive),
    Aci {
        archive: Box<AciArchive>,
        signing: Option<Signing>,
    },
}

/// Signing an ACI while it streams, and keeping the signature.
struct Signing {
    signer: Arc<Signer>,
    signatures: Signatures,
    in_flight: InFlight,
}

impl Job {
    fn start(self) -> ByteStream {
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let handle = Handle::current();
        let format = match self.output {
            Output::Docker(_) => "squash",
            Output::Aci { .. } => "aci",
        };
        let span = tracing::info_span!("convert", format, image = %self.reference, manifest = %self.image.manifest_digest);
        tokio::task::spawn_blocking(move || {
            let _enter = span.enter();
            let mut out = ChannelWriter::new(tx.clone());
            let result = self.run(&mut out, &handle).and_then(|()| out.flush());
            if let Err(e) = result {
                if caused_by::<SizeExceeded>(&e) {
                    let blobs: Vec<String> = self
                        .image
                        .layers
                        .iter()
                        .map(|l| l.digest.hex().to_string())
                        .collect();
                    let blobs: Vec<&str> = blobs.iter().map(String::as_str).collect();
                    self.store.forget(self.image.manifest_digest.hex(), &blobs);
                }
                if e.kind() == io::ErrorKind::BrokenPipe {
                    tracing::info!("client went away; conversion stopped");
                } else {
                    tracing::error!(error = %e, "conversion failed after the response started");
                    let _ = tx.blocking_send(Err(e));
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }

    /// Starts fetching a layer on the runtime: the request, then [`read_ahead`].
    fn fetch(&self, layer: &LayerDescriptor, handle: &Handle) -> Fetch {
        let (source, reference, credentials) = (
            self.source.clone(),
            self.reference.clone(),
            self.credentials.clone(),
        );
        let (digest, size) = (layer.digest.clone(), layer.size);
        Fetch(handle.spawn(async move {
            let stream = source
                .blob(&reference, &digest, size, &credentials)
                .await
                .map_err(|e| io::Error::other(format!("layer {digest}: {e}")))?;
            Ok(read_ahead(stream))
        }))
    }

    fn run(&self, out: &mut ChannelWriter, handle: &Handle) -> io::Result<()> {
        match &self.output {
            Output::Docker(archive) => self.run_docker(archive, out, handle),
            Output::Aci { archive, signing } => {
                self.run_aci(archive, signing.as_ref(), out, handle)
            }
        }
    }

    fn run_docker(
        &self,
        archive: &DockerArchive,
        out: &mut ChannelWriter,
        handle: &Handle,
    ) -> io::Result<()> {
        archive.write_head(out)?;
        // The first byte leaves now, not when a chunk fills: the client learns the transfer has begun.
        out.flush()?;
        out.tap_next(archive.layer_size(), sha256_tap);
        let mut layer_out = LayerWriter::new(&mut *out, archive.layer_size());
        let mut sink = TarSink(&mut layer_out);
        self.merge_layers(&mut sink, handle)?;
        entry::write_end(&mut sink.0)?;
        layer_out.finish()?;
        let diff_id = String::from_utf8(out.finish_tap()?).expect("hex digest");
        archive.write_tail(out, &diff_id)
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
        let layers: Vec<_> = self.image.layers.iter().zip(&self.hints).rev().collect();
        // One layer is fetched ahead: its request and first chunks overlap the merge of the one above.
        let mut next = layers.first().map(|(layer, _)| self.fetch(layer, handle));
        for (depth, (layer, hints)) in layers.iter().enumerate() {
            let _span =
                tracing::debug_span!("layer", digest = %layer.digest, size = layer.size).entered();
            merger.begin_layer(depth as u32, (*hints).clone());
            // What is ready goes out while this layer's fetch may still wait on the network.
            sink.flush()?;
            let this = next.take().expect("fetched ahead");
            next = layers.get(depth + 1).map(|(l, _)| self.fetch(l, handle));
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

/// `sha256:…` of every chunk received.
fn sha256_tap(chunks: std::sync::mpsc::Receiver<Bytes>) -> io::Result<Vec<u8>> {
    let mut hasher = Sha256::new();
    for chunk in chunks {
        hasher.update(&chunk);
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())).into_bytes())
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

fn layer_error_io(digest: &Digest, e: MergeError) -> io::Error {
    match e {
        // Kept as it is: the job recognises it to forget the wrong size.
        MergeError::Io(io) if caused_by::<SizeExceeded>(&io) => io,
        MergeError::Io(io) => io::Error::new(io.kind(), format!("layer {digest}: {io}")),
        other => io::Error::new(
            io::ErrorKind::InvalidData,
            format!("layer {digest}: {other}"),
        ),
    }
}

/// `Write` into the body channel, in [`CHUNK`]-sized pieces. A closed channel (the client went away)
/// is a `BrokenPipe`, which stops the merge and with it the upstream fetches.
///
/// It can also hand one range of what it sends to a "tap" on a thread of its own (a digest, a
/// signature): the chunks are shared, not copied, and the hashing leaves the merge thread.
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: BytesMut,
    /// Bytes sent so far.
    sent: u64,
    tap: Option<Tap>,
}

/// Chunks queued for a tap thread; it keeps pace with the body, so a few suffice.
const TAP_DEPTH: usize = 4;

struct Tap {
    /// Stream offsets of the range.
    start: u64,
    end: u64,
    /// Offset up to which the tap has been fed.
    fed: u64,
    tx: std::sync::mpsc::SyncSender<Bytes>,
    thread: std::thread::JoinHandle<io::Result<Vec<u8>>>,
}

impl Tap {
    /// Feeds the part of `chunk` (at stream offset `offset`) that lies in the range and beyond `fed`.
    fn feed(&mut self, chunk: &Bytes, offset: u64) -> io::Result<()> {
        let end = offset + chunk.len() as u64;
        let from = self.start.max(self.fed).clamp(offset, end) - offset;
        let to = self.end.clamp(offset, end) - offset;
        if from < to {
            self.tx
                .send(chunk.slice(from as usize..to as usize))
                .map_err(|_| io::Error::other("tap thread ended early"))?;
            self.fed = offset + to;
        }
        Ok(())
    }
}

impl ChannelWriter {
    fn new(tx: mpsc::Sender<io::Result<Bytes>>) -> Self {
        ChannelWriter {
            tx,
            buf: BytesMut::with_capacity(CHUNK),
            sent: 0,
            tap: None,
        }
    }

    /// Stream offset of the next byte written.
    fn position(&self) -> u64 {
        self.sent + self.buf.len() as u64
    }

    /// Hands the next `len` bytes written (`u64::MAX`: all the rest) to `consume` on its own thread.
    fn tap_next<F>(&mut self, len: u64, consume: F)
    where
        F: FnOnce(std::sync::mpsc::Receiver<Bytes>) -> io::Result<Vec<u8>> + Send + 'static,
    {
        let start = self.position();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(TAP_DEPTH);
        let thread = std::thread::Builder::new()
            .name("strata-tap".into())
            .spawn(move || consume(rx))
            .expect("a thread can be started");
        self.tap = Some(Tap {
            start,
            end: start.saturating_add(len),
            fed: start,
            tx,
            thread,
        });
    }

    /// The tap's result, once its range is written (or, for an open range, at this point). Bytes
    /// written but not yet sent are fed to it without being sent: a caller can act on the result
    /// before the client receives them.
    fn finish_tap(&mut self) -> io::Result<Vec<u8>> {
        let mut tap = self.tap.take().expect("a range is being tapped");
        if tap.end != u64::MAX && self.position() < tap.end {
            return Err(io::Error::other("tapped range not fully written"));
        }
        if !self.buf.is_empty() {
            let pending = Bytes::copy_from_slice(&self.buf);
            tap.feed(&pending, self.sent)?;
        }
        let Tap { tx, thread, .. } = tap;
        drop(tx);
        thread
            .join()
            .map_err(|_| io::Error::other("tap thread panicked"))?
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.buf.reserve(CHUNK);
        let offset = self.sent;
        self.sent += chunk.len() as u64;
        if let Some(tap) = &mut self.tap {
            tap.feed(&chunk, offset)?;
        }
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "client went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}
