//! Detached signatures kept once computed: in memory, and on disk beside the layer summaries when a
//! cache directory is set (so they survive restarts and are shared by instances sharing it). Also the
//! conversions under way per signature, so a request for a signature that is about to exist waits for
//! it instead of being told to come back.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Signatures kept in memory; each is under 1 KiB.
const MEMORY_ENTRIES: usize = 4096;

#[derive(Debug, Default)]
struct Inner {
    kept: HashMap<String, String>,
    /// Insertion order, to drop the oldest when full.
    order: VecDeque<String>,
    in_flight: HashMap<String, usize>,
}

#[derive(Debug, Clone, Default)]
pub struct Signatures {
    dir: Option<PathBuf>,
    inner: Arc<Mutex<Inner>>,
}

/// Marks a conversion that will produce the signature under `key`; dropping it (finished or not)
/// unmarks it.
#[derive(Debug)]
pub struct InFlight {
    key: String,
    inner: Arc<Mutex<Inner>>,
}

impl InFlight {
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut inner = self.inner.lock().expect("not poisoned");
        if let Some(n) = inner.in_flight.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                inner.in_flight.remove(&self.key);
            }
        }
    }
}

fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl Signatures {
    pub fn new(cache_dir: Option<PathBuf>) -> Self {
        Signatures {
            dir: cache_dir.map(|d| d.join("signatures")),
            inner: Arc::default(),
        }
    }

    fn file(&self, key: &str) -> Option<PathBuf> {
        debug_assert!(valid_key(key));
        self.dir.as_ref().map(|d| d.join(format!("{key}.asc")))
    }

    pub fn load(&self, key: &str) -> Option<String> {
        if let Some(sig) = self.inner.lock().expect("not poisoned").kept.get(key) {
            return Some(sig.clone());
        }
        let sig = std::fs::read_to_string(self.file(key)?).ok()?;
        sig.starts_with("-----BEGIN PGP SIGNATURE-----")
            .then_some(sig)
    }

    /// Keeps the first signature of these bytes: any one verifies, and the one already handed out
    /// stays the one served.
    pub fn save(&self, key: &str, signature: &str) {
        {
            let mut inner = self.inner.lock().expect("not poisoned");
            if inner.kept.contains_key(key) {
                return;
            }
            if inner.kept.len() >= MEMORY_ENTRIES {
                if let Some(old) = inner.order.pop_front() {
                    inner.kept.remove(&old);
                }
            }
            inner.kept.insert(key.to_string(), signature.to_string());
            inner.order.push_back(key.to_string());
        }
        if let Some(path) = self.file(key) {
            if !path.exists() {
                crate::summary::write_atomic(&path, signature.as_bytes());
            }
        }
    }

    pub fn start(&self, key: &str) -> InFlight {
        *self
            .inner
            .lock()
            .expect("not poisoned")
            .in_flight
            .entry(key.to_string())
            .or_default() += 1;
        InFlight {
            key: key.to_string(),
            inner: self.inner.clone(),
        }
    }

    pub fn in_flight(&self, key: &str) -> bool {
        self.inner
            .lock()
            .expect("not poisoned")
            .in_flight
            .contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIG: &str = "-----BEGIN PGP SIGNATURE-----\nx\n-----END PGP SIGNATURE-----\n";

    #[test]
    fn kept_in_memory_and_on_disk_first_wins() {
        let dir = tempfile::tempdir().unwrap();
        let a = Signatures::new(Some(dir.path().to_path_buf()));
        assert!(a.load("k-1").is_none());
        a.save("k-1", SIG);
        a.save("k-1", "-----BEGIN PGP SIGNATURE-----\nother\n");
        assert_eq!(a.load("k-1").as_deref(), Some(SIG));
        // Another instance sharing the directory.
        let b = Signatures::new(Some(dir.path().to_path_buf()));
        assert_eq!(b.load("k-1").as_deref(), Some(SIG));
        let none = Signatures::new(None);
        none.save("k-2", SIG);
        assert_eq!(none.load("k-2").as_deref(), Some(SIG));
    }

    #[test]
    fn in_flight_counts() {
        let s = Signatures::new(None);
        let one = s.start("k");
        let two = s.start("k");
        assert!(s.in_flight("k"));
        drop(one);
        assert!(s.in_flight("k"));
        drop(two);
        assert!(!s.in_flight("k"));
    }
}
