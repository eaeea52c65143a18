//! The distribution v2 client: manifests by tag or digest, blobs as verified byte streams, token and
//! basic auth with the caller's own credentials, or the service's when the caller sends none. Blob
//! redirects are followed by reqwest, which drops the `Authorization` header when a redirect leaves
//! the registry's host. `transport` holds the HTTP side (TLS roots, timeouts, retries, bounded
//! bodies).

pub mod auth;
pub mod service_auth;
pub mod transport;

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode};

use crate::digest::Digest;
use crate::limits::{LimitExceeded, DEFAULT_MAX_MANIFEST_BYTES};
use crate::reference::Reference;
use crate::source::{verify_stream, BlobStream, RawManifest};
use auth::{parse_challenge, Challenge, Principal, TokenCache, TokenKey, TokenResponse};
pub use service_auth::ServiceCredentials;
use transport::{describe, read_limited, send_failure, send_retrying, BodyError};

/// The caller's own `Authorization` header value (Basic), passed through upstream; never logged.
#[derive(Clone, Default)]
pub struct Credentials(pub Option<String>);

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Credentials(<redacted>)"
        } else {
            "Credentials(none)"
        })
    }
}

/// Every manifest type strata reads (docs/FORMATS.md §4), schema 1 last and least preferred: a registry
/// that has a schema 2 manifest then serves it, where one asked for schema 1 only would convert it
/// to schema 1 (distribution does, for a client that does not name schema 2).
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.v1+prettyjws;q=0.5, \
application/vnd.docker.distribution.manifest.v1+json;q=0.5";
/// Longest wait for a response's status and headers (not its body).
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest silence in the middle of a body before it counts as stalled.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Upstream(String),
    /// A manifest, index or config that is not what the image format allows: the image's fault.
    #[error("{0}")]
    Invalid(String),
    /// The image goes past one of the configured limits: its fault, not the registry's.
    #[error("{context}: {limit}")]
    Limit {
        context: String,
        limit: LimitExceeded,
    },
}

impl RegistryError {
    /// The HTTP status a caller of strata should see.
    pub fn status(&self) -> u16 {
        match self {
            RegistryError::Unauthorized(_) => 401,
            RegistryError::Denied(_) => 403,
            RegistryError::NotFound(_) => 404,
            RegistryError::Upstream(_)
            | RegistryError::Invalid(_)
            | RegistryError::Limit { .. } => 502,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host[:port]` reached over plain HTTP.
    pub insecure: Vec<String>,
    pub user_agent: String,
    /// How long a body may send nothing before its transfer counts as failed.
    pub idle_timeout: Duration,
    /// How long a registry may take to send a response's status and headers.
    pub response_timeout: Duration,
    /// Longest manifest or index read.
    pub max_manifest_bytes: u64,
    /// CAs trusted besides the compiled-in roots and the system store (`--registry-ca`).
    pub ca_certificates: Vec<reqwest::Certificate>,
    /// Used for callers who send no credentials of their own.
    pub service_credentials: ServiceCredentials,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            insecure: Vec::new(),
            user_agent: format!("strata/{}", env!("CARGO_PKG_VERSION")),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            max_manifest_bytes: DEFAULT_MAX_MANIFEST_BYTES,
            ca_certificates: Vec::new(),
            service_credentials: ServiceCredentials::default(),
        }
    }
}

pub struct Client {
    http: reqwest::Client,
    insecure: Vec<String>,
    tokens: TokenCache,
    idle_timeout: Duration,
    response_timeout: Duration,
    max_manifest_bytes: u64,
    service_credentials: ServiceCredentials,
}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Client, RegistryError> {
        let http = transport::build(transport::HttpSettings {
            user_agent: &config.user_agent,
            ca_certificates: &config.ca_certificates,
        })?;
        Ok(Client {
            http,
            insecure: config.insecure,
            tokens: TokenCache::default(),
            idle_timeout: config.idle_timeout,
            response_timeout: config.response_timeout,
            max_manifest_bytes: config.max_manifest_bytes,
            service_credentials: config.service_credentials,
        })
    }

    fn url(&self, reference: &Reference, path: &str) -> String {
        let scheme = if self.insecure.contains(&reference.registry) {
            "http"
        } else {
            "https"
        };
        format!(
            "{scheme}://{}/v2/{}/{path}",
            reference.api_host(),
            reference.repository
        )
    }

    /// The credentials a request for `reference` carries, and whose they are: the caller's when they
    /// sent any (right or wrong: never replaced by the service's), else the service's for that
    /// registry, else none.
    fn principal(
        &self,
        reference: &Reference,
        caller: &Credentials,
    ) -> (Option<String>, Principal) {
        match &caller.0 {
            Some(c) => (Some(c.clone()), Principal::caller(c)),
            None => match self.service_credentials.for_registry(&reference.registry) {
                Some(s) => (Some(s.to_string()), Principal::Service),
                None => (None, Principal::Anonymous),
            },
        }
    }

    /// GET with auth: a cached token first; on 401, the challenge's token flow or basic auth.
    async fn get(
        &self,
        reference: &Reference,
        path: &str,
        accept: Option<&str>,
        credentials: &Credentials,
    ) -> Result<(String, Response), RegistryError> {
        let mut headers = HeaderMap::new();
        if let Some(a) = accept {
            headers.insert(
                ACCEPT,
                HeaderValue::from_str(a).expect("static accept value"),
            );
        }
        self.get_with(reference, path, headers, credentials).await
    }

    async fn get_with(
        &self,
        reference: &Reference,
        path: &str,
        base: HeaderMap,
        credentials: &Credentials,
    ) -> Result<(String, Response), RegistryError> {
        let url = self.url(reference, path);
        let (credentials, principal) = self.principal(reference, credentials);
        let key = TokenKey::new(&reference.registry, &reference.repository, principal);
        let mut auth = self.tokens.get(&key).map(|t| format!("Bearer {t}"));
        for attempt in 0..2 {
            let mut headers = base.clone();
            if let Some(a) = &auth {
                let value = HeaderValue::from_str(a)
                    .map_err(|_| RegistryError::Unauthorized("malformed credentials".into()))?;
                headers.insert(AUTHORIZATION, value);
            }
            let resp = send_retrying(&self.http, &url, headers, self.response_timeout).await?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && attempt == 0 {
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_challenge);
                auth = match challenge {
                    Some(Challenge::Bearer {
                        realm,
                        service,
                        scope,
                    }) => {
                        let scope = scope
                            .unwrap_or_else(|| format!("repository:{}:pull", reference.repository));
                        let token = self
                            .token(&realm, service.as_deref(), &scope, credentials.as_deref())
                            .await?;
                        self.tokens.put(key.clone(), token.0.clone(), token.1);
                        Some(format!("Bearer {}", token.0))
                    }
                    Some(Challenge::Basic) if credentials.is_some() => credentials.clone(),
                    _ => return Err(RegistryError::Unauthorized(self.describe(&url, resp).await)),
                };
                continue;
            }
            return match status {
                s if s.is_success() => Ok((url, resp)),
                StatusCode::UNAUTHORIZED => {
                    Err(RegistryError::Unauthorized(self.describe(&url, resp).await))
                }
                StatusCode::FORBIDDEN => {
                    Err(RegistryError::Denied(self.describe(&url, resp).await))
                }
                StatusCode::NOT_FOUND => {
                    Err(RegistryError::NotFound(self.describe(&url, resp).await))
                }
                _ => Err(RegistryError::Upstream(self.describe(&url, resp).await)),
            };
        }
        unreachable!("the loop returns on its second attempt")
    }

    async fn describe(&self, url: &str, resp: Response) -> String {
        describe(url, resp, self.response_timeout).await
    }

    /// A token from `realm` for `scope`, asked for with `credentials` (Basic) when there are any. The
    /// response is read up to [`auth::MAX_TOKEN_RESPONSE`] bytes, within the response timeout.
    async fn token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        credentials: Option<&str>,
    ) -> Result<(String, Option<u64>), RegistryError> {
        let mut query = vec![("scope", scope)];
        if let Some(s) = service {
            query.push(("service", s));
        }
        let mut req = self.http.get(realm).query(&query);
        if let Some(c) = credentials {
            req = req.header(AUTHORIZATION, c);
        }
        let upstream = |detail: String| RegistryError::Upstream(format!("token endpoint {detail}"));
        let resp = tokio::time::timeout(self.response_timeout, req.send())
            .await
            .map_err(|_| {
                upstream(format!(
                    "{realm}: no response headers within {}s",
                    self.response_timeout.as_secs()
                ))
            })?
            .map_err(|e| upstream(send_failure(realm, &e)))?;
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED => {
                return Err(RegistryError::Unauthorized(
                    self.describe(realm, resp).await,
                ))
            }
            StatusCode::FORBIDDEN => {
                return Err(RegistryError::Denied(self.describe(realm, resp).await))
            }
            _ => return Err(upstream(self.describe(realm, resp).await)),
        }
        let read = read_limited(resp, auth::MAX_TOKEN_RESPONSE, self.idle_timeout);
        let body = match tokio::time::timeout(self.response_timeout, read).await {
            Ok(Ok(body)) => body,
            Ok(Err(BodyError::TooLarge(_))) => {
                return Err(upstream(format!(
                    "{realm}: response larger than {} KiB",
                    auth::MAX_TOKEN_RESPONSE >> 10
                )))
            }
            Ok(Err(e)) => return Err(upstream(format!("{realm}: {e}"))),
            Err(_) => {
                return Err(upstream(format!(
                    "{realm}: response not complete within {}s",
                    self.response_timeout.as_secs()
                )))
            }
        };
        let body: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| upstream(format!("{realm}: bad response: {e}")))?;
        let token = body
            .token
            .or(body.access_token)
            .ok_or_else(|| upstream(format!("{realm}: no token")))?;
        Ok((token, body.expires_in))
    }

    /// A manifest by tag or digest; its bytes are checked against the digest asked for, or the one the
    /// registry announces.
    pub async fn manifest(
        &self,
        reference: &Reference,
        tag_or_digest: &str,
        credentials: &Credentials,
    ) -> Result<RawManifest, RegistryError> {
        let (url, resp) = self
            .get(
                reference,
                &format!("manifests/{tag_or_digest}"),
                Some(MANIFEST_ACCEPT),
                credentials,
            )
            .await?;
        let media_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
            .unwrap_or_default();
        let announced = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok());
        let body = match read_limited(resp, self.max_manifest_bytes, self.idle_timeout).await {
            Ok(body) => body,
            Err(BodyError::TooLarge(limit)) => return Err(manifest_too_large(url, limit)),
            Err(e) => return Err(RegistryError::Upstream(format!("{url}: {e}"))),
        };
        // A signed schema 1 manifest is known by the digest of its payload, without the signatures.
        let payload = crate::manifest::schema1::signed_payload(&body)
            .map_err(|e| RegistryError::Invalid(format!("{url}: {e}")))?;
        let content = payload.as_deref().unwrap_or(&body);
        let expected = Digest::parse(tag_or_digest).ok().or(announced);
        let digest = match &expected {
            Some(e) => Digest::of_with(e.algorithm(), content),
            None => Digest::of(content),
        };
        if let Some(expected) = expected {
            if expected != digest {
                return Err(RegistryError::Upstream(format!(
                    "{url}: manifest digest is {digest}, expected {expected}"
                )));
            }
        }
        Ok(RawManifest {
            bytes: Bytes::from(body),
            media_type,
            digest,
        })
    }

    /// One page of the repository's tags (`n`/`last` as the distribution spec has them); whether
    /// the registry said more follow (a `Link` header).
    pub async fn tags(
        &self,
        reference: &Reference,
        n: Option<usize>,
        last: Option<&str>,
        credentials: &Credentials,
    ) -> Result<(Vec<String>, bool), RegistryError> {
        let mut query: Vec<String> = Vec::new();
        if let Some(n) = n {
            query.push(format!("n={n}"));
        }
        if let Some(last) = last {
            query.push(format!(
                "last={}",
                percent_encoding::utf8_percent_encode(last, percent_encoding::NON_ALPHANUMERIC)
            ));
        }
        let path = if query.is_empty() {
            "tags/list".to_string()
        } else {
            format!("tags/list?{}", query.join("&"))
        };
        let (url, resp) = self.get(reference, &path, None, credentials).await?;
        let more = resp.headers().contains_key(reqwest::header::LINK);
        let body = match read_limited(resp, self.max_manifest_bytes, self.idle_timeout).await {
            Ok(body) => body,
            Err(BodyError::TooLarge(limit)) => return Err(manifest_too_large(url, limit)),
            Err(e) => return Err(RegistryError::Upstream(format!("{url}: {e}"))),
        };
        #[derive(serde::Deserialize)]
        struct TagList {
            tags: Option<Vec<String>>,
        }
        let list: TagList = serde_json::from_slice(&body)
            .map_err(|e| RegistryError::Invalid(format!("{url}: bad tag list: {e}")))?;
        Ok((list.tags.unwrap_or_default(), more))
    }

    /// A blob as a stream whose digest and size are verified as it flows.
    pub async fn blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        size: u64,
        credentials: &Credentials,
    ) -> Result<BlobStream, RegistryError> {
        let (url, resp) = self
            .get(reference, &format!("blobs/{digest}"), None, credentials)
            .await?;
        let stream = resp.bytes_stream().map(move |r| {
            r.map_err(|e| std::io::Error::other(format!("{url}: {}", error_chain(&e))))
        });
        Ok(verify_stream(
            Box::pin(stream),
            digest.clone(),
            size,
            self.idle_timeout,
        ))
    }

    /// Bytes `range` of a blob, unverified (a blob's digest covers all of it): `None` when the
    /// registry answers with the whole blob instead, as one that ignores `Range` does.
    pub async fn blob_range(
        &self,
        reference: &Reference,
        digest: &Digest,
        range: std::ops::Range<u64>,
        credentials: &Credentials,
    ) -> Result<Option<Bytes>, RegistryError> {
        if range.is_empty() {
            return Ok(Some(Bytes::new()));
        }
        let mut headers = HeaderMap::new();
        let value = format!("bytes={}-{}", range.start, range.end - 1);
        headers.insert(
            reqwest::header::RANGE,
            HeaderValue::from_str(&value).expect("ascii range"),
        );
        let (url, resp) = self
            .get_with(reference, &format!("blobs/{digest}"), headers, credentials)
            .await?;
        if resp.status() != StatusCode::PARTIAL_CONTENT {
            return Ok(None);
        }
        let want = range.end - range.start;
        match read_limited(resp, want, self.idle_timeout).await {
            Ok(body) if body.len() as u64 == want => Ok(Some(Bytes::from(body))),
            Ok(_) | Err(BodyError::TooLarge(_)) => Ok(None),
            Err(e) => Err(RegistryError::Upstream(format!("{url}: {e}"))),
        }
    }
}

/// A manifest (or index) past `--max-manifest-bytes`; `context` names where it came from.
pub fn manifest_too_large(context: String, limit: u64) -> RegistryError {
    RegistryError::Limit {
        context,
        limit: LimitExceeded {
            what: "the manifest",
            limit,
            flag: "max-manifest-bytes",
        },
    }
}

/// reqwest's errors hide the cause (connection refused, reset) a level down.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
