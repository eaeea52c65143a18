//! Convert on push: `POST /hooks/registry` takes a registry's push notifications and converts each
//! pushed tag into the store in the background, so that the first pull of its squash is already
//! stored. Callers prove they hold `--hook-token`; the answer (202 and what was queued) comes at once.
//! Pushes are mapped to the repository a pull names (`squash/<path>`, `squash/<alias>/<path>`), and
//! only for registries this service fetches from: a notification cannot send strata anywhere a pull
//! could not.

mod events;
mod queue;

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use http::{header, HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tracing::Instrument;

use super::{json, json_error, slot, Body, State};
use crate::convert::{Error, ViewRequest};
use crate::digest::Digest;
use crate::format::image::Flavour;
use crate::manifest::Platform;
use crate::reference::Reference;
use crate::registry::Credentials;
use crate::store::names;
use events::{Item, Push};
use queue::{Outcome, Queue};

pub const HOOK_PATH: &str = "/hooks/registry";
/// Jobs converting at once: each may hold several `--max-concurrent` slots (an index's platforms),
/// and pulls must keep the rest.
const WORKERS: usize = 2;
/// Jobs waiting; past it a notification is answered 503, which registries send again later.
const MAX_WAITING: usize = 256;
/// A notification envelope is a few KiB per event.
const MAX_BODY: usize = 1 << 20;
/// How long a caller may take to send the body, once its headers are in.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// While pulls hold every conversion slot, a job waits and tries again, up to the give-up time.
const OVERLOADED_RETRY: Duration = Duration::from_secs(2);
const OVERLOADED_GIVE_UP: Duration = Duration::from_secs(300);

/// `--hook-token`: kept out of `Debug` output, as the settings are printable.
#[derive(Clone)]
pub struct HookToken(String);

impl HookToken {
    pub fn new(token: String) -> Result<HookToken, String> {
        // Sent in a header by every registry: visible ASCII, no spaces, survives any of them.
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("--hook-token must be non-empty visible ASCII without spaces".into());
        }
        Ok(HookToken(token))
    }
}

impl fmt::Debug for HookToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HookToken(…)")
    }
}

/// A conversion a push asked for.
#[derive(Debug, Clone)]
struct Job {
    reference: Reference,
    /// The store repository, `squash/<name>` as a pull names it.
    repository: String,
}

pub(super) struct Hooks {
    /// The token's sha256: compared in constant time, whatever the length presented.
    token: Option<[u8; 32]>,
    queue: Mutex<Queue<Job>>,
}

impl Hooks {
    pub(super) fn new(token: Option<&HookToken>) -> Hooks {
        Hooks {
            token: token.map(|t| Sha256::digest(t.0.as_bytes()).into()),
            queue: Mutex::new(Queue::new(WORKERS, MAX_WAITING)),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue<Job>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The secret presented: `Bearer TOKEN` (distribution's `headers:`, Harbor's auth header), or the
/// password of `Basic` (a `https://hook:TOKEN@…` URL, for senders that take no header, as Quay).
fn presented(req: &Request<Incoming>) -> Option<Vec<u8>> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.trim().split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.as_bytes().to_vec());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let colon = decoded.iter().position(|&b| b == b':')?;
        return Some(decoded[colon + 1..].to_vec());
    }
    None
}

fn authorized(req: &Request<Incoming>, expected: &[u8; 32]) -> bool {
    let Some(token) = presented(req) else {
        return false;
    };
    let got: [u8; 32] = Sha256::digest(&token).into();
    got.iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

pub(super) async fn respond(req: Request<Incoming>, state: &Arc<State>) -> Response<Body> {
    let Some(expected) = &state.hooks.token else {
        return json_error(
            404,
            "NOT_FOUND",
            "no such route: /hooks/registry (this service takes no notifications: no --hook-token)",
        );
    };
    if req.method() != Method::POST {
        let mut resp = json_error(405, "METHOD_NOT_ALLOWED", "notifications are POSTed");
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return resp;
    }
    if !authorized(&req, expected) {
        let mut resp = json_error(
            401,
            "UNAUTHORIZED",
            "send the hook token: Authorization: Bearer <--hook-token>",
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"strata hooks\""),
        );
        return resp;
    }
    let body = match tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return json_error(
                413,
                "TOO_LARGE",
                &format!("a notification is at most {MAX_BODY} bytes"),
            )
        }
        Ok(Err(e)) => return json_error(400, "BAD_REQUEST", &format!("reading the body: {e}")),
        Err(_) => return json_error(408, "TIMEOUT", "the body did not arrive in time"),
    };
    let items = match events::parse(&body) {
        Ok(items) => items,
        Err(m) => return json_error(400, "BAD_REQUEST", &m),
    };
    let (summary, queued, full, workers) = offer(state, items);
    for _ in 0..workers {
        tokio::spawn(worker(state.clone()));
    }
    let body = json!({ "queued": queued, "events": summary });
    if full {
        let mut resp = json(503, &body);
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
        return resp;
    }
    json(202, &body)
}

/// Queues the pushes of one notification: what became of each item, how many were queued, whether
/// any found the queue full, and how many workers to start.
fn offer(state: &State, items: Vec<Item>) -> (Vec<serde_json::Value>, usize, bool, usize) {
    let (mut summary, mut queued, mut full, mut workers) = (Vec::new(), 0, false, 0);
    let targets: Vec<_> = items
        .into_iter()
        .map(|item| match item {
            Item::Push(push) => target(state, &push).map(|job| (job, push)),
            Item::Ignored(reason) => Err(reason),
        })
        .collect();
    let mut q = state.hooks.queue();
    for target in targets {
        let (job, push) = match target {
            Ok(t) => t,
            Err(reason) => {
                tracing::debug!(%reason, "notification item ignored");
                summary.push(json!({"outcome": "ignored", "reason": reason}));
                continue;
            }
        };
        let key = format!("{}:{}", job.repository, push.tag);
        let outcome = q.offer(&key, push.digest.clone(), job.clone());
        let (word, note) = match outcome {
            Outcome::Queued { spawn } => {
                queued += 1;
                workers += usize::from(spawn);
                ("queued", None)
            }
            Outcome::Deduplicated => ("deduplicated", Some("this tag is queued or converting")),
            Outcome::Again => (
                "again",
                Some("this tag is converting an earlier push; converted again after it"),
            ),
            Outcome::Full => {
                full = true;
                (
                    "refused",
                    Some("too many conversions queued; send it again later"),
                )
            }
        };
        if matches!(outcome, Outcome::Queued { .. } | Outcome::Again) {
            tracing::info!(repository = %job.repository, tag = %push.tag,
                source = %job.reference.familiar(), "queued conversion on push");
        }
        let mut entry = json!({
            "outcome": word,
            "repository": job.repository,
            "tag": push.tag,
            "source": job.reference.familiar(),
        });
        if let Some(note) = note {
            entry["note"] = json!(note);
        }
        summary.push(entry);
    }
    (summary, queued, full, workers)
}

/// Docker's test for a first component that is a registry, not part of the repository path.
fn names_a_host(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost"
}

/// The upstream image a pushed tag is, and the store repository a pull of its squash names; or why
/// there is none strata may convert.
fn target(state: &State, push: &Push) -> Result<Job, String> {
    let converter = &state.converter;
    if !names_a_host(&push.host) {
        return Err(format!(
            "{:?} cannot be named as a registry (no dot, no port, not localhost)",
            push.host
        ));
    }
    let mut reference = converter
        .parse_reference(&format!("{}/{}:{}", push.host, push.repository, push.tag))
        .map_err(|e| e.to_string())?;
    // distribution notifies of a manifest before it links the tag to it, so the tag may still name
    // the previous image (or none) when the job starts: the pushed digest is converted, and the tag
    // linked to it in the store.
    reference.digest = push.digest.as_deref().and_then(|d| Digest::parse(d).ok());
    if converter.check_allowed(&reference).is_err() {
        return Err(format!(
            "registry {} is not one this service fetches from (--default-registry, \
             --insecure-registry, --allow-registry)",
            reference.registry
        ));
    }
    let default = converter.parse_reference("x").map(|r| r.registry).ok();
    let aliases = &state.settings.registry_aliases;
    let name = if default.as_deref() == Some(&reference.registry) {
        reference.repository.clone()
    } else if let Some((alias, _)) = aliases.iter().find(|(_, h)| *h == reference.registry) {
        format!("{alias}/{}", reference.repository)
    } else if !reference.registry.contains(':') {
        format!("{}/{}", reference.registry, reference.repository)
    } else {
        return Err(format!(
            "registry {0} has a port, which a repository path cannot hold: name it with \
             --registry-alias NAME={0}",
            reference.registry
        ));
    };
    let repository = format!("squash/{name}");
    names::check_repository(&repository).map_err(|e| e.to_string())?;
    // What a pull of that name reaches must be this image, or the conversion would serve no one.
    let (first, tail) = name.split_once('/').unwrap_or((&name, ""));
    let upstream = match aliases.iter().find(|(a, _)| a == first) {
        Some((_, host)) if !tail.is_empty() => format!("{host}/{tail}"),
        _ => name.clone(),
    };
    let pulled = converter.parse_reference(&format!("{upstream}:{}", push.tag));
    if !pulled
        .is_ok_and(|p| p.registry == reference.registry && p.repository == reference.repository)
    {
        return Err(format!(
            "a pull of {repository} names another image than {}",
            reference.familiar()
        ));
    }
    Ok(Job {
        reference,
        repository,
    })
}

/// Runs queued jobs until none waits.
async fn worker(state: Arc<State>) {
    loop {
        let next = state.hooks.queue().next();
        let Some((key, job)) = next else {
            return;
        };
        let span = tracing::info_span!("hook", repository = %job.repository,
            tag = ?job.reference.tag);
        // On a task of its own, so that a panic cannot leave the tag marked running forever.
        let run = tokio::spawn(convert(state.clone(), job).instrument(span));
        if let Err(e) = run.await {
            tracing::error!(error = %e, "conversion on push ended abnormally");
        }
        state.hooks.queue().done(&key);
    }
}

/// What a pull that takes an index would ask for, with the service's own credentials.
async fn convert(state: Arc<State>, job: Job) {
    let request = ViewRequest {
        reference: job.reference,
        credentials: Credentials(None),
        repository: job.repository,
        accepts_index: true,
        platform: Platform::default(),
        flavour: Flavour::Oci,
    };
    let slot = || slot(&state);
    let started = Instant::now();
    loop {
        match state.converter.stored_manifest(&request, &slot).await {
            Ok(m) => {
                tracing::info!(
                    manifest = %m.digest,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "converted on push"
                );
                return;
            }
            Err(Error::Overloaded) if started.elapsed() < OVERLOADED_GIVE_UP => {
                tokio::time::sleep(OVERLOADED_RETRY).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "conversion on push failed");
                return;
            }
        }
    }
}
