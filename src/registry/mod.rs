//! The distribution v2 client: manifests by tag or digest, blobs as verified byte streams, token and
//! basic auth with the caller's own credentials. Blob redirects are followed by reqwest, which drops
//! the `Authorization` header when a redirect leaves the registry's host.

pub mod auth;

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use reqwest::header::{
    HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, RETRY_AFTER, WWW_AUTHENTICATE,
};
use reqwest::{Response, StatusCode};

use crate::digest::Digest;
use crate::limits::{LimitExceeded, DEFAULT_MAX_MANIFEST_BYTES};
use crate::reference::Reference;
use crate::source::{verify_stream, BlobStream, RawManifest};
use auth::{parse_challenge, Challenge, TokenCache, TokenKey, TokenResponse};

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

/// Every manifest type strata reads (FORMATS.md §4), schema 1 last and least preferred: a registry
/// that has a schema 2 manifest then serves it, where one asked for schema 1 only would convert it
/// to schema 1 (distribution does, for a client that does not name schema 2).
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.v1+prettyjws;q=0.5, \
application/vnd.docker.distribution.manifest.v1+json;q=0.5";
/// A registry that does not answer a connection in this time is down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for response headers.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest silence in the middle of a blob before it counts as stalled.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Retries of a request the registry answered with "later" or could not take: enough to ride out a
/// rate limit's short window, few enough that a dead registry is reported within seconds.
const RETRIES: u32 = 3;
/// First pause between retries, doubled each time when the registry names none.
const RETRY_BACKOFF: Duration = Duration::from_millis(250);
/// The longest pause a `Retry-After` may impose on a caller who is waiting.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(10);

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
    /// How long a blob may send nothing before its transfer counts as failed.
    pub idle_timeout: Duration,
    /// Longest manifest or index read.
    pub max_manifest_bytes: u64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            insecure: Vec::new(),
            user_agent: format!("strata/{}", env!("CARGO_PKG_VERSION")),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_manifest_bytes: DEFAULT_MAX_MANIFEST_BYTES,
        }
    }
}

pub struct Client {
    http: reqwest::Client,
    insecure: Vec<String>,
    tokens: TokenCache,
    idle_timeout: Duration,
    max_manifest_bytes: u64,
}

/// The registry's error body: `{"errors":[{"code":…,"message":…}]}`.
#[derive(serde::Deserialize)]
struct ErrorBody {
    errors: Vec<ErrorEntry>,
}
#[derive(serde::Deserialize)]
struct ErrorEntry {
    code: Option<String>,
    message: Option<String>,
}

async fn describe(url: &str, resp: Response) -> String {
    let status = resp.status();
    let body = resp.bytes().await.unwrap_or_default();
    let detail = serde_json::from_slice::<ErrorBody>(&body)
        .ok()
        .and_then(|b| b.errors.into_iter().next())
        .map(|e| {
            format!(
                ": {} {}",
                e.code.unwrap_or_default(),
                e.message.unwrap_or_default()
            )
        })
        .unwrap_or_default();
    format!("{url}: {status}{detail}")
}

impl Client {
    pub fn new(config: ClientConfig) -> Client {
        let http = reqwest::Client::builder()
            .user_agent(config.user_agent)
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(5))
            .build()
            .expect("TLS backend initialises");
        Client {
            http,
            insecure: config.insecure,
            tokens: TokenCache::default(),
            idle_timeout: config.idle_timeout,
            max_manifest_bytes: config.max_manifest_bytes,
        }
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

    /// GET with auth: a cached token first; on 401, the challenge's token flow or basic auth.
    async fn get(
        &self,
        reference: &Reference,
        path: &str,
        accept: Option<&str>,
        credentials: &Credentials,
    ) -> Result<(String, Response), RegistryError> {
        let url = self.url(reference, path);
        let key = TokenKey::new(
            &reference.registry,
            &reference.repository,
            credentials.0.as_deref(),
        );
        let mut auth = self.tokens.get(&key).map(|t| format!("Bearer {t}"));
        for attempt in 0..2 {
            let mut headers = HeaderMap::new();
            if let Some(a) = accept {
                headers.insert(
                    ACCEPT,
                    HeaderValue::from_str(a).expect("static accept value"),
                );
            }
            if let Some(a) = &auth {
                let value = HeaderValue::from_str(a)
                    .map_err(|_| RegistryError::Unauthorized("malformed credentials".into()))?;
                headers.insert(AUTHORIZATION, value);
            }
            let resp = self.send_retrying(&url, headers).await?;
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
                            .token(&realm, service.as_deref(), &scope, credentials)
                            .await?;
                        self.tokens.put(key.clone(), token.0.clone(), token.1);
                        Some(format!("Bearer {}", token.0))
                    }
                    Some(Challenge::Basic) if credentials.0.is_some() => credentials.0.clone(),
                    _ => return Err(RegistryError::Unauthorized(describe(&url, resp).await)),
                };
                continue;
            }
            return match status {
                s if s.is_success() => Ok((url, resp)),
                StatusCode::UNAUTHORIZED => {
                    Err(RegistryError::Unauthorized(describe(&url, resp).await))
                }
                StatusCode::FORBIDDEN => Err(RegistryError::Denied(describe(&url, resp).await)),
                StatusCode::NOT_FOUND => Err(RegistryError::NotFound(describe(&url, resp).await)),
                _ => Err(RegistryError::Upstream(describe(&url, resp).await)),
            };
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// Sends a GET; sends it again after a pause when the registry says "later" (429, 502, 503, 504)
    /// or cannot be reached, at most [`RETRIES`] more times, waiting what `Retry-After` asks (capped at
    /// [`MAX_RETRY_WAIT`]) or a doubling backoff. The last answer, good or bad, is the caller's.
    async fn send_retrying(
        &self,
        url: &str,
        headers: HeaderMap,
    ) -> Result<Response, RegistryError> {
        let mut attempt = 0;
        loop {
            let result = self
                .http
                .get(url)
                .headers(headers.clone())
                .timeout(RESPONSE_TIMEOUT)
                .send()
                .await;
            let backoff = RETRY_BACKOFF * 2u32.pow(attempt);
            let wait = match &result {
                Ok(r) if matches!(r.status().as_u16(), 429 | 502 | 503 | 504) => Some(
                    r.headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse().ok())
                        .map_or(backoff, Duration::from_secs),
                ),
                Err(e) if e.is_connect() || e.is_timeout() => Some(backoff),
                _ => None,
            };
            match wait {
                Some(wait) if attempt < RETRIES => {
                    tracing::debug!(url, attempt, "registry busy or unreachable; retrying");
                    tokio::time::sleep(wait.min(MAX_RETRY_WAIT)).await;
                    attempt += 1;
                }
                _ => {
                    return result.map_err(|e| {
                        RegistryError::Upstream(format!("{url}: {}", error_chain(&e)))
                    })
                }
            }
        }
    }

    async fn token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        credentials: &Credentials,
    ) -> Result<(String, Option<u64>), RegistryError> {
        let mut query = vec![("scope", scope)];
        if let Some(s) = service {
            query.push(("service", s));
        }
        let mut req = self.http.get(realm).query(&query).timeout(RESPONSE_TIMEOUT);
        if let Some(c) = &credentials.0 {
            req = req.header(AUTHORIZATION, c.as_str());
        }
        let resp = req.send().await.map_err(|e| {
            RegistryError::Upstream(format!("token endpoint {realm}: {}", error_chain(&e)))
        })?;
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED => {
                return Err(RegistryError::Unauthorized(describe(realm, resp).await))
            }
            StatusCode::FORBIDDEN => {
                return Err(RegistryError::Denied(describe(realm, resp).await))
            }
            _ => {
                return Err(RegistryError::Upstream(format!(
                    "token endpoint {}",
                    describe(realm, resp).await
                )))
            }
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| RegistryError::Upstream(format!("token endpoint {realm}: {e}")))?;
        let body: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            RegistryError::Upstream(format!("token endpoint {realm}: bad response: {e}"))
        })?;
        let token = body
            .token
            .or(body.access_token)
            .ok_or_else(|| RegistryError::Upstream(format!("token endpoint {realm}: no token")))?;
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
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|e| RegistryError::Upstream(format!("{url}: {}", error_chain(&e))))?;
            if (body.len() + chunk.len()) as u64 > self.max_manifest_bytes {
                return Err(manifest_too_large(url, self.max_manifest_bytes));
            }
            body.extend_from_slice(&chunk);
        }
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
