//! (in progress) image references.

/// A canonical image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Registry as named (`docker.io`, `localhost:5000`).
    pub registry: String,
    /// Repository path (`library/ubuntu`).
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}
