//! The docker-load archive of a squashed image (docs/FORMATS.md §1): `<id>/layer.tar` first, its size fixed
//! in its header before its content exists; then the legacy `<id>/json` and `<id>/VERSION`, the image
//! config (the image's own, with the one new diff_id and a one-entry history), `manifest.json` and
//! `repositories`. Every member after the layer has a length known in advance (digests are fixed
//! width), so the archive's total length is known before the first byte.

use std::io::{self, Write};

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use super::image::squashed_config;
use crate::entry::{padded, write_end, write_entry, write_zeros, EntryMeta, Kind};

/// A digest of the right width, to measure members before the real one is known.
const PLACEHOLDER_DIGEST: &str =
    "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// The archive around one squashed layer.
#[derive(Debug, Clone)]
pub struct DockerArchive {
    /// Directory name of the layer (64 hex), fixed by the inputs so output is reproducible.
    id: String,
    /// Size of the `layer.tar` member: the merged tar plus zero padding.
    layer_size: u64,
    /// The source image's config, kept verbatim but for `rootfs` and `history`.
    config: Value,
    /// `name:tag` that `docker load` gives the image; none leaves it untagged.
    repo_tag: Option<String>,
    /// Where the layers came from, for the history entry.
    source: String,
}

fn member(path: &str, size: u64) -> EntryMeta {
    EntryMeta::synthetic(path.as_bytes(), Kind::File, 0o644, size)
}

impl DockerArchive {
    pub fn new(
        id: String,
        layer_size: u64,
        config: Value,
        repo_tag: Option<String>,
        source: String,
    ) -> Self {
        DockerArchive {
            id,
            layer_size,
            config,
            repo_tag,
            source,
        }
    }

    pub fn layer_size(&self) -> u64 {
        self.layer_size
    }

    /// The image config with the squashed layer's diff_id.
    pub fn config_json(&self, diff_id: &str) -> Vec<u8> {
        squashed_config(&self.config, diff_id, &self.source)
    }

    /// Members after the layer, in order, as (name, content).
    fn tail_members(&self, diff_id: &str) -> Vec<(String, Vec<u8>)> {
        let config = self.config_json(diff_id);
        let config_name = format!("{}.json", hex::encode(Sha256::digest(&config)));
        let layer_name = format!("{}/layer.tar", self.id);
        let legacy = json!({
            "id": self.id,
            "created": self.config.get("created"),
            "os": self.config.get("os"),
            "architecture": self.config.get("architecture"),
            "config": self.config.get("config"),
        });
        let tags: Vec<&str> = self.repo_tag.iter().map(String::as_str).collect();
        let manifest = json!([{"Config": config_name, "RepoTags": tags, "Layers": [layer_name]}]);
        let mut members = vec![
            (
                format!("{}/json", self.id),
                serde_json::to_vec(&legacy).expect("serialises"),
            ),
            (format!("{}/VERSION", self.id), b"1.0".to_vec()),
            (config_name, config),
            (
                "manifest.json".to_string(),
                serde_json::to_vec(&manifest).expect("serialises"),
            ),
        ];
        if let Some((name, tag)) = self.repo_tag.as_deref().and_then(split_tag) {
            let repositories = json!({ name: { tag: self.id } });
            members.push((
                "repositories".to_string(),
                serde_json::to_vec(&repositories).expect("serialises"),
            ));
        }
        members
    }

    /// Exact length of the whole archive.
    pub fn total_len(&self) -> u64 {
        let head = member(&format!("{}/layer.tar", self.id), self.layer_size)
            .header_bytes()
            .len() as u64;
        let tail: u64 = self
            .tail_members(PLACEHOLDER_DIGEST)
            .iter()
            .map(|(name, data)| member(name, data.len() as u64).encoded_len())
            .sum();
        head + padded(self.layer_size) + tail + 1024
    }

    /// The `layer.tar` header; its content follows.
    pub fn write_head<W: Write + ?Sized>(&self, out: &mut W) -> io::Result<()> {
        out.write_all(&member(&format!("{}/layer.tar", self.id), self.layer_size).header_bytes())
    }

    /// Everything after the layer content, once its digest is known.
    pub fn write_tail<W: Write + ?Sized>(&self, out: &mut W, diff_id: &str) -> io::Result<()> {
        write_zeros(out, padded(self.layer_size) - self.layer_size)?;
        for (name, data) in self.tail_members(diff_id) {
            write_entry(out, &member(&name, data.len() as u64), &mut &data[..])?;
        }
        write_end(out)
    }
}

/// `name:tag` → (`name`, `tag`); the tag is after the last `:` that follows the last `/`.
fn split_tag(repo_tag: &str) -> Option<(&str, &str)> {
    let slash = repo_tag.rfind('/').map_or(0, |i| i + 1);
    let colon = repo_tag[slash..].rfind(':')? + slash;
    Some((&repo_tag[..colon], &repo_tag[colon + 1..]))
}

/// Writes the layer member's content: counts it, refuses to exceed the size announced in its header,
/// and pads it to that size at the end. Its digest (the diff_id) is taken by whoever receives the bytes,
/// so the hashing can run on another thread.
pub struct LayerWriter<W> {
    inner: W,
    written: u64,
    limit: u64,
}

/// The merged layer outgrew the size announced before it started.
#[derive(Debug, thiserror::Error)]
#[error("merged layer exceeds its announced size of {limit} bytes")]
pub struct SizeExceeded {
    pub limit: u64,
}

impl<W: Write> LayerWriter<W> {
    pub fn new(inner: W, limit: u64) -> Self {
        LayerWriter {
            inner,
            written: 0,
            limit,
        }
    }

    /// Content bytes written so far (the padding not counted).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Pads to the announced size; returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        let rest = self.limit - self.written;
        write_zeros(&mut self, rest)?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for LayerWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written + buf.len() as u64 > self.limit {
            return Err(io::Error::other(SizeExceeded { limit: self.limit }));
        }
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn archive(tag: Option<&str>) -> DockerArchive {
        let config = json!({
            "created": "2024-01-02T03:04:05Z",
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Env": ["A=b=c"], "Healthcheck": {"Test": ["NONE"]}},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:aa", "sha256:bb"]},
            "history": [{"created_by": "x"}, {"created_by": "y"}],
        });
        DockerArchive::new(
            "ab".repeat(32),
            3000,
            config,
            tag.map(str::to_string),
            "r/x@sha256:00".into(),
        )
    }

    fn build(a: &DockerArchive, content: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        a.write_head(&mut out).unwrap();
        let start = out.len();
        let mut lw = LayerWriter::new(&mut out, a.layer_size());
        lw.write_all(content).unwrap();
        lw.finish().unwrap();
        let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&out[start..])));
        a.write_tail(&mut out, &diff_id).unwrap();
        out
    }

    #[test]
    fn length_members_and_diff_id() {
        for tag in [Some("localhost:5000/a/b:1.0"), None] {
            let a = archive(tag);
            let out = build(&a, &[1u8; 1000]);
            assert_eq!(out.len() as u64, a.total_len());
            let mut names = Vec::new();
            let mut layer = Vec::new();
            let mut manifest = Value::Null;
            let mut configs = Vec::new();
            for e in tar::Archive::new(&out[..]).entries().unwrap() {
                let mut e = e.unwrap();
                let name = e.path().unwrap().to_string_lossy().into_owned();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                if name.ends_with("layer.tar") {
                    layer = data.clone();
                } else if name == "manifest.json" {
                    manifest = serde_json::from_slice(&data).unwrap();
                } else if name.ends_with(".json") && !name.contains('/') {
                    configs.push((name.clone(), data.clone()));
                }
                names.push(name);
            }
            assert_eq!(names[0], format!("{}/layer.tar", "ab".repeat(32)));
            assert_eq!(layer.len(), 3000);
            assert!(layer[1000..].iter().all(|&b| b == 0));
            let (config_name, config) = &configs[0];
            assert_eq!(
                *config_name,
                format!("{}.json", hex::encode(Sha256::digest(config)))
            );
            let config: Value = serde_json::from_slice(config).unwrap();
            let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&layer)));
            assert_eq!(config["rootfs"]["diff_ids"], json!([diff_id]));
            assert_eq!(config["history"].as_array().unwrap().len(), 1);
            assert_eq!(config["config"]["Env"], json!(["A=b=c"]));
            assert_eq!(manifest[0]["Config"], json!(config_name));
            assert_eq!(
                manifest[0]["RepoTags"],
                json!(tag.into_iter().collect::<Vec<_>>())
            );
            assert_eq!(names.contains(&"repositories".to_string()), tag.is_some());
        }
    }

    #[test]
    fn layer_writer_refuses_to_exceed() {
        let mut lw = LayerWriter::new(Vec::new(), 10);
        lw.write_all(&[0; 10]).unwrap();
        let err = lw.write_all(&[0; 1]).unwrap_err();
        assert!(err.to_string().contains("exceeds"));
    }

    #[test]
    fn split_tag_table() {
        assert_eq!(split_tag("a:1"), Some(("a", "1")));
        assert_eq!(
            split_tag("localhost:5000/a:1"),
            Some(("localhost:5000/a", "1"))
        );
        assert_eq!(split_tag("localhost:5000/a"), None);
    }
}
