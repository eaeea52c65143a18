//! Command-line flags, in two stages: clap's raw arguments, then a validated [`Config`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::convert::ConverterConfig;
use crate::format::image::WireCompression;
use crate::limits::{self, Limits};
use crate::manifest::Platform;
use crate::reference::DOCKER_HUB;
use crate::registry::{ServiceCredentials, DEFAULT_IDLE_TIMEOUT, DEFAULT_RESPONSE_TIMEOUT};
use crate::server::{
    ServerSettings, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_MANIFEST_WAIT, DEFAULT_MAX_CONCURRENT,
    DEFAULT_MAX_CONNECTIONS,
};

#[derive(Parser, Debug)]
#[command(
    name = "strata",
    version,
    about = "Container images converted on the fly: registry layers squashed into one"
)]
pub struct Cli {
    /// Log lines as text (coloured only on a terminal) or as JSON objects, one a line.
    #[arg(long, global = true, value_enum, env = "STRATA_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve conversions over HTTP.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "STRATA_LISTEN", default_value = "127.0.0.1:8080")]
        listen: String,
        /// Conversions served at once; more get 503 with Retry-After.
        #[arg(long, env = "STRATA_MAX_CONCURRENT", default_value_t = DEFAULT_MAX_CONCURRENT)]
        max_concurrent: usize,
        /// Seconds in-flight conversions may run after SIGTERM/SIGINT.
        #[arg(long, env = "STRATA_SHUTDOWN_GRACE", default_value_t = 30)]
        shutdown_grace: u64,
        /// Seconds a client may take to send a request's headers (slow clients hold a connection).
        #[arg(long, env = "STRATA_HEADER_READ_TIMEOUT", default_value_t = DEFAULT_HEADER_READ_TIMEOUT.as_secs())]
        header_read_timeout: u64,
        /// Client connections held at once; more are answered 503 and closed.
        #[arg(long, env = "STRATA_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
        /// Name prefix of the ACIs served (a host name, no port), answered by appc discovery.
        #[arg(long, env = "STRATA_PUBLIC_NAME")]
        public_name: Option<String>,
        /// Base URL the discovery templates point to (default: the one discovery was asked on).
        #[arg(long, env = "STRATA_PUBLIC_URL", requires = "public_name")]
        public_url: Option<String>,
        #[command(flatten)]
        signing: SigningArgs,
        #[command(flatten)]
        view: ViewArgs,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Write the squashed docker-load tarball of one image, the same bytes the server sends.
    Squash {
        /// Image reference, docker syntax.
        reference: String,
        /// Output file, or `-` for standard output.
        #[arg(short, long)]
        output: String,
        /// Platform to pick from a multi-platform image.
        #[arg(long, default_value = "linux/amd64")]
        platform: String,
        /// Name `docker load` gives the image (default: the reference).
        #[arg(long)]
        tag: Option<String>,
        /// Read `user:password` for the registry from the STRATA_AUTH environment variable.
        #[arg(long)]
        credentials_from_env: bool,
        /// No progress bar (there is none either when standard error is not a terminal).
        #[arg(short, long, env = "STRATA_QUIET")]
        quiet: bool,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Write the appc ACI of one image, the same bytes the server sends for the same name and tag.
    Aci {
        /// Image reference, docker syntax.
        reference: String,
        /// Output file, or `-` for standard output.
        #[arg(short, long)]
        output: String,
        /// The ACI's name (default: the reference's repository path).
        #[arg(long)]
        name: Option<String>,
        /// Platform to pick from a multi-platform image (OCI spelling).
        #[arg(long, default_value = "linux/amd64")]
        platform: String,
        /// Also write the detached signature here (needs --signing-key).
        #[arg(long, requires = "signing_key")]
        signature: Option<PathBuf>,
        /// Read `user:password` for the registry from the STRATA_AUTH environment variable.
        #[arg(long)]
        credentials_from_env: bool,
        /// No progress bar (there is none either when standard error is not a terminal).
        #[arg(short, long, env = "STRATA_QUIET")]
        quiet: bool,
        #[command(flatten)]
        signing: SigningArgs,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Write a new OpenPGP signing key (RSA, v4: what rkt trusts) for ACI signatures.
    Keygen {
        /// Secret key file (armored); the public key goes to FILE.pub.
        #[arg(short, long)]
        output: PathBuf,
        /// User id of the key.
        #[arg(long, default_value = "strata ACI signing key")]
        user_id: String,
        /// Key algorithm.
        #[arg(long, value_enum, default_value_t = crate::sign::KeyKind::Rsa3072)]
        algorithm: crate::sign::KeyKind,
    },
    /// Write a small generated image as an OCI layout, to try strata without a registry.
    SampleLayout {
        /// Directory to write.
        dir: PathBuf,
    },
    /// Exit 0 if a server answers 2xx at URL: a container HEALTHCHECK that needs no curl.
    Healthcheck {
        /// Plain http:// URL to GET.
        #[arg(env = "STRATA_HEALTHCHECK_URL", default_value = crate::healthcheck::DEFAULT_URL)]
        url: String,
        /// Seconds the connection and each read or write may take.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
}

#[derive(Args, Debug)]
pub struct SigningArgs {
    /// Armored OpenPGP secret key (unprotected) that signs ACIs; see `strata keygen`.
    #[arg(long, env = "STRATA_SIGNING_KEY")]
    pub signing_key: Option<PathBuf>,
}

impl SigningArgs {
    pub fn signer(&self) -> anyhow::Result<Option<std::sync::Arc<crate::sign::Signer>>> {
        let Some(path) = &self.signing_key else {
            return Ok(None);
        };
        let armored =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let signer = crate::sign::Signer::from_armored(&armored)
            .with_context(|| format!("signing key {}", path.display()))?;
        Ok(Some(std::sync::Arc::new(signer)))
    }
}

/// The appc name prefix: an ACIdentifier host name, so no port and no path.
pub fn public_name(name: &str) -> anyhow::Result<String> {
    if !crate::format::aci::names::is_ac_identifier(name) || name.contains('/') {
        bail!("--public-name {name:?} must be a lower-case host name without port or path");
    }
    Ok(name.to_string())
}

#[derive(Args, Debug)]
pub struct SourceArgs {
    /// Registry of references that name none.
    #[arg(long, env = "STRATA_DEFAULT_REGISTRY", default_value = DOCKER_HUB)]
    pub default_registry: String,
    /// Registry reached over plain HTTP (and allowed); repeatable.
    #[arg(long, env = "STRATA_INSECURE_REGISTRY", value_delimiter = ',')]
    pub insecure_registry: Vec<String>,
    /// Another registry requests may name; repeatable.
    #[arg(long, env = "STRATA_ALLOW_REGISTRY", value_delimiter = ',')]
    pub allow_registry: Vec<String>,
    /// Where layer summaries and merged sizes are remembered.
    #[arg(long, env = "STRATA_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Remember nothing between conversions.
    #[arg(long, env = "STRATA_NO_CACHE", conflicts_with = "cache_dir")]
    pub no_cache: bool,
    /// Serve the images of this OCI image layout instead of registries.
    #[arg(long, env = "STRATA_OCI_LAYOUT")]
    pub oci_layout: Option<PathBuf>,
    /// Tar entries one image may hold, all layers together.
    #[arg(long, env = "STRATA_MAX_ENTRIES", default_value_t = limits::DEFAULT_MAX_ENTRIES)]
    pub max_entries: u64,
    /// Bytes of one path or link target.
    #[arg(long, env = "STRATA_MAX_PATH_BYTES", default_value_t = limits::DEFAULT_MAX_PATH_BYTES)]
    pub max_path_bytes: u64,
    /// Bytes of one PAX extended header or GNU long-name member.
    #[arg(long, env = "STRATA_MAX_PAX_BYTES", default_value_t = limits::DEFAULT_MAX_PAX_BYTES)]
    pub max_pax_bytes: u64,
    /// Uncompressed bytes of one image, all layers together.
    #[arg(long, env = "STRATA_MAX_IMAGE_BYTES", default_value_t = limits::DEFAULT_MAX_IMAGE_BYTES)]
    pub max_image_bytes: u64,
    /// Bytes of one manifest or index.
    #[arg(long, env = "STRATA_MAX_MANIFEST_BYTES", default_value_t = limits::DEFAULT_MAX_MANIFEST_BYTES)]
    pub max_manifest_bytes: u64,
    /// Bytes of one image config.
    #[arg(long, env = "STRATA_MAX_CONFIG_BYTES", default_value_t = limits::DEFAULT_MAX_CONFIG_BYTES)]
    pub max_config_bytes: u64,
    /// Layers of one image.
    #[arg(long, env = "STRATA_MAX_LAYERS", default_value_t = limits::DEFAULT_MAX_LAYERS)]
    pub max_layers: u64,
    /// Seconds a registry may send nothing in the middle of a blob before the transfer fails.
    #[arg(long, env = "STRATA_UPSTREAM_IDLE_TIMEOUT", default_value_t = DEFAULT_IDLE_TIMEOUT.as_secs())]
    pub upstream_idle_timeout: u64,
    /// Seconds a registry may take to answer a request with its status and headers.
    #[arg(long, env = "STRATA_UPSTREAM_RESPONSE_TIMEOUT", default_value_t = DEFAULT_RESPONSE_TIMEOUT.as_secs())]
    pub upstream_response_timeout: u64,
    /// PEM file of CA certificates trusted for registries, besides the system store; repeatable.
    #[arg(
        long,
        env = "STRATA_REGISTRY_CA",
        value_delimiter = ',',
        value_name = "FILE"
    )]
    pub registry_ca: Vec<PathBuf>,
    /// Docker config.json (`auths`) whose credentials serve callers who send none.
    #[arg(long, env = "STRATA_REGISTRY_AUTH_FILE", value_name = "FILE")]
    pub registry_auth_file: Option<PathBuf>,
}

/// The registry view (`/v2/`): where converted images are stored, and how they are served.
#[derive(Args, Debug)]
pub struct ViewArgs {
    /// Where converted images are stored: a directory, or `s3://BUCKET[/PREFIX]` (S3-compatible
    /// object storage, configured by the usual `AWS_*` environment). Default: `store/` in the
    /// cache dir; none with `--no-cache`, and then no registry view.
    #[arg(long, env = "STRATA_STORE", value_name = "DIR|s3://BUCKET/PREFIX", value_parser = crate::store::Location::parse)]
    pub store: Option<crate::store::Location>,
    /// Compression of the squashed layer blob the registry view serves: gzip, zstd or none.
    #[arg(long, env = "STRATA_LAYER_COMPRESSION", default_value = "gzip", value_parser = WireCompression::parse)]
    pub layer_compression: WireCompression,
    /// `NAME=HOST[:PORT]`: repository paths under `squash/NAME/` name that registry (a port cannot
    /// be written in a repository path); repeatable.
    #[arg(long, env = "STRATA_REGISTRY_ALIAS", value_delimiter = ',', value_name = "NAME=HOST[:PORT]", value_parser = parse_alias)]
    pub registry_alias: Vec<(String, String)>,
    /// Seconds a manifest request waits for a conversion before it is answered "retry later" (the
    /// conversion goes on).
    #[arg(long, env = "STRATA_MANIFEST_WAIT", default_value_t = DEFAULT_MANIFEST_WAIT.as_secs())]
    pub manifest_wait: u64,
    /// Bytes the store keeps at most; least recently used blobs are evicted past it (0: no bound).
    #[arg(long, env = "STRATA_CACHE_MAX_BYTES", default_value_t = 0)]
    pub cache_max_bytes: u64,
    /// Accept `DELETE /v2/squash/<name>/manifests/<digest>` (202), removing a converted image.
    #[arg(long, env = "STRATA_ENABLE_DELETE")]
    pub enable_delete: bool,
    /// Seconds an unreferenced blob is kept before GC may remove it.
    #[arg(long, env = "STRATA_GC_GRACE", default_value_t = crate::convert::DEFAULT_GC_GRACE.as_secs())]
    pub gc_grace: u64,
    /// Seconds between GC passes over the store (0: only after deletes).
    #[arg(long, env = "STRATA_GC_INTERVAL", default_value_t = 3600)]
    pub gc_interval: u64,
    /// Seconds a replica's lease on a conversion (or on GC) outlives its last renewal (renewed
    /// every third of it): how long replicas sharing the store wait before converting what a dead
    /// replica was converting. Fractions allowed.
    #[arg(long, env = "STRATA_LEASE_TTL", value_name = "SECS", default_value_t = crate::store::fleet::DEFAULT_LEASE_TTL.as_secs_f64(), value_parser = parse_lease_ttl)]
    pub lease_ttl: f64,
    /// Seconds a tarball request (squash, ACI) that finds another request converting the same
    /// bytes (here or on another replica) waits for them to be stored before converting them too:
    /// nothing is sent while it waits, so keep it below the idle timeout of proxies in front.
    #[arg(long, env = "STRATA_TARBALL_WAIT", value_name = "SECS", default_value_t = crate::convert::DEFAULT_TARBALL_WAIT.as_secs())]
    pub tarball_wait: u64,
    /// Answer the registry view's blob GETs with a 307 to a presigned URL of the object (S3 store
    /// only), so layer bytes go from the bucket to the client, not through strata.
    #[arg(long, env = "STRATA_BLOB_REDIRECT")]
    pub blob_redirect: bool,
    /// Secret that turns on `POST /hooks/registry` (convert on push): notifications carry it as
    /// `Authorization: Bearer TOKEN`. The environment keeps it out of `ps`.
    #[arg(long, env = "STRATA_HOOK_TOKEN", hide_env_values = true)]
    pub hook_token: Option<String>,
}

fn parse_lease_ttl(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        // Below that, one slow store round trip would miss a renewal.
        Ok(v) if (0.3..=86400.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?}: seconds between 0.3 and 86400")),
    }
}

fn parse_alias(s: &str) -> Result<(String, String), String> {
    let (name, host) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=HOST[:PORT]"))?;
    let name_ok = !name.is_empty()
        && !name.contains('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(&b));
    if !name_ok {
        return Err(format!(
            "alias {name:?}: lowercase letters, digits, - and _, no dot (a dot makes a host name)"
        ));
    }
    if !host_ok(host) {
        return Err(format!("alias {name:?}: invalid registry {host:?}"));
    }
    Ok((name.to_string(), host.to_string()))
}

fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("strata"))
}

fn host_ok(h: &str) -> bool {
    !h.is_empty()
        && !h.contains('/')
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
}

impl SourceArgs {
    /// The validated settings. `docker_config`: without `--registry-auth-file`, take the service
    /// credentials from `$DOCKER_CONFIG/config.json` (or `~/.docker/config.json`), as the one-shot
    /// commands do; the server reads no file it was not given.
    pub fn converter_config(&self, docker_config: bool) -> anyhow::Result<ConverterConfig> {
        for h in std::iter::once(&self.default_registry)
            .chain(&self.insecure_registry)
            .chain(&self.allow_registry)
        {
            if !host_ok(h) {
                bail!("invalid registry {h:?}: expected HOST[:PORT]");
            }
        }
        if self.upstream_idle_timeout == 0 {
            bail!("--upstream-idle-timeout must be at least 1 second");
        }
        if self.upstream_response_timeout == 0 {
            bail!("--upstream-response-timeout must be at least 1 second");
        }
        if let Some(dir) = &self.oci_layout {
            if !dir.join("index.json").is_file() {
                bail!(
                    "{} is not an OCI image layout (no index.json)",
                    dir.display()
                );
            }
        }
        let mut registry_ca_certificates = Vec::new();
        for path in &self.registry_ca {
            let pem = std::fs::read(path)
                .with_context(|| format!("reading --registry-ca {}", path.display()))?;
            let certs = crate::registry::transport::parse_ca_bundle(&pem)
                .map_err(|e| anyhow::anyhow!("--registry-ca {}: {e}", path.display()))?;
            registry_ca_certificates.extend(certs);
        }
        let service_credentials = match &self.registry_auth_file {
            Some(path) => ServiceCredentials::from_file(path)?,
            None if docker_config => ServiceCredentials::from_docker_config()?,
            None => ServiceCredentials::default(),
        };
        Ok(ConverterConfig {
            default_registry: self.default_registry.clone(),
            insecure_registries: self.insecure_registry.clone(),
            allowed_registries: self.allow_registry.clone(),
            cache_dir: if self.no_cache {
                None
            } else {
                self.cache_dir.clone().or_else(default_cache_dir)
            },
            oci_layout: self.oci_layout.clone(),
            limits: Limits {
                max_entries: self.max_entries,
                max_path_bytes: self.max_path_bytes,
                max_pax_bytes: self.max_pax_bytes,
                max_image_bytes: self.max_image_bytes,
                max_manifest_bytes: self.max_manifest_bytes,
                max_config_bytes: self.max_config_bytes,
                max_layers: self.max_layers,
            },
            upstream_idle_timeout: Duration::from_secs(self.upstream_idle_timeout),
            upstream_response_timeout: Duration::from_secs(self.upstream_response_timeout),
            registry_ca_certificates,
            service_credentials,
            signer: None,
            store: None,
            wire_compression: WireCompression::default(),
            store_max_bytes: None,
            gc_grace: crate::convert::DEFAULT_GC_GRACE,
            lease_ttl: crate::store::fleet::DEFAULT_LEASE_TTL,
            tarball_wait: crate::convert::DEFAULT_TARBALL_WAIT,
        })
    }
}

/// The serve flags that shape the HTTP front.
pub struct FrontArgs {
    pub max_concurrent: usize,
    pub shutdown_grace: u64,
    pub header_read_timeout: u64,
    pub max_connections: usize,
}

pub fn server_settings(args: FrontArgs) -> anyhow::Result<ServerSettings> {
    if args.max_concurrent == 0 {
        bail!("--max-concurrent must be at least 1");
    }
    if args.header_read_timeout == 0 {
        bail!("--header-read-timeout must be at least 1 second");
    }
    if args.max_connections < args.max_concurrent {
        bail!("--max-connections must be at least --max-concurrent");
    }
    Ok(ServerSettings {
        max_concurrent: args.max_concurrent,
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
        header_read_timeout: Duration::from_secs(args.header_read_timeout),
        max_connections: args.max_connections,
        ..Default::default()
    })
}

pub fn platform(s: &str) -> anyhow::Result<Platform> {
    Platform::parse(s).map_err(anyhow::Error::msg)
}

/// `user:password` from STRATA_AUTH as a Basic authorization header value.
pub fn credentials_from_env() -> anyhow::Result<String> {
    use base64::Engine;
    let raw = std::env::var("STRATA_AUTH")
        .context("--credentials-from-env needs STRATA_AUTH=user:password")?;
    if !raw.contains(':') {
        bail!("STRATA_AUTH must be user:password");
    }
    Ok(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    ))
}
