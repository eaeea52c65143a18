//! `_catalog` (the converted repositories the store holds) and `tags/list` (the upstream's tags:
//! what can be pulled, converted yet or not), paginated with `n`/`last` and a `Link` header.

use http::{header, HeaderValue, Request, Response};
use hyper::body::Incoming;

use super::super::{json, Body, State};
use super::error::V2Error;
use super::{blocking, name, reference, store, Result, MAX_PAGE};
use crate::registry::Credentials;

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
pub(super) async fn catalog(req: &Request<Incoming>, state: &State) -> Result<Response<Body>> {
    let store = store(state)?;
    let (n, last) = page_query(req)?;
    let page = blocking(move || store.repositories(last.as_deref(), n.or(Some(MAX_PAGE)))).await?;
    let mut resp = json(200, &serde_json::json!({ "repositories": page }));
    link_next(&mut resp, "/v2/_catalog", n, &page);
    Ok(resp)
}

/// The upstream's tags: what can be pulled, converted or not.
pub(super) async fn tags(
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
