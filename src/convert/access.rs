//! Whether a caller may read what the store holds for an upstream repository: the store keeps
//! private images' conversions, so serving one by digest (or a blob of it) asks the upstream first,
//! with the caller's credentials, whether they may pull from that repository now. Answers are kept
//! briefly per caller and repository, shorter than any registry's pull token lives.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use super::{Converter, Error};
use crate::reference::Reference;
use crate::registry::Credentials;

/// How long an upstream "yes" is trusted without asking again.
const ACCESS_TTL: Duration = Duration::from_secs(30);
/// Entries kept at most; an old one is dropped when full (callers × repositories is unbounded).
const MAX_ENTRIES: usize = 10_000;

#[derive(Default)]
pub(super) struct AccessCache(Mutex<HashMap<[u8; 32], Instant>>);

fn key(reference: &Reference, credentials: &Credentials) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(reference.name().as_bytes());
    h.update([0]);
    h.update(credentials.0.as_deref().unwrap_or("").as_bytes());
    h.finalize().into()
}

impl Converter {
    /// `Ok` if the upstream lets `credentials` pull from `reference`'s repository (it lists one tag
    /// for them: the same pull permission a manifest needs, without naming a manifest).
    pub async fn check_access(
        &self,
        reference: &Reference,
        credentials: &Credentials,
    ) -> Result<(), Error> {
        let k = key(reference, credentials);
        let now = Instant::now();
        {
            let cache = self.access.0.lock().unwrap_or_else(|p| p.into_inner());
            if cache.get(&k).is_some_and(|until| *until > now) {
                return Ok(());
            }
        }
        self.check_allowed(reference)?;
        self.source
            .tags(reference, Some(1), None, credentials)
            .await
            .map_err(super::error::source_error)?;
        let mut cache = self.access.0.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_ENTRIES {
            cache.retain(|_, until| *until > now);
            if cache.len() >= MAX_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(k, now + ACCESS_TTL);
        Ok(())
    }
}
