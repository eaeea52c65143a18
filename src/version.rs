//! The version of everything strata derives from an image: the output bytes of both formats, and the
//! summaries and merged sizes remembered between conversions. It is part of every key those are known
//! by (docker image ids, ETags, ACI signature keys) and written into every remembered file, so state made
//! by code that produced other bytes is never served or trusted.
//!
//! Bump it in any commit that changes the output for the same input. `tests/output_version.rs` holds the
//! digests of a fixed set of conversions for each version and fails when the output changes under an
//! old version.

/// The converter's output version.
pub const OUTPUT: &str = "strata-output-v5";
