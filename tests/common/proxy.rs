//! A fault-injecting HTTP proxy placed between strata and the real registry. It serves one request per
//! connection (`Connection: close` both ways), forwards it to the registry, and applies the first rule
//! whose path fragment matches: stall, throttle, truncate, corrupt or answer with a status of its own.
//! Every request is logged with how it ended, so tests can see what strata fetched and when it stopped.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub enum Fault {
    /// Wait this long before answering.
    Stall(Duration),
    /// Send this many body bytes, then nothing for this long (then the rest).
    StallAfter(usize, Duration),
    /// Send the body at this many bytes per second.
    Throttle(u64),
    /// Send this many body bytes of the real response, then close the connection.
    Truncate(usize),
    /// Flip one byte of the body at this offset.
    Corrupt(usize),
    /// Answer with this status and an empty body instead of asking the registry.
    Status(u16),
    /// Answer `401` with a bearer challenge whose token endpoint (realm) is this URL.
    Challenge(String),
    /// Answer with this status and a body of this many bytes (no `Content-Length`: it ends when the
    /// connection does) that starts with this text and goes on with `x`, instead of asking the registry.
    HugeBody(u16, &'static str, u64),
    /// Answer `307` to the same path on this other host (`host:port`), as registries backed by object
    /// storage do for blobs.
    Redirect(String),
}

#[derive(Debug, Clone)]
struct Rule {
    path_contains: String,
    fault: Fault,
    /// How many more requests the rule applies to; `None`: all.
    times: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    InProgress,
    /// The whole response went to strata.
    Complete,
    /// Strata closed the connection before the response was through.
    ClientGone,
    /// The proxy cut the response on purpose.
    Cut,
    /// The registry could not be reached or misbehaved.
    UpstreamError,
}

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// The `Authorization` header the request came with.
    pub authorization: Option<String>,
    pub started: Instant,
    pub ended: Option<Instant>,
    /// Response body bytes sent to strata so far.
    pub body_bytes: u64,
    pub outcome: Outcome,
    /// Asked for part of a blob (`Range`): strata's probes of a layer's ends, which faults spare.
    pub ranged: bool,
}

#[derive(Default)]
struct State {
    rules: Vec<Rule>,
    log: Vec<Request>,
    /// Sent upstream in place of the client's `Authorization`, as a presigned URL carries its own.
    authorization: Option<String>,
}

pub struct Proxy {
    /// `127.0.0.1:PORT`, to use as the registry host in references.
    pub addr: String,
    state: Arc<Mutex<State>>,
}

const COPY_BUF: usize = 64 * 1024;

impl Proxy {
    /// Starts a proxy to `upstream` (`host:port`) on a free loopback port; it lives as long as the test
    /// binary.
    pub fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(Mutex::new(State::default()));
        let (shared, upstream) = (state.clone(), upstream.to_string());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (state, upstream) = (shared.clone(), upstream.clone());
                std::thread::spawn(move || serve(conn, &upstream, &state));
            }
        });
        Proxy { addr, state }
    }

    /// Applies `fault` to requests whose path contains `path_contains`, `times` times (`None`: always).
    pub fn rule(&self, path_contains: &str, fault: Fault, times: Option<usize>) {
        self.state.lock().unwrap().rules.push(Rule {
            path_contains: path_contains.to_string(),
            fault,
            times,
        });
    }

    /// Forwards every request with this `Authorization` header instead of the client's.
    pub fn authorize_upstream(&self, value: &str) {
        self.state.lock().unwrap().authorization = Some(value.to_string());
    }

    /// The requests whose path contains `fragment`, oldest first; ranged ones (a layer's ends,
    /// probed for its size) left out.
    pub fn requests(&self, fragment: &str) -> Vec<Request> {
        let state = self.state.lock().unwrap();
        state
            .log
            .iter()
            .filter(|r| !r.ranged && r.path.contains(fragment))
            .cloned()
            .collect()
    }

    /// [`Proxy::requests`] once none of them is still in progress (5 s at most): the client may have
    /// every byte before the proxy has seen the registry close its side.
    pub fn settled_requests(&self, fragment: &str) -> Vec<Request> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let requests = self.requests(fragment);
            let settled = requests.iter().all(|r| r.outcome != Outcome::InProgress);
            if settled || std::time::Instant::now() > deadline {
                return requests;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

pub(super) fn read_head(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    Ok(head)
}

/// The value of header `name` in a head.
pub(super) fn header(head: &[u8], name: &str) -> Option<String> {
    String::from_utf8_lossy(head).split("\r\n").find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// The head with any `Connection` header replaced by `Connection: close`, and the `Authorization`
/// header replaced by `authorization` when one is given.
fn closing(head: &[u8], authorization: Option<&str>) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        let lower = line.to_ascii_lowercase();
        let replaced = authorization.is_some() && lower.starts_with("authorization:");
        if !lower.starts_with("connection:") && !replaced {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    if let Some(value) = authorization {
        out.push_str(&format!("Authorization: {value}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

fn serve(mut client: TcpStream, upstream: &str, state: &Mutex<State>) {
    let Ok(head) = read_head(&mut client) else {
        return;
    };
    let line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let mut parts = line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let ranged = header(&head, "range").is_some();
    let (index, fault, authorization) = {
        let mut s = state.lock().unwrap();
        let fault = s
            .rules
            .iter_mut()
            .find(|r| !ranged && path.contains(&r.path_contains) && r.times != Some(0))
            .map(|r| {
                if let Some(n) = r.times.as_mut() {
                    *n -= 1;
                }
                r.fault.clone()
            });
        s.log.push(Request {
            method,
            path: path.clone(),
            authorization: header(&head, "authorization"),
            started: Instant::now(),
            ended: None,
            body_bytes: 0,
            outcome: Outcome::InProgress,
            ranged,
        });
        (s.log.len() - 1, fault, s.authorization.clone())
    };
    let progress = |sent: u64| state.lock().unwrap().log[index].body_bytes = sent;
    let (bytes, outcome) = forward(
        &mut client,
        &head,
        &path,
        upstream,
        fault,
        authorization.as_deref(),
        progress,
    );
    let _ = client.shutdown(Shutdown::Both);
    let mut s = state.lock().unwrap();
    let r = &mut s.log[index];
    r.ended = Some(Instant::now());
    r.body_bytes = bytes;
    r.outcome = outcome;
}

fn forward(
    client: &mut TcpStream,
    head: &[u8],
    path: &str,
    upstream: &str,
    fault: Option<Fault>,
    authorization: Option<&str>,
    progress: impl Fn(u64),
) -> (u64, Outcome) {
    match &fault {
        Some(Fault::Challenge(realm)) => {
            let resp = format!(
                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"{realm}\",service=\"test\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = client.write_all(resp.as_bytes());
            return (0, Outcome::Cut);
        }
        Some(Fault::Redirect(host)) => {
            let resp = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://{host}{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = client.write_all(resp.as_bytes());
            return (0, Outcome::Cut);
        }
        Some(Fault::Status(code)) => {
            let resp = format!(
                "HTTP/1.1 {code} Injected\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
            );
            let _ = client.write_all(resp.as_bytes());
            return (0, Outcome::Cut);
        }
        Some(Fault::HugeBody(code, start, len)) => return huge_body(client, *code, start, *len),
        Some(Fault::Stall(d)) => std::thread::sleep(*d),
        _ => {}
    }
    let Ok(mut reg) = TcpStream::connect(upstream) else {
        return (0, Outcome::UpstreamError);
    };
    if reg.write_all(&closing(head, authorization)).is_err() {
        return (0, Outcome::UpstreamError);
    }
    let Ok(resp_head) = read_head(&mut reg) else {
        return (0, Outcome::UpstreamError);
    };
    if client.write_all(&closing(&resp_head, None)).is_err() {
        return (0, Outcome::ClientGone);
    }
    let mut sent = 0u64;
    let mut buf = vec![0u8; COPY_BUF];
    let start = Instant::now();
    loop {
        let mut want = COPY_BUF;
        if let Some(Fault::Truncate(limit)) = fault {
            if sent as usize >= limit {
                return (sent, Outcome::Cut);
            }
            want = want.min(limit - sent as usize);
        }
        let n = match reg.read(&mut buf[..want]) {
            Ok(0) => return (sent, Outcome::Complete),
            Ok(n) => n,
            Err(_) => return (sent, Outcome::UpstreamError),
        };
        if let Some(Fault::Corrupt(at)) = fault {
            if (sent..sent + n as u64).contains(&(at as u64)) {
                buf[at - sent as usize] ^= 0xff;
            }
        }
        if client.write_all(&buf[..n]).is_err() {
            return (sent, Outcome::ClientGone);
        }
        if let Some(Fault::StallAfter(at, pause)) = &fault {
            if (sent as usize) < *at && sent as usize + n >= *at {
                std::thread::sleep(*pause);
            }
        }
        sent += n as u64;
        progress(sent);
        if let Some(Fault::Throttle(rate)) = fault {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
}

/// Sends a `status` response whose body is `len` bytes: `start`, then `x`s, until the client stops
/// reading.
fn huge_body(client: &mut TcpStream, status: u16, start: &str, len: u64) -> (u64, Outcome) {
    let head = format!(
        "HTTP/1.1 {status} Injected\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
    );
    if client.write_all(head.as_bytes()).is_err() {
        return (0, Outcome::ClientGone);
    }
    let mut chunk = vec![b'x'; COPY_BUF];
    chunk[..start.len()].copy_from_slice(start.as_bytes());
    let mut sent = 0u64;
    while sent < len {
        let n = (len - sent).min(COPY_BUF as u64) as usize;
        if client.write_all(&chunk[..n]).is_err() {
            return (sent, Outcome::ClientGone);
        }
        sent += n as u64;
        chunk[..start.len()].fill(b'x');
    }
    (sent, Outcome::Complete)
}
