//! From a reference to an image: the manifest (following an index or manifest list to the platform
//! asked for), its layers with their compression, and the image config, all verified by digest.
//! Schema 1 manifests, which carry their config inline, are read by [`schema1`].

mod platform;
pub mod schema1;

use std::fmt;

pub use platform::Platform;

use futures::StreamExt;
use oci_spec::image::{ImageIndex, ImageManifest};
use serde_json::Value;

use crate::digest::Digest;
use crate::layer::Compression;
use crate::limits::{LimitExceeded, Limits};
use crate::reference::Reference;
use crate::registry::{Credentials, RegistryError};
use crate::source::{RawManifest, Source, SourceError};

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

#[derive(Debug, Clone)]
pub struct LayerDescriptor {
    pub digest: Digest,
    pub size: u64,
    pub compression: Compression,
}

/// An image ready to convert.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub reference: Reference,
    /// The image manifest chosen for the platform.
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    /// The image config, kept whole for re-serialisation.
    pub config: Value,
    /// Bottom layer first.
    pub layers: Vec<LayerDescriptor>,
    /// The platform the image's config declares.
    pub platform: Platform,
}

fn invalid(reference: &Reference, what: impl fmt::Display) -> SourceError {
    RegistryError::Invalid(format!("{reference}: {what}"))
}

/// `--max-layers`, for every manifest format.
fn check_layer_count(
    reference: &Reference,
    count: u64,
    limits: &Limits,
) -> Result<(), SourceError> {
    if count > limits.max_layers {
        return Err(limit(
            reference,
            format!("{count} layers"),
            "the layer count",
            limits.max_layers,
            "max-layers",
        ));
    }
    Ok(())
}

fn limit(
    reference: &Reference,
    context: String,
    what: &'static str,
    limit: u64,
    flag: &'static str,
) -> SourceError {
    RegistryError::Limit {
        context: format!("{reference}: {context}"),
        limit: LimitExceeded { what, limit, flag },
    }
}

fn digest_of(reference: &Reference, s: &str) -> Result<Digest, SourceError> {
    Digest::parse(s).map_err(|e| invalid(reference, e))
}

/// Resolves `reference` for `platform`, within the config size and layer count of `limits` (the
/// source enforces the manifest size).
pub async fn resolve(
    source: &Source,
    reference: &Reference,
    platform: &Platform,
    credentials: &Credentials,
    limits: &Limits,
) -> Result<ResolvedImage, SourceError> {
    resolve_for(source, reference, Some(platform), credentials, limits).await
}

/// Resolves `reference` for `platform`, or, with `None`, takes the image manifest it names whatever
/// its platform (an index is then an error: something must choose).
pub async fn resolve_for(
    source: &Source,
    reference: &Reference,
    platform: Option<&Platform>,
    credentials: &Credentials,
    limits: &Limits,
) -> Result<ResolvedImage, SourceError> {
    let raw = source
        .manifest(reference, &reference.manifest_ref(), credentials)
        .await?;
    resolve_raw(source, reference, raw, platform, credentials, limits).await
}

/// [`resolve_for`] of a manifest already fetched (for `reference`, by tag or digest): an image
/// manifest is taken as it is, not fetched again.
pub async fn resolve_raw(
    source: &Source,
    reference: &Reference,
    mut raw: RawManifest,
    platform: Option<&Platform>,
    credentials: &Credentials,
    limits: &Limits,
) -> Result<ResolvedImage, SourceError> {
    let chosen = match platform {
        Some(platform) => choose_from_index(reference, &raw.bytes, &raw.media_type, platform)?,
        None if index_platforms(reference, &raw.bytes, &raw.media_type)?.is_some() => {
            return Err(invalid(
                reference,
                "an index where an image manifest was expected",
            ))
        }
        None => None,
    };
    let is_index = chosen.is_some();
    if let Some(digest) = chosen {
        raw = source.manifest(reference, &digest, credentials).await?;
    }
    if let Some(image) = resolve_schema1(reference, &raw, platform, limits)? {
        return Ok(image);
    }
    let manifest = parse_image_manifest(reference, &raw.bytes, limits)?;
    let mut stream = source
        .blob(
            reference,
            &manifest.config_digest,
            manifest.config_size,
            credentials,
        )
        .await?;
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        // Bytes that miss their digest are the registry's fault, as for layer blobs.
        let chunk =
            chunk.map_err(|e| RegistryError::Upstream(format!("{reference}: config blob: {e}")))?;
        bytes.extend_from_slice(&chunk);
    }
    let (config, image_platform) = parse_config(reference, &bytes, manifest.layers.len())?;
    if let Some(platform) = platform.filter(|p| !is_index && !p.matches(&image_platform)) {
        return Err(RegistryError::NotFound(format!(
            "{reference}: image is {image_platform}, not {platform}"
        )));
    }
    Ok(ResolvedImage {
        reference: reference.clone(),
        manifest_digest: raw.digest,
        config_digest: manifest.config_digest,
        config,
        layers: manifest.layers,
        platform: image_platform,
    })
}

/// A schema 1 manifest as an image, `None` for any other manifest. Its config is the one docker
/// synthesises; its digest is that config's as strata serialises it (docker's image ID also covers
/// the diff_ids, which only the layers tell). Schema 1 has no platform selection: as docker 20.10
/// does, the operating system must match the request and the architecture is not compared.
fn resolve_schema1(
    reference: &Reference,
    raw: &RawManifest,
    platform: Option<&Platform>,
    limits: &Limits,
) -> Result<Option<ResolvedImage>, SourceError> {
    let payload = match schema1::signed_payload(&raw.bytes) {
        Ok(Some(payload)) => payload,
        Ok(None) => raw.bytes.to_vec(),
        Err(e) => return Err(invalid(reference, e)),
    };
    let is_schema1 =
        serde_json::from_slice::<Value>(&payload).is_ok_and(|body| schema1::is_schema1(&body));
    if !is_schema1 {
        return Ok(None);
    }
    let image = schema1::parse(&payload).map_err(|e| invalid(reference, e))?;
    let count = image.layers.len() as u64;
    check_layer_count(reference, count, limits)?;
    let (config, image_platform) = parse_config(
        reference,
        &serde_json::to_vec(&image.config).expect("a JSON value serialises"),
        image.layers.len(),
    )?;
    if let Some(platform) = platform.filter(|p| p.os != image_platform.os) {
        return Err(RegistryError::NotFound(format!(
            "{reference}: image is for {}, not {} (a schema 1 image names one platform)",
            image_platform.os, platform.os
        )));
    }
    Ok(Some(ResolvedImage {
        reference: reference.clone(),
        manifest_digest: raw.digest.clone(),
        config_digest: Digest::of(&serde_json::to_vec(&config).expect("serialises")),
        config,
        layers: image.layers,
        platform: image_platform,
    }))
}

/// A platform's image in an index (attestations and `unknown` platforms left out).
#[derive(Debug, Clone)]
pub struct IndexChoice {
    pub digest: String,
    pub platform: Platform,
    /// The index's `platform` object as it was (`os.version`, `features` kept).
    pub raw_platform: Value,
}

/// Reads what a manifest endpoint returned (registry bytes, untrusted): for an index or manifest
/// list, its platforms' images in the index's order; `None` when the bytes are no index (and should
/// be an image manifest).
pub fn index_platforms(
    reference: &Reference,
    bytes: &[u8],
    media_type: &str,
) -> Result<Option<Vec<IndexChoice>>, SourceError> {
    let body: Value = serde_json::from_slice(bytes)
        .map_err(|e| invalid(reference, format!("manifest is not JSON: {e}")))?;
    if schema1::is_schema1(&body) {
        return Ok(None);
    }
    let is_index = INDEX_TYPES.contains(&media_type)
        || body
            .get("mediaType")
            .and_then(Value::as_str)
            .is_some_and(|m| INDEX_TYPES.contains(&m))
        || (body.get("manifests").is_some() && body.get("layers").is_none());
    if !is_index {
        return Ok(None);
    }
    let index: ImageIndex =
        serde_json::from_slice(bytes).map_err(|e| invalid(reference, format!("bad index: {e}")))?;
    let mut out = Vec::new();
    for m in index.manifests() {
        let attestation = m
            .annotations()
            .as_ref()
            .and_then(|a| a.get("vnd.docker.reference.type"))
            .is_some_and(|t| t == "attestation-manifest");
        let Some(p) = m.platform() else { continue };
        let platform = Platform {
            os: p.os().to_string(),
            architecture: p.architecture().to_string(),
            variant: p.variant().clone(),
        };
        if attestation || platform.os == "unknown" {
            continue;
        }
        out.push(IndexChoice {
            digest: m.digest().to_string(),
            platform,
            raw_platform: serde_json::to_value(p).unwrap_or(Value::Null),
        });
    }
    Ok(Some(out))
}

/// For an index or manifest list, the digest of its image manifest for `platform`; `None` when the
/// bytes are no index (and should be an image manifest).
pub fn choose_from_index(
    reference: &Reference,
    bytes: &[u8],
    media_type: &str,
    platform: &Platform,
) -> Result<Option<String>, SourceError> {
    let Some(choices) = index_platforms(reference, bytes, media_type)? else {
        return Ok(None);
    };
    match choices.iter().find(|c| platform.matches(&c.platform)) {
        Some(c) => Ok(Some(c.digest.clone())),
        None => Err(RegistryError::NotFound(format!(
            "{reference}: no image for platform {platform}; available: {}",
            if choices.is_empty() {
                "none".to_string()
            } else {
                choices
                    .iter()
                    .map(|c| c.platform.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ))),
    }
}

/// What an image manifest names: its layers, bottom first, and its config.
#[derive(Debug, Clone)]
pub struct ImageManifestParts {
    pub layers: Vec<LayerDescriptor>,
    pub config_digest: Digest,
    pub config_size: u64,
}

/// Reads an image manifest (registry bytes, untrusted), within the layer count and config size of
/// `limits`.
pub fn parse_image_manifest(
    reference: &Reference,
    bytes: &[u8],
    limits: &Limits,
) -> Result<ImageManifestParts, SourceError> {
    let manifest: ImageManifest = serde_json::from_slice(bytes)
        .map_err(|e| invalid(reference, format!("bad image manifest: {e}")))?;
    let count = manifest.layers().len() as u64;
    check_layer_count(reference, count, limits)?;
    let mut layers = Vec::new();
    for l in manifest.layers() {
        let media_type = l.media_type().to_string();
        let compression = Compression::from_media_type(&media_type).ok_or_else(|| {
            invalid(
                reference,
                format!("unsupported layer media type {media_type:?}"),
            )
        })?;
        layers.push(LayerDescriptor {
            digest: digest_of(reference, l.digest().as_ref())?,
            size: l.size(),
            compression,
        });
    }
    let config_digest = digest_of(reference, manifest.config().digest().as_ref())?;
    let config_size = manifest.config().size();
    if config_size > limits.max_config_bytes {
        return Err(limit(
            reference,
            format!("config of {config_size} bytes"),
            "the image config",
            limits.max_config_bytes,
            "max-config-bytes",
        ));
    }
    Ok(ImageManifestParts {
        layers,
        config_digest,
        config_size,
    })
}

/// Reads an image config (registry bytes, untrusted, already checked against their digest): a JSON
/// object, with one diff_id per layer when it lists them. Returns it with the platform it declares.
pub fn parse_config(
    reference: &Reference,
    bytes: &[u8],
    layers: usize,
) -> Result<(Value, Platform), SourceError> {
    let config: Value = serde_json::from_slice(bytes)
        .map_err(|e| invalid(reference, format!("config is not JSON: {e}")))?;
    if !config.is_object() {
        return Err(invalid(reference, "config is not a JSON object"));
    }
    if let Some(diff_ids) = config.pointer("/rootfs/diff_ids").and_then(Value::as_array) {
        if diff_ids.len() != layers {
            return Err(invalid(
                reference,
                format!(
                    "config lists {} diff_ids for {layers} layers",
                    diff_ids.len()
                ),
            ));
        }
    }
    let field = |name: &str| config.get(name).and_then(Value::as_str);
    let platform = Platform {
        os: field("os").unwrap_or("linux").to_string(),
        architecture: field("architecture").unwrap_or("amd64").to_string(),
        variant: field("variant").map(str::to_string),
    };
    Ok((config, platform))
}
