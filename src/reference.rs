//! Image references as users write them, canonicalised with docker's rules (distribution/reference):
//! `ubuntu` → `docker.io/library/ubuntu:latest`; `host[:port]/path[:tag][@sha256:…]`.

use std::fmt;

use crate::digest::Digest;

/// Docker Hub's name, and the host its API is reached at.
pub const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// Longest reference accepted (distribution's NameTotalLengthMax is 255 for the name alone).
const MAX_REFERENCE: usize = 512;
/// Longest canonical name, registry and repository (`docker.io/library/x`): distribution's
/// NameTotalLengthMax, which it checks on the name with Docker Hub's prefixes added.
const MAX_NAME: usize = 255;

/// A canonical image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Registry as named (`docker.io`, `localhost:5000`).
    pub registry: String,
    /// Repository path (`library/ubuntu`).
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid reference {input:?}: {reason}")]
pub struct ReferenceError {
    input: String,
    reason: &'static str,
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// A path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// A tag: `[\w][\w.-]{0,127}`.
fn valid_tag(t: &str) -> bool {
    let w = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let b = t.as_bytes();
    !b.is_empty() && b.len() <= 128 && w(b[0]) && b.iter().all(|&x| w(x) || x == b'.' || x == b'-')
}

/// A registry host: DNS labels or an IPv4 address, optional port, or `localhost`.
fn valid_host(h: &str) -> bool {
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (h, None),
    };
    if let Some(p) = port {
        if p.is_empty()
            || p.len() > 5
            || !p.bytes().all(|b| b.is_ascii_digit())
            || p.parse::<u32>().unwrap_or(0) > 65535
        {
            return false;
        }
    }
    !host.is_empty()
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Whether the first component of a name is a registry host rather than part of the repository
/// (docker's rule: a dot, a port, or `localhost`).
fn names_a_host(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost"
}

/// A Docker Hub repository the way docker shows it, when that shorter form reads back as the same one.
fn hub_short(repository: &str) -> Option<&str> {
    let short = match repository.strip_prefix("library/") {
        Some(official) if !official.contains('/') => official,
        _ => repository,
    };
    match short.split_once('/') {
        Some((first, _)) if names_a_host(first) => None,
        _ => Some(short),
    }
}

impl Reference {
    /// Parses `s`; a reference naming no registry gets `default_registry`.
    pub fn parse(s: &str, default_registry: &str) -> Result<Reference, ReferenceError> {
        let err = |reason| ReferenceError {
            input: s.chars().take(200).collect(),
            reason,
        };
        if s.is_empty() || s.len() > MAX_REFERENCE {
            return Err(err("empty or too long"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => (rest, Some(Digest::parse(d).map_err(|_| err("bad digest"))?)),
            None => (s, None),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            if !valid_tag(t) {
                return Err(err("bad tag"));
            }
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, path)) if names_a_host(first) => {
                if !valid_host(first) {
                    return Err(err("bad registry host"));
                }
                (first.to_string(), path)
            }
            _ => (default_registry.to_string(), name),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        if path.is_empty() || !path.split('/').all(valid_component) {
            return Err(err(
                "bad repository name (lowercase letters, digits and separators . _ __ -)",
            ));
        }
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        if registry.len() + 1 + repository.len() > MAX_NAME {
            return Err(err("name longer than 255 bytes"));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some("latest".to_string()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// Host the registry API is reached at.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// `registry/repository`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The name docker shows: `ubuntu:latest`, `user/app:1`, `localhost:5000/x:y`. It parses back to
    /// the same image: Docker Hub's prefixes are left out only where reading it again puts them back
    /// (`library/a/b` keeps its `library/`, as `a/b` is `docker.io/a/b`; `docker.io/my.host/x` keeps
    /// `docker.io/`, as `my.host/x` names another registry).
    pub fn familiar(&self) -> String {
        let short = (self.registry == DOCKER_HUB)
            .then(|| hub_short(&self.repository))
            .flatten();
        let name = short.map_or_else(|| self.name(), str::to_string);
        match (&self.tag, &self.digest) {
            (Some(t), _) => format!("{name}:{t}"),
            (None, Some(d)) => format!("{name}@{d}"),
            (None, None) => name,
        }
    }

    /// What to ask the registry's manifest endpoint for: the digest if there is one, else the tag.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_references() {
        let d = format!("sha256:{}", "b".repeat(64));
        let cases = [
            ("ubuntu", "docker.io/library/ubuntu:latest", "ubuntu:latest"),
            (
                "library/alpine:3.20",
                "docker.io/library/alpine:3.20",
                "alpine:3.20",
            ),
            (
                "docker.io/user/app:v1.2-rc_1",
                "docker.io/user/app:v1.2-rc_1",
                "user/app:v1.2-rc_1",
            ),
            (
                "index.docker.io/ubuntu",
                "docker.io/library/ubuntu:latest",
                "ubuntu:latest",
            ),
            (
                "localhost:5000/a/b:t",
                "localhost:5000/a/b:t",
                "localhost:5000/a/b:t",
            ),
            ("localhost/x", "localhost/x:latest", "localhost/x:latest"),
            (
                "127.0.0.1:5000/fix/basic",
                "127.0.0.1:5000/fix/basic:latest",
                "127.0.0.1:5000/fix/basic:latest",
            ),
            (
                "quay.io/a-b/c__d.e:1",
                "quay.io/a-b/c__d.e:1",
                "quay.io/a-b/c__d.e:1",
            ),
            // Familiar forms that used to parse as another image (the first found by fuzzing).
            (
                "index.docker.io/ubuntex.docker.io/ubunu",
                "docker.io/ubuntex.docker.io/ubunu:latest",
                "docker.io/ubuntex.docker.io/ubunu:latest",
            ),
            (
                "docker.io/library/a/b",
                "docker.io/library/a/b:latest",
                "library/a/b:latest",
            ),
        ];
        for (input, canonical, familiar) in cases {
            let r = Reference::parse(input, DOCKER_HUB).unwrap();
            assert_eq!(r.to_string(), canonical, "{input}");
            assert_eq!(r.familiar(), familiar, "{input}");
            assert_eq!(
                Reference::parse(familiar, DOCKER_HUB).unwrap(),
                r,
                "{input}"
            );
        }
        let r = Reference::parse(&format!("alpine@{d}"), DOCKER_HUB).unwrap();
        assert_eq!((r.tag.as_deref(), r.manifest_ref()), (None, d.clone()));
        let r = Reference::parse(&format!("alpine:3@{d}"), DOCKER_HUB).unwrap();
        assert_eq!((r.tag.as_deref(), r.manifest_ref()), (Some("3"), d));
        let r = Reference::parse("team/app", "registry.example.com:5000").unwrap();
        assert_eq!(r.to_string(), "registry.example.com:5000/team/app:latest");
        assert_eq!(
            Reference::parse("ubuntu", DOCKER_HUB).unwrap().api_host(),
            "registry-1.docker.io"
        );
    }

    #[test]
    fn bad_references() {
        let long_tag = format!("a:{}", "t".repeat(129));
        let long = "a/".repeat(300);
        // Found by fuzzing: 250 bytes, but `docker.io/library/` makes the name 268.
        let long_official = "b".repeat(250);
        for bad in [
            "",
            "Ubuntu",
            "a//b",
            "a/../b",
            "../x",
            "-a",
            "a-",
            "a:",
            "a:.t",
            "a@sha256:abc",
            "a@md5:aaaa",
            "localhost:99999/a",
            "host:port/a",
            "a b",
            "a/b/",
            "/a",
            long_tag.as_str(),
            long.as_str(),
            long_official.as_str(),
            "exa_mple.com/a",
        ] {
            assert!(Reference::parse(bad, DOCKER_HUB).is_err(), "{bad:?}");
        }
    }
}
