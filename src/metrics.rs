//! What the service counts, for `GET /metrics` (OpenMetrics text, which Prometheus scrapes): one
//! [`Metrics`] per [`crate::convert::Converter`], no global registry, so two servers in one process
//! (the tests) count apart. The server counts requests and response bytes; the conversion counts
//! upstream bytes and errors (in [`crate::source`]), its own duration, and what the store answered.
//!
//! Label values are fixed sets (route kinds, formats, error kinds), never a path or an image name:
//! a scrape stays the same size however many images are asked for.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// What `GET /metrics` is served as.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The formats a conversion's duration is observed under.
pub const FORMATS: [&str; 4] = ["squash", "aci", "layer", "view"];

/// Upstream error kinds: a [`crate::registry::RegistryError`]'s variant, or what broke a blob's
/// transfer after it started.
pub const UPSTREAM_ERROR_KINDS: [&str; 9] = [
    "unauthorized",
    "denied",
    "not_found",
    "upstream",
    "invalid",
    "limit",
    "transfer",
    "stalled",
    "digest_mismatch",
];

/// What a store lookup was for: a tarball route's output, or a registry-view image.
pub const STORE_ARTIFACTS: [&str; 2] = ["tarball", "view"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FormatLabel {
    format: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ArtifactLabel {
    artifact: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Conversions take from well under a second (a small image, summaries remembered) to many
/// minutes (GiB of layers): 0.1 s doubling to ~27 min.
fn conversion_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.1, 2.0, 15))
}

/// Every metric the service exports; cheap to share behind an `Arc`.
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    response_bytes: Family<RouteLabel, Counter>,
    conversion_seconds: HistogramFamily<FormatLabel>,
    upstream_bytes: Counter,
    upstream_errors: Family<KindLabel, Counter>,
    store_hits: Family<ArtifactLabel, Counter>,
    store_misses: Family<ArtifactLabel, Counter>,
    store_evictions: Counter,
    store_gc_deletions: Counter,
    conversions_in_flight: Gauge,
    lease_waits: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("strata");
        let m = Metrics {
            requests: Family::default(),
            response_bytes: Family::default(),
            conversion_seconds: Family::new_with_constructor(conversion_buckets),
            upstream_bytes: Counter::default(),
            upstream_errors: Family::default(),
            store_hits: Family::default(),
            store_misses: Family::default(),
            store_evictions: Counter::default(),
            store_gc_deletions: Counter::default(),
            conversions_in_flight: Gauge::default(),
            lease_waits: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests answered, by route kind and status",
            m.requests.clone(),
        );
        registry.register(
            "http_response_bytes",
            "Body bytes sent, by route kind (counted as they leave)",
            m.response_bytes.clone(),
        );
        registry.register(
            "conversion_duration_seconds",
            "How long a conversion took, from resolving the image to its last byte written and stored (waits for another replica's conversion left out)",
            m.conversion_seconds.clone(),
        );
        registry.register(
            "upstream_bytes",
            "Blob bytes read from registries or the OCI layout",
            m.upstream_bytes.clone(),
        );
        registry.register(
            "upstream_errors",
            "Failed upstream requests and blob transfers, by kind",
            m.upstream_errors.clone(),
        );
        registry.register(
            "store_hits",
            "Store lookups that found a stored conversion",
            m.store_hits.clone(),
        );
        registry.register(
            "store_misses",
            "Store lookups that found none (a conversion follows)",
            m.store_misses.clone(),
        );
        registry.register(
            "store_evictions",
            "Blobs evicted as least recently used under --cache-max-bytes",
            m.store_evictions.clone(),
        );
        registry.register(
            "store_gc_deletions",
            "Unreferenced blobs removed by garbage collection",
            m.store_gc_deletions.clone(),
        );
        registry.register(
            "conversions_in_flight",
            "Conversions with any part still running",
            m.conversions_in_flight.clone(),
        );
        registry.register(
            "lease_waits",
            "Waits for another replica's conversion of the same image",
            m.lease_waits.clone(),
        );
        // The fixed label sets appear at zero from the start: a rate over a series that only
        // appears at its first event misses that event.
        for format in FORMATS {
            let _ = m.conversion_seconds.get_or_create(&FormatLabel { format });
        }
        for kind in UPSTREAM_ERROR_KINDS {
            let _ = m.upstream_errors.get_or_create(&KindLabel { kind });
        }
        for artifact in STORE_ARTIFACTS {
            let _ = m.store_hits.get_or_create(&ArtifactLabel { artifact });
            let _ = m.store_misses.get_or_create(&ArtifactLabel { artifact });
        }
        Metrics { registry, ..m }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing into a String cannot fail");
        out
    }

    /// One response started, `route` a [`crate::server::routes::Route`] kind.
    pub fn request(&self, route: &'static str, status: u16) {
        self.requests
            .get_or_create(&RouteStatus { route, status })
            .inc();
    }

    /// The response-bytes counter of `route`, taken once per response and counted into per frame:
    /// a long download shows as it goes, not when it ends.
    pub fn response_bytes_counter(&self, route: &'static str) -> Counter {
        self.response_bytes
            .get_or_create_owned(&RouteLabel { route })
    }

    /// Observes the time until the returned guard is dropped under `format` (one of [`FORMATS`]).
    pub fn time_conversion(self: &Arc<Self>, format: &'static str) -> ConversionTimer {
        self.time_conversion_from(format, Instant::now())
    }

    /// Observes the time from `started` until the returned guard is dropped.
    pub fn time_conversion_from(
        self: &Arc<Self>,
        format: &'static str,
        started: Instant,
    ) -> ConversionTimer {
        ConversionTimer {
            metrics: self.clone(),
            format,
            started,
        }
    }

    pub fn upstream_bytes(&self, bytes: u64) {
        self.upstream_bytes.inc_by(bytes);
    }

    /// Bytes read upstream so far: what the CLI's progress bar follows.
    pub fn upstream_bytes_total(&self) -> u64 {
        self.upstream_bytes.get()
    }

    /// `kind`: one of [`UPSTREAM_ERROR_KINDS`].
    pub fn upstream_error(&self, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    /// A store lookup for `artifact` (one of [`STORE_ARTIFACTS`]) found what it looked for or not.
    pub fn store_lookup(&self, artifact: &'static str, hit: bool) {
        let family = if hit {
            &self.store_hits
        } else {
            &self.store_misses
        };
        family.get_or_create(&ArtifactLabel { artifact }).inc();
    }

    pub fn store_evicted(&self, blobs: usize) {
        self.store_evictions.inc_by(blobs as u64);
    }

    pub fn store_gc_deleted(&self, blobs: usize) {
        self.store_gc_deletions.inc_by(blobs as u64);
    }

    /// The gauge [`crate::stats::Conversions`] moves: the same count `GET /debug/stats` shows.
    pub fn conversions_in_flight(&self) -> Gauge {
        self.conversions_in_flight.clone()
    }

    /// A request waits for another replica's conversion of the same image (its lease in the
    /// shared store) instead of converting it again.
    pub fn lease_wait(&self) {
        self.lease_waits.inc();
    }
}

/// Observes a conversion's duration when dropped, whether it ended well or not.
pub struct ConversionTimer {
    metrics: Arc<Metrics>,
    format: &'static str,
    started: Instant,
}

impl Drop for ConversionTimer {
    fn drop(&mut self) {
        self.metrics
            .conversion_seconds
            .get_or_create(&FormatLabel {
                format: self.format,
            })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_series_show_their_counts() {
        let m = Arc::new(Metrics::new());
        m.request("squash", 200);
        m.request("squash", 200);
        m.request("not_found", 404);
        m.response_bytes_counter("squash").inc_by(1234);
        m.upstream_error("not_found");
        m.store_lookup("tarball", false);
        m.lease_wait();
        drop(m.time_conversion("aci"));
        let text = m.encode();
        for line in [
            "strata_http_requests_total{route=\"squash\",status=\"200\"} 2",
            "strata_http_requests_total{route=\"not_found\",status=\"404\"} 1",
            "strata_http_response_bytes_total{route=\"squash\"} 1234",
            "strata_upstream_errors_total{kind=\"not_found\"} 1",
            "strata_upstream_errors_total{kind=\"transfer\"} 0",
            "strata_store_misses_total{artifact=\"tarball\"} 1",
            "strata_store_hits_total{artifact=\"view\"} 0",
            "strata_lease_waits_total 1",
            "strata_conversion_duration_seconds_count{format=\"aci\"} 1",
            "strata_conversion_duration_seconds_count{format=\"squash\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
