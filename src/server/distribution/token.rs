//! Who a registry-view request is. Pull clients send credentials only after a challenge from
//! `GET /v2/`, and a Basic challenge there would fail every anonymous pull (docker then refuses to
//! go on without credentials), so the view challenges with a token flow, as Docker Hub does: the
//! token endpoint hands back the caller's own Basic credentials (or none) as an opaque bearer token,
//! and each request's token is turned back into them and passed upstream. The upstream registry
//! alone decides what a caller may pull; this service grants nothing itself.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::{header, HeaderValue, Request, Response};

use super::super::{discovery::base_url, json, Body, ServerSettings};
use super::error::V2Error;
use crate::registry::Credentials;

const ANONYMOUS: &str = "strata-anonymous";
const BASIC: &str = "strata-basic.";
/// What a token is said to last. It only carries credentials, so its age matters nothing here; the
/// upstream's own tokens expire on their own schedule.
const EXPIRES_IN: u64 = 3600;
pub(super) const TOKEN_PATH: &str = "/v2/token";

/// The caller's upstream credentials: from a token this service issued, or a Basic header sent
/// straight (curl `-u`). `Err` for a bearer token that is not one of ours.
pub(super) fn caller<B>(req: &Request<B>) -> Result<Credentials, V2Error> {
    let Some(value) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Ok(Credentials(None));
    };
    if value.starts_with("Basic ") {
        return Ok(Credentials(Some(value.to_string())));
    }
    let bad = || {
        V2Error::new(
            401,
            "UNAUTHORIZED",
            "a bearer token this service did not issue",
        )
    };
    let token = value.strip_prefix("Bearer ").ok_or_else(bad)?.trim();
    if token == ANONYMOUS {
        return Ok(Credentials(None));
    }
    let encoded = token.strip_prefix(BASIC).ok_or_else(bad)?;
    let basic = URL_SAFE_NO_PAD
        .decode(encoded)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|b| b.starts_with("Basic "))
        .ok_or_else(bad)?;
    Ok(Credentials(Some(basic)))
}

/// Whether the request carries any credentials or token at all (the ping's question).
pub(super) fn presented<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(header::AUTHORIZATION)
}

/// `WWW-Authenticate` naming this service's token endpoint.
pub(super) fn challenge<B>(
    req: &Request<B>,
    settings: &ServerSettings,
    scope: Option<&str>,
) -> Option<HeaderValue> {
    let base = base_url(req, settings)?;
    let mut value = format!("Bearer realm=\"{base}{TOKEN_PATH}\",service=\"strata\"");
    if let Some(scope) = scope {
        value.push_str(&format!(",scope=\"{scope}\""));
    }
    HeaderValue::from_str(&value).ok()
}

/// `GET /v2/token`: the caller's Basic credentials (if any) as a token. Nothing is checked here; the
/// upstream checks them on every request they are used for.
pub(super) fn issue<B>(req: &Request<B>) -> Response<Body> {
    let token = match req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.starts_with("Basic "))
    {
        Some(basic) => format!("{BASIC}{}", URL_SAFE_NO_PAD.encode(basic)),
        None => ANONYMOUS.to_string(),
    };
    json(
        200,
        &serde_json::json!({"token": token, "access_token": token, "expires_in": EXPIRES_IN}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(auth: Option<&str>) -> Request<()> {
        let mut b = Request::builder().uri("/v2/").header(header::HOST, "h:1");
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn tokens_carry_the_callers_credentials_back() {
        let basic = "Basic dXNlcjpwYXNz";
        for (sent, want) in [(Some(basic), Some(basic)), (None, None)] {
            let resp = issue(&request(sent));
            assert_eq!(resp.status(), 200);
            let token = match sent {
                Some(b) => format!("{BASIC}{}", URL_SAFE_NO_PAD.encode(b)),
                None => ANONYMOUS.to_string(),
            };
            let back = caller(&request(Some(&format!("Bearer {token}")))).unwrap();
            assert_eq!(back.0.as_deref(), want);
        }
        assert_eq!(
            caller(&request(Some(basic))).unwrap().0.as_deref(),
            Some(basic)
        );
        assert_eq!(caller(&request(None)).unwrap().0, None);
        for forged in ["Bearer someone-elses", "Bearer strata-basic.!!", "Digest x"] {
            assert_eq!(
                caller(&request(Some(forged))).unwrap_err().status,
                401,
                "{forged}"
            );
        }
        let c = challenge(
            &request(None),
            &ServerSettings::default(),
            Some("repository:a:pull"),
        )
        .unwrap();
        assert_eq!(
            c.to_str().unwrap(),
            "Bearer realm=\"http://h:1/v2/token\",service=\"strata\",scope=\"repository:a:pull\""
        );
    }
}
