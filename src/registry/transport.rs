//! HTTP to registries and token endpoints: the reqwest client (TLS roots: compiled-in, the system
//! store and `--registry-ca`), requests sent with a deadline on their headers and retried when the
//! registry says "later", and bodies read with a bound on their size and their silences.
//!
//! No deadline covers a whole body: on a slow link a large layer takes as long as it takes, and only
//! a silence ([`ClientConfig::idle_timeout`](super::ClientConfig)) fails it. Small bodies (tokens,
//! error messages) are the exception: they are read under the response timeout, since a token that
//! takes longer than that to arrive is not a token.

use std::time::Duration;

use futures::StreamExt;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::Response;

use super::{error_chain, RegistryError};

/// A registry that does not answer a connection in this time is down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Redirects followed: a blob's redirect to storage, and maybe one more hop.
const MAX_REDIRECTS: usize = 5;
/// Retries of a request the registry answered with "later" or could not take: enough to ride out a
/// rate limit's short window, few enough that a dead registry is reported within seconds.
const RETRIES: u32 = 3;
/// First pause between retries, doubled each time when the registry names none.
const RETRY_BACKOFF: Duration = Duration::from_millis(250);
/// The longest pause a `Retry-After` may impose on a caller who is waiting.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(10);
/// Bytes of an error response kept for the message; the rest is never read.
pub const ERROR_BODY_KEEP: usize = 8 << 10;

/// The TLS and timeout side of a [`super::ClientConfig`].
pub struct HttpSettings<'a> {
    pub user_agent: &'a str,
    /// Trusted besides the compiled-in roots and the system store.
    pub ca_certificates: &'a [reqwest::Certificate],
}

/// The reqwest client. Trusted roots: Mozilla's, compiled in (so a container without
/// `ca-certificates` still reaches Docker Hub), the system store (`/etc/ssl/certs`, or
/// `SSL_CERT_FILE`/`SSL_CERT_DIR` when set: rustls-native-certs reads them), and `ca_certificates`.
pub fn build(settings: HttpSettings<'_>) -> Result<reqwest::Client, RegistryError> {
    let mut builder = reqwest::Client::builder()
        .user_agent(settings.user_agent)
        .connect_timeout(CONNECT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS));
    for cert in settings.ca_certificates {
        builder = builder.add_root_certificate(cert.clone());
    }
    builder
        .build()
        .map_err(|e| RegistryError::Upstream(format!("TLS set-up: {}", error_chain(&e))))
}

/// The certificates of a PEM file (one or several); a file with none is an error, since a CA file
/// that trusts nothing is a mistake.
pub fn parse_ca_bundle(pem: &[u8]) -> Result<Vec<reqwest::Certificate>, String> {
    let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| error_chain(&e))?;
    if certs.is_empty() {
        return Err("no PEM certificate in it".into());
    }
    Ok(certs)
}

/// Sends a GET; sends it again after a pause when the registry says "later" (429, 502, 503, 504),
/// cannot be reached or sends no headers within `response_timeout`, at most [`RETRIES`] more
/// times, waiting what `Retry-After` asks (capped at [`MAX_RETRY_WAIT`]) or a doubling backoff. The
/// last answer, good or bad, is the caller's. A certificate the registry's name does not verify
/// against is not retried: it will not verify the next time either.
pub async fn send_retrying(
    http: &reqwest::Client,
    url: &str,
    headers: HeaderMap,
    response_timeout: Duration,
) -> Result<Response, RegistryError> {
    let mut attempt = 0;
    loop {
        let request = http.get(url).headers(headers.clone()).send();
        let result = tokio::time::timeout(response_timeout, request).await;
        let backoff = RETRY_BACKOFF * 2u32.pow(attempt);
        let wait = match &result {
            Ok(Ok(r)) if matches!(r.status().as_u16(), 429 | 502 | 503 | 504) => Some(
                r.headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse().ok())
                    .map_or(backoff, Duration::from_secs),
            ),
            Ok(Err(e)) if tls_failure(e).is_some() => None,
            Ok(Err(e)) if e.is_connect() || e.is_timeout() => Some(backoff),
            Err(_) => Some(backoff),
            _ => None,
        };
        match wait {
            Some(wait) if attempt < RETRIES => {
                tracing::debug!(url, attempt, "registry busy or unreachable; retrying");
                tokio::time::sleep(wait.min(MAX_RETRY_WAIT)).await;
                attempt += 1;
            }
            _ => {
                return match result {
                    Ok(r) => r.map_err(|e| RegistryError::Upstream(send_failure(url, &e))),
                    Err(_) => Err(RegistryError::Upstream(format!(
                        "{url}: no response headers within {}s (--upstream-response-timeout)",
                        response_timeout.as_secs()
                    ))),
                };
            }
        }
    }
}

/// What went wrong sending to `url`, with a hint when it was the registry's certificate.
pub fn send_failure(url: &str, e: &reqwest::Error) -> String {
    match tls_failure(e) {
        Some(rustls::Error::InvalidCertificate(_)) => format!(
            "{url}: TLS: {} (a private CA? name it with --registry-ca or in the system store)",
            error_chain(e)
        ),
        Some(_) => format!("{url}: TLS: {}", error_chain(e)),
        None => format!("{url}: {}", error_chain(e)),
    }
}

/// The rustls error under a failed request, if TLS is what failed. tokio-rustls wraps it in an
/// `io::Error` and hyper-rustls wraps that in another; an `io::Error`'s `source()` skips what it
/// wraps, hence `get_ref`.
fn tls_failure(e: &reqwest::Error) -> Option<&rustls::Error> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        next = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner),
            None => err.source(),
        };
    }
    None
}

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("larger than {0} bytes")]
    TooLarge(u64),
    #[error("stalled: no data for {}s", .0.as_secs_f32())]
    Stalled(Duration),
    #[error("{0}")]
    Failed(String),
}

/// A body of at most `limit` bytes, read whole; a silence longer than `idle` fails it. Reading
/// stops at the first byte past `limit`, whatever the registry goes on sending.
pub async fn read_limited(
    resp: Response,
    limit: u64,
    idle: Duration,
) -> Result<Vec<u8>, BodyError> {
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    loop {
        let next = tokio::time::timeout(idle, stream.next())
            .await
            .map_err(|_| BodyError::Stalled(idle))?;
        let Some(chunk) = next else {
            return Ok(body);
        };
        let chunk = chunk.map_err(|e| BodyError::Failed(error_chain(&e)))?;
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(BodyError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
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

/// `url: status` and the first error the body names. At most [`ERROR_BODY_KEEP`] bytes of the body
/// are read, for at most `timeout`: an error page that does not end is not worth waiting for.
pub async fn describe(url: &str, resp: Response, timeout: Duration) -> String {
    let status = resp.status();
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    let read = async {
        while body.len() < ERROR_BODY_KEEP {
            match stream.next().await {
                Some(Ok(chunk)) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(timeout, read).await;
    body.truncate(ERROR_BODY_KEEP);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_needs_a_certificate() {
        assert!(parse_ca_bundle(b"not a certificate\n").is_err());
        assert!(parse_ca_bundle(b"").is_err());
    }
}
