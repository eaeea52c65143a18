//! Blobs from the store: only those a manifest of the repository names, after an upstream access
//! check; `Range` (206, 416) so interrupted pulls resume. With `--blob-redirect` (S3 store), a GET
//! is answered `307` to a presigned URL of the object instead, as distribution's S3 driver does:
//! the bucket sends the bytes (and honours `Range`), the replica sends none.

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};

use super::super::{empty, Body, State};
use super::error::V2Error;
use super::{blocking, check_access, name, store, Result};
use crate::digest::Digest;
use crate::registry::Credentials;

/// How long a redirect's presigned URL is valid: only its request must start within it (a transfer
/// may outlast it), so it is short, with room for a client's queue of layers and clock skew.
const REDIRECT_EXPIRY: std::time::Duration = std::time::Duration::from_secs(300);

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

pub(super) async fn blob(
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
    if state.settings.blob_redirect && req.method() == Method::GET {
        let url = blocking({
            let (store, digest) = (store.clone(), digest.clone());
            move || {
                // A redirected read is an access for LRU eviction, as a served one is.
                drop(store.lease(&digest)?);
                store.blob_url(&digest, REDIRECT_EXPIRY)
            }
        })
        .await?;
        if let Some(url) = url {
            tracing::debug!(%digest, "blob redirected");
            return Ok(Response::builder()
                .status(StatusCode::TEMPORARY_REDIRECT)
                .header(header::LOCATION, url)
                .header("docker-content-digest", digest.to_string())
                .header(header::CONTENT_LENGTH, 0)
                .body(empty())
                .expect("valid response"));
        }
    }
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
        let len = reader.range.end - reader.range.start;
        let chunks = crate::convert::stream_blob(reader, len, None);
        BodyExt::boxed_unsync(StreamBody::new(futures::StreamExt::map(chunks, |c| {
            c.map(Frame::data)
        })))
    };
    Ok(builder.body(body).expect("valid response"))
}
