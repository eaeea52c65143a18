//! The registry view (`/v2/squash/…`) as the tests drive it: a strata server whose view names the
//! test registry's repositories, curl helpers for its API, and a check of its store on disk.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest as _, Sha256};

use super::fixtures::sha;
use super::*;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// A strata server whose registry view names the test registry's repositories (`squash/<ns>/<repo>`
/// is `<registry>/<ns>/<repo>`).
pub struct View {
    pub server: Server,
    /// `127.0.0.1:PORT`, the registry host pull clients are given (docker, podman, skopeo and
    /// containerd all allow plain HTTP there when told, docker by itself for 127.0.0.0/8).
    pub host: String,
}

impl View {
    pub fn start(registry: &str) -> View {
        View::logging(registry, "warn")
    }

    pub fn logging(registry: &str, filter: &str) -> View {
        View::with(registry, &[], filter)
    }

    /// With more `strata serve` flags.
    pub fn with(registry: &str, extra: &[&str], filter: &str) -> View {
        let args = [&["--default-registry", registry], extra].concat();
        View::of(Server::start_logging(registry, &args, filter))
    }

    pub fn of(server: Server) -> View {
        let host = server.url.trim_start_matches("http://").to_string();
        View { server, host }
    }

    /// `http://…/v2/<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("{}/v2/{path}", self.server.url)
    }

    /// What a pull client is given for the conversion of `fixtures/<name>:<tag>`.
    pub fn reference(&self, name: &str, tag: &str) -> String {
        format!("{}/squash/fixtures/{name}:{tag}", self.host)
    }

    /// Manifest `reference` (tag or digest) of `squash/fixtures/<name>`, asked with `accept`.
    pub fn manifest(&self, name: &str, reference: &str, accept: &str) -> (u16, String, Vec<u8>) {
        curl(&[
            "-H",
            &format!("Accept: {accept}"),
            &self.url(&format!("squash/fixtures/{name}/manifests/{reference}")),
        ])
    }

    /// The OCI manifest of `fixtures/<name>:<tag>`'s conversion (converted if need be) and its digest.
    pub fn converted(&self, name: &str, tag: &str) -> (Value, String) {
        let (status, headers, body) = self.manifest(name, tag, OCI_MANIFEST);
        assert_eq!(status, 200, "{name}:{tag}: {headers}");
        (json_body(&body), sha(&body))
    }

    pub fn blob(&self, name: &str, digest: &str, extra: &[&str]) -> (u16, String, Vec<u8>) {
        let url = self.url(&format!("squash/fixtures/{name}/blobs/{digest}"));
        curl(&[extra, &[url.as_str()]].concat())
    }

    /// `DELETE` of manifest `reference` of `squash/fixtures/<name>`: the status.
    pub fn delete(&self, name: &str, reference: &str) -> u16 {
        let url = self.url(&format!("squash/fixtures/{name}/manifests/{reference}"));
        curl(&["-X", "DELETE", &url]).0
    }

    /// An `Authorization` header with a token of the view's endpoint for curl arguments `creds`.
    pub fn token(&self, creds: &[&str]) -> String {
        let (status, _, body) = curl(&[creds, &[self.url("token").as_str()]].concat());
        assert_eq!(status, 200);
        let token = json_body(&body)["token"].as_str().unwrap().to_string();
        format!("Authorization: Bearer {token}")
    }

    /// The repositories `_catalog` lists.
    pub fn catalog(&self) -> Value {
        let (status, headers, body) = curl(&[&self.url("_catalog")]);
        assert_eq!(status, 200, "{headers}");
        json_body(&body)["repositories"].clone()
    }

    /// How many times the server logged `line` so far.
    pub fn logged(&self, line: &str) -> usize {
        self.server.log.lock().unwrap().matches(line).count()
    }

    /// The lines logged so far that contain `fragment` (`key=value` as written: a log that is not a
    /// terminal carries no colour codes).
    pub fn log_lines(&self, fragment: &str) -> Vec<String> {
        let log = self.server.log.lock().unwrap().clone();
        log.lines()
            .filter(|l| l.contains(fragment))
            .map(str::to_string)
            .collect()
    }

    /// How many conversions the server logged it stored.
    pub fn conversions(&self) -> usize {
        self.logged("stored conversion")
    }

    /// Waits (at most `secs`) until `line` was logged more than `before` times; whether it was.
    pub fn await_log(&self, line: &str, before: usize, secs: u64) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while self.logged(line) <= before {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        true
    }

    /// The `removed=N` of each GC pass logged so far.
    pub fn gc_removals(&self) -> Vec<usize> {
        let lines = self.log_lines("garbage collection");
        let removed = |l: &String| l.split("removed=").nth(1)?.split(' ').next()?.parse().ok();
        lines.iter().filter_map(removed).collect()
    }

    /// The store's directory (`--store` left at its default).
    pub fn store(&self) -> PathBuf {
        self.server.cache.join("store")
    }
}

pub fn json_body(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{e}: not JSON: {}", String::from_utf8_lossy(body)))
}

/// The `errors[0].code` of a view response (a `curl` result), which must have `status`.
pub fn v2_code((got, headers, body): (u16, String, Vec<u8>), status: u16, what: &str) -> String {
    assert_eq!(
        got,
        status,
        "{what}: {headers}{}",
        String::from_utf8_lossy(&body)
    );
    json_body(&body)["errors"][0]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: {}", String::from_utf8_lossy(&body)))
        .to_string()
}

pub fn header(headers: &str, name: &str) -> String {
    header_value(headers, name).unwrap_or_else(|| panic!("no {name} header in\n{headers}"))
}

/// The regular files under `dir`, relative to it, recursively (none if it does not exist).
pub fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.map(Result::unwrap) {
            let path = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap();
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// What a store directory holds, read from its files alone (not through strata).
#[derive(Debug)]
pub struct StoreState {
    /// `sha256:<hex>` of every file under `blobs/`.
    pub blobs: BTreeSet<String>,
    /// Blobs some linked manifest or derived record names (through indexes), the roots included.
    pub referenced: BTreeSet<String>,
    /// Referenced but not stored: a manifest a client is served could not be pulled whole.
    pub missing: BTreeSet<String>,
    /// Stored but referenced by nothing: what GC must have removed.
    pub orphans: BTreeSet<String>,
}

/// Reads `store` (layout: `blobs/sha256/<hex>`, `repositories/<name>/_manifests/sha256/<hex>`,
/// `derived/<hash>` whose first line is a manifest digest) and follows every root's references.
pub fn store_state(store: &Path) -> StoreState {
    let blobs: BTreeSet<String> = files_under(&store.join("blobs"))
        .iter()
        .map(|f| f.replacen('/', ":", 1))
        .collect();
    let mut pending: Vec<String> = Vec::new();
    for link in files_under(&store.join("repositories")) {
        if let Some((_, digest)) = link.split_once("/_manifests/") {
            pending.push(digest.replacen('/', ":", 1));
        }
    }
    for record in files_under(&store.join("derived")) {
        let text = std::fs::read_to_string(store.join("derived").join(record)).unwrap();
        pending.push(text.lines().next().unwrap_or_default().to_string());
    }
    let mut referenced = BTreeSet::new();
    let mut read = HashSet::new();
    while let Some(manifest) = pending.pop() {
        referenced.insert(manifest.clone());
        if !read.insert(manifest.clone()) || !blobs.contains(&manifest) {
            continue;
        }
        let bytes = std::fs::read(blob_path(store, &manifest)).unwrap();
        let doc = json_body(&bytes);
        let digests = |key: &str| -> Vec<String> {
            let list = doc.get(key).and_then(Value::as_array).cloned();
            let list = list.unwrap_or_default().into_iter();
            list.map(|d| d["digest"].as_str().unwrap().to_string())
                .collect()
        };
        referenced.extend(
            doc.get("config")
                .map(|c| c["digest"].as_str().unwrap().into()),
        );
        referenced.extend(digests("layers"));
        pending.extend(digests("manifests"));
    }
    StoreState {
        missing: referenced.difference(&blobs).cloned().collect(),
        orphans: blobs.difference(&referenced).cloned().collect(),
        blobs,
        referenced,
    }
}

pub fn blob_path(store: &Path, digest: &str) -> PathBuf {
    store
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// Bytes of the blob files of a store.
pub fn store_bytes(store: &Path) -> u64 {
    let blobs = store_state(store).blobs;
    let size = |d: &String| std::fs::metadata(blob_path(store, d)).unwrap().len();
    blobs.iter().map(size).sum()
}

/// Asserts every blob file's content hashes to its name: nothing partial or wrong is visible.
pub fn assert_blobs_verify(store: &Path) {
    for digest in store_state(store).blobs {
        let path = blob_path(store, &digest);
        let mut hasher = Sha256::new();
        std::io::copy(&mut std::fs::File::open(&path).unwrap(), &mut hasher).unwrap();
        let got = format!("sha256:{}", hex::encode(hasher.finalize()));
        assert_eq!(
            got,
            digest,
            "{} holds other bytes than its name",
            path.display()
        );
    }
}

/// The listing of a converted image's one layer blob (gzip), as `listing` gives.
pub fn layer_listing(blob: &[u8]) -> std::collections::BTreeMap<String, String> {
    listing(flate2::read::GzDecoder::new(blob))
}

/// Whether a listing's `path` is a regular file with exactly `content`.
pub fn holds(
    listing: &std::collections::BTreeMap<String, String>,
    path: &str,
    content: &[u8],
) -> bool {
    listing
        .get(path)
        .is_some_and(|l| l.starts_with("Regular ") && l.contains(&sha(content)[7..19]))
}
