//! Streaming end to end, seen from outside: strata behind a fault-injecting proxy in front of the real
//! registry. The first byte leaves before the bottom layer is fetched; a client hang-up stops the upstream
//! fetch; a registry that fails after the first byte, or a merged layer that outgrows its announced size,
//! aborts the transfer so that no loader takes the result for a whole image, and the next request succeeds.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::fixtures::{noise, Comp, Image, Layer};
use common::proxy::{Fault, Outcome, Proxy};
use common::*;
use serde_json::Value;

/// A three-layer image whose bottom layer is `bottom_len` bytes of noise and whose top layer holds
/// `top_len` bytes, pushed to the registry; returns (reference through the proxy, bottom blob digest).
fn setup(
    env: &Env,
    proxy: &Proxy,
    name: &str,
    bottom_len: usize,
    top_len: usize,
) -> (String, String) {
    let image = Image::new(vec![
        (
            Layer::new()
                .dir("data", 0o755)
                .file("data/bottom", 0o644, &noise(bottom_len, 1)),
            Comp::Gzip,
        ),
        (Layer::new().file("data/mid", 0o644, b"mid"), Comp::Gzip),
        (
            Layer::new().file("data/top", 0o644, &noise(top_len, 2)),
            Comp::Gzip,
        ),
    ]);
    publish(env, name, vec![image]);
    let layers = layer_digests(&env.registry, &format!("fixtures/{name}"), "v1");
    (
        format!("{}/fixtures/{name}:v1", proxy.addr),
        layers[0].clone(),
    )
}

/// A GET on a raw socket, to see when bytes arrive: returns the socket after the response head, and
/// the head.
fn open(server: &Server, path: &str) -> (TcpStream, String, Vec<u8>) {
    let addr = server.url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed before the response head");
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&got[..end]).into_owned();
    (s, head, got[end..].to_vec())
}

/// The whole body of a transfer that must succeed.
fn body_of(server: &Server, reference: &str) -> Vec<u8> {
    let out = scratch(&format!("body-{}", rand_suffix())).join("body");
    let (status, code) = curl_exit(&format!("{}/squash/{reference}", server.url), &out);
    assert_eq!((status, code), (200, 0), "status and curl exit code");
    std::fs::read(out).unwrap()
}

#[test]
fn first_byte_leaves_before_the_bottom_layer_is_fetched() {
    let Some(env) = env() else { return };
    let proxy = Proxy::start(&env.registry);
    let server = Server::start(&proxy.addr, &[]);
    let (r, bottom) = setup(&env, &proxy, "stream-first-byte", 1 << 20, 300 << 10);
    // A first request makes the size known, as for any image converted before.
    let whole = body_of(&server, &r);

    let stall = Duration::from_secs(4);
    proxy.rule(&bottom[7..], Fault::Stall(stall), Some(1));
    let start = Instant::now();
    let (mut s, head, mut body) = open(&server, &format!("/squash/{r}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Everything above the bottom layer, the top layer's 300 KiB included, arrives during the stall.
    let mut buf = vec![0u8; 64 << 10];
    while body.len() < 300 << 10 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early");
        body.extend_from_slice(&buf[..n]);
    }
    let early = start.elapsed();
    assert!(
        early < stall - Duration::from_secs(1),
        "{} bytes took {early:?}, the bottom layer's stall is {stall:?}",
        body.len()
    );
    s.read_to_end(&mut body).unwrap();
    assert!(start.elapsed() >= stall, "the stall did apply");
    assert!(body == whole, "same bytes as the unstalled request");
    let fetches = proxy.requests(&bottom[7..]);
    assert_eq!(fetches.last().unwrap().outcome, Outcome::Complete);
}

#[test]
fn a_client_hang_up_stops_the_upstream_fetch() {
    let Some(env) = env() else { return };
    let proxy = Proxy::start(&env.registry);
    let server = Server::start(&proxy.addr, &[]);
    let (r, bottom) = setup(&env, &proxy, "stream-hangup", 32 << 20, 1 << 10);
    body_of(&server, &r);
    let before = proxy.requests(&bottom[7..]).len();

    // 2 MiB/s: the 32 MiB blob would take 16 s.
    proxy.rule(&bottom[7..], Fault::Throttle(2 << 20), None);
    let (s, head, _) = open(&server, &format!("/squash/{r}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.requests(&bottom[7..]).len() == before {
        assert!(
            Instant::now() < deadline,
            "strata never fetched the bottom layer"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let hung_up = Instant::now();
    drop(s);

    let fetch = loop {
        let f = proxy.requests(&bottom[7..]).pop().unwrap();
        if f.outcome != Outcome::InProgress || hung_up.elapsed() > Duration::from_secs(5) {
            break f;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(fetch.outcome, Outcome::ClientGone, "{fetch:?}");
    let stopped = fetch.ended.unwrap().saturating_duration_since(hung_up);
    assert!(
        stopped < Duration::from_secs(1),
        "upstream fetch went on for {stopped:?} after the client left"
    );
    assert!(fetch.body_bytes < 16 << 20, "{fetch:?}");
}

/// curl's view of a transfer: (HTTP status, curl's exit code, body).
fn curl_exit(url: &str, out: &std::path::Path) -> (u16, i32) {
    let o = Command::new("curl")
        .args(["-sS", "-o"])
        .arg(out)
        .args(["-w", "%{http_code}", url])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (status, o.status.code().unwrap_or(-1))
}

/// `docker load` of a file must fail.
fn docker_load_fails(file: &std::path::Path) {
    let out = docker().arg("load").arg("-i").arg(file).output().unwrap();
    assert!(
        !out.status.success(),
        "docker load took a broken transfer: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_registry_failing_after_the_first_byte_aborts_the_transfer() {
    let Some(env) = env() else { return };
    let proxy = Proxy::start(&env.registry);
    let server = Server::start(&proxy.addr, &[]);
    let (r, bottom) = setup(&env, &proxy, "stream-upstream-dies", 4 << 20, 1 << 10);
    let whole = body_of(&server, &r);
    let url = format!("{}/squash/{r}", server.url);
    let dir = scratch("upstream-dies");

    for (what, fault) in [
        ("connection cut mid-blob", Fault::Truncate(1 << 20)),
        ("bytes changed in flight", Fault::Corrupt(2 << 20)),
    ] {
        proxy.rule(&bottom[7..], fault, Some(1));
        let out = dir.join("partial.tar");
        let (status, code) = curl_exit(&url, &out);
        assert_eq!(
            status, 200,
            "{what}: the failure comes after the first byte"
        );
        assert_ne!(code, 0, "{what}: curl must see a failed transfer");
        let got = std::fs::read(&out).unwrap();
        assert!(got.len() < whole.len(), "{what}: {} bytes", got.len());
        docker_load_fails(&out);
    }
    // Nothing was remembered wrong: the next request is whole again.
    assert!(body_of(&server, &r) == whole, "the next request is whole");
}

#[test]
fn a_registry_failing_before_the_first_byte_is_a_json_502() {
    let Some(env) = env() else { return };
    let proxy = Proxy::start(&env.registry);
    let server = Server::start(&proxy.addr, &[]);
    let (r, bottom) = setup(&env, &proxy, "stream-cold-fail", 1 << 20, 1 << 10);
    // Nothing is remembered yet, so the failing layer is met while sizing, before any byte.
    for fault in [
        Fault::Truncate(100 << 10),
        Fault::Corrupt(500 << 10),
        Fault::Status(500),
    ] {
        proxy.rule(&bottom[7..], fault.clone(), Some(1));
        let (status, headers, body) = curl(&[&format!("{}/squash/{r}", server.url)]);
        assert_eq!(status, 502, "{fault:?}: {}", String::from_utf8_lossy(&body));
        assert_eq!(
            header_value(&headers, "content-type").as_deref(),
            Some("application/json")
        );
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&bottom[7..]),
            "{fault:?}: the error names the layer: {v}"
        );
        // The registry's fault, not the image's: bytes that miss their digest included.
        assert_eq!(v["error"]["code"], "UPSTREAM", "{fault:?}: {v}");
    }
    body_of(&server, &r);
}

#[test]
fn a_merged_layer_outgrowing_its_announced_size_aborts_and_the_next_request_succeeds() {
    let Some(env) = env() else { return };
    let server = Server::start(&env.registry, &[]);
    let image = Image::new(vec![(
        Layer::new().file("f", 0o644, &noise(100 << 10, 3)),
        Comp::Gzip,
    )]);
    let r = publish(&env, "size-exceeded", vec![image]);
    let whole = body_of(&server, &r);

    // Make the remembered merged size of this image too small, as a wrong estimate would be.
    let sizes: Vec<_> = std::fs::read_dir(server.cache.join("sizes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(sizes.len(), 1, "{sizes:?}");
    let real: u64 = std::fs::read_to_string(&sizes[0])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::fs::write(&sizes[0], format!("{}\n", real - 4096)).unwrap();

    let url = format!("{}/squash/{r}", server.url);
    let dir = scratch("size-exceeded");
    let out = dir.join("partial.tar");
    let (status, code) = curl_exit(&url, &out);
    assert_eq!(status, 200);
    assert_ne!(code, 0, "curl must see a failed transfer");
    docker_load_fails(&out);

    // The wrong size is forgotten: the next request is sized afresh and whole.
    assert!(body_of(&server, &r) == whole, "the next request is whole");
    let remembered: u64 = std::fs::read_to_string(&sizes[0])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(remembered, real);
}
