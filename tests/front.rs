//! The HTTP front against misbehaving clients, and conditional requests that need no layer: a client
//! trickling its headers byte by byte is let go after `--header-read-timeout`; connections beyond
//! `--max-connections` get a JSON 503; a matching `If-None-Match` and a HEAD read no layer blob (the
//! proxy between strata and the registry counts what it serves).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::fixtures::{Comp, Image, Layer};
use common::proxy::Proxy;
use common::*;

/// Writes `request` one byte at a time, `pause` apart, until done or the server closes; returns how
/// many bytes went out and when the server closed (None: it did not within the request).
fn trickle(addr: &str, request: &[u8], pause: Duration) -> (usize, Option<Duration>) {
    let started = Instant::now();
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(1)))
        .unwrap();
    for (i, byte) in request.iter().enumerate() {
        if conn.write_all(&[*byte]).is_err() {
            return (i, Some(started.elapsed()));
        }
        let mut buf = [0u8; 512];
        match conn.read(&mut buf) {
            Ok(_) => return (i + 1, Some(started.elapsed())),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return (i + 1, Some(started.elapsed())),
        }
        std::thread::sleep(pause);
    }
    (request.len(), None)
}

fn host_port(url: &str) -> &str {
    url.strip_prefix("http://").unwrap()
}

#[test]
fn a_client_trickling_its_headers_is_let_go() {
    let env = env();
    let server = Server::start(&env.registry, &["--header-read-timeout", "2"]);
    let addr = host_port(&server.url).to_string();
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: {}\r\n\r\n",
        "s".repeat(60)
    );
    let slow =
        std::thread::spawn(move || trickle(&addr, request.as_bytes(), Duration::from_millis(100)));
    // Others are served meanwhile.
    std::thread::sleep(Duration::from_millis(500));
    let (status, _, body) = curl(&["--max-time", "5", &format!("{}/healthz", server.url)]);
    assert_eq!((status, &body[..]), (200, &b"ok\n"[..]));
    let (sent, closed) = slow.join().unwrap();
    let closed = closed.expect("the server must close a connection that trickles its headers");
    assert!(
        closed >= Duration::from_millis(1900) && closed < Duration::from_secs(5),
        "closed after {closed:?} ({sent} bytes sent); --header-read-timeout is 2 s"
    );
}

#[test]
fn connections_beyond_the_limit_get_503() {
    let env = env();
    let server = Server::start(
        &env.registry,
        &[
            "--max-connections",
            "2",
            "--max-concurrent",
            "1",
            "--header-read-timeout",
            "30",
        ],
    );
    let addr = host_port(&server.url);
    // Two idle connections hold the limit.
    let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let url = format!("{}/healthz", server.url);
    let err = json_error(&url, 503);
    assert_eq!(err["error"]["code"], "OVERLOADED", "{err}");
    let (_, headers, _) = curl(&[&url]);
    assert_eq!(
        header_value(&headers, "retry-after").as_deref(),
        Some("5"),
        "{headers}"
    );

    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let (status, _, body) = curl(&[&url]);
    assert_eq!((status, &body[..]), (200, &b"ok\n"[..]));
}

/// Blob bytes the proxy served for these layers.
fn layer_bytes(proxy: &Proxy, layers: &[String]) -> u64 {
    layers
        .iter()
        .flat_map(|d| proxy.requests(d))
        .map(|r| r.body_bytes)
        .sum()
}

#[test]
fn conditional_and_head_requests_read_no_layer() {
    let env = env();
    let proxy = Proxy::start(&env.registry);
    let image = Image::new(vec![
        (
            Layer::new().file("a", 0o644, &vec![7u8; 1 << 20]),
            Comp::Gzip,
        ),
        (Layer::new().file("b", 0o644, b"b"), Comp::Gzip),
    ]);
    publish(&env, "conditional", vec![image]);
    let layers = layer_digests(&env.registry, "fixtures/conditional", "v1");
    let r = format!("{}/fixtures/conditional:v1", proxy.addr);

    // A first server converts once and gives the ETag, which is the same on any server.
    let first = Server::start(&proxy.addr, &[]);
    let url = format!("{}/squash/{r}", first.url);
    let (status, headers, whole) = curl(&[&url]);
    assert_eq!(status, 200, "{headers}");
    let (_, headers, _) = curl(&["-I", &url]);
    let etag = header_value(&headers, "etag").expect("an ETag");
    let length = header_value(&headers, "content-length").expect("a length");
    assert_eq!(
        length,
        whole.len().to_string(),
        "HEAD's length is the GET's"
    );
    let read = layer_bytes(&proxy, &layers);
    assert!(read > 0);

    // Warm HEAD: sizes remembered, so nothing of the layers is read.
    for _ in 0..3 {
        let (status, _, _) = curl(&["-I", &url]);
        assert_eq!(status, 200);
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        layer_bytes(&proxy, &layers),
        read,
        "a warm HEAD read layers"
    );

    // A cold server (its own empty cache) answers the ETag from the manifest alone.
    let cold = Server::start(&proxy.addr, &[]);
    let cold_url = format!("{}/squash/{r}", cold.url);
    for inm in [
        etag.clone(),
        format!("\"x\", {etag}"),
        format!("W/{etag}"),
        "*".into(),
    ] {
        let (status, headers, body) = curl(&["-H", &format!("If-None-Match: {inm}"), &cold_url]);
        assert_eq!(status, 304, "If-None-Match: {inm}\n{headers}");
        assert!(body.is_empty());
        assert_eq!(header_value(&headers, "etag").as_deref(), Some(&etag[..]));
    }
    assert_eq!(
        layer_bytes(&proxy, &layers),
        read,
        "a matching If-None-Match read layers"
    );
    // Not matching: the whole image, same bytes.
    let (status, _, body) = curl(&["-H", "If-None-Match: \"other\"", &cold_url]);
    assert_eq!((status, body == whole), (200, true));
}
