//! Errors of a conversion: before the first byte each carries the HTTP status a caller should see;
//! after it, they end the stream as `io::Error`s. Whose fault a failure is (the upstream's or the
//! image's) is decided here.

use std::io;

use crate::digest::Digest;
use crate::format::docker_archive::SizeExceeded;
use crate::merge::{MergeError, NeedsSummary};
use crate::source::{SourceError, TransferError};

/// Errors before the first byte, each with the HTTP status a caller should see. `Clone`: a conversion
/// shared by several requests gives each the same error.
#[derive(Debug, Clone, thiserror::Error)]
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

    /// The same error, its message prefixed with what it happened to.
    pub(super) fn with_context(self, context: &str) -> Error {
        let at = |m: String| format!("{context}: {m}");
        match self {
            Error::BadRequest(m) => Error::BadRequest(at(m)),
            Error::RegistryNotAllowed(m) => Error::RegistryNotAllowed(at(m)),
            Error::Unauthorized(m) => Error::Unauthorized(at(m)),
            Error::Denied(m) => Error::Denied(at(m)),
            Error::NotFound(m) => Error::NotFound(at(m)),
            Error::Upstream(m) => Error::Upstream(at(m)),
            Error::InvalidImage(m) => Error::InvalidImage(at(m)),
            Error::Internal(m) => Error::Internal(at(m)),
            Error::Overloaded => Error::Overloaded,
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

pub(super) fn source_error(e: SourceError) -> Error {
    let message = e.to_string();
    if matches!(e, SourceError::Limit { .. } | SourceError::Invalid(_)) {
        return Error::InvalidImage(message);
    }
    match e.status() {
        400 => Error::BadRequest(message),
        401 => Error::Unauthorized(message),
        403 => Error::Denied(message),
        404 => Error::NotFound(message),
        _ => Error::Upstream(message),
    }
}

/// A layer that cannot be read: a failed transfer is the upstream's fault; anything else (broken
/// compression or tar, a hostile entry, a limit) is the image's.
pub(super) fn layer_error(digest: &Digest, e: MergeError) -> Error {
    match e {
        MergeError::Io(io) if !image_fault(&io) => Error::Upstream(format!("layer {digest}: {io}")),
        other => Error::InvalidImage(format!("layer {digest}: {other}")),
    }
}

/// Whether a read error is the layer's own fault (its compressed stream or the tar inside is broken
/// or ends early) rather than its transfer's.
pub(super) fn image_fault(e: &io::Error) -> bool {
    !caused_by::<TransferError>(e)
}

/// Whether an error of type `E` is somewhere in the chain of `e` (readers on the way wrap errors).
pub(super) fn caused_by<E: std::error::Error + 'static>(e: &io::Error) -> bool {
    find::<E>(e).is_some()
}

/// The first error of type `E` in the chain of `e`.
pub(super) fn find<E: std::error::Error + 'static>(e: &io::Error) -> Option<&E> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|r| r as _);
    while let Some(err) = cur {
        if let Some(found) = err.downcast_ref::<E>() {
            return Some(found);
        }
        cur = match err.downcast_ref::<io::Error>() {
            Some(io) => io.get_ref().map(|r| r as _),
            None => err.source(),
        };
    }
    None
}

/// A layer's fetch that failed, as the error it is before the first byte.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct FetchFailed(pub(super) Error);

/// What a conversion's stream failed with, as the error a response not yet started answers.
pub(super) fn stream_error(e: io::Error) -> Error {
    if let Some(FetchFailed(error)) = find::<FetchFailed>(&e) {
        return error.clone();
    }
    match image_fault(&e) {
        true => Error::InvalidImage(e.to_string()),
        false => Error::Upstream(e.to_string()),
    }
}

pub(super) fn layer_error_io(digest: &Digest, e: MergeError) -> io::Error {
    match e {
        // Kept as it is: the job recognises it to forget the wrong size.
        MergeError::Io(io) if caused_by::<SizeExceeded>(&io) => io,
        MergeError::NeedsSummary(n) => io::Error::new(
            io::ErrorKind::InvalidData,
            NeedsSummary {
                path: format!("layer {digest}: {}", n.path),
                why: n.why,
            },
        ),
        MergeError::Io(io) => io::Error::new(io.kind(), format!("layer {digest}: {io}")),
        other => io::Error::new(
            io::ErrorKind::InvalidData,
            format!("layer {digest}: {other}"),
        ),
    }
}
