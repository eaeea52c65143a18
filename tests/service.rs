//! The service as a whole: a concurrency limit that answers 503 with Retry-After beyond it, and a
//! graceful stop on SIGTERM (no new connections, in-flight conversions finish within the grace
//! period, the rest are aborted so their clients see a failed transfer).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::fixtures::{noise, Layer};
use common::proxy::{Fault, Proxy};
use common::*;
use serde_json::Value;

/// An image of `len` incompressible bytes in one layer, whose blob the proxy serves at `rate` bytes
/// per second; returns the reference through the proxy. Sizes are made known first (a `HEAD` through
/// `server`, which stores nothing, so a `GET` converts), so the transfer itself is what takes the time.
fn slow_image(
    env: &Env,
    proxy: &Proxy,
    server: &Server,
    name: &str,
    len: usize,
    rate: u64,
) -> String {
    let blob = publish_layer(
        env,
        name,
        Layer::new().file("payload", 0o644, &noise(len, 9)),
    );
    let r = format!("{}/fixtures/{name}:v1", proxy.addr);
    let (status, _, _) = curl(&["-f", "-I", &format!("{}/squash/{r}", server.url)]);
    assert_eq!(status, 200);
    proxy.rule(&blob, Fault::Throttle(rate), None);
    r
}

/// A curl running in the background, writing the body to a file.
fn background_curl(url: &str, out: &std::path::Path) -> Child {
    Command::new("curl")
        .args(["-sS", "-f", "-o"])
        .arg(out)
        .arg(url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn beyond_the_concurrency_limit_the_answer_is_503_with_retry_after() {
    let env = env();
    let proxy = Proxy::start(&env.registry);
    let server = Server::start(&proxy.addr, &["--max-concurrent", "1"]);
    let r = slow_image(&env, &proxy, &server, "overload", 4 << 20, 2 << 20);
    let url = format!("{}/squash/{r}", server.url);
    let out = scratch("overload").join("first.tar");
    let mut first = background_curl(&url, &out);
    std::thread::sleep(Duration::from_millis(500));

    let (status, headers, body) = curl(&[&url]);
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(header_value(&headers, "retry-after").is_some(), "{headers}");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "OVERLOADED", "{v}");

    assert!(
        first.wait().unwrap().success(),
        "the conversion in progress finishes"
    );
    let (status, _, _) = curl(&["-f", "-o", "/dev/null", &url]);
    assert_eq!(status, 200, "served again once the slot is free");
}

#[test]
fn sigterm_lets_conversions_in_flight_finish() {
    let env = env();
    let proxy = Proxy::start(&env.registry);
    let mut server = Server::start(&proxy.addr, &["--shutdown-grace", "30"]);
    // About 3 s of transfer.
    let r = slow_image(&env, &proxy, &server, "sigterm-finish", 6 << 20, 2 << 20);
    let url = format!("{}/squash/{r}", server.url);
    let dir = scratch("sigterm-finish");
    let mut inflight = background_curl(&url, &dir.join("inflight.tar"));
    std::thread::sleep(Duration::from_millis(700));
    server.terminate();
    std::thread::sleep(Duration::from_millis(300));

    // No new connections once stopping.
    let (status, _, _) = curl(&["--max-time", "5", &url]);
    assert_eq!(status, 0, "a request after SIGTERM must not be served");
    assert!(
        inflight.wait().unwrap().success(),
        "the transfer in flight completes"
    );
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "exits cleanly: {status:?}"
    );
}

#[test]
fn sigterm_aborts_what_outlasts_the_grace_period() {
    let env = env();
    let proxy = Proxy::start(&env.registry);
    let mut server = Server::start(&proxy.addr, &["--shutdown-grace", "1"]);
    // About 8 s of transfer: far beyond the grace period.
    let r = slow_image(&env, &proxy, &server, "sigterm-abort", 8 << 20, 1 << 20);
    let url = format!("{}/squash/{r}", server.url);
    let out = scratch("sigterm-abort").join("partial.tar");
    let mut inflight = background_curl(&url, &out);
    std::thread::sleep(Duration::from_millis(700));
    let stopped = Instant::now();
    server.terminate();
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(status.is_some(), "the server exits after the grace period");
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "took {:?}",
        stopped.elapsed()
    );
    assert!(
        !inflight.wait().unwrap().success(),
        "the cut transfer must fail for its client"
    );
}

/// A client that reads slowly holds the conversion back, and the conversion holds back the registry:
/// buffers stay bounded, so memory does not grow with what the client has not read yet.
#[test]
fn a_slow_reader_pushes_back_on_the_registry() {
    let env = env();
    let proxy = Proxy::start(&env.registry);
    let server = Server::start(&proxy.addr, &[]);
    let name = "slow-reader";
    let blob = publish_layer(
        &env,
        name,
        Layer::new().file("payload", 0o644, &noise(96 << 20, 5)),
    );
    let url = format!("{}/squash/{}/fixtures/{name}:v1", server.url, proxy.addr);
    // Sized, not stored: the slow GET converts.
    let (status, _, _) = curl(&["-f", "-I", &url]);
    assert_eq!(status, 200);
    let rss_before = server.peak_rss_kib();

    // 1 MiB/s for three seconds.
    let out = scratch("slow-reader").join("body");
    let mut slow = Command::new("curl")
        .args(["-sS", "--limit-rate", "1M", "-o"])
        .arg(&out)
        .arg(&url)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let fetched = proxy.requests(&blob).pop().unwrap().body_bytes;
    let read = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    slow.kill().unwrap();
    slow.wait().unwrap();
    eprintln!("slow reader: read {read} bytes, strata fetched {fetched}");
    assert!(read < 32 << 20, "the client read {read} bytes");
    // What the client has not read waits in bounded buffers (body channel, read-ahead, socket buffers
    // on both sides), not in memory that grows with the layer: unbounded, strata would have fetched
    // all 96 MiB by now.
    assert!(
        fetched < read + (40 << 20),
        "fetched {fetched} bytes from the registry for a client that read {read}"
    );
    let rss = server.peak_rss_kib();
    assert!(
        rss < rss_before + 32 * 1024,
        "peak RSS went from {rss_before} KiB to {rss} KiB"
    );
}

/// A log that is not a terminal (a file, a pipe) gets no terminal escape codes.
#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let env = env();
    let server = Server::start_logging(&env.registry, &[], "info");
    let (status, _, _) = curl(&[&format!("{}/healthz", server.url)]);
    assert_eq!(status, 200);
    std::thread::sleep(Duration::from_millis(300));
    let log = server.log.lock().unwrap().clone();
    assert!(log.contains("request finished"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "escape codes in a piped log: {log:?}"
    );
}
