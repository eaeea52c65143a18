//! The HTTP front: routes, the one place errors become responses (JSON before the first byte, an
//! aborted connection after it), a concurrency limit, and graceful shutdown.

pub mod discovery;
mod distribution;
mod hooks;
mod observe;
pub mod routes;
mod tarball;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::convert::{AciRequest, AciSignature, Converter, Error, SquashRequest};
use crate::format::aci::names::platform_from_appc;
use crate::manifest::Platform;
use crate::registry::Credentials;
use crate::stats::Stats;
pub use distribution::DEFAULT_MANIFEST_WAIT;
pub use hooks::HookToken;
use routes::{AciRoute, Route, RouteError};

/// Conversions served at once unless configured: each holds a blocking thread and a few MiB.
pub const DEFAULT_MAX_CONCURRENT: usize = 16;
/// How long in-flight conversions may run after SIGTERM unless configured.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How long a client may take to send a request's headers unless configured: long enough for any
/// real client on a slow link, short enough that connections trickling bytes (slowloris) are let go.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Client connections held at once unless configured: each costs a task and a socket, and idle
/// keep-alive clients must not exhaust the descriptors conversions need.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// What an overloaded server asks clients to wait.
const RETRY_AFTER_SECS: &str = "5";
/// How long a connection beyond the limit is kept to be told 503 before it is dropped.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub max_concurrent: usize,
    pub shutdown_grace: Duration,
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// The appc name prefix discovery answers for (a host name, no port).
    pub public_name: Option<String>,
    /// Base URL of the discovery templates; by default the one the discovery request came in on.
    pub public_url: Option<String>,
    /// `squash/NAME/…` of the registry view names this registry (`--registry-alias`).
    pub registry_aliases: Vec<(String, String)>,
    /// How long a registry-view manifest request waits for a conversion.
    pub manifest_wait: Duration,
    /// Whether the registry view accepts `DELETE` of a converted image.
    pub enable_delete: bool,
    /// Whether blob GETs of the registry view are answered with a redirect to the object store.
    pub blob_redirect: bool,
    /// The secret push notifications carry; without one, `/hooks/registry` is not served.
    pub hook_token: Option<HookToken>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            public_name: None,
            public_url: None,
            registry_aliases: Vec::new(),
            manifest_wait: DEFAULT_MANIFEST_WAIT,
            enable_delete: false,
            blob_redirect: false,
            hook_token: None,
        }
    }
}

type Body = UnsyncBoxBody<Bytes, io::Error>;

struct State {
    converter: Arc<Converter>,
    permits: Arc<Semaphore>,
    settings: ServerSettings,
    hooks: hooks::Hooks,
}

/// Serves until `shutdown` completes, then lets open connections finish for the grace period.
pub async fn run(
    listener: TcpListener,
    converter: Arc<Converter>,
    settings: ServerSettings,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let state = Arc::new(State {
        converter,
        permits: Arc::new(Semaphore::new(settings.max_concurrent)),
        settings: settings.clone(),
        hooks: hooks::Hooks::new(settings.hook_token.as_ref()),
    });
    let connections = Arc::new(Semaphore::new(settings.max_connections));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(held) = connections.clone().try_acquire_owned() else {
                    tokio::spawn(refuse(stream, peer));
                    continue;
                };
                let state = state.clone();
                let service = service_fn(move |req| handle(req, state.clone(), peer));
                let conn = http.serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _held = held;
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: waiting for in-flight conversions");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(settings.shutdown_grace) => tracing::warn!("grace period over; aborting the rest"),
    }
    Ok(())
}

/// A connection beyond `--max-connections`: a 503 without reading the request, then closed.
async fn refuse(mut stream: tokio::net::TcpStream, peer: SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tracing::warn!(%peer, "connection limit reached; refusing a connection");
    let body = r#"{"error":{"code":"OVERLOADED","message":"too many connections"}}"#;
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: {RETRY_AFTER_SECS}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
        stream.write_all(resp.as_bytes()).await?;
        stream.shutdown().await?;
        // Closing with the request unread would reset the connection, and the client could lose the
        // 503 it was sent: drain what it sends until it closes, or the timeout.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), io::Error>(())
    })
    .await;
}

fn json(status: u16, body: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec(body).expect("serialisable");
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|e: Infallible| match e {})
            .boxed_unsync(),
    );
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn json_error(status: u16, code: &str, message: &str) -> Response<Body> {
    json(
        status,
        &serde_json::json!({"error": {"code": code, "message": message}}),
    )
}

fn from_error(e: &Error) -> Response<Body> {
    let mut resp = json_error(e.status(), e.code(), &e.to_string());
    if matches!(e, Error::Overloaded) {
        resp.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_static(RETRY_AFTER_SECS),
        );
    }
    resp
}

fn empty() -> Body {
    Empty::new()
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
    peer: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let id = observe::request_id(req.headers());
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let span = tracing::info_span!("request", %id, %method, %path, %peer);
    let mut seen = observe::Seen {
        route: "not_found",
        reference: None,
    };
    let resp = respond(req, &state, &mut seen)
        .instrument(span.clone())
        .await;
    let finish = observe::Finish {
        id,
        method,
        path,
        peer,
        seen,
        status: resp.status().as_u16(),
        started,
        span,
    };
    Ok(observe::observed(resp, finish, state.converter.metrics()))
}

fn text(content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(body.into())
            .map_err(|e: Infallible| match e {})
            .boxed_unsync(),
    );
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

async fn respond(
    req: Request<Incoming>,
    state: &Arc<State>,
    seen: &mut observe::Seen,
) -> Response<Body> {
    if routes::is_discovery(req.uri().query()) && req.method() == Method::GET {
        seen.route = "discovery";
        return discovery::page(&req, &state.settings);
    }
    let route = match routes::route(req.uri().path()) {
        Ok(r) => r,
        Err(RouteError::NotFound(p)) => {
            return json_error(404, "NOT_FOUND", &format!("no such route: {p}"))
        }
        Err(RouteError::BadRequest(m)) => {
            seen.route = "bad_request";
            return json_error(400, "BAD_REQUEST", &m);
        }
    };
    seen.route = route.kind();
    seen.reference = route.reference();
    if let Route::Distribution(path) = &route {
        return distribution::respond(&req, state, path).await;
    }
    if route == Route::Hook {
        return hooks::respond(req, state).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = json_error(405, "METHOD_NOT_ALLOWED", "only GET and HEAD are served");
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let reference = match route {
        Route::Health => {
            return Response::new(
                Full::new(Bytes::from_static(b"ok\n"))
                    .map_err(|e: Infallible| match e {})
                    .boxed_unsync(),
            )
        }
        Route::Ready => return observe::ready(state).await,
        Route::Metrics => return observe::metrics(state),
        Route::SigningKey => {
            return match state.converter.public_key() {
                Some(key) => text("application/pgp-keys", key.to_string()),
                None => json_error(
                    404,
                    "NOT_FOUND",
                    "this service signs nothing (no --signing-key)",
                ),
            }
        }
        Route::Aci(aci) => {
            return match serve_aci(&req, state, aci).await {
                Ok(resp) => resp,
                Err(e) => from_error(&e),
            }
        }
        Route::Stats => {
            return json(
                200,
                &Stats {
                    conversions: state.converter.live_conversions(),
                    tasks: tokio::runtime::Handle::current()
                        .metrics()
                        .num_alive_tasks(),
                },
            )
        }
        Route::Squash(r) => r,
        Route::Distribution(_) | Route::Hook => unreachable!("answered above"),
    };
    match squash(&req, state, &reference).await {
        Ok(resp) => resp,
        Err(e) => from_error(&e),
    }
}

/// The caller's own registry credentials, passed through.
fn credentials(req: &Request<Incoming>) -> Credentials {
    Credentials(
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.starts_with("Basic "))
            .map(str::to_string),
    )
}

/// Whether the client already holds these bytes: `If-None-Match` lists the (quoted) ETag, or is `*`
/// (RFC 9110 §13.1.2; weak comparison, so a `W/` prefix matches too).
fn not_modified(req: &Request<Incoming>, etag: &str) -> bool {
    req.headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag).trim_matches('"') == etag)
}

async fn serve_aci(
    req: &Request<Incoming>,
    state: &Arc<State>,
    route: AciRoute,
) -> Result<Response<Body>, Error> {
    if req.uri().query().is_some_and(|q| !q.is_empty()) {
        return Err(Error::BadRequest(
            "ACI routes take no query parameters".into(),
        ));
    }
    let platform = platform_from_appc(&route.os, &route.arch).map_err(Error::BadRequest)?;
    let reference = state
        .converter
        .parse_reference(&format!("{}:{}", route.repository, route.tag))?;
    let request = AciRequest {
        reference,
        platform,
        credentials: credentials(req),
        name: format!("{}/{}", route.server, route.repository),
        version: Some(route.tag.clone()),
    };
    if route.signature {
        return signature(state, request).await;
    }
    let permit = slot(state)?;
    let aci_request = request.clone();
    let planned = state.converter.plan_aci(request).await?;
    let file = format!("{}-{}.aci", file_name(&planned.name), file_name(&route.tag));
    let etag = planned.etag.clone();
    let headers = || tar_headers(&etag, &file);
    if not_modified(req, &planned.etag) {
        return Ok(not_modified_response(headers()));
    }
    // A stored response holds no conversion slot: the permit is dropped with this function.
    if let Some(stored) = state.converter.stored_aci(&planned).await {
        let resp = tarball::stored(req, &state.converter, headers(), &etag, &stored);
        if let Some(resp) = resp.await? {
            return Ok(resp);
        }
    }
    // A fresh ACI's length is not known ahead: HEAD answers without it, and a Range is answered
    // whole (RFC 9110 allows it), since a 206 needs the total.
    if req.method() == Method::HEAD {
        return Ok(headers().body(empty()).expect("valid response"));
    }
    // Waiting for another conversion of these bytes holds no slot: it takes no thread.
    drop(permit);
    let mut planned = planned;
    if let Some(stored) = state.converter.aci_turn(&mut planned).await {
        let resp = tarball::stored(req, &state.converter, headers(), &etag, &stored);
        if let Some(resp) = resp.await? {
            return Ok(resp);
        }
    }
    let permit = slot(state)?;
    let prepared = state
        .converter
        .prepare_held_aci(planned, aci_request)
        .await?;
    Ok(streaming(headers(), prepared.body, permit))
}

/// `.aci.asc`: the kept signature, or 202 while none exists. rkt asks for the signature first and, on
/// 202, downloads the ACI and asks once more; that download keeps the signature before its last bytes
/// leave. A conversion is also started here, so a signature comes to exist even if the ACI is then
/// fetched from another instance.
async fn signature(state: &Arc<State>, request: AciRequest) -> Result<Response<Body>, Error> {
    match state.converter.aci_signature(&request).await? {
        None => Err(Error::NotFound(
            "this service signs nothing (no --signing-key)".into(),
        )),
        Some(AciSignature::Ready(sig)) => Ok(text("application/pgp-signature", sig)),
        Some(AciSignature::Pending { key }) => {
            if let Ok(permit) = slot(state) {
                let converter = state.converter.clone();
                let in_flight = converter.signature_in_flight(&key);
                tokio::spawn(async move {
                    let _held = (permit, in_flight);
                    if let Err(e) = converter.sign_in_background(request).await {
                        tracing::warn!(error = %e, "signing in the background failed");
                    }
                });
            }
            let mut resp = json_error(
                202,
                "SIGNATURE_PENDING",
                "the signature exists once the ACI has been downloaded; fetch it, then ask again",
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            Ok(resp)
        }
    }
}

async fn squash(
    req: &Request<Incoming>,
    state: &State,
    reference: &str,
) -> Result<Response<Body>, Error> {
    let query = routes::query(req.uri().query()).map_err(|e| Error::BadRequest(e.to_string()))?;
    let platform = match &query.platform {
        Some(p) => Platform::parse(p).map_err(Error::BadRequest)?,
        None => Platform::default(),
    };
    let reference = state.converter.parse_reference(reference)?;
    let credentials = credentials(req);
    let permit = slot(state)?;
    let name = reference.familiar();
    let request = SquashRequest {
        reference,
        platform,
        tag: query.tag,
        credentials,
    };
    let planned = state.converter.plan(request.clone()).await?;
    let file = format!("{}.tar", file_name(&name));
    // Stored bytes keep the validator they were made with: how their layer was sized then (an
    // upper bound, or exactly) may not be how it would be sized now.
    let stored = state.converter.stored_squash(&planned).await;
    let etag = match stored.as_ref().and_then(|s| s.etag.clone()) {
        Some(etag) => etag,
        None => planned.etag.clone(),
    };
    let headers = || tar_headers(&etag, &file);
    // Known from the manifest (and the store) alone: no layer is read, not even to size them.
    if not_modified(req, &etag) {
        return Ok(not_modified_response(headers()));
    }
    // A stored response holds no conversion slot: the permit is dropped with this function.
    if let Some(stored) = stored {
        let resp = tarball::stored(req, &state.converter, headers(), &etag, &stored);
        if let Some(resp) = resp.await? {
            return Ok(resp);
        }
    }
    let mut planned = planned;
    let mut permit = permit;
    // HEAD neither waits nor converts: it needs the length only (below).
    if req.method() == Method::GET {
        // Waiting for another conversion of these bytes holds no slot: it takes no thread.
        drop(permit);
        if let Some(stored) = state.converter.squash_turn(&mut planned).await {
            let etag = stored.etag.clone().unwrap_or_else(|| planned.etag.clone());
            let headers = || tar_headers(&etag, &file);
            if not_modified(req, &etag) {
                return Ok(not_modified_response(headers()));
            }
            let resp = tarball::stored(req, &state.converter, headers(), &etag, &stored);
            if let Some(resp) = resp.await? {
                return Ok(resp);
            }
        }
        permit = slot(state)?;
    }
    // HEAD needs the length: remembered, or sized (an upper bound); the conversion itself never
    // starts. A whole GET starts its response once the conversion is under way (`prepare_held`).
    let prepared = match req.method() == Method::GET && !req.headers().contains_key(header::RANGE) {
        true => state.converter.prepare_held(planned, request).await?,
        false => state.converter.prepare_planned(planned).await?,
    };
    let etag = prepared.etag.clone();
    let headers = tar_headers(&etag, &file);
    let size = prepared.content_length;
    // A range of bytes not stored yet is converted whole (and stored), and only the range is sent:
    // what resumes a first download that was cut.
    let ranged = tarball::requested(req, &etag, size);
    Ok(tarball::respond(req, headers, size, ranged, |range| {
        let body = if range == (0..size) {
            prepared.body
        } else {
            crate::convert::window(prepared.body, range)
        };
        tarball::body_of(body, permit)
    }))
}

/// One of the `--max-concurrent` conversion slots, or 503.
fn slot(state: &State) -> Result<tokio::sync::OwnedSemaphorePermit, Error> {
    state
        .permits
        .clone()
        .try_acquire_owned()
        .map_err(|_| Error::Overloaded)
}

/// The headers of a conversion's response (squash or ACI): its validator and a download name.
fn tar_headers(etag: &str, download_name: &str) -> http::response::Builder {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-tar")
        .header(header::ETAG, format!("\"{etag}\""))
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{download_name}\""),
        )
}

fn not_modified_response(headers: http::response::Builder) -> Response<Body> {
    headers
        .status(StatusCode::NOT_MODIFIED)
        .body(empty())
        .expect("valid response")
}

/// The bytes as they stream. The permit lives as long as the body: a finished or dropped body frees
/// the slot.
fn streaming(
    headers: http::response::Builder,
    body: crate::convert::ByteStream,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Response<Body> {
    headers
        .body(tarball::body_of(body, permit))
        .expect("valid response")
}

/// A file name for Content-Disposition: the image name with anything unusual replaced.
fn file_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
