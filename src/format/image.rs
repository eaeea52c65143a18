//! The squashed image as a registry serves it (docs/FORMATS.md §7): the source's config with one
//! diff_id and a one-entry history (the same config the docker-load archive carries), and an image
//! manifest naming it and the one layer blob, in the OCI or the Docker schema 2 media types.

use serde_json::{json, Value};

use crate::digest::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The config of the squashed image: the source's, kept verbatim but for `rootfs` (the one layer's
/// diff_id) and `history` (one entry, so `docker history` does not list layers that are gone).
pub fn squashed_config(config: &Value, diff_id: &str, source: &str) -> Vec<u8> {
    let mut config = config.clone();
    if !config.is_object() {
        config = json!({});
    }
    let created = config.get("created").cloned();
    let mut history = json!({
        "created_by": "strata squash",
        "comment": format!("all layers of {source} merged into one"),
    });
    if let Some(created) = created {
        history["created"] = created;
    }
    config["rootfs"] = json!({"type": "layers", "diff_ids": [diff_id]});
    config["history"] = json!([history]);
    serde_json::to_vec(&config).expect("a JSON value serialises")
}

/// How the one layer blob is compressed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WireCompression {
    #[default]
    Gzip,
    Zstd,
    None,
}

impl WireCompression {
    pub fn parse(s: &str) -> Result<WireCompression, String> {
        match s {
            "gzip" => Ok(WireCompression::Gzip),
            "zstd" => Ok(WireCompression::Zstd),
            "none" => Ok(WireCompression::None),
            other => Err(format!("unknown compression {other:?}: gzip, zstd or none")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WireCompression::Gzip => "gzip",
            WireCompression::Zstd => "zstd",
            WireCompression::None => "none",
        }
    }

    /// The layer's media type in a manifest of `flavour`; `None`: that flavour cannot name it
    /// (Docker schema 2 has no zstd layer type).
    fn layer_type(self, flavour: Flavour) -> Option<&'static str> {
        Some(match (flavour, self) {
            (Flavour::Oci, WireCompression::Gzip) => "application/vnd.oci.image.layer.v1.tar+gzip",
            (Flavour::Oci, WireCompression::Zstd) => "application/vnd.oci.image.layer.v1.tar+zstd",
            (Flavour::Oci, WireCompression::None) => "application/vnd.oci.image.layer.v1.tar",
            (Flavour::Docker, WireCompression::Gzip) => {
                "application/vnd.docker.image.rootfs.diff.tar.gzip"
            }
            (Flavour::Docker, WireCompression::None) => {
                "application/vnd.docker.image.rootfs.diff.tar"
            }
            (Flavour::Docker, WireCompression::Zstd) => return None,
        })
    }
}

/// Which family of media types a manifest is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    Oci,
    Docker,
}

impl Flavour {
    pub fn manifest_type(self) -> &'static str {
        match self {
            Flavour::Oci => OCI_MANIFEST,
            Flavour::Docker => DOCKER_MANIFEST,
        }
    }

    pub fn index_type(self) -> &'static str {
        match self {
            Flavour::Oci => OCI_INDEX,
            Flavour::Docker => DOCKER_LIST,
        }
    }

    fn config_type(self) -> &'static str {
        match self {
            Flavour::Oci => OCI_CONFIG,
            Flavour::Docker => DOCKER_CONFIG,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Flavour::Oci => "oci",
            Flavour::Docker => "docker",
        }
    }
}

/// A stored blob as a manifest names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    pub digest: Digest,
    pub size: u64,
}

/// The image manifest of the squashed image; `None` when `flavour` cannot express the layer's
/// compression.
pub fn image_manifest(
    flavour: Flavour,
    config: &Blob,
    layer: &Blob,
    compression: WireCompression,
) -> Option<Vec<u8>> {
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": flavour.manifest_type(),
        "config": {
            "mediaType": flavour.config_type(),
            "digest": config.digest.to_string(),
            "size": config.size,
        },
        "layers": [{
            "mediaType": compression.layer_type(flavour)?,
            "digest": layer.digest.to_string(),
            "size": layer.size,
        }],
    });
    Some(serde_json::to_vec(&manifest).expect("a JSON value serialises"))
}

/// One converted platform of a multi-platform source.
pub struct IndexEntry {
    pub manifest: Blob,
    /// The source index's `platform` object, kept as it was.
    pub platform: Value,
}

/// The index (manifest list) of a multi-platform source's conversions, in the source's order.
pub fn image_index(flavour: Flavour, entries: &[IndexEntry]) -> Vec<u8> {
    let manifests: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "mediaType": flavour.manifest_type(),
                "digest": e.manifest.digest.to_string(),
                "size": e.manifest.size,
                "platform": e.platform,
            })
        })
        .collect();
    let index = json!({
        "schemaVersion": 2,
        "mediaType": flavour.index_type(),
        "manifests": manifests,
    });
    serde_json::to_vec(&index).expect("a JSON value serialises")
}

/// The media type a stored manifest or index declares (every one strata writes declares it).
pub fn declared_type(bytes: &[u8]) -> Option<String> {
    let doc: Value = serde_json::from_slice(bytes).ok()?;
    doc.get("mediaType")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(c: char, size: u64) -> Blob {
        Blob {
            digest: Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap(),
            size,
        }
    }

    #[test]
    fn manifests_name_their_blobs_in_each_flavour() {
        let (config, layer) = (blob('a', 10), blob('b', 20));
        let oci = image_manifest(Flavour::Oci, &config, &layer, WireCompression::Zstd).unwrap();
        let doc: Value = serde_json::from_slice(&oci).unwrap();
        assert_eq!(doc["mediaType"], OCI_MANIFEST);
        assert_eq!(doc["config"]["mediaType"], OCI_CONFIG);
        assert_eq!(
            doc["layers"][0]["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
        assert_eq!(doc["layers"][0]["size"], 20);
        assert_eq!(declared_type(&oci).as_deref(), Some(OCI_MANIFEST));
        let docker =
            image_manifest(Flavour::Docker, &config, &layer, WireCompression::Gzip).unwrap();
        let doc: Value = serde_json::from_slice(&docker).unwrap();
        assert_eq!(doc["config"]["mediaType"], DOCKER_CONFIG);
        assert_eq!(
            doc["layers"][0]["mediaType"],
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        );
        assert!(image_manifest(Flavour::Docker, &config, &layer, WireCompression::Zstd).is_none());
    }

    #[test]
    fn squashed_config_keeps_all_but_rootfs_and_history() {
        let source = json!({"architecture": "amd64", "os": "linux", "created": "2020-01-01T00:00:00Z",
            "config": {"Env": ["A=1"]}, "rootfs": {"type": "layers", "diff_ids": ["x", "y"]},
            "history": [{}, {}]});
        let out: Value =
            serde_json::from_slice(&squashed_config(&source, "sha256:d", "r@x")).unwrap();
        assert_eq!(out["config"]["Env"][0], "A=1");
        assert_eq!(out["rootfs"]["diff_ids"], json!(["sha256:d"]));
        assert_eq!(out["history"].as_array().unwrap().len(), 1);
        assert_eq!(out["history"][0]["created"], "2020-01-01T00:00:00Z");
    }
}
