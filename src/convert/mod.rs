//! One conversion, from a request to a byte stream: resolve the image, size the merged layer (exactly
//! when remembered, else an upper bound the content is padded to), then run the merge and the output
//! writer on a blocking thread that feeds a bounded channel the HTTP body (or the CLI's file) reads
//! from, the layers' summaries read one ahead of their merge.
//!
//! What can fail before the first byte (the image, its top layer) fails in [`Converter::prepare`];
//! after that, a failure ends the stream with an error, which the server turns into an aborted
//! connection.
//!
//! By job: `plan` (request → planned → prepared conversion), `bound` (how the layer member is
//! sized), `prepass` (layer summaries, read ahead of the merge, and the exact size), `job` (the
//! streaming merge on its thread), `body` (the channel writer), `cached` (tarballs kept in the store
//! and served from it), `fleet` (one conversion per key across the replicas on a store), `error`
//! (whose fault a failure is, and its status).

mod access;
mod body;
mod bound;
mod cached;
mod error;
mod fleet;
mod held;
mod job;
mod plan;
mod prepass;
mod space;
mod stored;
mod tee;
mod wire;

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;

use crate::format::aci::ManifestPlan;
use crate::format::image::WireCompression;
use crate::limits::Limits;
use crate::manifest::{self, Platform, ResolvedImage};
use crate::metrics::Metrics;
use crate::oci_layout::OciLayout;
use crate::reference::Reference;
use crate::registry::{self, Credentials};
use crate::sign::{Signatures, Signer};
use crate::source::{Origin, Source};
use crate::stats::{Alive, Conversions};
use crate::store::fleet::FleetLease;
use crate::summary::Store;

pub use cached::{stream_blob, window, StoredTarball};
use error::source_error;
pub use error::Error;
pub use stored::{StoredManifest, ViewRequest};

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

/// A squash resolved and named, none of its layers read: what a conditional request needs.
pub struct Planned {
    /// Strong validator: same image and options, same bytes.
    pub etag: String,
    id: String,
    repo_tag: Option<String>,
    reference: Reference,
    credentials: Credentials,
    image: ResolvedImage,
    /// How its layer member is sized: decided once, as the ETag names it.
    sizing: bound::Sizing,
    /// What the bytes are stored under.
    key: crate::store::ArtifactKey,
    /// The fleet lease its conversion is published under, once [`Converter::squash_turn`] took it.
    lease: Option<FleetLease>,
    alive: Alive,
}

impl Planned {
    /// Compressed bytes of the image's layers: what one pass over them reads upstream.
    pub fn layer_bytes(&self) -> u64 {
        self.image.layers.iter().map(|l| l.size).sum()
    }
}

/// An ACI resolved, named and its manifest planned, none of its layers read.
pub struct PlannedAci {
    /// Strong validator, and the key its signature is kept under.
    pub etag: String,
    pub name: String,
    plan: ManifestPlan,
    request: AciRequest,
    image: ResolvedImage,
    /// What the bytes are stored under.
    key: crate::store::ArtifactKey,
    /// The fleet lease its conversion is published under, once [`Converter::aci_turn`] took it.
    lease: Option<FleetLease>,
    alive: Alive,
}

impl PlannedAci {
    /// Compressed bytes of the image's layers: what one pass over them reads upstream.
    pub fn layer_bytes(&self) -> u64 {
        self.image.layers.iter().map(|l| l.size).sum()
    }
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
    /// How long a registry may take to send a response's status and headers.
    pub upstream_response_timeout: std::time::Duration,
    /// CAs trusted for registries besides the compiled-in roots and the system store.
    pub registry_ca_certificates: Vec<reqwest::Certificate>,
    /// The service's own registry credentials, for callers who send none.
    pub service_credentials: registry::ServiceCredentials,
    /// Signs ACIs when set.
    pub signer: Option<Arc<Signer>>,
    /// The content-addressed store of converted images the registry view serves; `None`: no view.
    pub store: Option<crate::store::Location>,
    /// How the registry view's layer blob is compressed.
    pub wire_compression: WireCompression,
    /// Bytes of blobs the store keeps at most (least recently used go first); `None`: unbounded.
    pub store_max_bytes: Option<u64>,
    /// How old an unreferenced blob must be before GC removes it: longer than any publication.
    pub gc_grace: std::time::Duration,
    /// How long a replica's lease on a conversion (or on GC) outlives its last renewal.
    pub lease_ttl: std::time::Duration,
    /// How long a tarball request waits for another request's conversion of the same bytes (here
    /// or on another replica) before it converts them itself.
    pub tarball_wait: std::time::Duration,
}

impl Default for ConverterConfig {
    /// Docker Hub, no cache, no signing key, default limits.
    fn default() -> Self {
        ConverterConfig {
            default_registry: "docker.io".into(),
            insecure_registries: Vec::new(),
            allowed_registries: Vec::new(),
            cache_dir: None,
            oci_layout: None,
            limits: Limits::default(),
            upstream_idle_timeout: registry::DEFAULT_IDLE_TIMEOUT,
            upstream_response_timeout: registry::DEFAULT_RESPONSE_TIMEOUT,
            registry_ca_certificates: Vec::new(),
            service_credentials: registry::ServiceCredentials::default(),
            signer: None,
            store: None,
            wire_compression: WireCompression::default(),
            store_max_bytes: None,
            gc_grace: DEFAULT_GC_GRACE,
            lease_ttl: crate::store::fleet::DEFAULT_LEASE_TTL,
            tarball_wait: DEFAULT_TARBALL_WAIT,
        }
    }
}

/// How long a tarball request waits for another conversion of its bytes unless configured: nothing
/// is sent while it waits, and proxies and load balancers commonly cut a response that sends nothing
/// for 60 s (nginx's `proxy_read_timeout`, an AWS ALB's idle timeout), so well below that.
pub const DEFAULT_TARBALL_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// GC's grace period unless configured: far longer than any conversion's publication step.
pub const DEFAULT_GC_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// Output bytes buffered per chunk sent to the body: large enough to amortise the channel, small
/// enough that the chunks in flight stay a few MiB.
const CHUNK: usize = 256 * 1024;
/// Chunks queued between the merge thread and the response: bounds memory per conversion and lets
/// a slow client push back on the merge, and the merge on the registry.
const CHANNEL_DEPTH: usize = 8;
/// Read buffer in front of each layer's decompressor.
const READ_BUF: usize = 256 * 1024;
/// How long a signature request waits for a conversion of the same bytes that is under way.
const SIGNATURE_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Shared by all requests of a server (or the one request of the CLI).
pub struct Converter {
    config: ConverterConfig,
    source: Source,
    store: Store,
    signatures: Signatures,
    conversions: Conversions,
    images: Option<crate::store::Store>,
    /// This replica's leases on `images`, shared with the other replicas on it.
    leases: Option<Arc<crate::store::fleet::Leases>>,
    flights: stored::Flights,
    /// Tarball requests waiting for another conversion of their bytes, one store watch per key.
    tarball_waits: fleet::Watches,
    publishing: Arc<tee::Publishing>,
    access: access::AccessCache,
    metrics: Arc<Metrics>,
}

impl Converter {
    pub fn new(config: ConverterConfig) -> Result<Self, Error> {
        let source = match &config.oci_layout {
            Some(dir) => Origin::Layout(Arc::new(
                OciLayout::open(dir, config.limits.max_manifest_bytes)
                    .map_err(|e| Error::Internal(format!("OCI layout {}: {e}", dir.display())))?,
            )),
            None => Origin::Registry(Arc::new(
                registry::Client::new(registry::ClientConfig {
                    insecure: config.insecure_registries.clone(),
                    idle_timeout: config.upstream_idle_timeout,
                    response_timeout: config.upstream_response_timeout,
                    max_manifest_bytes: config.limits.max_manifest_bytes,
                    ca_certificates: config.registry_ca_certificates.clone(),
                    service_credentials: config.service_credentials.clone(),
                    ..Default::default()
                })
                .map_err(|e| Error::Internal(e.to_string()))?,
            )),
        };
        let metrics = Arc::new(Metrics::new());
        let source = Source::new(source, metrics.clone());
        let store = Store::new(config.cache_dir.clone());
        let signatures = Signatures::new(config.cache_dir.clone());
        let images = match &config.store {
            Some(location) => Some(
                crate::store::Store::open(location)
                    .map_err(|e| Error::Internal(format!("store {location}: {e}")))?,
            ),
            None => None,
        };
        let leases = images
            .as_ref()
            .map(|s| Arc::new(s.leases(config.lease_ttl)));
        Ok(Converter {
            config,
            source,
            store,
            signatures,
            conversions: Conversions::new(metrics.clone()),
            metrics,
            images,
            leases,
            flights: stored::Flights::default(),
            tarball_waits: fleet::Watches::default(),
            publishing: Arc::default(),
            access: access::AccessCache::default(),
        })
    }

    /// What this converter (and the server in front of it) counts, for `GET /metrics`.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Conversions with any part still running.
    pub fn live_conversions(&self) -> usize {
        self.conversions.live()
    }

    /// Times a conversion waited for another replica's (the `lease_waits` metric: `/metrics`
    /// should export this counter).
    pub fn lease_waits(&self) -> u64 {
        self.leases.as_ref().map_or(0, |l| l.waits())
    }

    /// Parses a reference the way requests name images (default registry, `library/`, `latest`).
    pub fn parse_reference(&self, s: &str) -> Result<Reference, Error> {
        Reference::parse(s, &self.config.default_registry)
            .map_err(|e| Error::BadRequest(e.to_string()))
    }

    /// A conversion service must not be a way to reach arbitrary hosts.
    pub fn check_allowed(&self, reference: &Reference) -> Result<(), Error> {
        if self.source.is_layout() {
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
}
