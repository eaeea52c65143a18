//! Streaming end to end, seen from outside: strata behind a fault-injecting proxy in front of the real
//! registry. The first byte leaves before the bottom layer is fetched; a client hang-up stops the upstream
//! fetch; a registry that fails after the first byte, or a merged layer that outgrows its announced size,
//! aborts the transfer so that no loader takes the result for a whole image, and the next request succeeds;
//! hang-ups, while sizing or while streaming, leave no task, socket, file or conversion behind.

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

/// Makes the image's size known as a first `HEAD` does: nothing is converted or stored, so the next
/// `GET` is a conversion (a stored one would stream the stored bytes) that starts at once.
fn size(server: &Server, reference: &str) {
    let (status, _, _) = curl(&["-I", &format!("{}/squash/{reference}", server.url)]);
    assert_eq!(status, 200);
}

/// The image as a server that stores and remembers nothing converts it through `registry`.
fn converted_apart(registry: &str, reference: &str) -> Vec<u8> {
    body_of(&Server::start(registry, &["--no-cache"]), reference)
}

#[test]
fn first_byte_leaves_before_the_bottom_layer_is_fetched() {
    let env = env();
    let proxy = Proxy::start(&env.registry);
    let server = Server::start(&proxy.addr, &[]);
    let (r, bottom) = setup(&env, &proxy, "stream-first-byte", 1 << 20, 300 << 10);
    let whole = converted_apart(&proxy.addr, &r);
    size(&server, &r);

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
    // The proxy records the outcome after its last write, which may be after strata's last byte
    // reached us: give its thread a moment on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(5);
    let outcome = loop {
        let outcome = proxy.requests(&bottom[7..]).last().unwrap().outcome.clone();
        if outcome != Outcome::InProgress || Instant::now() > deadline {
            break outcome;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(outcome, Outcome::Complete);
}

#[test]
fn a_client_hang_up_stops_the_upstream_fetch() {
    let env = env();
    let proxy = Proxy::start(&env.registry);
    let server = Server::start(&proxy.addr, &[]);
    let (r, bottom) = setup(&env, &proxy, "stream-hangup", 32 << 20, 1 << 10);
    size(&server, &r);
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
    let env = env();
    let proxy = Proxy::start(&env.registry);
    let server = Server::start(&proxy.addr, &[]);
    let (r, bottom) = setup(&env, &proxy, "stream-upstream-dies", 4 << 20, 1 << 10);
    let whole = converted_apart(&proxy.addr, &r);
    size(&server, &r);
    let url = format!("{}/squash/{r}", server.url);
    let dir = scratch("upstream-dies");

    for (what, fault) in [
        // Past the bytes a response holds back before it starts.
        ("connection cut mid-blob", Fault::Truncate(3 << 20)),
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
    let env = env();
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
    let env = env();
    let server = Server::start(&env.registry, &[]);
    // Larger than a response holds back before it starts: the oversize is met after the first byte.
    let image = Image::new(vec![(
        Layer::new().file("f", 0o644, &noise(3 << 20, 3)),
        Comp::Gzip,
    )]);
    let r = publish(&env, "size-exceeded", vec![image]);
    let whole = converted_apart(&env.registry, &r);
    // A whole conversion remembers the exact size; its stored copy is then taken away, so the
    // next request converts again, sized by what is remembered.
    let first = body_of(&server, &r);
    let store = server.cache.join("store");
    assert!(stored_whole(&store, &first));
    for part in stored_parts(&store, &first) {
        std::fs::remove_file(part).unwrap();
    }

    // Make the remembered merged size of this image too small, as a wrong estimate would be.
    let sizes: Vec<_> = std::fs::read_dir(server.cache.join("sizes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(sizes.len(), 1, "{sizes:?}");
    // `<output version> <size>`: keep the version, so the wrong size is trusted.
    let remembered = |path: &std::path::Path| -> (String, u64) {
        let text = std::fs::read_to_string(path).unwrap();
        let (version, size) = text.trim().split_once(' ').unwrap();
        (version.to_string(), size.parse().unwrap())
    };
    let (version, real) = remembered(&sizes[0]);
    std::fs::write(&sizes[0], format!("{version} {}\n", real - 4096)).unwrap();

    let url = format!("{}/squash/{r}", server.url);
    let dir = scratch("size-exceeded");
    let out = dir.join("partial.tar");
    let (status, code) = curl_exit(&url, &out);
    assert_eq!(status, 200);
    assert_ne!(code, 0, "curl must see a failed transfer");
    docker_load_fails(&out);

    // The wrong size is forgotten: the next request is sized afresh (an upper bound, as a first
    // request is) and whole.
    assert!(body_of(&server, &r) == whole, "the next request is whole");
    assert_eq!(remembered(&sizes[0]).1, real);
}

/// A bound is an estimate: a layer below the top one holding a sparse file (its blob tells the size
/// of its data, the merged tar holds the file whole) makes it too small. Past the bytes a response
/// holds back, the transfer aborts (no complete-looking archive), and the retry is sized exactly and
/// whole.
#[test]
fn a_merged_layer_outgrowing_its_bound_aborts_and_the_retry_is_exact() {
    let env = env();
    let server = Server::start(&env.registry, &[]);
    let top = noise(2 << 20, 9);
    let r = sparse_below(&env, "bound-exceeded", &top);
    let url = format!("{}/squash/{r}", server.url);
    let (_, head, _) = curl(&["-I", &url]);
    let announced: u64 = header_value(&head, "content-length")
        .unwrap()
        .parse()
        .unwrap();
    let dir = scratch("bound-exceeded");
    let out = dir.join("partial.tar");
    let (status, code) = curl_exit(&url, &out);
    assert_eq!(status, 200);
    assert_ne!(code, 0, "curl must see a failed transfer");
    docker_load_fails(&out);
    assert!(
        server.log.lock().unwrap().contains("outgrew the bound"),
        "the abort is logged"
    );

    // Sized exactly now: whole, and no longer than the merged tar needs.
    let (_, head, _) = curl(&["-I", &url]);
    let exact: u64 = header_value(&head, "content-length")
        .unwrap()
        .parse()
        .unwrap();
    assert!(exact > announced, "{exact} vs the bound's {announced}");
    let body = body_of(&server, &r);
    assert_eq!(body.len() as u64, exact);
    check_exact(&body, top.len(), &dir);
}

/// The same bound outgrown within the bytes a response holds back: the client never sees it, the
/// conversion is run again sized exactly, and the first response is that one.
#[test]
fn a_bound_outgrown_before_the_response_starts_is_converted_again_unseen() {
    let env = env();
    let server = Server::start(&env.registry, &[]);
    let top = b"top".to_vec();
    let r = sparse_below(&env, "bound-exceeded-early", &top);
    let dir = scratch("bound-exceeded-early");
    let (status, headers, body) = curl(&["-f", &format!("{}/squash/{r}", server.url)]);
    assert_eq!(status, 200);
    let log = server.log.lock().unwrap().clone();
    assert!(log.contains("outgrew the bound"), "{log}");
    assert_eq!(
        header_value(&headers, "content-length"),
        Some(body.len().to_string())
    );
    check_exact(&body, top.len(), &dir);
}

/// An image whose layer below the top one holds a 2 MiB sparse file; the top layer holds `top`.
fn sparse_below(env: &Env, name: &str, top: &[u8]) -> String {
    let image = Image::new(vec![
        (
            Layer::new().pax_sparse("1.0", "sparse", 2 << 20, &[(0, b"head"), (1 << 20, b"x")]),
            Comp::Gzip,
        ),
        (Layer::new().file("top", 0o644, top), Comp::Gzip),
    ]);
    publish(env, name, vec![image])
}

/// `body` (of [`sparse_below`]) holds the sparse file whole and no padding, and docker loads it.
fn check_exact(body: &[u8], top_len: usize, dir: &std::path::Path) {
    let listing = squash_listing(body);
    assert!(listing.keys().any(|k| k == "sparse"), "{listing:?}");
    let layer_len = {
        let mut tar = tar::Archive::new(body);
        let e = tar.entries().unwrap().next().unwrap().unwrap();
        e.header().size().unwrap()
    };
    // `top`, the sparse file whole, and the end blocks: no padding.
    let merged = 512 + top_len.div_ceil(512) * 512 + 512 + (2 << 20) + 1024;
    assert_eq!(layer_len, merged as u64, "exact: no padding");
    let loaded = dir.join("whole.tar");
    std::fs::write(&loaded, body).unwrap();
    run(docker().arg("load").arg("-i").arg(&loaded));
}

/// What a server holds: open descriptors, TCP sockets to a port, and its own counts (`/debug/stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    fds: usize,
    upstream_sockets: usize,
    conversions: u64,
    tasks: u64,
}

/// The inodes of the TCP sockets (v4 and v6) connected to `port`, from the network namespace's tables.
fn sockets_to(pid: u32, port: u16) -> Vec<String> {
    let mut inodes = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let remote_port = cols[2].rsplit(':').next().unwrap();
            if u16::from_str_radix(remote_port, 16) == Ok(port) {
                inodes.push(cols[9].to_string());
            }
        }
    }
    inodes
}

fn held(server: &Server, upstream_port: u16) -> Held {
    let pid = server.pid();
    let links: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .collect();
    let upstream = sockets_to(pid, upstream_port);
    let upstream_sockets = links
        .iter()
        .filter(|l| {
            l.strip_prefix("socket:[")
                .and_then(|l| l.strip_suffix(']'))
                .is_some_and(|inode| upstream.iter().any(|u| u == inode))
        })
        .count();
    let (status, _, body) = curl(&[&format!("{}/debug/stats", server.url)]);
    assert_eq!(status, 200);
    let stats: Value = serde_json::from_slice(&body).unwrap();
    Held {
        fds: links.len(),
        upstream_sockets,
        conversions: stats["conversions"].as_u64().unwrap(),
        tasks: stats["tasks"].as_u64().unwrap(),
    }
}

/// Polls until `f` holds or `timeout` passes; whether it held.
fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends a GET and returns at once, the response not yet begun.
fn send(server: &Server, path: &str) -> TcpStream {
    let addr = server.url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    s
}

#[test]
fn client_hang_ups_leave_no_task_socket_or_file_behind() {
    let env = env();
    let proxy = Proxy::start(&env.registry);
    let server = Server::start(&proxy.addr, &[]);
    let port: u16 = proxy.addr.rsplit(':').next().unwrap().parse().unwrap();
    let (warm, warm_bottom) = setup(&env, &proxy, "leak-warm", 16 << 20, 1 << 10);
    // Its own bytes, so that nothing of it is remembered from the other.
    let image = Image::new(vec![(
        Layer::new().file("cold", 0o644, &noise(16 << 20, 4)),
        Comp::Gzip,
    )]);
    publish(&env, "leak-cold", vec![image]);
    let cold = format!("{}/fixtures/leak-cold:v1", proxy.addr);
    let cold_bottom = layer_digests(&env.registry, "fixtures/leak-cold", "v1").remove(0);
    // Everything a conversion sets up once (client, blocking threads, cache dirs) exists from here on.
    // Stored under a name of its own, so that `warm` is converted below, its sizes known.
    body_of(&server, &format!("{warm}?tag=warm:up"));
    let mut baseline = held(&server, port);
    assert!(
        eventually(Duration::from_secs(5), || {
            let now = held(&server, port);
            let settled = now == baseline && now.conversions == 0;
            baseline = now;
            settled
        }),
        "no steady state after one conversion: {baseline:?}"
    );
    assert_eq!(baseline.upstream_sockets, 0, "{baseline:?}");

    // 1 MiB/s: each 16 MiB bottom blob would take 16 s.
    proxy.rule(&warm_bottom[7..], Fault::Throttle(1 << 20), None);
    proxy.rule(&cold_bottom[7..], Fault::Throttle(1 << 20), None);
    let fetching = |bottom: &str, n: usize| {
        eventually(Duration::from_secs(10), || {
            proxy
                .requests(&bottom[7..])
                .iter()
                .filter(|r| r.outcome == Outcome::InProgress && r.body_bytes > 0)
                .count()
                == n
        })
    };
    const CLIENTS: usize = 3;

    // Hang-ups while the image is being sized, before any response. Each under a name of its own:
    // requests for the same bytes would share one conversion (tests/tarball_lease.rs).
    let sizing: Vec<TcpStream> = (0..CLIENTS)
        .map(|i| send(&server, &format!("/squash/{cold}?tag=cold:{i}")))
        .collect();
    assert!(fetching(&cold_bottom, CLIENTS), "sizing never fetched");
    let during = held(&server, port);
    assert_eq!(during.conversions, CLIENTS as u64, "{during:?}");
    assert!(during.upstream_sockets >= CLIENTS, "{during:?}");
    drop(sizing);
    let hung_up = Instant::now();
    // The scans run on blocking threads, which nothing cancels: their fetches must stop all the same.
    let mut scans = Vec::new();
    assert!(
        eventually(Duration::from_secs(5), || {
            scans = proxy.requests(&cold_bottom[7..]);
            scans.iter().all(|r| r.outcome != Outcome::InProgress)
        }),
        "sizing fetches go on after the hang-ups: {scans:?}"
    );
    for scan in &scans {
        let stopped = scan.ended.unwrap().saturating_duration_since(hung_up);
        assert!(stopped < Duration::from_secs(1), "{stopped:?}: {scan:?}");
    }

    // Hang-ups after the first byte, while the bottom layer streams.
    let streaming: Vec<TcpStream> = (0..CLIENTS)
        .map(|i| {
            let (mut s, head, mut body) = open(&server, &format!("/squash/{warm}?tag=warm:{i}"));
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            let mut buf = [0u8; 4096];
            while body.is_empty() {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "stream ended early");
                body.extend_from_slice(&buf[..n]);
            }
            s
        })
        .collect();
    assert!(fetching(&warm_bottom, CLIENTS), "streaming never fetched");
    drop(streaming);
    let hung_up = Instant::now();

    let (mut now, mut fetches) = (baseline, Vec::new());
    let back = eventually(Duration::from_secs(5), || {
        now = held(&server, port);
        // The proxy sees a closed connection at its next write.
        fetches = proxy
            .requests("/blobs/")
            .into_iter()
            .filter(|r| r.outcome == Outcome::InProgress)
            .collect();
        now == baseline && fetches.is_empty()
    });
    assert!(
        back,
        "{:?} after the hang-ups, the server holds {now:?} (baseline {baseline:?}); \
         fetches still open: {fetches:?}",
        hung_up.elapsed()
    );
}

/// A layer merged without its summary that turns out to need it (a path it writes twice) once the
/// response has started: the transfer aborts, and the retry is merged with summaries and whole.
#[test]
fn a_layer_needing_its_summary_after_the_first_byte_aborts_and_the_retry_is_whole() {
    let env = env();
    let server = Server::start(&env.registry, &[]);
    let image = Image::new(vec![
        (
            Layer::new()
                .file("dup", 0o644, b"one")
                .file("dup", 0o644, b"two"),
            Comp::Gzip,
        ),
        // Past the bytes a response holds back before it starts.
        (
            Layer::new().file("big", 0o644, &noise(2 << 20, 5)),
            Comp::Gzip,
        ),
    ]);
    let r = publish(&env, "needs-summary-late", vec![image]);
    let url = format!("{}/squash/{r}", server.url);
    let dir = scratch("needs-summary-late");
    let out = dir.join("partial.tar");
    let (status, code) = curl_exit(&url, &out);
    assert_eq!(status, 200);
    assert_ne!(code, 0, "curl must see a failed transfer");
    docker_load_fails(&out);
    assert!(
        server
            .log
            .lock()
            .unwrap()
            .contains("comes twice in its layer"),
        "the abort is logged"
    );

    let body = body_of(&server, &r);
    let listing = squash_listing(&body);
    let two = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b"two"))
    };
    assert!(listing["dup"].contains(&two[..12]), "{listing:?}");
    let loaded = dir.join("whole.tar");
    std::fs::write(&loaded, &body).unwrap();
    run(docker().arg("load").arg("-i").arg(&loaded));
}
