//! The registry view: the read side of the OCI distribution API over the store of converted images.
//! `squash/<reference path>` names the squashed image of that upstream repository (parsed as
//! `/squash/<reference>` is, after `--registry-alias`); a manifest asked for by tag converts on first
//! use and answers when stored, or "retry later" past `--manifest-wait`. What is stored is served
//! by digest only to callers the upstream lets pull from the source repository (`token`).

mod blobs;
mod error;
mod listings;
mod manifests;
mod token;

use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Request, Response};
use hyper::body::Incoming;

use super::{empty, json, Body, State};
use crate::reference::Reference;
use crate::registry::Credentials;
use crate::store::{names, Store, StoreError};
use error::V2Error;

/// How long a first pull's manifest request waits for its conversion unless configured: under the
/// 30 s idle timeout common in front of registries, and 6 waits (containerd's retries) under
/// containerd CRI's 5 min pull-progress timeout.
pub const DEFAULT_MANIFEST_WAIT: Duration = Duration::from_secs(25);
/// The repository prefix of squashed images.
const SQUASH: &str = "squash/";
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
    let deleting = req.method() == Method::DELETE
        && state.settings.enable_delete
        && matches!(endpoint, Endpoint::Manifest { .. });
    if req.method() != Method::GET && req.method() != Method::HEAD && !deleting {
        return Err(V2Error::new(
            405,
            "UNSUPPORTED",
            "this registry serves GET and HEAD (and DELETE of manifests with --enable-delete)",
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
        Endpoint::Catalog => listings::catalog(req, state).await,
        Endpoint::Tags { name } => listings::tags(req, state, &name, &credentials).await,
        Endpoint::Manifest { name, reference } if req.method() == Method::DELETE => {
            manifests::delete(state, &name, &reference, &credentials).await
        }
        Endpoint::Manifest { name, reference } => {
            manifests::manifest(req, state, &name, &reference, credentials).await
        }
        Endpoint::Blob { name, digest } => {
            blobs::blob(req, state, &name, &digest, &credentials).await
        }
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

/// A `squash/…` repository name: the store's repository, and the upstream image it names.
struct Name {
    pub repository: String,
    pub upstream: String,
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

/// Whether the upstream lets this caller pull from the source repository now.
async fn check_access(state: &State, name: &Name, credentials: &Credentials) -> Result<()> {
    let reference = reference(state, &name.upstream, "")?;
    state
        .converter
        .check_access(&reference, credentials)
        .await
        .map_err(|e| V2Error::from_convert(&e, "NAME_UNKNOWN"))
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
