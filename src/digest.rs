//! Content digests (`sha256:<hex>`, and the other algorithms the OCI image spec and go-digest allow:
//! `sha384:`, `sha512:`), and the incremental check that a blob's bytes match the digest and size its
//! descriptor names, run while the bytes stream.

use std::fmt;

use sha2::{Digest as _, Sha256, Sha384, Sha512};

/// A blob whose descriptor names no size (schema 1 manifests list digests only): its digest alone
/// checks it. No real blob has this many bytes.
pub const SIZE_UNKNOWN: u64 = u64::MAX;

/// The hash functions a digest may name: OCI image-spec `descriptor.md` registers sha256 and sha512;
/// go-digest, and so docker, also takes sha384.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha384,
    Sha512,
}

impl Algorithm {
    fn parse(name: &str) -> Option<Algorithm> {
        match name {
            "sha256" => Some(Algorithm::Sha256),
            "sha384" => Some(Algorithm::Sha384),
            "sha512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha384 => "sha384",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Length of the hex encoding.
    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha384 => 96,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A content digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error(
        "invalid digest {0:?}: expected sha256:<64 lowercase hex> (or sha384:<96>, sha512:<128>)"
    )]
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

/// An incremental hash of one of the algorithms.
#[derive(Clone)]
enum Hasher {
    Sha256(Sha256),
    Sha384(Sha384),
    Sha512(Sha512),
}

impl Hasher {
    fn new(algorithm: Algorithm) -> Hasher {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha384 => Hasher::Sha384(Sha384::new()),
            Algorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha384(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    fn finish(self) -> Digest {
        let (algorithm, hex) = match self {
            Hasher::Sha256(h) => (Algorithm::Sha256, hex::encode(h.finalize())),
            Hasher::Sha384(h) => (Algorithm::Sha384, hex::encode(h.finalize())),
            Hasher::Sha512(h) => (Algorithm::Sha512, hex::encode(h.finalize())),
        };
        Digest { algorithm, hex }
    }
}

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        let invalid = || DigestError::Invalid(s.to_string());
        let (name, hex) = s.split_once(':').ok_or_else(invalid)?;
        let algorithm = Algorithm::parse(name).ok_or_else(invalid)?;
        if hex.len() != algorithm.hex_len()
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(invalid());
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_string(),
        })
    }

    /// The sha256 digest of `data` (the canonical algorithm, what registries announce).
    pub fn of(data: &[u8]) -> Digest {
        Digest::of_with(Algorithm::Sha256, data)
    }

    pub fn of_with(algorithm: Algorithm, data: &[u8]) -> Digest {
        let mut h = Hasher::new(algorithm);
        h.update(data);
        h.finish()
    }

    /// Whether `data` is what this digest names (hashed with this digest's algorithm).
    pub fn matches(&self, data: &[u8]) -> bool {
        Digest::of_with(self.algorithm, data) == *self
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The hex part alone. Unique across algorithms, since their lengths differ: what caches key by.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Digest, DigestError> {
        Digest::parse(s)
    }
}

/// Checks bytes against an expected digest and size (or [`SIZE_UNKNOWN`]) as they pass.
pub struct Verifier {
    expected: Digest,
    size: u64,
    seen: u64,
    hasher: Hasher,
}

impl Verifier {
    pub fn new(expected: Digest, size: u64) -> Verifier {
        Verifier {
            hasher: Hasher::new(expected.algorithm),
            expected,
            size,
            seen: 0,
        }
    }

    /// Feeds bytes; fails as soon as more bytes arrive than the descriptor announced.
    pub fn update(&mut self, data: &[u8]) -> Result<(), DigestError> {
        self.seen += data.len() as u64;
        if self.size != SIZE_UNKNOWN && self.seen > self.size {
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
        if self.size != SIZE_UNKNOWN && self.seen != self.size {
            return Err(DigestError::Size {
                digest: self.expected,
                expected: self.size,
                actual: self.seen,
            });
        }
        let actual = self.hasher.finish();
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
        for good in [
            format!("sha256:{}", "a".repeat(64)),
            format!("sha384:{}", "b".repeat(96)),
            format!("sha512:{}", "c".repeat(128)),
        ] {
            assert_eq!(Digest::parse(&good).unwrap().to_string(), good);
        }
        for bad in [
            "sha256:".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha512:{}", "a".repeat(64)),
            format!("sha256:{}", "a".repeat(128)),
            format!("sha512:{}", "a".repeat(127)),
            format!("sha1:{}", "a".repeat(40)),
            format!("SHA512:{}", "a".repeat(128)),
            format!("sha256:{}g", "a".repeat(63)),
            "a".repeat(64),
        ] {
            assert!(Digest::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sha512_and_sha384_hash_with_their_own_function() {
        // Known answers: sha512("abc") and sha384("abc") from FIPS 180-2.
        let d = Digest::of_with(Algorithm::Sha512, b"abc");
        assert_eq!(
            d.to_string(),
            "sha512:ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
             2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
        );
        assert!(d.matches(b"abc") && !d.matches(b"abd"));
        let d = Digest::of_with(Algorithm::Sha384, b"abc");
        assert!(d
            .to_string()
            .starts_with("sha384:cb00753f45a35e8bb5a03d699ac65007"));
        let mut v = Verifier::new(Digest::of_with(Algorithm::Sha512, b"hello"), 5);
        v.update(b"hel").unwrap();
        v.update(b"lo").unwrap();
        v.finish().unwrap();
        let mut v = Verifier::new(Digest::of_with(Algorithm::Sha512, b"hello"), 5);
        v.update(b"hellO").unwrap();
        assert!(matches!(v.finish(), Err(DigestError::Mismatch { .. })));
    }

    #[test]
    fn unknown_size_checks_the_digest_alone() {
        let d = Digest::of(b"hello");
        let mut v = Verifier::new(d.clone(), SIZE_UNKNOWN);
        v.update(b"hello").unwrap();
        v.finish().unwrap();
        let mut v = Verifier::new(d, SIZE_UNKNOWN);
        v.update(b"hello!").unwrap();
        assert!(matches!(v.finish(), Err(DigestError::Mismatch { .. })));
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
