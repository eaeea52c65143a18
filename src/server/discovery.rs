//! appc discovery (spec `discovery.md`): `GET <name>?ac-discovery=1` answers an HTML page whose meta
//! tags map the name prefix (the service's public name) to URL templates of the ACI routes and the
//! signing key. The templates point back at this service, at the URL the request came in on unless a
//! public URL is configured (behind a proxy that terminates TLS, for instance).

use http::{header, Request};

use super::{json_error, text, Body, ServerSettings};

/// `{base}` of the templates: the configured public URL, or the scheme (as a proxy reports it) and
/// host of the request.
pub(super) fn base_url<B>(req: &Request<B>, settings: &ServerSettings) -> Option<String> {
    if let Some(url) = &settings.public_url {
        return Some(url.trim_end_matches('/').to_string());
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })?;
    let scheme = match req
        .headers()
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
    {
        Some("https") => "https",
        _ => "http",
    };
    Some(format!("{scheme}://{host}"))
}

/// The file name of the discovered URLs, before `.{ext}` (`aci` or `aci.asc`). A file name, as rkt
/// wants of a URL given by hand, so discovered URLs can be used that way too; a fixed one, because
/// `{name}` holds slashes and `{version}` may too, and the ACI's own name is in the path already.
const ACI_FILE_STEM: &str = "image";

pub fn page<B>(req: &Request<B>, settings: &ServerSettings) -> http::Response<Body> {
    let Some(prefix) = &settings.public_name else {
        return json_error(
            404,
            "NOT_FOUND",
            "appc discovery needs the service's name (--public-name)",
        );
    };
    let Some(base) = base_url(req, settings) else {
        return json_error(400, "BAD_REQUEST", "no usable Host header");
    };
    let html = format!(
        "<!DOCTYPE html>\n<html>\n<head>\n\
         <meta name=\"ac-discovery\" content=\"{prefix} {base}/c1/aci/{{name}}/{{version}}/aci/{{os}}/{{arch}}/{ACI_FILE_STEM}.{{ext}}\">\n\
         <meta name=\"ac-discovery-pubkeys\" content=\"{prefix} {base}/aci-signing-key\">\n\
         </head>\n<body></body>\n</html>\n"
    );
    text("text/html; charset=utf-8", html)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: Option<&str>) -> ServerSettings {
        ServerSettings {
            public_name: Some("images.example.com".into()),
            public_url: url.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn base_from_request_or_setting() {
        let req = Request::get("/ns/app?ac-discovery=1")
            .header("host", "127.0.0.1:8080")
            .body(())
            .unwrap();
        assert_eq!(
            base_url(&req, &settings(None)).unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            base_url(&req, &settings(Some("https://images.example.com/"))).unwrap(),
            "https://images.example.com"
        );
        let req = Request::get("/x")
            .header("host", "images.example.com")
            .header("x-forwarded-proto", "https")
            .body(())
            .unwrap();
        assert_eq!(
            base_url(&req, &settings(None)).unwrap(),
            "https://images.example.com"
        );
        let req = Request::get("/x").header("host", "a\"b").body(()).unwrap();
        assert!(base_url(&req, &settings(None)).is_none());
    }
}
