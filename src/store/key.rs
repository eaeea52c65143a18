//! Keys of derived artifacts: what fixes a conversion's output bytes (the source manifest digest, the
//! output format and its options, and [`crate::version::OUTPUT`]) → the digest of the stored output's
//! manifest. A new output version makes new keys, so bytes made by other code are never served.

use std::collections::BTreeMap;
use std::fmt;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::{Store, StoreError};
use crate::digest::Digest;
use crate::version;

/// Everything but unreserved characters is escaped in option names and values, so `&`, `=` and `/`
/// in them cannot make two keys' texts equal.
const ESCAPED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

const DERIVED: &str = "derived/";

/// A derived artifact's identity. Its text (`Display`) is stable: it is what the store is keyed by,
/// across restarts and replicas.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ArtifactKey {
    source: Digest,
    format: String,
    /// Sorted by name, so the order options were given in does not matter.
    options: BTreeMap<String, String>,
    version: String,
}

impl ArtifactKey {
    /// A key under the current output version. `format` names the output (`docker-archive`, `aci`).
    pub fn new(source: Digest, format: &str) -> ArtifactKey {
        ArtifactKey {
            source,
            format: format.to_string(),
            options: BTreeMap::new(),
            version: version::OUTPUT.to_string(),
        }
    }

    /// Adds an option that changes the bytes (platform, the name `docker load` gives the image, …).
    pub fn option(mut self, name: &str, value: &str) -> ArtifactKey {
        self.options.insert(name.to_string(), value.to_string());
        self
    }

    #[cfg(test)]
    fn with_version(mut self, v: &str) -> ArtifactKey {
        self.version = v.to_string();
        self
    }

    /// Object key of the record: the text's sha256, since the text may hold any characters.
    fn record_key(&self) -> String {
        format!("{DERIVED}{}", self.lease_name())
    }

    /// The name of the fleet lease whoever converts this key holds ([`super::fleet`]).
    pub fn lease_name(&self) -> String {
        Digest::of(self.to_string().as_bytes()).hex().to_string()
    }
}

impl fmt::Display for ArtifactKey {
    /// `<version>/<format>/<source digest>?<name>=<value>&…`, names and values percent-encoded.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let enc = |s: &str| utf8_percent_encode(s, ESCAPED).to_string();
        write!(
            f,
            "{}/{}/{}",
            enc(&self.version),
            enc(&self.format),
            self.source
        )?;
        for (i, (k, v)) in self.options.iter().enumerate() {
            write!(f, "{}{}={}", if i == 0 { '?' } else { '&' }, enc(k), enc(v))?;
        }
        Ok(())
    }
}

impl Store {
    /// Records that `key`'s output is the stored manifest `manifest` (replacing an earlier record:
    /// same key, same bytes, so a racing writer records the same digest).
    pub fn put_derived(&self, key: &ArtifactKey, manifest: &Digest) -> Result<(), StoreError> {
        if self.stat_blob(manifest)?.is_none() {
            return Err(StoreError::BlobUnknown(manifest.clone()));
        }
        let record = key.record_key();
        let mut up = self.backend.upload().map_err(StoreError::io(&record))?;
        // The key's text follows the digest, so a record can be checked and read by a person.
        let text = format!("{manifest}\n{key}\n");
        std::io::Write::write_all(&mut up, text.as_bytes()).map_err(StoreError::io(&record))?;
        up.replace(&record).map_err(StoreError::io(&record))
    }

    /// The stored output's manifest digest for `key`, if converted before.
    pub fn derived(&self, key: &ArtifactKey) -> Result<Option<Digest>, StoreError> {
        self.read_digest(&key.record_key())
    }

    pub fn delete_derived(&self, key: &ArtifactKey) -> Result<bool, StoreError> {
        let record = key.record_key();
        self.backend
            .delete(&record)
            .map_err(StoreError::io(&record))
    }

    /// Every recorded output manifest: GC roots beside the repositories' links.
    pub(super) fn derived_manifests(&self) -> Result<Vec<Digest>, StoreError> {
        let keys = self
            .backend
            .list(DERIVED)
            .map_err(StoreError::io(DERIVED))?;
        keys.iter()
            .filter_map(|k| self.read_digest(k).transpose())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_stable_and_separates_what_differs() {
        let src = Digest::of(b"manifest");
        let a = ArtifactKey::new(src.clone(), "docker-archive")
            .option("tag", "a:b&c=d")
            .option("platform", "linux/amd64");
        let b = ArtifactKey::new(src.clone(), "docker-archive")
            .option("platform", "linux/amd64")
            .option("tag", "a:b&c=d");
        assert_eq!(a, b);
        assert_eq!(
            a.to_string(),
            format!(
                "{}/docker-archive/{src}?platform=linux%2Famd64&tag=a%3Ab%26c%3Dd",
                version::OUTPUT
            )
        );
        let others = [
            ArtifactKey::new(src.clone(), "aci")
                .option("tag", "a:b&c=d")
                .option("platform", "linux/amd64"),
            a.clone().option("platform", "linux/arm64"),
            a.clone().with_version("strata-output-v0"),
            ArtifactKey::new(Digest::of(b"other"), "docker-archive"),
            ArtifactKey::new(src.clone(), "docker-archive")
                .option("tag", "a:b")
                .option("c", "d"),
        ];
        for o in others {
            assert_ne!(o.to_string(), a.to_string());
            assert_ne!(o.record_key(), a.record_key());
        }
    }
}
