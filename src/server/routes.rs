//! Request paths and queries to what they ask for. Pure functions, so the table tests cover them.

use percent_encoding::percent_decode_str;

/// Longest request target accepted; references are at most a few hundred bytes.
pub const MAX_TARGET: usize = 4096;

#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// A squash of this reference (docker syntax, not yet parsed).
    Squash(String),
    /// An ACI (or its signature), Quay's spelling.
    Aci(AciRoute),
    /// The public key ACI signatures verify with.
    SigningKey,
    /// Liveness: the process answers.
    Health,
    /// Readiness: the store answers too.
    Ready,
    /// Prometheus' scrape.
    Metrics,
    /// What is in flight: live conversions, runtime tasks.
    Stats,
    /// The registry view: `/v2/…`, routed further by `distribution`.
    Distribution(String),
    /// A registry's push notifications (`hooks`).
    Hook,
}

/// `/c1/aci/<server>/<repository...>/<tag>/{aci,aci.asc,sig}/<os>/<arch>/`, or
/// `…/aci/<os>/<arch>/<file>.aci` and `….aci.asc`
#[derive(Debug, PartialEq, Eq)]
pub struct AciRoute {
    /// The name prefix discovery put there (the service's public name).
    pub server: String,
    /// Repository path, looked up as the squash routes look it up.
    pub repository: String,
    pub tag: String,
    /// appc spellings.
    pub os: String,
    pub arch: String,
    /// `aci.asc` (Quay also spells it `sig`), or a file name ending `.aci.asc`: the detached
    /// signature.
    pub signature: bool,
}

impl Route {
    /// The route's kind: the `route` label of the request metrics and the request log, a fixed set
    /// (never the path) so that the metrics stay a bounded size.
    pub fn kind(&self) -> &'static str {
        match self {
            Route::Squash(_) => "squash",
            Route::Aci(a) if a.signature => "aci_signature",
            Route::Aci(_) => "aci",
            Route::SigningKey => "signing_key",
            Route::Health => "healthz",
            Route::Ready => "readyz",
            Route::Metrics => "metrics",
            Route::Stats => "stats",
            Route::Distribution(_) => "registry_view",
            Route::Hook => "hook",
        }
    }

    /// The image asked for, as the request wrote it, for the request log.
    pub fn reference(&self) -> Option<String> {
        match self {
            Route::Squash(r) => Some(r.clone()),
            Route::Aci(a) => Some(format!("{}:{}", a.repository, a.tag)),
            _ => None,
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no such route: {0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
}

fn decode(s: &str) -> Result<String, RouteError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| RouteError::BadRequest("path is not UTF-8".into()))
}

/// What a trailing file name asks for: rkt takes an http(s) URL only when its path ends in `.aci`,
/// and asks for the signature at the same path with `.aci.asc` (`rkt/image/common.go`,
/// `ascPathFromImgPath`). `None`: no file name.
fn file_name_kind(segment: &str) -> Option<bool> {
    if segment.ends_with(".aci.asc") {
        Some(true)
    } else if segment.ends_with(".aci") {
        Some(false)
    } else {
        None
    }
}

fn aci(rest: &str) -> Result<AciRoute, RouteError> {
    let usage = || {
        RouteError::BadRequest(
            "expected /c1/aci/<server>/<repository>/<tag>/aci[.asc]/<os>/<arch>/ or \
             /c1/aci/<server>/<repository>/<tag>/aci/<os>/<arch>/<file>.aci[.asc]"
                .into(),
        )
    };
    let mut parts: Vec<&str> = rest.strip_suffix('/').unwrap_or(rest).split('/').collect();
    let named = match parts.last() {
        Some(last) if !rest.ends_with('/') => file_name_kind(last),
        _ => None,
    };
    if named.is_some() {
        parts.pop();
    }
    if parts.len() < 6 || parts.iter().any(|p| p.is_empty()) {
        return Err(usage());
    }
    let arch = parts.pop().expect("six parts");
    let os = parts.pop().expect("five parts");
    // With a file name, its ending says which; under `aci.asc/` a `.aci` would send rkt to
    // `….aci.asc` there, so only `aci/` takes one.
    let signature = match (parts.pop().expect("four parts"), named) {
        ("aci", None) => false,
        ("aci.asc" | "sig", None) => true,
        ("aci", Some(signature)) => signature,
        _ => return Err(usage()),
    };
    let tag = parts.pop().expect("three parts");
    let server = parts.remove(0);
    Ok(AciRoute {
        server: server.to_string(),
        repository: parts.join("/"),
        tag: tag.to_string(),
        os: os.to_string(),
        arch: arch.to_string(),
        signature,
    })
}

pub fn route(path: &str) -> Result<Route, RouteError> {
    if path.len() > MAX_TARGET {
        return Err(RouteError::BadRequest(format!(
            "request path longer than {MAX_TARGET} bytes"
        )));
    }
    if path == "/healthz" {
        return Ok(Route::Health);
    }
    if path == "/readyz" {
        return Ok(Route::Ready);
    }
    if path == "/metrics" {
        return Ok(Route::Metrics);
    }
    if path == "/v2" || path.starts_with("/v2/") {
        return Ok(Route::Distribution(path.to_string()));
    }
    if path == super::hooks::HOOK_PATH {
        return Ok(Route::Hook);
    }
    if path == "/aci-signing-key" {
        return Ok(Route::SigningKey);
    }
    if let Some(rest) = path.strip_prefix("/c1/aci/") {
        return aci(&decode(rest)?).map(Route::Aci);
    }
    if path == "/debug/stats" {
        return Ok(Route::Stats);
    }
    if let Some(rest) = path.strip_prefix("/squash/") {
        let reference = decode(rest)?;
        if reference.is_empty() {
            return Err(RouteError::BadRequest("missing image reference".into()));
        }
        return Ok(Route::Squash(reference));
    }
    // Quay's verbs: /c1/squash/<namespace>/<repository...>/<tag>
    if let Some(rest) = path.strip_prefix("/c1/squash/") {
        let rest = decode(rest)?;
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.len() < 3 || parts.iter().any(|p| p.is_empty()) {
            return Err(RouteError::BadRequest(
                "expected /c1/squash/<namespace>/<repository>/<tag>".into(),
            ));
        }
        let (tag, repo) = parts.split_last().expect("three parts or more");
        return Ok(Route::Squash(format!("{}:{tag}", repo.join("/"))));
    }
    Err(RouteError::NotFound(path.chars().take(200).collect()))
}

/// `?ac-discovery=1`, on any path: appc discovery's question.
pub fn is_discovery(q: Option<&str>) -> bool {
    q.unwrap_or("").split('&').any(|p| p == "ac-discovery=1")
}

/// Query parameters of a squash.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Query {
    pub platform: Option<String>,
    pub tag: Option<String>,
}

pub fn query(q: Option<&str>) -> Result<Query, RouteError> {
    let mut out = Query::default();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = decode(&v.replace('+', " "))?;
        let slot = match k {
            "platform" => &mut out.platform,
            "tag" => &mut out.tag,
            other => {
                return Err(RouteError::BadRequest(format!(
                    "unknown query parameter {other:?}"
                )))
            }
        };
        if slot.replace(v).is_some() {
            return Err(RouteError::BadRequest(format!(
                "query parameter {k:?} given twice"
            )));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_table() {
        let d = format!("sha256:{}", "c".repeat(64));
        let cases = [
            (
                "/squash/library/alpine:3.20",
                Ok(Route::Squash("library/alpine:3.20".into())),
            ),
            ("/squash/alpine", Ok(Route::Squash("alpine".into()))),
            (
                &*format!("/squash/localhost:5000/a/b@{d}"),
                Ok(Route::Squash(format!("localhost:5000/a/b@{d}"))),
            ),
            (
                "/squash/localhost%3A5000/a",
                Ok(Route::Squash("localhost:5000/a".into())),
            ),
            (
                "/c1/squash/ns/repo/tag",
                Ok(Route::Squash("ns/repo:tag".into())),
            ),
            (
                "/c1/squash/ns/team/repo/1.0",
                Ok(Route::Squash("ns/team/repo:1.0".into())),
            ),
            ("/healthz", Ok(Route::Health)),
            ("/readyz", Ok(Route::Ready)),
            ("/metrics", Ok(Route::Metrics)),
            ("/metrics/x", Err(RouteError::NotFound("/metrics/x".into()))),
            ("/aci-signing-key", Ok(Route::SigningKey)),
            (
                "/c1/aci/example.com/ns/app/1.0/aci/linux/amd64/",
                Ok(Route::Aci(AciRoute {
                    server: "example.com".into(),
                    repository: "ns/app".into(),
                    tag: "1.0".into(),
                    os: "linux".into(),
                    arch: "amd64".into(),
                    signature: false,
                })),
            ),
            (
                "/c1/aci/example.com/ns/team/app/v2/aci.asc/linux/aarch64",
                Ok(Route::Aci(AciRoute {
                    server: "example.com".into(),
                    repository: "ns/team/app".into(),
                    tag: "v2".into(),
                    os: "linux".into(),
                    arch: "aarch64".into(),
                    signature: true,
                })),
            ),
            ("/debug/stats", Ok(Route::Stats)),
            ("/hooks/registry", Ok(Route::Hook)),
            // rkt takes an http(s) URL only when its path ends in `.aci`, and asks for the
            // signature at the same path ending in `.aci.asc`.
            (
                "/c1/aci/example.com/ns/app/1.0/aci/linux/amd64/app-1.0.aci",
                Ok(Route::Aci(AciRoute {
                    server: "example.com".into(),
                    repository: "ns/app".into(),
                    tag: "1.0".into(),
                    os: "linux".into(),
                    arch: "amd64".into(),
                    signature: false,
                })),
            ),
            (
                "/c1/aci/example.com/ns/app/1.0/aci/linux/amd64/app-1.0.aci.asc",
                Ok(Route::Aci(AciRoute {
                    server: "example.com".into(),
                    repository: "ns/app".into(),
                    tag: "1.0".into(),
                    os: "linux".into(),
                    arch: "amd64".into(),
                    signature: true,
                })),
            ),
            // Any file name: only its ending counts.
            (
                "/c1/aci/example.com/ns/team/app/v2/aci/linux/aarch64/image.v2.aci",
                Ok(Route::Aci(AciRoute {
                    server: "example.com".into(),
                    repository: "ns/team/app".into(),
                    tag: "v2".into(),
                    os: "linux".into(),
                    arch: "aarch64".into(),
                    signature: false,
                })),
            ),
            // Quay's other spelling of the signature route.
            (
                "/c1/aci/example.com/ns/app/1.0/sig/linux/amd64/",
                Ok(Route::Aci(AciRoute {
                    server: "example.com".into(),
                    repository: "ns/app".into(),
                    tag: "1.0".into(),
                    os: "linux".into(),
                    arch: "amd64".into(),
                    signature: true,
                })),
            ),
            (
                "/squash/",
                Err(RouteError::BadRequest("missing image reference".into())),
            ),
            ("/", Err(RouteError::NotFound("/".into()))),
            (
                "/squashed/x",
                Err(RouteError::NotFound("/squashed/x".into())),
            ),
        ];
        for (path, want) in cases {
            assert_eq!(route(path), want, "{path}");
        }
        for bad in [
            "/c1/aci/example.com/1.0/aci/linux/amd64/",
            "/c1/aci/example.com/ns/app/1.0/tar/linux/amd64/",
            "/c1/aci/example.com/ns//app/1.0/aci/linux/amd64/",
            // A file name that is neither, one after a trailing slash, or one under the
            // signature route (whose `.aci` would make rkt ask for `….aci.asc` there).
            "/c1/aci/example.com/ns/app/1.0/aci/linux/amd64/app.tar",
            "/c1/aci/example.com/ns/app/1.0/aci/linux/amd64/app.aci/",
            "/c1/aci/example.com/ns/app/1.0/aci.asc/linux/amd64/app.aci",
            "/c1/aci/example.com/1.0/aci/linux/amd64/app.aci",
        ] {
            assert!(
                matches!(route(bad), Err(RouteError::BadRequest(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            route("/c1/squash/ns/repo"),
            Err(RouteError::BadRequest(_))
        ));
        assert!(matches!(
            route("/c1/squash/ns//tag"),
            Err(RouteError::BadRequest(_))
        ));
        assert!(matches!(
            route(&format!("/squash/{}", "a".repeat(MAX_TARGET))),
            Err(RouteError::BadRequest(_))
        ));
    }

    #[test]
    fn query_table() {
        assert_eq!(query(None).unwrap(), Query::default());
        assert_eq!(
            query(Some("platform=linux/arm64&tag=x%3A1")).unwrap(),
            Query {
                platform: Some("linux/arm64".into()),
                tag: Some("x:1".into())
            }
        );
        assert!(query(Some("plat=1")).is_err());
        assert!(query(Some("tag=a:1&tag=b:2")).is_err());
    }
}
