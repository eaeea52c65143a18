//! A token server for distribution's token authentication (distribution `docs/spec/auth/token.md`),
//! standing where a real one (docker_auth, Harbor's core, auth.docker.io) would. It checks the
//! caller's `Authorization: Basic` against fixed users, and answers a `GET /token?service=…&scope=…`
//! with a JWT the registry can verify: RS256-signed by a key whose self-signed certificate is the
//! registry's `rootcertbundle`, the certificate itself in the header's `x5c`. Keys, certificates and
//! signatures come from the `openssl` CLI. Every request is logged with the credentials it carried,
//! what it asked for and what it got, so tests can see who asked for which token and how often.
//!
//! The claims follow distribution v2.8's `registry/auth/token/token.go`: `iss` and `aud` (a string,
//! the service) must be the ones the registry is configured with, `exp`/`nbf` are checked with a
//! minute's leeway, and `access` lists the actions granted per repository.

use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde_json::json;

use super::proxy::{header, read_head};
use super::run;

/// The registry's name for itself: the challenge's `service`, the token's `aud`.
pub const SERVICE: &str = "strata-test-registry";
/// Who signs the tokens: the token's `iss`, trusted by the registry.
pub const ISSUER: &str = "strata-test-issuer";
/// The `expires_in` of every token: the token spec's five minutes.
pub const TOKEN_LIFETIME_SECS: u64 = 300;

/// A user the token server knows, and the actions it grants them on any repository.
#[derive(Debug, Clone, Copy)]
pub struct User {
    pub name: &'static str,
    pub password: &'static str,
    pub actions: &'static [&'static str],
}

impl User {
    /// The `user:password` curl's `-u` and skopeo's `--creds` take.
    pub fn creds(&self) -> String {
        format!("{}:{}", self.name, self.password)
    }

    /// The `Authorization` header value of these credentials.
    pub fn basic(&self) -> String {
        basic(self.name, self.password)
    }
}

/// `Basic base64(user:password)`.
pub fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

/// Which of the response's two equivalent fields carry the token (the spec allows either).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fields {
    Both,
    /// Only `token`, as distribution's own examples answer.
    Token,
    /// Only `access_token`, as OAuth2-minded servers answer.
    AccessToken,
}

/// One request to the token endpoint.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// The `Authorization` header it carried.
    pub authorization: Option<String>,
    pub service: Option<String>,
    /// Every `scope` parameter, split at spaces.
    pub scopes: Vec<String>,
    pub status: u16,
    /// The user it was issued to and the token, when it got one.
    pub user: Option<String>,
    pub token: Option<String>,
}

struct State {
    users: Vec<User>,
    fields: Fields,
    key: PathBuf,
    /// The signing certificate, base64 DER, for `x5c`.
    x5c: String,
    log: Vec<TokenRequest>,
}

pub struct TokenServer {
    /// `http://127.0.0.1:PORT/token`, the registry's `realm`.
    pub realm: String,
    /// The signing key's certificate (PEM): the registry's `rootcertbundle`.
    pub cert: PathBuf,
    dir: PathBuf,
    state: Arc<Mutex<State>>,
}

impl TokenServer {
    /// Generates a signing key and certificate in `dir` and serves on a free loopback port for as
    /// long as the test binary runs.
    pub fn start(dir: &Path, users: &[User]) -> TokenServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let realm = format!("http://{}/token", listener.local_addr().unwrap());
        let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
        let x5c = new_key(&key, &cert);
        let state = Arc::new(Mutex::new(State {
            users: users.to_vec(),
            fields: Fields::Both,
            key,
            x5c,
            log: Vec::new(),
        }));
        let shared = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || serve(conn, &state));
            }
        });
        TokenServer {
            realm,
            cert,
            dir: dir.to_path_buf(),
            state,
        }
    }

    pub fn set_fields(&self, fields: Fields) {
        self.state.lock().unwrap().fields = fields;
    }

    /// Signs from now on with a new key, whose certificate replaces the old one in [`Self::cert`]; a
    /// registry restarted on it no longer trusts tokens signed before.
    pub fn rotate_key(&self) {
        let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let key = self.dir.join(format!("key-{n}.pem"));
        let x5c = new_key(&key, &self.cert);
        let mut state = self.state.lock().unwrap();
        state.key = key;
        state.x5c = x5c;
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.lock().unwrap().log.clone()
    }
}

/// Numbers key files and token ids.
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// A new RSA key and its self-signed certificate, written as PEM; returns the certificate as base64
/// DER. OpenSSL 3's `req -x509` marks it a CA, which Go's verifier accepts as its own root.
fn new_key(key: &Path, cert: &Path) -> String {
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", &format!("/CN={ISSUER}")])
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert));
    // PEM's body is the DER in standard base64, cut into lines.
    std::fs::read_to_string(cert)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect()
}

fn serve(mut conn: TcpStream, state: &Mutex<State>) {
    let Ok(head) = read_head(&mut conn) else {
        return;
    };
    let target = String::from_utf8_lossy(&head)
        .split(' ')
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let authorization = header(&head, "authorization");
    let (mut service, mut scopes) = (None, Vec::new());
    for (k, v) in query(&target) {
        match k.as_str() {
            "service" => service = Some(v),
            "scope" => scopes.extend(v.split(' ').map(str::to_string)),
            _ => {}
        }
    }
    let mut state = state.lock().unwrap();
    let user = authorization
        .as_deref()
        .and_then(|a| state.users.iter().find(|u| u.basic() == a).copied());
    let (status, body, token) = match user {
        None => (
            401,
            json!({"errors": [{"code": "UNAUTHORIZED", "message": "wrong or missing credentials"}]}),
            None,
        ),
        Some(user) => {
            let token = sign(&state, &user, service.as_deref().unwrap_or(""), &scopes);
            let mut body = json!({
                "expires_in": TOKEN_LIFETIME_SECS,
                "issued_at": rfc3339(now()),
            });
            if state.fields != Fields::AccessToken {
                body["token"] = json!(token);
            }
            if state.fields != Fields::Token {
                body["access_token"] = json!(token);
            }
            (200, body, Some(token))
        }
    };
    state.log.push(TokenRequest {
        authorization,
        service,
        scopes,
        status,
        user: user.map(|u| u.name.to_string()),
        token,
    });
    drop(state);
    let body = body.to_string();
    let reason = if status == 200 { "OK" } else { "Unauthorized" };
    let challenge = if status == 401 {
        "WWW-Authenticate: Basic realm=\"strata-test-token\"\r\n"
    } else {
        ""
    };
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\n{challenge}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    use std::io::Write as _;
    let _ = conn.write_all(resp.as_bytes());
    let _ = conn.shutdown(Shutdown::Both);
}

/// The query parameters of a request target, form-decoded (reqwest encodes `:` and `/`; a space may
/// come as `+`).
fn query(target: &str) -> Vec<(String, String)> {
    let Some((_, q)) = target.split_once('?') else {
        return Vec::new();
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    q.split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

/// A JWT granting `user` what it may do of what `scopes` (`repository:NAME:ACTION,…`) ask.
fn sign(state: &State, user: &User, service: &str, scopes: &[String]) -> String {
    let access: Vec<_> = scopes
        .iter()
        .filter_map(|s| {
            let (kind, rest) = s.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            let granted: Vec<&str> = actions
                .split(',')
                .filter(|a| user.actions.contains(a))
                .collect();
            Some(json!({"type": kind, "name": name, "actions": granted}))
        })
        .collect();
    let now = now();
    let header = json!({"typ": "JWT", "alg": "RS256", "x5c": [state.x5c]});
    let claims = json!({
        "iss": ISSUER,
        "sub": user.name,
        "aud": service,
        "exp": now + TOKEN_LIFETIME_SECS,
        "nbf": now,
        "iat": now,
        "jti": format!("{}-{}", std::process::id(), SEQUENCE.fetch_add(1, Ordering::Relaxed)),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    // RS256: RSASSA-PKCS1-v1_5 over SHA-256, which is what `dgst -sign` writes with an RSA key.
    let mut openssl = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(&state.key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    openssl
        .stdin
        .take()
        .unwrap()
        .write_all(signing_input.as_bytes())
        .unwrap();
    let out = openssl.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl dgst -sign failed");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(out.stdout))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, Howard Hinnant's algorithm).
fn rfc3339(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
