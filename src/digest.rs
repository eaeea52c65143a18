//! Content digests (`sha256:<hex>`), and the incremental check that a blob's bytes match the digest
//! and size its descriptor names, run while the bytes stream.

use std::fmt;

use sha2::{Digest as _, Sha256};

/// A sha256 content digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("invalid digest {0:?}: expected sha256:<64 lowercase hex>")]
    Invalid(String),
    #[error("content does not match its digest: expected {expected}, got {actual}")]
    Mismatch { expected: Digest, actual: Digest },
    #[error("content of {digest} has the wrong size: expected {expected} bytes, got {actual}")]
    Size {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
}

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| DigestError::Invalid(s.to_string()))?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::Invalid(s.to_string()));
        }
        Ok(Digest {
            hex: hex.to_string(),
        })
    }

    pub fn of(data: &[u8]) -> Digest {
        Digest {
            hex: hex::encode(Sha256::digest(data)),
        }
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl std::str::FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Digest, DigestError> {
        Digest::parse(s)
    }
}

/// Checks bytes against an expected digest and size as they pass.
pub struct Verifier {
    expected: Digest,
    size: u64,
    seen: u64,
    hasher: Sha256,
}

impl Verifier {
    pub fn new(expected: Digest, size: u64) -> Verifier {
        Verifier {
            expected,
            size,
            seen: 0,
            hasher: Sha256::new(),
        }
    }

    /// Feeds bytes; fails as soon as more bytes arrive than the descriptor announced.
    pub fn update(&mut self, data: &[u8]) -> Result<(), DigestError> {
        self.seen += data.len() as u64;
        if self.seen > self.size {
            return Err(DigestError::Size {
                digest: self.expected.clone(),
                expected: self.size,
                actual: self.seen,
            });
        }
        self.hasher.update(data);
        Ok(())
    }

    /// At the end of the bytes: size and digest must both match.
    pub fn finish(self) -> Result<(), DigestError> {
        if self.seen != self.size {
            return Err(DigestError::Size {
                digest: self.expected,
                expected: self.size,
                actual: self.seen,
            });
        }
        let actual = Digest {
            hex: hex::encode(self.hasher.finalize()),
        };
        if actual != self.expected {
            return Err(DigestError::Mismatch {
                expected: self.expected,
                actual,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert_eq!(Digest::parse(&good).unwrap().to_string(), good);
        for bad in [
            "sha256:".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha512:{}", "a".repeat(64)),
            format!("sha256:{}g", "a".repeat(63)),
            "a".repeat(64),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn verifier_catches_mismatch_and_size() {
        let d = Digest::of(b"hello");
        let mut v = Verifier::new(d.clone(), 5);
        v.update(b"hel").unwrap();
        v.update(b"lo").unwrap();
        v.finish().unwrap();
        let mut v = Verifier::new(d.clone(), 5);
        v.update(b"hellO").unwrap();
        assert!(matches!(v.finish(), Err(DigestError::Mismatch { .. })));
        let mut v = Verifier::new(d.clone(), 5);
        assert!(v.update(b"hello!").is_err());
        let mut v = Verifier::new(d, 5);
        v.update(b"hell").unwrap();
        assert!(matches!(v.finish(), Err(DigestError::Size { .. })));
    }
}
