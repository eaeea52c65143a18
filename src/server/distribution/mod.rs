//! The registry view: the read side of the OCI distribution API over the store of converted images.
//! `squash/<reference path>` names the squashed image of that upstream repository (parsed as
//! `/squash/<reference>` is, after `--registry-alias`); a manifest asked for by tag converts on first
//! use and answers when stored, or "retry later" past `--manifest-wait`. What is stored is served
//! by digest only to callers the upstream lets pull from the source repository (`token`).

mod error;
mod token;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio_stream::wrappers::ReceiverStream;

use super::{empty, json, slot, Body, State};
use crate::convert::{StoredManifest, ViewRequest};
use crate::digest::Digest;
use crate::format::image::{
    declared_type, Flavour, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST,
};
use crate::manifest::Platform;
use crate::reference::Reference;
use crate::registry::Credentials;
use crate::store::{names, repo::MAX_MANIFEST_BYTES, Store, StoreError};
use error::V2Error;

/// How long a first pull's manifest request waits for its conversion unless configured.
pub const DEFAULT_MANIFEST_WAIT: Duration = Duration::from_secs(60);
/// The repository prefix of squashed images.
const SQUASH: &str = "squash/";
/// Bytes per chunk of a blob response.
const CHUNK: usize = 256 * 1024;
/// Largest page of `_catalog` and `tags/list`.
const MAX_PAGE: usize = 1000;
/// What a client past the manifest wait is asked to wait before it asks again.
const CONVERTING_RETRY_SECS: &str = "10";

type Result<T> = std::result::Result<T, V2Error>;

/// What a `/v2/` path asks for.
#[derive(Debug, PartialEq, Eq)]
enum Endpoint {
    Ping,
    Token,
    Catalog,
    Tags { name: String },
    Manifest { name: String, reference: String },
    Blob { name: String, digest: String },
}

fn endpoint(path: &str) -> Option<Endpoint> {
    if path == token::TOKEN_PATH {
        return Some(Endpoint::Token);
    }
    let rest = path.strip_prefix("/v2")?;
    if rest.is_empty() || rest == "/" {
        return Some(Endpoint::Ping);
    }
    let rest = rest.strip_prefix('/')?;
    if rest == "_catalog" {
        return Some(Endpoint::Catalog);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some(Endpoint::Tags { name: name.into() });
    }
    // The last marker splits: a repository may itself have a `manifests` or `blobs` component.
    let (at, marker) = [
        rest.rfind("/manifests/").map(|at| (at, "/manifests/")),
        rest.rfind("/blobs/").map(|at| (at, "/blobs/")),
    ]
    .into_iter()
    .flatten()
    .max()?;
    let (name, last) = (&rest[..at], &rest[at + marker.len()..]);
    if name.is_empty() || last.is_empty() || last.contains('/') {
        return None;
    }
    Some(if marker == "/manifests/" {
        Endpoint::Manifest {
            name: name.into(),
            reference: last.into(),
        }
    } else {
        Endpoint::Blob {
            name: name.into(),
            digest: last.into(),
        }
    })
}

pub(super) async fn respond(
    req: &Request<Incoming>,
    state: &Arc<State>,
    path: &str,
) -> Response<Body> {
    let mut resp = match answer(req, state, path).await {
        Ok(resp) => resp,
        Err(e) => {
            let mut resp = e.response();
            if e.status == 401 {
                let scope = endpoint(path).and_then(|e| match e {
                    Endpoint::Tags { name }
                    | Endpoint::Manifest { name, .. }
                    | Endpoint::Blob { name, .. } => Some(format!("repository:{name}:pull")),
                    _ => None,
                });
                if let Some(c) = token::challenge(req, &state.settings, scope.as_deref()) {
                    resp.headers_mut().insert(header::WWW_AUTHENTICATE, c);
                }
            }
            resp
        }
    };
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    if req.method() == Method::HEAD {
        *resp.body_mut() = empty();
    }
    resp
}

async fn answer(req: &Request<Incoming>, state: &Arc<State>, path: &str) -> Result<Response<Body>> {
    let endpoint = endpoint(path)
        .ok_or_else(|| V2Error::new(404, "NOT_FOUND", format!("no such route: {path}")))?;
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(V2Error::new(
            405,
            "UNSUPPORTED",
            "this registry is read-only: GET and HEAD",
        ));
    }
    let credentials = token::caller(req)?;
    match endpoint {
        // The challenge that makes clients fetch a token, with their credentials if they have any.
        Endpoint::Ping if !token::presented(req) => Err(V2Error::new(
            401,
            "UNAUTHORIZED",
            "ask the token endpoint (anonymous access is fine)",
        )),
        Endpoint::Ping => Ok(json(200, &serde_json::json!({}))),
        Endpoint::Token => Ok(token::issue(req)),
        Endpoint::Catalog => catalog(req, state).await,
        Endpoint::Tags { name } => tags(req, state, &name, &credentials).await,
        Endpoint::Manifest { name, reference } => {
            manifest(req, state, &name, &reference, credentials).await
        }
        Endpoint::Blob { name, digest } => blob(req, state, &name, &digest, &credentials).await,
    }
}

fn store(state: &State) -> Result<Store> {
    state.converter.image_store().cloned().ok_or_else(|| {
        V2Error::new(
            404,
            "UNSUPPORTED",
            "no registry view: this service keeps no store (--store, or a cache dir)",
        )
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, StoreError> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(V2Error::from),
        Err(e) => Err(V2Error::new(500, "UNKNOWN", e.to_string())),
    }
}

/// `n` and `last` of a paginated listing.
fn page_query(req: &Request<Incoming>) -> Result<(Option<usize>, Option<String>)> {
    let (mut n, mut last) = (None, None);
    for pair in req.uri().query().unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("n", v)) => {
                let v: usize = v.parse().map_err(|_| {
                    V2Error::new(400, "PAGINATION_NUMBER_INVALID", format!("n={v}"))
                })?;
                n = Some(v.min(MAX_PAGE));
            }
            Some(("last", v)) => {
                last = Some(
                    percent_encoding::percent_decode_str(v)
                        .decode_utf8_lossy()
                        .into_owned(),
                );
            }
            _ => {}
        }
    }
    Ok((n, last))
}

/// `Link: <…?n=N&last=L>; rel="next"`, when a page was full.
fn link_next(resp: &mut Response<Body>, path: &str, n: Option<usize>, items: &[String]) {
    let (Some(n), Some(last)) = (n, items.last()) else {
        return;
    };
    if items.len() < n {
        return;
    }
    let last = percent_encoding::utf8_percent_encode(last, percent_encoding::NON_ALPHANUMERIC);
    if let Ok(v) = HeaderValue::from_str(&format!("<{path}?n={n}&last={last}>; rel=\"next\"")) {
        resp.headers_mut().insert(header::LINK, v);
    }
}

/// The converted repositories held. Only their names: what they hold is served per repository,
/// after the upstream's say.
async fn catalog(req: &Request<Incoming>, state: &State) -> Result<Response<Body>> {
    let store = store(state)?;
    let (n, last) = page_query(req)?;
    let page = blocking(move || store.repositories(last.as_deref(), n.or(Some(MAX_PAGE)))).await?;
    let mut resp = json(200, &serde_json::json!({ "repositories": page }));
    link_next(&mut resp, "/v2/_catalog", n, &page);
    Ok(resp)
}

/// A `squash/…` repository name: the store's repository, and the upstream image it names.
struct Name {
    repository: String,
    upstream: String,
}

fn name(state: &State, name: &str) -> Result<Name> {
    let rest = name.strip_prefix(SQUASH).ok_or_else(|| {
        V2Error::new(
            404,
            "NAME_UNKNOWN",
            format!("repository {name:?}: this registry serves squash/<repository>"),
        )
    })?;
    names::check_repository(name)?;
    let (first, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let upstream = match state
        .settings
        .registry_aliases
        .iter()
        .find(|(a, _)| a == first)
    {
        Some((_, host)) if !tail.is_empty() => format!("{host}/{tail}"),
        _ => rest.to_string(),
    };
    Ok(Name {
        repository: name.to_string(),
        upstream,
    })
}

fn reference(state: &State, upstream: &str, suffix: &str) -> Result<Reference> {
    state
        .converter
        .parse_reference(&format!("{upstream}{suffix}"))
        .map_err(|e| V2Error::from_convert(&e, "NAME_UNKNOWN"))
}

/// The upstream's tags: what can be pulled, converted or not.
async fn tags(
    req: &Request<Incoming>,
    state: &State,
    raw: &str,
    credentials: &Credentials,
) -> Result<Response<Body>> {
    let name = name(state, raw)?;
    let (n, last) = page_query(req)?;
    let reference = reference(state, &name.upstream, "")?;
    let (tags, more) = state
        .converter
        .upstream_tags(&reference, n, last.as_deref(), credentials)
        .await
        .map_err(|e| V2Error::from_convert(&e, "NAME_UNKNOWN"))?;
    let mut resp = json(
        200,
        &serde_json::json!({"name": name.repository, "tags": tags}),
    );
    if more || n.is_some() {
        let path = format!("/v2/{}/tags/list", name.repository);
        link_next(&mut resp, &path, n.or(Some(tags.len())), &tags);
    }
    Ok(resp)
}

/// What the client's `Accept` allows: an index, and which manifest flavour (OCI unless only Docker
/// schema 2 is acceptable). No `Accept` takes OCI, as every current client does.
fn negotiate(req: &Request<Incoming>) -> (bool, Flavour) {
    let accepted: Vec<String> = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .collect();
    if accepted.is_empty() || accepted.iter().any(|t| t == "*/*") {
        return (true, Flavour::Oci);
    }
    let has = |t: &str| accepted.iter().any(|a| a == t);
    let flavour = if !has(OCI_MANIFEST) && has(DOCKER_MANIFEST) {
        Flavour::Docker
    } else {
        Flavour::Oci
    };
    let index = match flavour {
        Flavour::Oci => has(OCI_INDEX),
        Flavour::Docker => has(DOCKER_LIST),
    };
    (index, flavour)
}

fn manifest_response(m: &StoredManifest) -> Response<Body> {
    let mut resp = Response::new(
        http_body_util::Full::new(Bytes::from(m.bytes.clone()))
            .map_err(|e: std::convert::Infallible| match e {})
            .boxed_unsync(),
    );
    let h = resp.headers_mut();
    let media = if m.media_type.is_empty() {
        OCI_MANIFEST
    } else {
        &m.media_type
    };
    if let Ok(v) = HeaderValue::from_str(media) {
        h.insert(header::CONTENT_TYPE, v);
    }
    let digest = HeaderValue::from_str(&m.digest.to_string()).expect("a digest is a header value");
    h.insert("docker-content-digest", digest);
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&format!("\"{}\"", m.digest)).expect("a digest is a header value"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(m.bytes.len()));
    resp
}

/// Whether the upstream lets this caller pull from the source repository now.
async fn check_access(state: &State, name: &Name, credentials: &Credentials) -> Result<()> {
    let reference = reference(state, &name.upstream, "")?;
    state
        .converter
        .check_access(&reference, credentials)
        .await
        .map_err(|e| V2Error::from_convert(&e, "NAME_UNKNOWN"))
}

async fn manifest(
    req: &Request<Incoming>,
    state: &Arc<State>,
    raw: &str,
    tag_or_digest: &str,
    credentials: Credentials,
) -> Result<Response<Body>> {
    let name = name(state, raw)?;
    let store = store(state)?;
    if let Ok(digest) = Digest::parse(tag_or_digest) {
        let repo = name.repository.clone();
        let found = blocking({
            let digest = digest.clone();
            move || match store.has_manifest(&repo, &digest)? {
                true => store.read_small(&digest, MAX_MANIFEST_BYTES).map(Some),
                false => Ok(None),
            }
        })
        .await;
        let unknown = || {
            V2Error::new(
                404,
                "MANIFEST_UNKNOWN",
                format!("manifest {tag_or_digest} is not in {raw}"),
            )
        };
        let bytes = match found {
            Ok(Some(b)) => b,
            Ok(None) => return Err(unknown()),
            Err(e) if e.status == 404 => return Err(unknown()),
            Err(e) => return Err(e),
        };
        check_access(state, &name, &credentials).await?;
        return Ok(manifest_response(&StoredManifest {
            media_type: declared_type(&bytes).unwrap_or_default(),
            digest,
            bytes,
        }));
    }
    names::check_tag(tag_or_digest)?;
    // By tag, the upstream is asked (with the caller's credentials) for the tag every time.
    let reference = reference(state, &name.upstream, &format!(":{tag_or_digest}"))?;
    let (accepts_index, flavour) = negotiate(req);
    let request = ViewRequest {
        reference,
        credentials,
        repository: name.repository,
        accepts_index,
        platform: Platform::default(),
        flavour,
    };
    let slot = || slot(state);
    let waited = tokio::time::timeout(
        state.settings.manifest_wait,
        state.converter.stored_manifest(&request, &slot),
    )
    .await;
    match waited {
        Ok(Ok(m)) => Ok(manifest_response(&m)),
        Ok(Err(e)) => Err(V2Error::from_convert(&e, "MANIFEST_UNKNOWN")),
        // The conversion goes on; the client is asked to come back.
        Err(_) => Err(V2Error::new(
            503,
            "UNAVAILABLE",
            "the squashed image is being converted; retry shortly",
        )
        .retry_after(CONVERTING_RETRY_SECS)),
    }
}

/// `Range: bytes=…` of a blob of `size` bytes: `Ok(None)` for the whole blob (no header, several
/// ranges or one that cannot be parsed, which RFC 9110 lets a server ignore), `Err` when
/// unsatisfiable.
fn byte_range(
    req: &Request<Incoming>,
    size: u64,
) -> std::result::Result<Option<std::ops::Range<u64>>, ()> {
    let Some(spec) = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let range = match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(start), Ok(end)) if start <= end => start..(end + 1).min(size),
        (Ok(start), Err(_)) if b.is_empty() => start..size,
        (Err(_), Ok(suffix)) if a.is_empty() => size.saturating_sub(suffix)..size,
        _ => return Ok(None),
    };
    if range.start >= size || range.is_empty() {
        return Err(());
    }
    Ok(Some(range))
}

async fn blob(
    req: &Request<Incoming>,
    state: &State,
    raw: &str,
    digest: &str,
    credentials: &Credentials,
) -> Result<Response<Body>> {
    let name = name(state, raw)?;
    let store = store(state)?;
    let digest =
        Digest::parse(digest).map_err(|e| V2Error::new(400, "DIGEST_INVALID", e.to_string()))?;
    let unknown = || {
        V2Error::new(
            404,
            "BLOB_UNKNOWN",
            format!("blob {digest} is not in {raw}"),
        )
    };
    let meta = blocking({
        let (store, digest, repo) = (store.clone(), digest.clone(), name.repository.clone());
        move || match store.repository_has_blob(&repo, &digest)? {
            true => store.stat_blob(&digest),
            false => Ok(None),
        }
    })
    .await?
    .ok_or_else(unknown)?;
    check_access(state, &name, credentials).await?;
    let range = match byte_range(req, meta.size) {
        Ok(r) => r,
        Err(()) => {
            let mut resp = V2Error::new(416, "BLOB_UNKNOWN", "range not satisfiable").response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", meta.size)) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(resp);
        }
    };
    let partial = range.is_some();
    let reader = blocking({
        let digest = digest.clone();
        move || store.open_blob(&digest, range)
    })
    .await
    .map_err(|e| if e.status == 404 { unknown() } else { e })?;
    let mut builder = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("docker-content-digest", digest.to_string())
        .header(header::ETAG, format!("\"{digest}\""))
        .header(header::ACCEPT_RANGES, "bytes")
        .header(
            header::CONTENT_LENGTH,
            reader.range.end - reader.range.start,
        );
    if partial {
        builder = builder.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!(
                "bytes {}-{}/{}",
                reader.range.start,
                reader.range.end - 1,
                reader.size
            ),
        );
    }
    let body = if req.method() == Method::HEAD {
        empty()
    } else {
        stream_reader(reader)
    };
    Ok(builder.body(body).expect("valid response"))
}

/// A stored blob's bytes as a body, read on a blocking thread (the lease held until the end).
fn stream_reader(mut reader: crate::store::BlobReader) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Frame<Bytes>>>(4);
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut left = reader.range.end - reader.range.start;
        while left > 0 {
            let mut buf = vec![0u8; CHUNK.min(left as usize)];
            match reader.read(&mut buf) {
                Ok(0) => {
                    let _ = tx.blocking_send(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "stored blob shorter than its size",
                    )));
                    return;
                }
                Ok(n) => {
                    buf.truncate(n);
                    left -= n as u64;
                    if tx.blocking_send(Ok(Frame::data(Bytes::from(buf)))).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    BodyExt::boxed_unsync(StreamBody::new(ReceiverStream::new(rx)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_table() {
        let d = format!("sha256:{}", "a".repeat(64));
        let cases = [
            ("/v2/", Some(Endpoint::Ping)),
            ("/v2/token", Some(Endpoint::Token)),
            ("/v2", Some(Endpoint::Ping)),
            ("/v2/_catalog", Some(Endpoint::Catalog)),
            (
                "/v2/squash/ns/app/tags/list",
                Some(Endpoint::Tags {
                    name: "squash/ns/app".into(),
                }),
            ),
            (
                "/v2/squash/ns/app/manifests/1.0",
                Some(Endpoint::Manifest {
                    name: "squash/ns/app".into(),
                    reference: "1.0".into(),
                }),
            ),
            // A repository may itself contain `manifests`: the last marker splits.
            (
                "/v2/squash/manifests/x/manifests/1",
                Some(Endpoint::Manifest {
                    name: "squash/manifests/x".into(),
                    reference: "1".into(),
                }),
            ),
            (
                &*format!("/v2/squash/a/blobs/{d}"),
                Some(Endpoint::Blob {
                    name: "squash/a".into(),
                    digest: d.clone(),
                }),
            ),
            (
                &*format!("/v2/squash/manifests/a/blobs/{d}"),
                Some(Endpoint::Blob {
                    name: "squash/manifests/a".into(),
                    digest: d.clone(),
                }),
            ),
            ("/v2/squash/a/manifests/", None),
            ("/v2/squash/a", None),
            ("/v2x", None),
        ];
        for (path, want) in cases {
            assert_eq!(endpoint(path), want, "{path}");
        }
    }
}
