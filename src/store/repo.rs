//! Repositories: manifest links (`repositories/<name>/_manifests/<alg>/<hex>`), tags
//! (`repositories/<name>/_tags/<tag>` holding the digest's text) and the listings behind
//! `tags/list` and `_catalog`, in lexical order for `n`/`last` pagination. Names are checked against
//! the distribution spec's grammar before they become keys.

use std::io::{Read, Write};

use serde_json::Value;

use super::names::{check_repository, check_tag};
use super::{Store, StoreError};
use crate::digest::Digest;

/// Bytes of a manifest or index the store reads back (to follow its references): the default of
/// `--max-manifest-bytes`, so anything strata would accept fits.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

const ROOT: &str = "repositories/";
const MANIFESTS: &str = "/_manifests/";
const TAGS: &str = "/_tags/";

fn link_key(repo: &str, digest: &Digest) -> String {
    format!(
        "{ROOT}{repo}{MANIFESTS}{}/{}",
        digest.algorithm().name(),
        digest.hex()
    )
}

fn tag_key(repo: &str, tag: &str) -> String {
    format!("{ROOT}{repo}{TAGS}{tag}")
}

/// What a manifest or index names: `config` and `layers[]` (blobs), `manifests[]` (child manifests,
/// themselves to be read for their references).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct References {
    pub blobs: Vec<Digest>,
    pub manifests: Vec<Digest>,
}

impl References {
    pub fn all(&self) -> impl Iterator<Item = &Digest> {
        self.blobs.iter().chain(&self.manifests)
    }
}

pub fn references(digest: &Digest, bytes: &[u8]) -> Result<References, StoreError> {
    let invalid = |reason: String| StoreError::InvalidManifest {
        digest: digest.clone(),
        reason,
    };
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
    let list = |k: &str| doc.get(k).and_then(Value::as_array).into_iter().flatten();
    let parse = |d: &Value| -> Result<Digest, StoreError> {
        let text = d
            .get("digest")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("a descriptor without a digest".into()))?;
        Ok(Digest::parse(text)?)
    };
    Ok(References {
        blobs: doc
            .get("config")
            .into_iter()
            .chain(list("layers"))
            .map(parse)
            .collect::<Result<_, _>>()?,
        manifests: list("manifests").map(parse).collect::<Result<_, _>>()?,
    })
}

/// The items after `last`, at most `n` of them (distribution-spec pagination); `items` sorted.
fn page(items: Vec<String>, last: Option<&str>, n: Option<usize>) -> Vec<String> {
    let after = items
        .into_iter()
        .filter(|i| last.is_none_or(|l| i.as_str() > l));
    after.take(n.unwrap_or(usize::MAX)).collect()
}

impl Store {
    /// Stores a manifest and links it into `repo`. Every blob it names must be stored already (the
    /// publish order), and leased by the caller until this returns (the leases [`super::Published`]
    /// carries, or [`Store::lease`] for blobs it did not write); the returned lease keeps the
    /// manifest blob until the caller has tagged it or recorded it as derived.
    ///
    /// A first link of a manifest into `repo` marks what it names in use for the other replicas'
    /// sweeps before looking for it ([`super::inuse`]): those blobs may be stored but unreferenced
    /// (a deleted image's), and the link is what will root them. A link already there roots them.
    pub fn put_manifest(&self, repo: &str, bytes: &[u8]) -> Result<super::Published, StoreError> {
        check_repository(repo)?;
        let digest = Digest::of(bytes);
        let refs = references(&digest, bytes)?;
        // Marks, not leases: the caller's leases already cover this process, and a lease's touch
        // would make every named blob recent for eviction.
        let _used: Vec<super::inuse::UseMark> = if self.has_manifest(repo, &digest)? {
            Vec::new()
        } else {
            refs.all()
                .map(|r| {
                    super::inuse::mark_in_use(&self.backend, r)
                        .map_err(StoreError::io(&super::blob_key(r)))
                })
                .collect::<Result<_, _>>()?
        };
        for r in refs.all() {
            if self.stat_blob(r)?.is_none() {
                return Err(StoreError::MissingBlob {
                    manifest: digest,
                    missing: r.clone(),
                });
            }
        }
        let published = self.put_blob(bytes)?;
        let key = link_key(repo, &published.digest);
        let mut up = self.backend.upload().map_err(StoreError::io(&key))?;
        up.write_all(published.digest.to_string().as_bytes())
            .map_err(StoreError::io(&key))?;
        up.create_if_absent(&key).map_err(StoreError::io(&key))?;
        Ok(published)
    }

    /// Whether a manifest and everything it names (through indexes) are stored. Eviction removes
    /// blobs, not manifests: a record or link whose manifest is incomplete is a miss to convert again.
    pub fn complete(&self, manifest: &Digest) -> Result<bool, StoreError> {
        let bytes = match self.read_small(manifest, MAX_MANIFEST_BYTES) {
            Ok(b) => b,
            Err(StoreError::BlobUnknown(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        let refs = references(manifest, &bytes)?;
        for b in &refs.blobs {
            if self.stat_blob(b)?.is_none() {
                return Ok(false);
            }
        }
        for m in &refs.manifests {
            if !self.complete(m)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    pub fn has_manifest(&self, repo: &str, digest: &Digest) -> Result<bool, StoreError> {
        check_repository(repo)?;
        let key = link_key(repo, digest);
        Ok(self
            .backend
            .stat(&key)
            .map_err(StoreError::io(&key))?
            .is_some())
    }

    /// Points `tag` at a manifest linked in `repo`, replacing what it named (atomically).
    pub fn set_tag(&self, repo: &str, tag: &str, digest: &Digest) -> Result<(), StoreError> {
        check_tag(tag)?;
        if !self.has_manifest(repo, digest)? {
            return Err(StoreError::ManifestUnknown {
                repository: repo.to_string(),
                digest: digest.clone(),
            });
        }
        let key = tag_key(repo, tag);
        let mut up = self.backend.upload().map_err(StoreError::io(&key))?;
        up.write_all(digest.to_string().as_bytes())
            .map_err(StoreError::io(&key))?;
        up.replace(&key).map_err(StoreError::io(&key))
    }

    pub fn tag(&self, repo: &str, tag: &str) -> Result<Option<Digest>, StoreError> {
        check_repository(repo)?;
        check_tag(tag)?;
        self.read_digest(&tag_key(repo, tag))
    }

    /// A record holding a digest's text (tag, link, derived key), if present.
    pub(super) fn read_digest(&self, key: &str) -> Result<Option<Digest>, StoreError> {
        let Some(mut r) = self.backend.get(key, None).map_err(StoreError::io(key))? else {
            return Ok(None);
        };
        let mut text = String::new();
        r.read_to_string(&mut text).map_err(StoreError::io(key))?;
        let first = text.lines().next().unwrap_or_default();
        Digest::parse(first)
            .map(Some)
            .map_err(|e| StoreError::Damaged {
                key: key.to_string(),
                reason: e.to_string(),
            })
    }

    pub fn delete_tag(&self, repo: &str, tag: &str) -> Result<bool, StoreError> {
        check_repository(repo)?;
        check_tag(tag)?;
        let key = tag_key(repo, tag);
        self.backend.delete(&key).map_err(StoreError::io(&key))
    }

    /// Removes a manifest from `repo` with the tags naming it (its blobs go only through GC).
    pub fn delete_manifest(&self, repo: &str, digest: &Digest) -> Result<bool, StoreError> {
        for tag in self.tags(repo, None, None)? {
            if self.tag(repo, &tag)?.as_ref() == Some(digest) {
                self.delete_tag(repo, &tag)?;
            }
        }
        let key = link_key(repo, digest);
        self.backend.delete(&key).map_err(StoreError::io(&key))
    }

    /// Tags of `repo` in lexical order, after `last`, at most `n`.
    pub fn tags(
        &self,
        repo: &str,
        last: Option<&str>,
        n: Option<usize>,
    ) -> Result<Vec<String>, StoreError> {
        check_repository(repo)?;
        let prefix = format!("{ROOT}{repo}{TAGS}");
        let keys = self
            .backend
            .list(&prefix)
            .map_err(StoreError::io(&prefix))?;
        let tags = keys.iter().filter_map(|k| k.strip_prefix(&prefix));
        // Only direct children: a deeper key belongs to a repository `<repo>/_tags/…`, which cannot exist.
        let tags = tags
            .filter(|t| !t.contains('/'))
            .map(str::to_string)
            .collect();
        Ok(page(tags, last, n))
    }

    /// Repositories holding at least one manifest, in lexical order, after `last`, at most `n`.
    pub fn repositories(
        &self,
        last: Option<&str>,
        n: Option<usize>,
    ) -> Result<Vec<String>, StoreError> {
        let mut repos: Vec<String> = self
            .manifest_links()?
            .into_iter()
            .map(|(repo, _)| repo)
            .collect();
        repos.sort();
        repos.dedup();
        Ok(page(repos, last, n))
    }

    /// Whether a manifest linked in `repo` (or an index child of one) names `blob`: a repository
    /// serves only its own blobs, so access to one repository never reads another's.
    pub fn repository_has_blob(&self, repo: &str, blob: &Digest) -> Result<bool, StoreError> {
        check_repository(repo)?;
        let prefix = format!("{ROOT}{repo}{MANIFESTS}");
        let keys = self
            .backend
            .list(&prefix)
            .map_err(StoreError::io(&prefix))?;
        let mut pending: Vec<Digest> = Vec::new();
        for key in keys {
            let Some(rest) = key.strip_prefix(&prefix) else {
                continue;
            };
            // Deeper keys belong to another repository (`<repo>/_manifests/…` cannot be one).
            if rest.matches('/').count() != 1 {
                continue;
            }
            if let Ok(d) = Digest::parse(&rest.replacen('/', ":", 1)) {
                pending.push(d);
            }
        }
        let mut seen = std::collections::HashSet::new();
        while let Some(m) = pending.pop() {
            if &m == blob {
                return Ok(true);
            }
            if !seen.insert(m.clone()) {
                continue;
            }
            let bytes = match self.read_small(&m, MAX_MANIFEST_BYTES) {
                Ok(b) => b,
                Err(StoreError::BlobUnknown(_)) => continue,
                Err(e) => return Err(e),
            };
            let refs = references(&m, &bytes)?;
            if refs.blobs.contains(blob) {
                return Ok(true);
            }
            pending.extend(refs.manifests);
        }
        Ok(false)
    }

    /// Every (repository, manifest digest) link: GC's roots.
    pub(super) fn manifest_links(&self) -> Result<Vec<(String, Digest)>, StoreError> {
        let keys = self.backend.list(ROOT).map_err(StoreError::io(ROOT))?;
        let mut out = Vec::new();
        for key in keys {
            let Some((repo, rest)) = key.strip_prefix(ROOT).and_then(|k| k.split_once(MANIFESTS))
            else {
                continue;
            };
            let digest =
                Digest::parse(&rest.replacen('/', ":", 1)).map_err(|e| StoreError::Damaged {
                    key: key.clone(),
                    reason: e.to_string(),
                })?;
            out.push((repo.to_string(), digest));
        }
        Ok(out)
    }
}
