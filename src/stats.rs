//! What the service has in flight, for `GET /debug/stats` (and the `conversions_in_flight` gauge of
//! `GET /metrics`): conversions with any part still running (the request, its layer scans, its merge
//! thread) and the runtime's live tasks. Reading them costs two atomic loads, so a monitor (or a
//! test checking that a hang-up leaves nothing behind) may poll.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::{ConversionTimer, Metrics};

/// Counts conversions that are alive, in the `conversions_in_flight` gauge of its [`Metrics`].
#[derive(Debug, Default)]
pub struct Conversions {
    metrics: Arc<Metrics>,
    gauge: Gauge,
}

impl Conversions {
    pub fn new(metrics: Arc<Metrics>) -> Conversions {
        Conversions {
            gauge: metrics.conversions_in_flight(),
            metrics,
        }
    }

    /// Counts one more conversion until every clone of the returned guard is dropped; its clock
    /// starts now.
    pub fn start(&self) -> Alive {
        self.gauge.inc();
        Alive {
            shared: Arc::new(Counted {
                gauge: self.gauge.clone(),
                started: Mutex::new(Instant::now()),
            }),
            metrics: self.metrics.clone(),
        }
    }

    pub fn live(&self) -> usize {
        self.gauge.get().max(0) as usize
    }
}

/// Held by each part of one conversion that may outlive the others (a blocking thread goes on until its
/// next read or write fails, after the request that started it is gone).
#[derive(Debug, Clone)]
pub struct Alive {
    shared: Arc<Counted>,
    metrics: Arc<Metrics>,
}

impl Alive {
    /// Times the conversion under `format` (see [`crate::metrics::FORMATS`]) from its start (the
    /// request's plan: resolving the image) until the returned guard is dropped, which its last
    /// step does (the merge thread, after the output is stored).
    pub fn time(&self, format: &'static str) -> ConversionTimer {
        let started = *self
            .shared
            .started
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.metrics.time_conversion_from(format, started)
    }

    /// Leaves `waited` out of the conversion's time: it waited for another conversion of the same
    /// bytes (a lease), which converted nothing here.
    pub fn exclude(&self, waited: Duration) {
        let mut started = self
            .shared
            .started
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *started = (*started + waited).min(Instant::now());
    }
}

#[derive(Debug)]
struct Counted {
    gauge: Gauge,
    started: Mutex<Instant>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The body of `GET /debug/stats`.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// Conversions with any part still running.
    pub conversions: usize,
    /// Tasks alive on the runtime (connections, fetches, read-aheads).
    pub tasks: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversion_lives_as_long_as_its_last_part() {
        let c = Conversions::default();
        let a = c.start();
        let b = c.start();
        let a2 = a.clone();
        assert_eq!(c.live(), 2);
        drop(a);
        assert_eq!(c.live(), 2);
        drop(a2);
        assert_eq!(c.live(), 1);
        drop(b);
        assert_eq!(c.live(), 0);
    }
}
