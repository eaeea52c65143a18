//! Deleting a converted image from a repository (`DELETE /v2/<name>/manifests/<digest>`): what
//! names it goes at once, its blobs with the next GC once nothing else names them.

use std::collections::HashSet;

use super::repo::{references, MAX_MANIFEST_BYTES};
use super::{Store, StoreError};
use crate::digest::Digest;

const DERIVED: &str = "derived/";

impl Store {
    /// The manifests and blobs `manifest` names; nothing if it is no longer stored.
    fn named_by(&self, manifest: &Digest) -> Result<super::repo::References, StoreError> {
        match self.read_small(manifest, MAX_MANIFEST_BYTES) {
            Ok(bytes) => references(manifest, &bytes),
            Err(StoreError::BlobUnknown(_)) => Ok(Default::default()),
            Err(e) => Err(e),
        }
    }

    /// Removes `manifest` from `repo`: its link and the tags naming it; for an index, the links of
    /// its children that no other manifest of `repo` names; and the derived records of whatever
    /// this left unlinked everywhere, or that make the same blobs (a Docker schema 2 twin's OCI
    /// original), so that GC can collect the blobs. `Ok(false)`: it was not in `repo`.
    pub fn delete_image(&self, repo: &str, manifest: &Digest) -> Result<bool, StoreError> {
        if !self.has_manifest(repo, manifest)? {
            return Ok(false);
        }
        let children = self.named_by(manifest)?.manifests;
        self.delete_manifest(repo, manifest)?;
        let mut still_named = HashSet::new();
        for (r, d) in self.manifest_links()? {
            if r == repo {
                still_named.extend(self.named_by(&d)?.manifests);
            }
        }
        let mut gone = vec![manifest.clone()];
        for child in children {
            if !still_named.contains(&child) {
                self.delete_manifest(repo, &child)?;
                gone.push(child);
            }
        }
        let linked: HashSet<Digest> = self.manifest_links()?.into_iter().map(|(_, d)| d).collect();
        let mut gone_blobs = HashSet::new();
        for m in &gone {
            gone_blobs.extend(self.named_by(m)?.blobs);
        }
        let gone: HashSet<Digest> = gone.into_iter().filter(|d| !linked.contains(d)).collect();
        for key in self
            .backend
            .list(DERIVED)
            .map_err(StoreError::io(DERIVED))?
        {
            let Some(target) = self.read_digest(&key)? else {
                continue;
            };
            if linked.contains(&target) {
                continue;
            }
            let same_blobs = || -> Result<bool, StoreError> {
                Ok(self
                    .named_by(&target)?
                    .blobs
                    .iter()
                    .any(|b| gone_blobs.contains(b)))
            };
            if gone.contains(&target) || same_blobs()? {
                self.backend.delete(&key).map_err(StoreError::io(&key))?;
            }
        }
        Ok(true)
    }
}
