//! Request paths and queries to what they ask for. Pure functions, so the table tests cover them.

use percent_encoding::percent_decode_str;

/// Longest request target accepted; references are at most a few hundred bytes.
pub const MAX_TARGET: usize = 4096;

#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// A squash of this reference (docker syntax, not yet parsed).
    Squash(String),
    Health,
    /// What is in flight: live conversions, runtime tasks.
    Stats,
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

pub fn route(path: &str) -> Result<Route, RouteError> {
    if path.len() > MAX_TARGET {
        return Err(RouteError::BadRequest(format!(
            "request path longer than {MAX_TARGET} bytes"
        )));
    }
    if path == "/healthz" {
        return Ok(Route::Health);
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
            ("/debug/stats", Ok(Route::Stats)),
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
