//! The one-shot commands' progress bar (`strata squash`, `strata aci`): layer bytes read upstream
//! against the image's compressed size, with rate and ETA, drawn on standard error when it is a
//! terminal and `--quiet` is not given. The bytes are the `upstream_bytes` metric, which the source
//! counts as blobs arrive, so the bar needs no hook in the conversion.
//!
//! A conversion may read its layers twice: once to size the output (unless their summaries are
//! remembered), then to convert. Each pass is a [`Progress::phase`] of its own, from zero.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::metrics::Metrics;

/// How often the bar follows the counter: indicatif redraws at most this often anyway.
const REFRESH: Duration = Duration::from_millis(100);

/// Where log lines go while a bar may be drawn: around the bar (hidden, line written, redrawn),
/// so neither tears the other.
#[derive(Clone, Default)]
pub struct Stderr {
    bar: Arc<Mutex<Option<ProgressBar>>>,
}

impl Stderr {
    fn set(&self, bar: Option<ProgressBar>) {
        *self.bar.lock().unwrap_or_else(|p| p.into_inner()) = bar;
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = StderrLine;

    fn make_writer(&'a self) -> StderrLine {
        StderrLine {
            bar: self.bar.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

/// One log line's writer.
pub struct StderrLine {
    bar: Option<ProgressBar>,
}

impl Write for StderrLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.bar {
            Some(bar) => bar.suspend(|| io::stderr().write_all(buf))?,
            None => io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// A progress bar following the upstream byte counter; shows nothing when not `shown`.
pub struct Progress {
    bar: ProgressBar,
    metrics: Arc<Metrics>,
    logs: Stderr,
    baseline: Arc<std::sync::atomic::AtomicU64>,
    follow: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// `total`: the compressed bytes of the image's layers, what one pass reads.
    pub fn new(metrics: Arc<Metrics>, total: u64, shown: bool, logs: &Stderr) -> Progress {
        let target = if shown {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(total), target);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        if shown {
            logs.set(Some(bar.clone()));
        }
        let baseline = Arc::new(std::sync::atomic::AtomicU64::new(
            metrics.upstream_bytes_total(),
        ));
        let follow = shown.then(|| {
            let (bar, metrics, baseline) = (bar.clone(), metrics.clone(), baseline.clone());
            tokio::spawn(async move {
                loop {
                    let from = baseline.load(std::sync::atomic::Ordering::Relaxed);
                    bar.set_position(metrics.upstream_bytes_total().saturating_sub(from));
                    tokio::time::sleep(REFRESH).await;
                }
            })
        });
        Progress {
            bar,
            metrics,
            logs: logs.clone(),
            baseline,
            follow,
        }
    }

    /// Starts a pass over the layers, its bytes counted from zero.
    pub fn phase(&self, message: &'static str) {
        self.baseline.store(
            self.metrics.upstream_bytes_total(),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.bar.reset();
        self.bar.set_message(message);
        self.bar.tick();
    }

    /// Leaves the last state drawn (what was read, how fast), and the log lines unwrapped again.
    pub fn finish(mut self) {
        if let Some(follow) = self.follow.take() {
            follow.abort();
            let from = self.baseline.load(std::sync::atomic::Ordering::Relaxed);
            self.bar
                .set_position(self.metrics.upstream_bytes_total().saturating_sub(from));
        }
        self.bar.finish();
        self.logs.set(None);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(follow) = self.follow.take() {
            follow.abort();
            self.bar.abandon();
        }
        self.logs.set(None);
    }
}
