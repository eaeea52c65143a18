//! The tarball routes' one conversion per key within one process, on a directory store (the
//! default `<cache-dir>/store`): concurrent `/squash` GETs of a new image make one conversion and
//! the others are served its stored bytes; a request that hangs up while it waits leaves no lease,
//! conversion or task behind; HEAD neither waits nor converts. Across replicas: tests/fleet_s3.rs.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::fixtures::{noise, Comp, Image, Layer};
use common::proxy::{Fault, Proxy};
use common::*;

const CONCURRENT: usize = 6;
const WAITING: &str = "another request here is converting; waiting for its result";
const STORED: &str = "strata::convert::tee: stored tarball";

/// `/debug/stats`: (conversions alive, runtime tasks alive).
fn stats(server: &Server) -> (u64, u64) {
    let (status, _, body) = curl(&[&format!("{}/debug/stats", server.url)]);
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    (
        v["conversions"].as_u64().unwrap(),
        v["tasks"].as_u64().unwrap(),
    )
}

/// The lease generations in the server's store.
fn leases(server: &Server) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![server.cache.join("store/leases")];
    while let Some(dir) = pending.pop() {
        for e in std::fs::read_dir(dir).into_iter().flatten() {
            let p = e.unwrap().path();
            if p.is_dir() {
                pending.push(p);
            } else {
                found.push(p);
            }
        }
    }
    found
}

fn logged(server: &Server, line: &str) -> usize {
    server.log.lock().unwrap().matches(line).count()
}

fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Publishes `fixtures/<name>:v1`, two layers of bytes of its own (no summary of one is remembered
/// from another); its reference through the proxy and its layer digests.
fn setup(env: &Env, proxy: &Proxy, name: &str) -> (String, Vec<String>) {
    let seed = name.bytes().map(u64::from).sum();
    let image = Image::new(vec![
        (
            Layer::new()
                .dir("data", 0o755)
                .file("data/name", 0o644, name.as_bytes()),
            Comp::Gzip,
        ),
        (
            Layer::new().file("data/top", 0o644, &noise(64 << 10, seed)),
            Comp::Gzip,
        ),
    ]);
    publish(env, name, vec![image]);
    (
        format!("{}/fixtures/{name}:v1", proxy.addr),
        layer_digests(&env.registry, &format!("fixtures/{name}"), "v1"),
    )
}

#[test]
fn concurrent_misses_in_one_process_convert_once() {
    let env = env();
    let proxy = Proxy::start(&env.registry);
    let (reference, layers) = setup(&env, &proxy, "lease-one");
    // The converting request's first read of the top layer is held: the others arrive meanwhile.
    proxy.rule(
        layers.last().unwrap(),
        Fault::Stall(Duration::from_secs(2)),
        Some(1),
    );
    let server = Server::start_logging(&proxy.addr, &[], "info");
    let url = format!("{}/squash/{reference}", server.url);
    let answers: Vec<(u16, String, Vec<u8>)> = std::thread::scope(|s| {
        let asks: Vec<_> = (0..CONCURRENT).map(|_| s.spawn(|| curl(&[&url]))).collect();
        asks.into_iter().map(|a| a.join().unwrap()).collect()
    });
    let (_, first_headers, first) = &answers[0];
    for (status, headers, body) in &answers {
        assert_eq!(*status, 200, "{headers}");
        assert!(body == first, "bodies differ");
        assert_eq!(
            header_value(headers, "etag"),
            header_value(first_headers, "etag")
        );
    }
    assert_eq!(logged(&server, STORED), 1, "conversions stored");
    assert_eq!(
        logged(&server, WAITING),
        CONCURRENT - 1,
        "requests that waited"
    );
    let fetched = proxy.settled_requests("/blobs/");
    for layer in &layers {
        let n = fetched.iter().filter(|r| r.path.ends_with(layer)).count();
        assert!((1..=2).contains(&n), "{layer} fetched {n} times");
    }
    eventually("a lease left behind", Duration::from_secs(5), || {
        leases(&server).is_empty()
    });

    // HEAD of an image not stored answers from its plan alone: it waits for no lease.
    let (_, other_layers) = setup(&env, &proxy, "lease-head");
    proxy.rule(
        other_layers.last().unwrap(),
        Fault::Stall(Duration::from_secs(2)),
        Some(1),
    );
    let other = format!(
        "{}/squash/{}/fixtures/lease-head:v1",
        server.url, proxy.addr
    );
    let converting = std::thread::spawn({
        let other = other.clone();
        move || curl(&[&other])
    });
    std::thread::sleep(Duration::from_millis(500));
    let (status, _, _) = curl(&["-I", &other]);
    assert_eq!(status, 200);
    assert_eq!(converting.join().unwrap().0, 200);
    assert_eq!(logged(&server, WAITING), CONCURRENT - 1, "a HEAD waited");
    // Stored once its last byte has left.
    eventually("not stored", Duration::from_secs(10), || {
        logged(&server, STORED) == 2
    });
}

#[test]
fn a_request_that_hangs_up_while_waiting_leaves_no_lease_or_task() {
    let env = env();
    let proxy = Proxy::start(&env.registry);
    let (warm, _) = setup(&env, &proxy, "lease-warm");
    let (reference, layers) = setup(&env, &proxy, "lease-gone");
    let server = Server::start_logging(&proxy.addr, &[], "info");
    // Whatever a conversion sets up once exists from here on.
    let (status, _, _) = curl(&[&format!("{}/squash/{warm}", server.url)]);
    assert_eq!(status, 200);
    let mut baseline = stats(&server);
    eventually("never settled", Duration::from_secs(5), || {
        let now = stats(&server);
        let settled = now == baseline && now.0 == 0;
        baseline = now;
        settled
    });
    let prepared = logged(&server, "prepared");

    // The first request holds the lease while its top layer's read stalls; the second waits for
    // it. Both clients give up before the stall ends.
    proxy.rule(
        layers.last().unwrap(),
        Fault::Stall(Duration::from_secs(3)),
        Some(1),
    );
    let url = format!("{}/squash/{reference}", server.url);
    let holder = std::thread::spawn({
        let url = url.clone();
        move || curl(&["--max-time", "2", &url])
    });
    eventually(
        "the holder never read its top layer",
        Duration::from_secs(5),
        || !proxy.requests(layers.last().unwrap()).is_empty(),
    );
    let waiter = std::thread::spawn({
        let url = url.clone();
        move || curl(&["--max-time", "1", &url])
    });
    eventually(
        "the second request did not wait",
        Duration::from_secs(5),
        || logged(&server, WAITING) == 1,
    );
    assert_eq!(waiter.join().unwrap().0, 0, "the waiter was answered");
    assert_eq!(holder.join().unwrap().0, 0, "the holder was answered");

    // Once the holder's request is gone its lease is released; a waiter still running would take
    // it and convert for nobody.
    eventually("a lease left behind", Duration::from_secs(5), || {
        leases(&server).is_empty()
    });
    eventually(
        "a conversion or task left behind",
        Duration::from_secs(10),
        || stats(&server) == baseline,
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        logged(&server, "prepared"),
        prepared,
        "converted after the hang-ups"
    );
    assert_eq!(logged(&server, STORED), 1, "only the warm-up was stored");
    assert!(leases(&server).is_empty());

    // The key is free: the next request converts at once.
    let (status, _, _) = curl(&[&url]);
    assert_eq!(status, 200);
    assert_eq!(logged(&server, WAITING), 1);
    // Stored once its last byte has left.
    eventually("not stored", Duration::from_secs(10), || {
        logged(&server, STORED) == 2
    });
}
