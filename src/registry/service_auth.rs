//! The service's own registry credentials: the `auths` of a docker `config.json`
//! (`--registry-auth-file`, or for the one-shot commands `$DOCKER_CONFIG/config.json`), used for a
//! caller who sends none. Anyone who can reach strata pulls what these reach.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::reference::DOCKER_HUB;

/// Bytes of a credentials file read at most: a docker config is a few KiB.
const MAX_AUTH_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: larger than {MAX_AUTH_FILE} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path}: not a docker config.json: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: auths[{key:?}]: {reason}")]
    Entry {
        path: PathBuf,
        key: String,
        reason: &'static str,
    },
}

/// `Authorization` values (Basic) by registry, as references name it (`docker.io`, `host:port`).
#[derive(Clone, Default)]
pub struct ServiceCredentials {
    by_registry: HashMap<String, String>,
}

impl std::fmt::Debug for ServiceCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut registries: Vec<_> = self.by_registry.keys().collect();
        registries.sort();
        write!(f, "ServiceCredentials({registries:?}, <redacted>)")
    }
}

#[derive(serde::Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(serde::Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

impl ServiceCredentials {
    /// Reads an `{"auths":{…}}` file. Entries that hold no credentials (docker writes `{}` for those
    /// kept by a credential helper) are skipped; ones that hold malformed credentials are an error.
    pub fn from_file(path: &Path) -> Result<ServiceCredentials, AuthFileError> {
        use std::io::Read as _;
        let read = |source| AuthFileError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .map_err(read)?
            .take(MAX_AUTH_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(read)?;
        if bytes.len() as u64 > MAX_AUTH_FILE {
            return Err(AuthFileError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        ServiceCredentials::parse(&bytes, path)
    }

    /// What the docker CLI would use: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`;
    /// none when that file does not exist.
    pub fn from_docker_config() -> Result<ServiceCredentials, AuthFileError> {
        let dir = std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")));
        match dir.map(|d| d.join("config.json")) {
            Some(path) if path.is_file() => ServiceCredentials::from_file(&path),
            _ => Ok(ServiceCredentials::default()),
        }
    }

    fn parse(bytes: &[u8], path: &Path) -> Result<ServiceCredentials, AuthFileError> {
        let config: DockerConfig =
            serde_json::from_slice(bytes).map_err(|source| AuthFileError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        let mut by_registry = HashMap::new();
        for (key, entry) in config.auths {
            let bad = |reason| AuthFileError::Entry {
                path: path.to_path_buf(),
                key: key.clone(),
                reason,
            };
            let user_password = match (entry.auth, entry.username, entry.password) {
                (Some(auth), _, _) if !auth.is_empty() => {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .map_err(|_| bad("`auth` is not base64"))?;
                    String::from_utf8(raw).map_err(|_| bad("`auth` is not UTF-8"))?
                }
                (_, Some(user), Some(password)) => format!("{user}:{password}"),
                _ => continue,
            };
            if !user_password.contains(':') {
                return Err(bad("credentials must be user:password"));
            }
            let value = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(user_password)
            );
            by_registry.insert(registry_of(&key), value);
        }
        Ok(ServiceCredentials { by_registry })
    }

    /// The `Authorization` value for `registry` (a reference's registry), if the service has one.
    pub fn for_registry(&self, registry: &str) -> Option<&str> {
        self.by_registry.get(registry).map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.by_registry.is_empty()
    }
}

/// The registry an `auths` key names: docker writes `https://index.docker.io/v1/` for Docker Hub and
/// bare `host[:port]` for the rest; people also write URLs.
fn registry_of(key: &str) -> String {
    let key = key.trim();
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => DOCKER_HUB.to_string(),
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ServiceCredentials, AuthFileError> {
        ServiceCredentials::parse(json.as_bytes(), Path::new("config.json"))
    }

    #[test]
    fn keys_name_registries() {
        for (key, registry) in [
            ("https://index.docker.io/v1/", "docker.io"),
            ("index.docker.io", "docker.io"),
            ("registry-1.docker.io", "docker.io"),
            ("docker.io", "docker.io"),
            ("127.0.0.1:5000", "127.0.0.1:5000"),
            ("https://Quay.io", "quay.io"),
            ("http://registry.local:5000/v2/", "registry.local:5000"),
        ] {
            assert_eq!(registry_of(key), registry, "{key}");
        }
    }

    #[test]
    fn both_spellings_of_credentials() {
        // "alice:pw" in base64.
        let c = parse(
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"YWxpY2U6cHc="},
                "h:5000":{"username":"bob","password":"p:w"},
                "helper.example":{}},"credsStore":"desktop"}"#,
        )
        .unwrap();
        assert_eq!(c.for_registry("docker.io"), Some("Basic YWxpY2U6cHc="));
        assert_eq!(c.for_registry("h:5000"), Some("Basic Ym9iOnA6dw=="));
        assert_eq!(c.for_registry("helper.example"), None);
        assert_eq!(c.for_registry("other"), None);
        assert!(!format!("{c:?}").contains("YWxp"), "redacted");
    }

    #[test]
    fn malformed_credentials_are_refused() {
        assert!(parse(r#"{"auths":{"h":{"auth":"%%%"}}}"#).is_err());
        // "alice" with no password.
        assert!(parse(r#"{"auths":{"h":{"auth":"YWxpY2U="}}}"#).is_err());
        assert!(parse(r#"{"auths":[]}"#).is_err());
        assert!(parse("{}").unwrap().is_empty());
    }
}
