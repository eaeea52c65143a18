//! What the server tells about itself: a request id per request (the caller's `X-Request-Id` when
//! it is a sane one, else a new one; sent back in the response), one log line per request written
//! when its body has ended (so the bytes are the bytes sent), the request and byte metrics, and the
//! `/metrics` and `/readyz` answers.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use prometheus_client::metrics::counter::Counter;

use super::{json, json_error, text, Body, State};
use crate::metrics::{Metrics, CONTENT_TYPE};
use crate::store::backend::READY_TIMEOUT;

pub const REQUEST_ID: &str = "x-request-id";
/// Longest caller id taken as it is: ids of tracing systems are 16 to 64 characters.
const MAX_REQUEST_ID: usize = 128;

/// The caller's id if it is one a log line can carry verbatim, else a new random one.
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|id| sane_id(id))
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()))
}

/// Printable, no spaces or quotes: nothing a log reader could mistake for another field.
fn sane_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(&b))
}

/// What routing learnt of a request, for its log line and metrics.
pub struct Seen {
    /// [`super::routes::Route::kind`], or what the request was answered as before it had one
    /// (`not_found`, `bad_request`, `discovery`).
    pub route: &'static str,
    pub reference: Option<String>,
}

/// Everything the log line needs besides the bytes.
pub struct Finish {
    pub id: String,
    pub method: Method,
    pub path: String,
    pub peer: std::net::SocketAddr,
    pub seen: Seen,
    pub status: u16,
    pub started: Instant,
    pub span: tracing::Span,
}

/// Counts the response, sets its id header, and wraps its body to log the request once it ends.
pub fn observed(mut resp: Response<Body>, finish: Finish, metrics: &Metrics) -> Response<Body> {
    metrics.request(finish.seen.route, finish.status);
    if let Ok(v) = HeaderValue::from_str(&finish.id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    let bytes = metrics.response_bytes_counter(finish.seen.route);
    let length = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    resp.map(|inner| {
        Observed {
            inner,
            sent: 0,
            length,
            bytes,
            ended: None,
            finish: Some(finish),
        }
        .boxed_unsync()
    })
}

struct Observed {
    inner: Body,
    sent: u64,
    /// `Content-Length`: hyper stops polling a body once that much is sent, before its end.
    length: Option<u64>,
    bytes: Counter,
    /// `Some(true)`: read to its end; `Some(false)`: failed.
    ended: Option<bool>,
    finish: Option<Finish>,
}

impl http_body::Body for Observed {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        // A conversion starts at the first poll: inside the request's span, its logs carry the id.
        let span = self.finish.as_ref().map(|f| f.span.clone());
        let _entered = span.as_ref().map(|s| s.enter());
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                    self.bytes.inc_by(data.len() as u64);
                }
            }
            Poll::Ready(Some(Err(_))) => self.ended = Some(false),
            Poll::Ready(None) => self.ended = Some(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        let Some(f) = self.finish.take() else { return };
        // A HEAD response's body is never sent; an empty one may never be polled; one of a known
        // length is not polled past it.
        let ended = self.ended.unwrap_or(
            f.method == Method::HEAD
                || self.inner.is_end_stream()
                || self.length == Some(self.sent),
        );
        let outcome = match self.ended {
            Some(false) => "aborted",
            _ if ended => "complete",
            _ => "client_gone",
        };
        let duration_ms = f.started.elapsed().as_millis() as u64;
        let reference = f.seen.reference.as_deref().unwrap_or("");
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    id = %f.id,
                    method = %f.method,
                    path = %f.path,
                    peer = %f.peer,
                    route = %f.seen.route,
                    reference = %reference,
                    status = f.status,
                    bytes = self.sent,
                    duration_ms,
                    outcome = %outcome,
                    "request finished"
                )
            };
        }
        // Each 5xx is logged once, here; a 503 is load shedding, not a failure of the service.
        if f.status >= 500 && f.status != 503 {
            line!(error);
        } else if outcome == "aborted" {
            line!(warn);
        } else {
            line!(info);
        }
    }
}

/// `GET /metrics`.
pub fn metrics(state: &State) -> Response<Body> {
    text(CONTENT_TYPE, state.converter.metrics().encode())
}

/// `GET /readyz`: 200 once the store answers a cheap request, 503 with the reason otherwise. A
/// server without a store (`--no-cache`) depends on nothing it could check.
pub async fn ready(state: &Arc<State>) -> Response<Body> {
    let Some(store) = state.converter.image_store().cloned() else {
        return json(200, &serde_json::json!({"status": "ready", "store": false}));
    };
    let probe = tokio::task::spawn_blocking(move || store.ready());
    // The backend bounds its own wait; this one only covers a blocking pool with no thread free.
    let failure = match tokio::time::timeout(READY_TIMEOUT + Duration::from_secs(1), probe).await {
        Ok(Ok(Ok(()))) => return json(200, &serde_json::json!({"status": "ready", "store": true})),
        Ok(Ok(Err(e))) => format!("the store does not answer: {e}"),
        Ok(Err(e)) => format!("the store probe failed: {e}"),
        Err(_) => format!(
            "the store did not answer within {}s",
            READY_TIMEOUT.as_secs()
        ),
    };
    tracing::warn!(reason = %failure, "not ready");
    json_error(503, "STORE_UNAVAILABLE", &failure)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_ids_are_kept_only_when_sane() {
        let id = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(REQUEST_ID, HeaderValue::from_str(v).unwrap());
            request_id(&h)
        };
        assert_eq!(id("abc-123_x.y:z"), "abc-123_x.y:z");
        assert_eq!(
            id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        for bad in ["", "a b", "a\"b", "x=\"1\" y", &"a".repeat(129)] {
            let made = id(bad);
            assert_ne!(made, bad);
            assert_eq!(made.len(), 32, "{made}");
            assert!(made.bytes().all(|b| b.is_ascii_hexdigit()), "{made}");
        }
        assert_ne!(request_id(&HeaderMap::new()), request_id(&HeaderMap::new()));
    }
}
