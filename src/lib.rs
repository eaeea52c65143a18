//! strata: container images converted on the fly, streaming end to end.
//!
//! The modules follow the data path of one conversion:
//!
//! - [`reference`]: image names as users write them, canonicalised with docker's rules.
//! - [`digest`]: content digests, and readers that verify them while the bytes stream.
//! - [`registry`]: the distribution v2 client (manifests, blobs, token and basic auth).
//! - [`oci_layout`]: a local OCI image layout as an image source, for use without a registry.
//! - [`source`]: what the conversion needs from either source.
//! - [`manifest`]: manifests and indexes, platform choice, the image config.
//! - [`layer`]: a layer blob's bytes, decompressed (gzip, zstd, none).
//! - [`limits`]: limits on manifests, configs, layer count, entries, paths, extended headers and
//!   uncompressed bytes; the tar ones enforced on each layer's tar stream before the parser.
//! - [`entry`]: one tar entry's metadata, read from a layer and written back canonically.
//! - [`merge`]: the top-down layer merger (whiteouts, opaque dirs, hardlinks).
//! - [`summary`]: per-layer entry listings, remembered on disk, that size the merged layer exactly.
//! - [`format`]: output formats (the docker-load archive, the appc ACI and its manifest).
//! - [`sign`]: OpenPGP detached signatures of ACIs, made while they stream, and kept.
//! - [`convert`]: one conversion from request to byte stream, the sync/async boundary.
//! - [`server`]: the HTTP front: routes, errors as JSON, streaming bodies.
//! - [`metrics`]: what `GET /metrics` exports (requests, bytes, conversions, upstream, store).
//! - [`stats`]: what is in flight (live conversions, runtime tasks), for `GET /debug/stats`.
//! - [`store`]: the content-addressed store of derived images (blobs, manifests, tags, keys, GC).
//! - [`version`]: the output version, part of every key of derived bytes and remembered state.
//! - [`cli`]: command-line flags turned into a validated configuration.
//! - [`progress`]: the one-shot commands' progress bar on a terminal.
//! - [`sample`]: a generated sample image as an OCI layout, to try strata offline.
//! - [`healthcheck`]: `strata healthcheck`, the container image's HEALTHCHECK without curl.
//! - `fuzzing` (hidden): the fuzz targets' bodies, shared with their regression test.

pub mod cli;
pub mod convert;
pub mod digest;
pub mod entry;
pub mod format;
#[doc(hidden)]
pub mod fuzzing;
pub mod healthcheck;
pub mod layer;
pub mod limits;
pub mod manifest;
pub mod merge;
pub mod metrics;
pub mod oci_layout;
pub mod progress;
pub mod reference;
pub mod registry;
pub mod sample;
pub mod server;
pub mod sign;
pub mod source;
pub mod stats;
pub mod store;
pub mod summary;
pub mod version;
