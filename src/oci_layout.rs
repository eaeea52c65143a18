//! A local OCI image layout (image-spec `image-layout.md`) as an image source, so strata works with no
//! registry: `index.json` names the images (annotation `org.opencontainers.image.ref.name`), blobs
//! are files under `blobs/<algorithm>/` (`sha256`, `sha512`, …), streamed and verified like registry
//! blobs.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use tokio_util::io::ReaderStream;

use crate::digest::Digest;
use crate::reference::Reference;
use crate::registry::{manifest_too_large, RegistryError, DEFAULT_IDLE_TIMEOUT};
use crate::source::{verify_stream, BlobStream, RawManifest};

const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug)]
pub struct OciLayout {
    dir: PathBuf,
    /// Longest `index.json` or manifest read.
    max_manifest_bytes: u64,
}

impl OciLayout {
    pub fn open(dir: &Path, max_manifest_bytes: u64) -> std::io::Result<OciLayout> {
        for required in ["oci-layout", "index.json"] {
            if !dir.join(required).is_file() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no {required} in {}", dir.display()),
                ));
            }
        }
        Ok(OciLayout {
            dir: dir.to_path_buf(),
            max_manifest_bytes,
        })
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("blobs")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    async fn read_small(&self, path: &Path) -> Result<Vec<u8>, RegistryError> {
        let data = tokio::fs::read(path).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                RegistryError::NotFound(format!("{} not in the OCI layout", path.display()))
            }
            _ => RegistryError::Upstream(format!("{}: {e}", path.display())),
        })?;
        if data.len() as u64 > self.max_manifest_bytes {
            return Err(manifest_too_large(
                path.display().to_string(),
                self.max_manifest_bytes,
            ));
        }
        Ok(data)
    }

    /// The manifest named by a digest, or by a tag matched against the index's ref names (as the tag
    /// alone, `repository:tag`, or the familiar `name:tag`).
    pub async fn manifest(
        &self,
        reference: &Reference,
        tag_or_digest: &str,
    ) -> Result<RawManifest, RegistryError> {
        let digest = match Digest::parse(tag_or_digest) {
            Ok(d) => d,
            Err(_) => {
                let index: Value =
                    serde_json::from_slice(&self.read_small(&self.dir.join("index.json")).await?)
                        .map_err(|e| RegistryError::Invalid(format!("index.json: {e}")))?;
                let names = [
                    tag_or_digest.to_string(),
                    format!("{}:{tag_or_digest}", reference.repository),
                    reference.familiar(),
                ];
                let found = index["manifests"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|m| {
                        m["annotations"][REF_NAME]
                            .as_str()
                            .is_some_and(|n| names.iter().any(|x| x == n))
                    });
                let d = found.and_then(|m| m["digest"].as_str()).ok_or_else(|| {
                    RegistryError::NotFound(format!(
                        "{reference}: no image named {tag_or_digest:?} in the OCI layout"
                    ))
                })?;
                Digest::parse(d).map_err(|e| RegistryError::Invalid(format!("index.json: {e}")))?
            }
        };
        let bytes = self.read_small(&self.blob_path(&digest)).await?;
        let actual = Digest::of_with(digest.algorithm(), &bytes);
        if actual != digest {
            return Err(RegistryError::Invalid(format!(
                "manifest blob {digest} holds {actual}"
            )));
        }
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let media_type = body["mediaType"].as_str().unwrap_or_default().to_string();
        Ok(RawManifest {
            bytes: Bytes::from(bytes),
            media_type,
            digest,
        })
    }

    /// The tags of the layout's index (its ref names that are plain tags), sorted.
    pub async fn tags(&self) -> Result<Vec<String>, RegistryError> {
        let index: Value =
            serde_json::from_slice(&self.read_small(&self.dir.join("index.json")).await?)
                .map_err(|e| RegistryError::Invalid(format!("index.json: {e}")))?;
        let mut tags: Vec<String> = index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["annotations"][REF_NAME].as_str())
            .map(|n| n.rsplit(':').next().unwrap_or(n).to_string())
            .filter(|t| !t.contains('/'))
            .collect();
        tags.sort();
        tags.dedup();
        Ok(tags)
    }

    /// Bytes `range` of a blob; `None` if the file is shorter.
    pub async fn blob_range(
        &self,
        digest: &Digest,
        range: std::ops::Range<u64>,
    ) -> Result<Option<bytes::Bytes>, RegistryError> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let path = self.blob_path(digest);
        let read = async {
            let mut file = tokio::fs::File::open(&path).await?;
            file.seek(std::io::SeekFrom::Start(range.start)).await?;
            let mut buf = vec![0; (range.end - range.start) as usize];
            match file.read_exact(&mut buf).await {
                Ok(_) => Ok(Some(bytes::Bytes::from(buf))),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
                Err(e) => Err(e),
            }
        };
        read.await.map_err(|e: std::io::Error| match e.kind() {
            std::io::ErrorKind::NotFound => {
                RegistryError::NotFound(format!("blob {digest} not in the OCI layout"))
            }
            _ => RegistryError::Upstream(format!("{}: {e}", path.display())),
        })
    }

    pub async fn blob(&self, digest: &Digest, size: u64) -> Result<BlobStream, RegistryError> {
        let path = self.blob_path(digest);
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    RegistryError::NotFound(format!("blob {digest} not in the OCI layout"))
                }
                _ => RegistryError::Upstream(format!("{}: {e}", path.display())),
            })?;
        let stream = ReaderStream::with_capacity(file, 256 * 1024).map(|r| r);
        // Local files do not stall; the registry's default keeps a hung disk from hanging forever.
        Ok(verify_stream(
            Box::pin(stream),
            digest.clone(),
            size,
            DEFAULT_IDLE_TIMEOUT,
        ))
    }
}
