//! One conversion, from a request to a byte stream: resolve the image, size the merged layer (remembered
//! summaries or a counting pre-pass), then run the merge and the output writer on a blocking thread that
//! feeds a bounded channel the HTTP body (or the CLI's file) reads from.
//!
//! Everything that can fail before the first byte happens in [`Converter::prepare`]; after that, a failure
//! ends the stream with an error, which the server turns into an aborted connection.

use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;

use crate::manifest::Platform;
use crate::reference::Reference;
use crate::registry::Credentials;

/// What a caller asks for.
#[derive(Debug, Clone)]
pub struct SquashRequest {
    pub reference: Reference,
    pub platform: Platform,
    /// The name `docker load` gives the image; `None` means the requested reference.
    pub tag: Option<String>,
    /// The caller's own credentials, passed through to the upstream registry.
    pub credentials: Credentials,
}

/// The output bytes, as the HTTP body or the CLI's file reads them.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// A conversion whose size is fixed and whose bytes have not started.
pub struct Prepared {
    /// Exact length of the stream.
    pub content_length: u64,
    /// Strong validator: same image and options, same bytes.
    pub etag: String,
    /// Body; dropping it stops the conversion and its upstream fetches.
    pub body: ByteStream,
}

/// Errors before the first byte, each with the HTTP status a caller should see.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error("registry {0} is not allowed by this service")]
    RegistryNotAllowed(String),
    #[error("authentication required: {0}")]
    Unauthorized(String),
    #[error("access denied: {0}")]
    Denied(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("upstream failure: {0}")]
    Upstream(String),
    #[error("invalid image: {0}")]
    InvalidImage(String),
    #[error("too many conversions in progress")]
    Overloaded,
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            Error::BadRequest(_) => 400,
            Error::Unauthorized(_) => 401,
            Error::RegistryNotAllowed(_) | Error::Denied(_) => 403,
            Error::NotFound(_) => 404,
            Error::Upstream(_) | Error::InvalidImage(_) => 502,
            Error::Overloaded => 503,
            Error::Internal(_) => 500,
        }
    }

    /// Stable machine-readable code for the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "BAD_REQUEST",
            Error::RegistryNotAllowed(_) => "REGISTRY_NOT_ALLOWED",
            Error::Unauthorized(_) => "UNAUTHORIZED",
            Error::Denied(_) => "DENIED",
            Error::NotFound(_) => "NOT_FOUND",
            Error::Upstream(_) => "UPSTREAM",
            Error::InvalidImage(_) => "INVALID_IMAGE",
            Error::Overloaded => "OVERLOADED",
            Error::Internal(_) => "INTERNAL",
        }
    }
}
