//! What the merge of one layer must know that a top-down pass cannot see coming: same-layer
//! duplicates and hardlinks. [`LayerHints`] know it ahead, from the layer's summary (a full read of
//! the layer before its merge). [`Watch`] does without: it learns the layer's paths as the merge meets
//! them, resolves same-layer hardlinks as they come, and stops the merge with [`NeedsSummary`] at the
//! first entry whose right place in the output lay earlier: a path the layer writes again, a directory
//! it later makes a non-directory, a link to a file of its own that an upper layer hid. Until then
//! both give the same output, entry for entry: the hints of a layer with none of these change nothing.

use std::collections::{HashMap, HashSet};

use crate::entry::{Item, Kind};

/// Where a same-layer hardlink's content comes from, when it is not simply its target path in the
/// layers below.
#[derive(Debug, Clone)]
pub(super) enum Source {
    /// The entry at this ordinal of the same layer (a file, symlink, device or fifo).
    Here(u32),
    /// This path of the layers below (a link to a link of this layer that points down).
    Lower(Vec<u8>),
    /// A directory of the same layer: an error if the link survives.
    Dir,
}

/// What the merge of one layer must know before reading it, derived from the layer's summary.
/// Entries are named by ordinal: their position among the layer's items (the same in the summary and
/// in the tar, as both come from [`entry::read_item`]).
#[derive(Debug, Default, Clone)]
pub struct LayerHints {
    /// Entries a later entry of the same layer replaces, extracted in order: an earlier occurrence of
    /// the same path (the last one wins), or anything below a path the layer later makes a
    /// non-directory (docker and containerd remove the directory, own children and all).
    pub(super) superseded: HashSet<u32>,
    /// Same-layer hardlink groups: ordinal of the entry holding the content → paths of the surviving
    /// links that share it (links to links included), in layer order.
    pub(super) groups: HashMap<u32, Vec<Vec<u8>>>,
    /// Surviving links (by ordinal) whose content is not their target path in lower layers.
    pub(super) sources: HashMap<u32, Source>,
}

impl LayerHints {
    pub fn from_items(items: &[Item]) -> LayerHints {
        let mut hints = LayerHints::default();
        // Forward: each path's latest occurrence, where each link's content comes from, and which
        // paths already had entries below them when the layer makes them a non-directory.
        let mut latest: HashMap<&[u8], u32> = HashMap::new();
        let mut parents: HashSet<&[u8]> = HashSet::new();
        let mut cuts: HashMap<&[u8], u32> = HashMap::new();
        let mut links: Vec<(u32, Source)> = Vec::new();
        let mut link_source: HashMap<u32, Source> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            let Item::Entry(m) = item else { continue };
            let i = i as u32;
            if m.kind == Kind::Hardlink {
                let source = match latest.get(&m.link[..]) {
                    None => Source::Lower(m.link.clone()),
                    Some(&k) => match &items[k as usize] {
                        Item::Entry(t) if t.kind == Kind::Hardlink => link_source[&k].clone(),
                        Item::Entry(t) if t.kind == Kind::Dir => Source::Dir,
                        _ => Source::Here(k),
                    },
                };
                link_source.insert(i, source.clone());
                links.push((i, source));
            }
            if let Some(prev) = latest.insert(&m.path, i) {
                hints.superseded.insert(prev);
            }
            if m.kind != Kind::Dir && parents.contains(&m.path[..]) {
                cuts.insert(&m.path, i);
            }
            // Deepest first: once a parent is known, so are its own parents.
            let mut p = &m.path[..];
            while let Some(slash) = p.iter().rposition(|&b| b == b'/') {
                p = &p[..slash];
                if !parents.insert(p) {
                    break;
                }
            }
        }
        if !cuts.is_empty() {
            for (i, item) in items.iter().enumerate() {
                let Item::Entry(m) = item else { continue };
                let i = i as u32;
                let cut =
                    m.path.iter().enumerate().any(|(at, &b)| {
                        b == b'/' && cuts.get(&m.path[..at]).is_some_and(|&j| j > i)
                    });
                if cut {
                    hints.superseded.insert(i);
                }
            }
        }
        for (i, source) in links {
            if hints.superseded.contains(&i) {
                continue;
            }
            let Item::Entry(m) = &items[i as usize] else {
                unreachable!("links are entries")
            };
            match source {
                Source::Here(k) => {
                    hints.groups.entry(k).or_default().push(m.path.clone());
                    hints.sources.insert(i, Source::Here(k));
                }
                Source::Lower(t) if t == m.link => {}
                other => {
                    hints.sources.insert(i, other);
                }
            }
        }
        hints
    }

    pub(super) fn superseded(&self, ordinal: u32) -> bool {
        !self.superseded.is_empty() && self.superseded.contains(&ordinal)
    }

    pub(super) fn group(&self, ordinal: u32) -> Option<&Vec<Vec<u8>>> {
        if self.groups.is_empty() {
            return None;
        }
        self.groups.get(&ordinal)
    }
}

/// A layer that cannot be merged without its summary, found as the merge met it.
#[derive(Debug, thiserror::Error)]
#[error("{path:?} {why}: the layer needs its summary to be merged")]
pub struct NeedsSummary {
    pub path: String,
    pub why: &'static str,
}

/// What a path of the current layer was, the latest time it came.
enum Seen {
    /// A file, symlink, device or fifo, at this ordinal.
    Content(u32),
    Dir,
    /// A hardlink, and where its content comes from.
    Link(Source),
}

/// A layer's paths so far, for merging it without its summary.
#[derive(Default)]
pub(super) struct Watch {
    seen: HashMap<Vec<u8>, Seen>,
    /// Parents of the layer's entries so far.
    parents: HashSet<Vec<u8>>,
}

impl Watch {
    /// Notes the entry at `ordinal`; for a hardlink, where its content comes from. Fails where the
    /// layer's hints would not have been empty.
    pub(super) fn observe(
        &mut self,
        item: &Item,
        ordinal: u32,
    ) -> Result<Option<Source>, NeedsSummary> {
        let Item::Entry(m) = item else {
            return Ok(None);
        };
        let fail = |why| {
            Err(NeedsSummary {
                path: String::from_utf8_lossy(&m.path).into_owned(),
                why,
            })
        };
        if self.seen.contains_key(&m.path) {
            return fail("comes twice in its layer");
        }
        if m.kind != Kind::Dir && self.parents.contains(&m.path[..]) {
            return fail("replaces a directory its own layer filled");
        }
        let (seen, source) = match m.kind {
            Kind::Dir => (Seen::Dir, None),
            Kind::Hardlink => {
                let source = match self.seen.get(&m.link) {
                    None => Source::Lower(m.link.clone()),
                    Some(Seen::Content(k)) => Source::Here(*k),
                    Some(Seen::Dir) => Source::Dir,
                    Some(Seen::Link(s)) => s.clone(),
                };
                // A link straight down is what the merge assumes of any link it is not told about.
                let told = !matches!(&source, Source::Lower(t) if *t == m.link);
                (Seen::Link(source.clone()), told.then_some(source))
            }
            _ => (Seen::Content(ordinal), None),
        };
        let mut p = &m.path[..];
        while let Some(slash) = p.iter().rposition(|&b| b == b'/') {
            p = &p[..slash];
            if !self.parents.insert(p.to_vec()) {
                break;
            }
        }
        self.seen.insert(m.path.clone(), seen);
        Ok(source)
    }
}
