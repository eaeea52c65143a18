//! Docker's image manifest schema 1 (distribution `docs/spec/manifest-v2-1.md`), which old registries
//! still serve: signed (`…v1+prettyjws`, libtrust JWS signatures appended to the manifest) or unsigned
//! (`…v1+json`). It names layers only (`fsLayers`, newest first, no sizes, no media types) and carries
//! the image config as one docker v1 image JSON per layer (`history[].v1Compatibility`). The config is
//! synthesised here the way docker 20.10 does when it pulls one (moby `distribution/pull_v2.go`
//! `pullSchema1` with `fixManifestLayers`, `image/v1` `HistoryFromConfig` and
//! `MakeConfigFromV1Config`), and what docker refuses is refused with its reason.

use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::digest::{Digest, SIZE_UNKNOWN};
use crate::layer::Compression;

use super::LayerDescriptor;

/// Media types of schema 1 manifests; registries also serve them as `application/json` or untyped.
pub const SIGNED_MEDIA_TYPE: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const UNSIGNED_MEDIA_TYPE: &str = "application/vnd.docker.distribution.manifest.v1+json";

/// Where a manifest's JWS signatures are, per libtrust's `ParsePrettySignature(content, "signatures")`.
const SIGNATURES_KEY: &str = "signatures";

/// Docker versions before this one wrote v1 JSON that docker re-reads through its `V1Image` struct,
/// keeping only the struct's fields (`noFallbackMinVersion` in moby `image/v1`).
const NO_FALLBACK_MIN_VERSION: [u64; 3] = [1, 8, 3];

/// The top-level fields of moby's `image.V1Image`, what the fallback keeps.
const V1_IMAGE_FIELDS: [&str; 13] = [
    "id",
    "parent",
    "comment",
    "created",
    "container",
    "container_config",
    "docker_version",
    "author",
    "config",
    "architecture",
    "variant",
    "os",
    "Size",
];

/// What docker drops from the newest v1 JSON when it makes it the image config.
const NOT_CONFIG_FIELDS: [&str; 6] = ["id", "parent", "Size", "parent_id", "layer_id", "throwaway"];

/// Go's zero `time.Time`, what docker writes for a v1 JSON without `created`.
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// A schema 1 manifest docker would not pull, or that is not one.
#[derive(Debug, thiserror::Error)]
#[error("schema 1 manifest: {0}")]
pub struct Schema1Error(String);

fn err(what: impl Into<String>) -> Schema1Error {
    Schema1Error(what.into())
}

/// Whether `body` (a parsed manifest) is schema 1.
pub fn is_schema1(body: &Value) -> bool {
    body.get("schemaVersion").and_then(Value::as_u64) == Some(1)
}

/// The bytes a signed schema 1 manifest's digest covers, `None` for any other manifest. A signed
/// manifest is the payload with a `signatures` member spliced in before its closing brace; each
/// signature's protected header says how long the payload's prefix is (`formatLength`) and what
/// followed it (`formatTail`), and the payload is that prefix plus that tail (libtrust
/// `ParsePrettySignature`). distribution stores and addresses the manifest by the payload's digest
/// and signs it anew, with its own key, each time it serves it; docker verifies a pull by digest
/// against the payload too. The signatures themselves are not checked, as docker does not check them.
pub fn signed_payload(bytes: &[u8]) -> Result<Option<Vec<u8>>, Schema1Error> {
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(bytes) else {
        return Ok(None);
    };
    if body.get("schemaVersion").and_then(Value::as_u64) != Some(1) {
        return Ok(None);
    }
    let Some(signatures) = body.get(SIGNATURES_KEY) else {
        return Ok(None);
    };
    let signatures = signatures
        .as_array()
        .ok_or_else(|| err("`signatures` is not a list"))?;
    let mut format: Option<(u64, Vec<u8>)> = None;
    for signature in signatures {
        let protected = signature
            .get("protected")
            .and_then(Value::as_str)
            .ok_or_else(|| err("a signature has no protected header"))?;
        let header: Value = serde_json::from_slice(&base64url(protected)?)
            .map_err(|e| err(format!("protected header is not JSON: {e}")))?;
        let length = header
            .get("formatLength")
            .and_then(Value::as_u64)
            .ok_or_else(|| err("protected header has no formatLength"))?;
        let tail = base64url(
            header
                .get("formatTail")
                .and_then(Value::as_str)
                .ok_or_else(|| err("protected header has no formatTail"))?,
        )?;
        match &format {
            None => format = Some((length, tail)),
            Some(f) if *f == (length, tail) => {}
            Some(_) => return Err(err("signatures disagree on the signed payload")),
        }
    }
    let (length, tail) = format.ok_or_else(|| err("`signatures` is empty"))?;
    let prefix = usize::try_from(length)
        .ok()
        .and_then(|n| bytes.get(..n))
        .ok_or_else(|| err("formatLength is past the manifest's end"))?;
    Ok(Some([prefix, &tail[..]].concat()))
}

/// libtrust's base64url: unpadded, though padding is tolerated.
fn base64url(s: &str) -> Result<Vec<u8>, Schema1Error> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|e| err(format!("bad base64url in a signature: {e}")))
}

/// A schema 1 image as strata converts it.
#[derive(Debug, Clone)]
pub struct Schema1Image {
    /// Bottom first, throwaway entries skipped.
    pub layers: Vec<LayerDescriptor>,
    /// The synthesised image config, without diff_ids (they are the layers' uncompressed digests,
    /// which only the layers themselves tell).
    pub config: Value,
}

/// One `history` entry's v1 JSON, as far as the conversion reads it.
struct V1 {
    json: Map<String, Value>,
    id: String,
    parent: String,
    throwaway: bool,
}

fn string_field(json: &Map<String, Value>, name: &str) -> Result<String, Schema1Error> {
    match json.get(name) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(err(format!("v1Compatibility `{name}` is not a string"))),
    }
}

fn parse_v1(text: &str) -> Result<V1, Schema1Error> {
    let json = match serde_json::from_str(text) {
        Ok(Value::Object(json)) => json,
        _ => return Err(err("a v1Compatibility entry is not a JSON object")),
    };
    let id = string_field(&json, "id")?;
    // moby pkg/stringid.ValidateID.
    if id.len() != 64 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(err(format!("invalid image ID {id:?} in v1Compatibility")));
    }
    let parent = string_field(&json, "parent")?;
    let throwaway = match json.get("throwaway") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(err("v1Compatibility `throwaway` is not a boolean")),
    };
    Ok(V1 {
        json,
        id,
        parent,
        throwaway,
    })
}

/// Reads a schema 1 manifest (the signed payload, or the unsigned bytes): its layers bottom first
/// and the image config docker would make of it.
pub fn parse(payload: &[u8]) -> Result<Schema1Image, Schema1Error> {
    let body: Value = serde_json::from_slice(payload).map_err(|e| err(format!("not JSON: {e}")))?;
    if !body.is_object() {
        return Err(err("not a JSON object"));
    }
    let list = |name: &str| -> Result<Vec<Value>, Schema1Error> {
        match body.get(name) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => Ok(a.clone()),
            Some(_) => Err(err(format!("`{name}` is not a list"))),
        }
    };
    let fs_layers = list("fsLayers")?;
    let history = list("history")?;
    // moby verifySchema1Manifest.
    if fs_layers.len() != history.len() {
        return Err(err(format!(
            "{} fsLayers but {} history entries",
            fs_layers.len(),
            history.len()
        )));
    }
    if fs_layers.is_empty() {
        return Err(err("no fsLayers"));
    }
    let mut entries = Vec::new();
    for (layer, h) in fs_layers.iter().zip(&history) {
        let blob_sum = layer
            .get("blobSum")
            .and_then(Value::as_str)
            .ok_or_else(|| err("an fsLayers entry has no blobSum"))?;
        let v1 = h
            .get("v1Compatibility")
            .and_then(Value::as_str)
            .ok_or_else(|| err("a history entry has no v1Compatibility string"))?;
        entries.push((blob_sum.to_string(), parse_v1(v1)?));
    }
    fix_layers(&mut entries)?;

    // Bottom first, as docker builds rootfs and history.
    let mut layers = Vec::new();
    let mut docker_history = Vec::new();
    for (blob_sum, v1) in entries.iter().rev() {
        let digest = Digest::parse(blob_sum)
            .map_err(|e| err(format!("could not validate layer digest: {e}")))?;
        docker_history.push(history_entry(v1)?);
        if v1.throwaway {
            continue;
        }
        layers.push(LayerDescriptor {
            digest,
            size: SIZE_UNKNOWN,
            // Schema 1 names no media type; docker detects the compression, as this does.
            compression: Compression::Detect,
        });
    }
    let newest = &entries[0].1;
    let mut config = newest.json.clone();
    if docker_version_before(
        &string_field(&newest.json, "docker_version")?,
        NO_FALLBACK_MIN_VERSION,
    ) {
        config.retain(|k, _| V1_IMAGE_FIELDS.contains(&k.as_str()));
        if config.get("created").is_none_or(Value::is_null) {
            config.insert("created".into(), Value::String(ZERO_TIME.into()));
        }
    }
    for field in NOT_CONFIG_FIELDS {
        config.remove(field);
    }
    config.insert("rootfs".into(), json!({"type": "layers"}));
    config.insert("history".into(), Value::Array(docker_history));
    Ok(Schema1Image {
        layers,
        config: Value::Object(config),
    })
}

/// moby `fixManifestLayers` (newest first): an entry repeating the one below it (same image ID) is
/// dropped; any other repeated ID, a parent chain that does not link each entry to the one below,
/// or a base with a parent is refused.
fn fix_layers(entries: &mut Vec<(String, V1)>) -> Result<(), Schema1Error> {
    let base = &entries[entries.len() - 1].1;
    if !base.parent.is_empty() {
        return Err(err("invalid parent ID in the base layer of the image"));
    }
    let mut seen = std::collections::HashSet::new();
    let mut last = "";
    for (_, v1) in entries.iter() {
        if v1.id != last && seen.contains(v1.id.as_str()) {
            return Err(err(format!("ID {} appears multiple times", v1.id)));
        }
        last = &v1.id;
        seen.insert(v1.id.as_str());
    }
    for i in (0..entries.len() - 1).rev() {
        if entries[i].1.id == entries[i + 1].1.id {
            entries.remove(i);
        } else if entries[i].1.parent != entries[i + 1].1.id {
            return Err(err(format!(
                "invalid parent ID: expected {}, got {:?}",
                entries[i + 1].1.id,
                entries[i].1.parent
            )));
        }
    }
    Ok(())
}

/// moby `HistoryFromConfig`: who, when, the command (`container_config.Cmd` joined by spaces), and
/// whether the entry made no layer.
fn history_entry(v1: &V1) -> Result<Value, Schema1Error> {
    let cmd = match v1.json.get("container_config").and_then(|c| c.get("Cmd")) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| p.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| err("container_config.Cmd holds a non-string"))?,
        Some(_) => return Err(err("container_config.Cmd is not a list")),
    };
    let created = match v1.json.get("created") {
        None | Some(Value::Null) => Value::String(ZERO_TIME.into()),
        Some(Value::String(s)) => Value::String(s.clone()),
        Some(_) => return Err(err("v1Compatibility `created` is not a time")),
    };
    let mut entry = Map::new();
    entry.insert("created".into(), created);
    for (from, to) in [("author", "author"), ("comment", "comment")] {
        let value = string_field(&v1.json, from)?;
        if !value.is_empty() {
            entry.insert(to.into(), Value::String(value));
        }
    }
    let created_by = cmd.join(" ");
    if !created_by.is_empty() {
        entry.insert("created_by".into(), Value::String(created_by));
    }
    if v1.throwaway {
        entry.insert("empty_layer".into(), Value::Bool(true));
    }
    Ok(Value::Object(entry))
}

/// moby `versions.LessThan`: dot-separated numbers, a part that is no number counting as 0.
fn docker_version_before(version: &str, than: [u64; 3]) -> bool {
    let parts: Vec<u64> = version.split('.').map(|p| p.parse().unwrap_or(0)).collect();
    for i in 0..parts.len().max(than.len()) {
        let (a, b) = (
            parts.get(i).copied().unwrap_or(0),
            than.get(i).copied().unwrap_or(0),
        );
        if a != b {
            return a < b;
        }
    }
    false
}

#[cfg(test)]
mod tests;
