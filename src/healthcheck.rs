//! `strata healthcheck [URL]`: one HTTP GET of the server's own health endpoint, answered by exit
//! status, for a container's HEALTHCHECK, so the image needs no curl or shell. Plain HTTP over a
//! blocking socket: it asks the server in the same container, never a registry, and has nothing to
//! overlap.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// What the image's HEALTHCHECK asks when nothing else is configured: the port the image listens on.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080/healthz";

/// Bytes of the response read to find its status line: a status line is short, and a server that
/// sends more without a line break is not one worth calling healthy.
const STATUS_LINE_MAX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("{0}: only http://HOST[:PORT][/PATH] is supported")]
    Url(String),
    #[error("{url}")]
    Io {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: no HTTP status line in the response")]
    NoStatus { url: String },
    #[error("{url}: answered {status}")]
    Status { url: String, status: u16 },
}

/// GETs `url`; Ok with the status when it is 2xx. `timeout` bounds the connection and each read
/// and write, so a wedged server makes the check fail rather than hang.
pub fn check(url: &str, timeout: Duration) -> Result<u16, HealthError> {
    let (authority, path) = split_url(url).ok_or_else(|| HealthError::Url(url.to_string()))?;
    let io = |source| HealthError::Io {
        url: url.to_string(),
        source,
    };
    let with_port = if has_port(authority) {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let mut last = None;
    let mut stream = None;
    for addr in with_port.to_socket_addrs().map_err(io)? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let mut stream = stream.ok_or_else(|| {
        io(last.unwrap_or_else(|| std::io::Error::other("the host resolves to no address")))
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nUser-Agent: strata-healthcheck\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < STATUS_LINE_MAX {
        let n = stream.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let status = parse_status(&head).ok_or_else(|| HealthError::NoStatus {
        url: url.to_string(),
    })?;
    if (200..300).contains(&status) {
        Ok(status)
    } else {
        Err(HealthError::Status {
            url: url.to_string(),
            status,
        })
    }
}

/// `http://host:port/path?q` → (`host:port`, `/path?q`).
fn split_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let usable = !authority.is_empty()
        && authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    usable.then_some((authority, path))
}

/// Whether the authority names a port (`[::1]:80` does, `[::1]` does not).
fn has_port(authority: &str) -> bool {
    match authority.rfind(':') {
        Some(i) => !authority[i..].contains(']'),
        None => false,
    }
}

fn parse_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_ascii_whitespace();
    words.next().filter(|v| v.starts_with("HTTP/1."))?;
    words.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A one-shot server answering `response` to whatever comes; returns its URL and the request
    /// it received.
    fn serve_once(response: &'static str) -> (String, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/healthz", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 512];
            while !request.ends_with(b"\r\n\r\n") {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0, "client closed before its request ended");
                request.extend_from_slice(&buf[..n]);
            }
            conn.write_all(response.as_bytes()).unwrap();
            String::from_utf8(request).unwrap()
        });
        (url, handle)
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[test]
    fn healthy_on_2xx_only() {
        let (url, server) = serve_once("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        assert_eq!(check(&url, TIMEOUT).unwrap(), 200);
        let request = server.join().unwrap();
        assert!(
            request.starts_with("GET /healthz HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains("\r\nHost: 127.0.0.1:"), "{request}");

        let (url, server) = serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\n");
        let err = check(&url, TIMEOUT).unwrap_err();
        assert!(
            matches!(err, HealthError::Status { status: 503, .. }),
            "{err}"
        );
        server.join().unwrap();

        let (url, server) = serve_once("SSH-2.0-OpenSSH\r\n");
        let err = check(&url, TIMEOUT).unwrap_err();
        assert!(matches!(err, HealthError::NoStatus { .. }), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn nothing_listening_fails() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = check(&format!("http://127.0.0.1:{port}/healthz"), TIMEOUT).unwrap_err();
        assert!(matches!(err, HealthError::Io { .. }), "{err}");
    }

    #[test]
    fn silent_server_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let start = std::time::Instant::now();
        let err = check(&url, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, HealthError::Io { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(3));
        drop(listener);
    }

    #[test]
    fn urls() {
        assert_eq!(
            split_url("http://127.0.0.1:8080/healthz"),
            Some(("127.0.0.1:8080", "/healthz"))
        );
        assert_eq!(split_url("http://localhost"), Some(("localhost", "/")));
        assert_eq!(split_url("http://[::1]:80/x?y"), Some(("[::1]:80", "/x?y")));
        assert_eq!(split_url("https://example.com/"), None);
        assert_eq!(split_url("http:///healthz"), None);
        assert_eq!(split_url("http://a b/"), None);
        assert!(has_port("[::1]:80") && has_port("a:1"));
        assert!(!has_port("[::1]") && !has_port("localhost"));
    }
}
