//! Schema 1 images for the tests, built as docker 1.x pushed them: a distribution registry that takes
//! schema 1 pushes, layer blobs uploaded by digest (any algorithm), manifests with `fsLayers` newest
//! first and a v1 image JSON per entry, signed the way libtrust signs (ES256 JWS whose protected
//! header names the payload's `formatLength` and `formatTail`). Also a minimal registry front that
//! serves a manifest of the test's choosing (unsigned schema 1, which distribution cannot store) and
//! redirects every other request to the real registry.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use p256::ecdsa::{signature::Signer, Signature, SigningKey};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use super::{curl, free_port, rand_suffix, scratch};

/// distribution with `compatibility.schema1.enabled`, on its own port and storage.
pub struct Schema1Registry {
    child: Child,
    pub addr: String,
}

impl Drop for Schema1Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Schema1Registry {
    pub fn start() -> Schema1Registry {
        let dir = scratch(&format!("schema1-registry-{}", rand_suffix()));
        let addr = format!("127.0.0.1:{}", free_port());
        let config = format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n\
             compatibility:\n  schema1:\n    enabled: true\nlog:\n  level: warn\n",
            dir.join("data").display()
        );
        let path = dir.join("config.yml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("registry.log")).unwrap())
            .spawn()
            .expect("docker-registry installed by scripts/test.sh");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "schema 1 registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Schema1Registry { child, addr }
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

pub fn sha512(data: &[u8]) -> String {
    format!("sha512:{}", hex::encode(sha2::Sha512::digest(data)))
}

/// Uploads `data` to `registry` (`host:port`) as a blob of `repo` named `digest`, monolithically
/// (distribution spec "POST then PUT"); distribution checks the digest whatever its algorithm.
pub fn push_blob(registry: &str, repo: &str, data: &[u8], digest: &str) {
    let (status, headers, body) = curl(&[
        "-X",
        "POST",
        &format!("http://{registry}/v2/{repo}/blobs/uploads/"),
    ]);
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
    let location = super::header_value(&headers, "location").unwrap();
    let location = if location.starts_with("http") {
        location
    } else {
        format!("http://{registry}{location}")
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let file = scratch(&format!("blob-{}", rand_suffix())).join("blob");
    std::fs::write(&file, data).unwrap();
    let (status, _, body) = curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("{location}{sep}digest={digest}"),
    ]);
    assert_eq!(status, 201, "{digest}: {}", String::from_utf8_lossy(&body));
}

/// PUTs a manifest; returns the `Docker-Content-Digest` the registry answers with.
pub fn put_manifest(
    registry: &str,
    repo: &str,
    tag: &str,
    media_type: &str,
    body: &[u8],
) -> String {
    let file = scratch(&format!("manifest-{}", rand_suffix())).join("m");
    std::fs::write(&file, body).unwrap();
    let (status, headers, answer) = curl(&[
        "-X",
        "PUT",
        "-H",
        &format!("Content-Type: {media_type}"),
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("http://{registry}/v2/{repo}/manifests/{tag}"),
    ]);
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&answer));
    super::header_value(&headers, "docker-content-digest").unwrap()
}

/// One entry of a schema 1 image, bottom first when handed to [`manifest`].
pub struct Entry {
    /// The layer blob as stored (any compression); the same blob may appear in several entries.
    pub blob: Vec<u8>,
    pub throwaway: bool,
    /// `container_config.Cmd`, what docker's history shows as `created_by`.
    pub created_by: Vec<&'static str>,
    /// The image's `config` as of this entry (docker writes the whole run config each time).
    pub config: Value,
    pub created: &'static str,
}

#[derive(Serialize)]
struct Manifest<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    name: &'a str,
    tag: &'a str,
    architecture: &'a str,
    #[serde(rename = "fsLayers")]
    fs_layers: Vec<FsLayer>,
    history: Vec<History>,
}

#[derive(Serialize)]
struct FsLayer {
    #[serde(rename = "blobSum")]
    blob_sum: String,
}

#[derive(Serialize)]
struct History {
    #[serde(rename = "v1Compatibility")]
    v1_compatibility: String,
}

/// Go's `json.MarshalIndent(v, "", "   ")`, how docker formatted the manifests it signed.
fn indented<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(
        &mut out,
        serde_json::ser::PrettyFormatter::with_indent(b"   "),
    );
    v.serialize(&mut ser).unwrap();
    out
}

/// The (unsigned) schema 1 manifest of `entries` (bottom first) as `name:tag`, with blob digests
/// made by `digest`; v1 image IDs are chained parent to child.
pub fn manifest(name: &str, tag: &str, entries: &[Entry], digest: fn(&[u8]) -> String) -> Vec<u8> {
    let mut fs_layers = Vec::new();
    let mut history = Vec::new();
    let mut parent: Option<String> = None;
    for (i, e) in entries.iter().enumerate() {
        let id = hex::encode(Sha256::digest(format!("{name}:{tag} entry {i}")));
        let mut v1 = json!({
            "id": id,
            "created": e.created,
            "container_config": {"Cmd": e.created_by},
            "config": e.config,
            "docker_version": "1.13.1",
            "architecture": "amd64",
            "os": "linux",
        });
        if let Some(p) = &parent {
            v1["parent"] = json!(p);
        }
        if e.throwaway {
            v1["throwaway"] = json!(true);
        }
        fs_layers.push(FsLayer {
            blob_sum: digest(&e.blob),
        });
        history.push(History {
            v1_compatibility: v1.to_string(),
        });
        parent = Some(id);
    }
    fs_layers.reverse();
    history.reverse();
    indented(&Manifest {
        schema_version: 1,
        name,
        tag,
        architecture: "amd64",
        fs_layers,
        history,
    })
}

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// libtrust `JSONSignature.Sign` + `PrettySignature("signatures")` with a fresh P-256 key: the
/// payload up to its closing brace, a `signatures` member, the brace.
pub fn sign(payload: &[u8]) -> Vec<u8> {
    let close = payload
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .unwrap();
    assert_eq!(payload[close], b'}');
    let length = payload[..close]
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .unwrap()
        + 1;
    let tail = &payload[length..];
    let protected = b64url(
        json!({"formatLength": length, "formatTail": b64url(tail), "time": "2026-01-01T00:00:00Z"})
            .to_string()
            .as_bytes(),
    );
    let key = SigningKey::random(&mut rand::rngs::OsRng);
    let signed: Signature = key.sign(format!("{protected}.{}", b64url(payload)).as_bytes());
    let point = key.verifying_key().to_encoded_point(false);
    let signatures = json!([{
        "header": {
            "jwk": {"crv": "P-256", "kty": "EC", "x": b64url(point.x().unwrap()), "y": b64url(point.y().unwrap())},
            "alg": "ES256",
        },
        "signature": b64url(&signed.to_bytes()),
        "protected": protected,
    }]);
    let mut out = payload[..length].to_vec();
    out.extend_from_slice(b",\n   \"signatures\": ");
    out.extend_from_slice(&indented(&signatures));
    out.extend_from_slice(b"\n}");
    out
}

/// A registry front on a free loopback port: GETs of `/v2/<repo>/manifests/<tag>` for one tag get
/// `body` with `media_type`, but only when the request's `Accept` names that type (as registries that
/// negotiate answer `MANIFEST_UNKNOWN` otherwise); every other request is redirected (307) to
/// `upstream`. Lives as long as the test binary.
pub fn manifest_front(upstream: &str, path: &str, media_type: &str, body: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (upstream, path, media_type) = (
        upstream.to_string(),
        path.to_string(),
        media_type.to_string(),
    );
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut request = String::new();
            let mut accept = String::new();
            reader.read_line(&mut request).unwrap_or(0);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("accept") {
                        accept.push_str(v.trim());
                        accept.push(',');
                    }
                }
            }
            let target = request.split_whitespace().nth(1).unwrap_or("/").to_string();
            let mut conn = conn;
            let head = |status: &str, extra: String, len: usize| {
                format!("HTTP/1.1 {status}\r\n{extra}Content-Length: {len}\r\nConnection: close\r\n\r\n")
            };
            let accepted = accept
                .split(',')
                .any(|t| t.split(';').next().unwrap_or("").trim() == media_type);
            let response = if target == path && accepted {
                let extra = format!(
                    "Content-Type: {media_type}\r\nDocker-Content-Digest: {}\r\n",
                    sha256(&body)
                );
                [head("200 OK", extra, body.len()).into_bytes(), body.clone()].concat()
            } else if target == path {
                let err =
                    br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#;
                [
                    head(
                        "404 Not Found",
                        "Content-Type: application/json\r\n".into(),
                        err.len(),
                    )
                    .into_bytes(),
                    err.to_vec(),
                ]
                .concat()
            } else {
                head(
                    "307 Temporary Redirect",
                    format!("Location: http://{upstream}{target}\r\n"),
                    0,
                )
                .into_bytes()
            };
            let _ = conn.write_all(&response);
            let mut rest = Vec::new();
            let _ = conn.shutdown(std::net::Shutdown::Write);
            let _ = reader.read_to_end(&mut rest);
        }
    });
    addr
}

/// A gzip layer blob of `tar`.
pub fn layer_blob(tar: &[u8]) -> Vec<u8> {
    gzip(tar)
}

/// Writes `data` under `dir/blobs/<algorithm>/<hex>` of an OCI layout; returns its digest.
pub fn layout_blob(dir: &Path, data: &[u8], digest: fn(&[u8]) -> String) -> String {
    let d = digest(data);
    let (alg, hex) = d.split_once(':').unwrap();
    let blobs = dir.join("blobs").join(alg);
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(hex), data).unwrap();
    d
}
