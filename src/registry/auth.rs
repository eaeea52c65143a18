//! Registry authentication (distribution's token spec): the `WWW-Authenticate` challenge of a 401, the
//! token request it asks for, and a small token cache kept per principal: each caller's credentials,
//! the service's own, or none.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

/// Lifetime of a token whose response names none (the token spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Tokens are dropped this long before they expire, so a request never starts with a dying one.
const EXPIRY_MARGIN: Duration = Duration::from_secs(5);
/// Longest a token is kept, whatever its `expires_in` claims: a lifetime past what `Instant` can
/// count (a token server answering `"expires_in": 18446744073709551615`) must not panic, and an
/// hourly token request costs nothing.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Cached tokens kept at most; the cache is cleared when it grows past this.
const MAX_TOKENS: usize = 4096;

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

/// Parses `Bearer realm="…",service="…",scope="…"` or `Basic realm="…"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim(), &after[end..])
        };
        params.insert(key, value.to_string());
        rest = tail.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge::Bearer {
        realm: params.remove("realm")?,
        service: params.remove("service"),
        scope: params.remove("scope"),
    })
}

/// Bytes of a token response read at most: JWTs run to a few KiB, and a token endpoint that sends
/// more is not one.
pub const MAX_TOKEN_RESPONSE: u64 = 64 << 10;

/// Whose credentials a request carries upstream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// Nobody's: an anonymous caller, and no service credentials for the registry.
    Anonymous,
    /// The service's own (`--registry-auth-file`), standing in for an anonymous caller.
    Service,
    /// A caller's own, by the hash of their `Authorization` value.
    Caller([u8; 32]),
}

impl Principal {
    pub fn caller(authorization: &str) -> Principal {
        Principal::Caller(Sha256::digest(authorization.as_bytes()).into())
    }
}

/// Who a token belongs to: a registry, a repository, and the principal, so a token one caller earned
/// is never used for another, and the service's never for a caller who sent credentials of their
/// own (even the same ones).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    registry: String,
    repository: String,
    principal: Principal,
}

impl TokenKey {
    pub fn new(registry: &str, repository: &str, principal: Principal) -> TokenKey {
        TokenKey {
            registry: registry.to_string(),
            repository: repository.to_string(),
            principal,
        }
    }
}

#[derive(Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<TokenKey, (String, Instant)>>,
}

impl TokenCache {
    pub fn get(&self, key: &TokenKey) -> Option<String> {
        let tokens = self.tokens.lock().expect("token cache lock");
        tokens
            .get(key)
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(t, _)| t.clone())
    }

    pub fn put(&self, key: TokenKey, token: String, expires_in: Option<u64>) {
        let lifetime = expires_in
            .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs)
            .min(MAX_TOKEN_LIFETIME);
        let until = Instant::now() + lifetime.saturating_sub(EXPIRY_MARGIN);
        let mut tokens = self.tokens.lock().expect("token cache lock");
        if tokens.len() >= MAX_TOKENS {
            tokens.clear();
        }
        tokens.insert(key, (token, until));
    }
}

/// The token endpoint's answer.
#[derive(serde::Deserialize)]
pub struct TokenResponse {
    pub token: Option<String>,
    pub access_token: Option<String>,
    pub expires_in: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/ubuntu:pull".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Bearer realm="http://h/t", scope="repository:a/b:pull,push""#),
            Some(Challenge::Bearer {
                realm: "http://h/t".into(),
                service: None,
                scope: Some("repository:a/b:pull,push".into())
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Bearer service=x"), None);
        assert_eq!(parse_challenge("Negotiate"), None);
    }

    #[test]
    fn tokens_are_per_caller() {
        let cache = TokenCache::default();
        let a = TokenKey::new("r", "x", Principal::caller("Basic YTpi"));
        let b = TokenKey::new("r", "x", Principal::caller("Basic YzpK"));
        cache.put(a.clone(), "ta".into(), Some(300));
        assert_eq!(cache.get(&a).as_deref(), Some("ta"));
        assert_eq!(cache.get(&b), None);
        assert_eq!(
            cache.get(&TokenKey::new("r", "x", Principal::Anonymous)),
            None
        );
        assert_eq!(
            cache.get(&TokenKey::new("r", "x", Principal::Service)),
            None
        );
    }

    #[test]
    fn the_service_token_is_no_callers() {
        let cache = TokenCache::default();
        let service = TokenKey::new("r", "x", Principal::Service);
        cache.put(service.clone(), "ts".into(), Some(300));
        assert_eq!(cache.get(&service).as_deref(), Some("ts"));
        assert_eq!(
            cache.get(&TokenKey::new("r", "x", Principal::Anonymous)),
            None
        );
        assert_eq!(
            cache.get(&TokenKey::new("r", "x", Principal::caller("Basic YTpi"))),
            None
        );
    }

    #[test]
    fn an_endless_expires_in_does_not_panic() {
        let cache = TokenCache::default();
        let key = TokenKey::new("r", "x", Principal::Anonymous);
        cache.put(key.clone(), "t".into(), Some(u64::MAX));
        assert_eq!(cache.get(&key).as_deref(), Some("t"));
    }
}
