//! Errors of the registry view, in the distribution spec's shape (`{"errors":[{"code":…}]}`), which
//! docker, podman and containerd print.

use http::{header, HeaderValue, Response};

use super::super::{json, Body};
use crate::convert::Error;
use crate::store::StoreError;

/// What a registry-view request failed with; becomes its response.
#[derive(Debug)]
pub(super) struct V2Error {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// Seconds, for a `Retry-After`.
    pub retry_after: Option<&'static str>,
}

impl V2Error {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> V2Error {
        V2Error {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, secs: &'static str) -> V2Error {
        self.retry_after = Some(secs);
        self
    }

    /// A conversion's error; `unknown` is the code of a 404 where it happened.
    pub fn from_convert(e: &Error, unknown: &'static str) -> V2Error {
        let message = e.to_string();
        match e {
            Error::BadRequest(_) => V2Error::new(400, "NAME_INVALID", message),
            Error::Unauthorized(_) => V2Error::new(401, "UNAUTHORIZED", message),
            Error::Denied(_) | Error::RegistryNotAllowed(_) => V2Error::new(403, "DENIED", message),
            Error::NotFound(_) => V2Error::new(404, unknown, message),
            Error::Overloaded => V2Error::new(429, "TOOMANYREQUESTS", message).retry_after("5"),
            Error::Upstream(_) | Error::InvalidImage(_) => V2Error::new(502, "UNKNOWN", message),
            Error::Internal(_) => V2Error::new(500, "UNKNOWN", message),
        }
    }

    pub fn response(&self) -> Response<Body> {
        let mut resp = json(
            self.status,
            &serde_json::json!({"errors": [{"code": self.code, "message": self.message, "detail": null}]}),
        );
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(secs));
        }
        resp
    }
}

impl From<StoreError> for V2Error {
    fn from(e: StoreError) -> V2Error {
        let code = match e {
            StoreError::InvalidRepository(_) => "NAME_INVALID",
            StoreError::InvalidTag(_) => "TAG_INVALID",
            StoreError::BlobUnknown(_) => "BLOB_UNKNOWN",
            _ => "UNKNOWN",
        };
        let status = match code {
            "UNKNOWN" => 500,
            "BLOB_UNKNOWN" => 404,
            _ => 400,
        };
        V2Error::new(status, code, e.to_string())
    }
}
