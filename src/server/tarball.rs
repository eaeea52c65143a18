//! Tarball responses from the store, and byte ranges (RFC 9110 §14): a stored squash or ACI is
//! served with its exact length, `HEAD` without reading it, `Range` as `206` (or `416`), so a cut
//! download resumes with `curl -C -`.

use std::ops::Range;

use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};

use super::{empty, Body};
use crate::convert::{ByteStream, Converter, Error, StoredTarball};

/// What a request's `Range` asks of a representation of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Ranged {
    /// No range, one that does not apply (`If-Range` of other bytes, several ranges, not bytes):
    /// the whole, `200`.
    Whole,
    /// One satisfiable range, half-open: `206`.
    Part(Range<u64>),
    /// None of it lies within the bytes: `416`.
    Unsatisfiable,
}

/// `Range: bytes=a-b`, `a-` or `-n` against `size` bytes. Several ranges are answered whole, which
/// the RFC allows and no resuming client asks for; a malformed header is ignored, as it must be.
pub(super) fn parse_range(value: &str, size: u64) -> Ranged {
    let Some((unit, spec)) = value.split_once('=') else {
        return Ranged::Whole;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return Ranged::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Ranged::Whole;
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (first.trim(), last.trim()) {
        ("", suffix) => match num(suffix) {
            None => Ranged::Whole,
            Some(0) => Ranged::Unsatisfiable,
            Some(_) if size == 0 => Ranged::Unsatisfiable,
            Some(n) => Ranged::Part(size.saturating_sub(n)..size),
        },
        (first, last) => {
            let Some(start) = num(first) else {
                return Ranged::Whole;
            };
            let end = match last {
                "" => size,
                last => match num(last) {
                    Some(l) if l >= start => l.saturating_add(1).min(size),
                    _ => return Ranged::Whole,
                },
            };
            if start >= size {
                Ranged::Unsatisfiable
            } else {
                Ranged::Part(start..end)
            }
        }
    }
}

/// The range a GET asks for, given the bytes' ETag: `If-Range` with another validator (or a date,
/// which these bytes do not carry) makes it the whole, as the RFC says.
pub(super) fn requested(req: &Request<Incoming>, etag: &str, size: u64) -> Ranged {
    if req.method() != Method::GET {
        return Ranged::Whole;
    }
    let Some(range) = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
    else {
        return Ranged::Whole;
    };
    if let Some(if_range) = req.headers().get(header::IF_RANGE) {
        // Strong comparison: a weak or different validator does not vouch for the same bytes.
        if if_range.to_str().ok().map(str::trim) != Some(&format!("\"{etag}\"")) {
            return Ranged::Whole;
        }
    }
    parse_range(range, size)
}

/// The response for `ranged` of a body of `size` bytes: the headers of a `200`, `206` or `416`; the
/// body is made by `body` from the range to send (not called for `416` or `HEAD`).
pub(super) fn respond(
    req: &Request<Incoming>,
    headers: http::response::Builder,
    size: u64,
    ranged: Ranged,
    body: impl FnOnce(Range<u64>) -> Body,
) -> Response<Body> {
    let headers = headers.header(header::ACCEPT_RANGES, "bytes");
    let (headers, range) = match ranged {
        Ranged::Whole => (headers.header(header::CONTENT_LENGTH, size), 0..size),
        Ranged::Part(r) => (
            headers
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_LENGTH, r.end - r.start)
                .header(
                    header::CONTENT_RANGE,
                    format!("bytes {}-{}/{size}", r.start, r.end - 1),
                ),
            r,
        ),
        Ranged::Unsatisfiable => {
            return headers
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                .body(empty())
                .expect("valid response")
        }
    };
    if req.method() == Method::HEAD {
        return headers.body(empty()).expect("valid response");
    }
    headers.body(body(range)).expect("valid response")
}

/// A byte stream as a response body; `held` lives as long as the body (a conversion slot).
pub(super) fn body_of(stream: ByteStream, held: impl Send + 'static) -> Body {
    let body = futures::StreamExt::map(stream, move |chunk| {
        let _held = &held;
        chunk.map(Frame::data)
    });
    BodyExt::boxed_unsync(StreamBody::new(body))
}

/// A stored tarball as the response: `Ok(None)` if it was removed since it was found (the caller
/// converts instead). `HEAD` reads nothing.
pub(super) async fn stored(
    req: &Request<Incoming>,
    converter: &Converter,
    headers: http::response::Builder,
    etag: &str,
    tarball: &StoredTarball,
) -> Result<Option<Response<Body>>, Error> {
    let ranged = requested(req, etag, tarball.size);
    let range = match &ranged {
        Ranged::Part(r) => r.clone(),
        Ranged::Whole => 0..tarball.size,
        Ranged::Unsatisfiable => 0..0,
    };
    let stream = if req.method() == Method::GET && ranged != Ranged::Unsatisfiable {
        match converter.open_stored(tarball, Some(range)).await? {
            Some(s) => Some(s),
            None => return Ok(None),
        }
    } else {
        None
    };
    tracing::info!(first_part = %tarball.parts[0].0, bytes = tarball.size, ?ranged, "serving a stored tarball");
    Ok(Some(respond(
        req,
        headers,
        tarball.size,
        ranged,
        move |_| body_of(stream.expect("opened for a GET"), ()),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_as_the_rfc_reads_them() {
        let p = |v: &str| parse_range(v, 100);
        assert_eq!(p("bytes=0-9"), Ranged::Part(0..10));
        assert_eq!(p("bytes=90-"), Ranged::Part(90..100));
        assert_eq!(p("bytes=90-1000"), Ranged::Part(90..100));
        assert_eq!(p("bytes=-10"), Ranged::Part(90..100));
        assert_eq!(p("bytes=-1000"), Ranged::Part(0..100));
        assert_eq!(p("BYTES = 5-5"), Ranged::Part(5..6));
        assert_eq!(p("bytes=99-99"), Ranged::Part(99..100));
        assert_eq!(p("bytes=100-"), Ranged::Unsatisfiable);
        assert_eq!(p("bytes=100-200"), Ranged::Unsatisfiable);
        assert_eq!(p("bytes=-0"), Ranged::Unsatisfiable);
        assert_eq!(parse_range("bytes=-5", 0), Ranged::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Ranged::Unsatisfiable);
        for ignored in [
            "bytes=5-1",
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=a-b",
            "bytes=-",
            "bytes 0-1",
            "bytes=+1-2",
        ] {
            assert_eq!(p(ignored), Ranged::Whole, "{ignored}");
        }
    }
}
