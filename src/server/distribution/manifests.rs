//! Manifests: by tag, converted on first use (waiting at most `--manifest-wait`); by digest, from
//! the repository's links after an upstream access check; `DELETE` behind `--enable-delete`.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::super::{slot, Body, State};
use super::error::V2Error;
use super::{blocking, check_access, name, reference, store, Result, CONVERTING_RETRY_SECS};
use crate::convert::{StoredManifest, ViewRequest};
use crate::digest::Digest;
use crate::format::image::{
    declared_type, Flavour, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST,
};
use crate::manifest::Platform;
use crate::registry::Credentials;
use crate::store::{names, repo::MAX_MANIFEST_BYTES};

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

pub(super) async fn manifest(
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
            // An evicted blob makes the image incomplete: unknown here (by tag it converts again).
            move || match store.has_manifest(&repo, &digest)? && store.complete(&digest)? {
                true => {
                    // Served, so recent for LRU eviction (the read itself is unleased).
                    drop(store.lease(&digest)?);
                    store.read_small(&digest, MAX_MANIFEST_BYTES).map(Some)
                }
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
        // The conversion goes on; the client is asked to come back. 429 is the one answer every
        // client tested retries (podman, skopeo after Retry-After, containerd at once; docker
        // 20.10 prints the message and stops): docs/PERFORMANCE.md, "First pulls".
        Err(_) => Err(V2Error::new(
            429,
            "TOOMANYREQUESTS",
            format!(
                "{raw}:{tag_or_digest} is being converted; pull again in {CONVERTING_RETRY_SECS} s"
            ),
        )
        .retry_after(CONVERTING_RETRY_SECS)),
    }
}

/// `DELETE …/manifests/<digest>`: 202 once the image is unlinked (its blobs go with GC); by tag,
/// only the tag. The caller must be able to pull the source upstream.
pub(super) async fn delete(
    state: &Arc<State>,
    raw: &str,
    tag_or_digest: &str,
    credentials: &Credentials,
) -> Result<Response<Body>> {
    let name = name(state, raw)?;
    let store = store(state)?;
    check_access(state, &name, credentials).await?;
    let unknown = || {
        V2Error::new(
            404,
            "MANIFEST_UNKNOWN",
            format!("manifest {tag_or_digest} is not in {raw}"),
        )
    };
    let deleted = match Digest::parse(tag_or_digest) {
        Ok(digest) => state
            .converter
            .delete_image(&name.repository, &digest)
            .await
            .map_err(|e| V2Error::from_convert(&e, "MANIFEST_UNKNOWN"))?,
        Err(_) => {
            names::check_tag(tag_or_digest)?;
            let (repo, tag) = (name.repository.clone(), tag_or_digest.to_string());
            blocking(move || store.delete_tag(&repo, &tag)).await?
        }
    };
    if !deleted {
        return Err(unknown());
    }
    let mut resp = super::super::json(202, &serde_json::json!({}));
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(2));
    Ok(resp)
}
