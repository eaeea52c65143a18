//! The top-down layer merger: layers arrive newest first, each entry is decided on sight against the
//! [`index::Index`] of what upper layers decided, and kept entries go straight to a [`Sink`]. Nothing
//! but paths is remembered; file contents pass through.
//!
//! Hardlinks are the one thing a top-down pass cannot decide alone (FORMATS.md §3):
//! - a link to a file of a lower layer is held back until that layer yields the target, then written
//!   right after it (extraction needs the target first);
//! - a link whose target an upper layer deleted or replaced gets the target's content itself: the target
//!   is written under the link's name, and the group's other links point there;
//! - for a link to an earlier file of the same layer, the merger must know when it meets that file that a
//!   link will follow: [`LayerHints`], computed from the layer's summary, tell it.

pub mod index;

use std::collections::HashMap;
use std::io::{self, Read};

use crate::entry::{self, EntryMeta, Item, Kind};
use index::Index;

/// Mode extractors give the parents they create (docker's and containerd's MkdirAll).
const IMPLIED_DIR_MODE: u32 = 0o755;

/// Where merged entries go: the tar writer, or a counter when sizing.
pub trait Sink {
    /// One entry; `content` yields exactly `meta.size` bytes.
    fn entry(&mut self, meta: &EntryMeta, content: &mut dyn Read) -> io::Result<()>;

    /// Sends on what is buffered (between layers, while the next one's fetch may wait).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes canonical tar entries.
pub struct TarSink<W>(pub W);

impl<W: io::Write> Sink for TarSink<W> {
    fn entry(&mut self, meta: &EntryMeta, content: &mut dyn Read) -> io::Result<()> {
        entry::write_entry(&mut self.0, meta, content)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Counts the bytes a [`TarSink`] would write, without reading any content.
#[derive(Debug, Default)]
pub struct CountingSink(pub u64);

impl Sink for CountingSink {
    fn entry(&mut self, meta: &EntryMeta, _content: &mut dyn Read) -> io::Result<()> {
        self.0 += meta.encoded_len();
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("hardlink {link:?} points to {target:?}, which no lower layer provides")]
    DanglingLink { link: String, target: String },
    #[error("hardlink {link:?} points to {target:?}, which is a directory")]
    LinkToDir { link: String, target: String },
    #[error(transparent)]
    Entry(#[from] entry::EntryError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl From<MergeError> for io::Error {
    fn from(e: MergeError) -> io::Error {
        match e {
            MergeError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

fn lossy(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// What the merge of one layer must know before reading it, derived from the layer's summary.
#[derive(Debug, Default, Clone)]
pub struct LayerHints {
    /// Same-layer hardlink groups: target path → link paths that follow it in the layer, in order.
    links: HashMap<Vec<u8>, Vec<Vec<u8>>>,
    /// Paths that occur more than once in the layer, with their count: the last occurrence wins.
    duplicates: HashMap<Vec<u8>, u32>,
}

impl LayerHints {
    pub fn from_items(items: &[Item]) -> LayerHints {
        let entries = || {
            items.iter().filter_map(|i| match i {
                Item::Entry(m) => Some(m),
                _ => None,
            })
        };
        let mut counts: HashMap<&[u8], u32> = HashMap::new();
        for meta in entries() {
            *counts.entry(&meta.path).or_default() += 1;
        }
        // Only a path's last occurrence counts; a link's target must come before it.
        let mut left = counts.clone();
        let mut seen: std::collections::HashSet<&[u8]> = std::collections::HashSet::new();
        let mut links: HashMap<Vec<u8>, Vec<Vec<u8>>> = HashMap::new();
        for meta in entries() {
            let n = left.get_mut(&meta.path[..]).expect("counted above");
            *n -= 1;
            if *n == 0 && meta.kind == Kind::Hardlink && seen.contains(&meta.link[..]) {
                links
                    .entry(meta.link.clone())
                    .or_default()
                    .push(meta.path.clone());
            }
            seen.insert(&meta.path);
        }
        let duplicates = counts
            .into_iter()
            .filter(|&(_, n)| n > 1)
            .map(|(p, n)| (p.to_vec(), n))
            .collect();
        LayerHints { links, duplicates }
    }
}

/// A hardlink waiting for its target to come up from a lower layer.
struct Pending {
    link: EntryMeta,
    /// Depth of the link's layer: only a lower layer's entry can be its target.
    depth: u32,
}

/// State of one merge, carried from the top layer down.
#[derive(Default)]
pub struct Merger {
    index: Index,
    /// Target path → links from upper layers waiting for it.
    pending: HashMap<Vec<u8>, Vec<Pending>>,
    depth: u32,
    hints: LayerHints,
    /// For link targets of the current layer: the name their content went out under (`None`: dropped).
    out_names: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Links of the current layer held for a lower target: link path → that target.
    held_here: HashMap<Vec<u8>, Vec<u8>>,
}

impl Merger {
    pub fn new() -> Merger {
        Merger::default()
    }

    /// Starts the next layer down (the first call starts the top layer).
    pub fn begin_layer(&mut self, depth: u32, hints: LayerHints) {
        self.depth = depth;
        self.hints = hints;
        self.out_names.clear();
        self.held_here.clear();
    }

    /// Feeds one member of the current layer.
    pub fn item(
        &mut self,
        item: Item,
        content: &mut dyn Read,
        sink: &mut dyn Sink,
    ) -> Result<(), MergeError> {
        match item {
            Item::Whiteout(path) => self.index.whiteout(&path, self.depth),
            Item::Opaque(dir) => self.index.opaque(&dir, self.depth),
            Item::Entry(meta) => {
                if let Some(left) = self.hints.duplicates.get_mut(&meta.path) {
                    *left -= 1;
                    if *left > 0 {
                        // An earlier non-directory occurrence still replaced whatever lower layers had
                        // there when extracted, subtree included; the last occurrence decides the rest.
                        if meta.kind != Kind::Dir {
                            self.index.whiteout(&meta.path, self.depth);
                        }
                        return Ok(());
                    }
                }
                if meta.kind == Kind::Hardlink {
                    self.hardlink(meta, sink)?;
                } else {
                    self.node(meta, content, sink)?;
                }
            }
        }
        Ok(())
    }

    fn node(
        &mut self,
        meta: EntryMeta,
        content: &mut dyn Read,
        sink: &mut dyn Sink,
    ) -> Result<(), MergeError> {
        let is_dir = meta.kind == Kind::Dir;
        let visible = self.index.admit(&meta.path, is_dir, self.depth);
        if !visible {
            self.index.imply_parents(&meta.path, self.depth);
        }
        if is_dir {
            if let Some(p) = self.take_pending(&meta.path).first() {
                return Err(MergeError::LinkToDir {
                    link: lossy(&p.link.path),
                    target: lossy(&meta.path),
                });
            }
            if visible {
                sink.entry(&meta, content)?;
            }
            return Ok(());
        }
        let waiting = self.take_pending(&meta.path);
        let same_layer = self.hints.links.get(&meta.path);
        if visible {
            sink.entry(&meta, content)?;
            if same_layer.is_some() {
                self.out_names
                    .insert(meta.path.clone(), Some(meta.path.clone()));
            }
            for p in waiting {
                emit_link(sink, p.link, &meta.path)?;
            }
            return Ok(());
        }
        if waiting.is_empty() && same_layer.is_none() {
            return Ok(());
        }
        // Hidden target with links that survive: its content goes out under the first surviving link,
        // and the group's other links point there. The group: links from upper layers waiting on it, and
        // for each same-layer link, the link itself (written when the layer reaches it) and upper links
        // waiting on that link.
        let mut group: Vec<(EntryMeta, bool)> =
            waiting.into_iter().map(|p| (p.link, false)).collect();
        for l in same_layer.cloned().unwrap_or_default() {
            if self.index.would_admit(&l, false, self.depth) {
                group.push((
                    EntryMeta {
                        path: l.clone(),
                        ..meta.clone()
                    },
                    true,
                ));
            }
            group.extend(self.take_pending(&l).into_iter().map(|p| (p.link, false)));
        }
        let mut group = group.into_iter();
        let Some((first, _)) = group.next() else {
            self.out_names.insert(meta.path.clone(), None);
            return Ok(());
        };
        let name = first.path;
        sink.entry(
            &EntryMeta {
                path: name.clone(),
                ..meta.clone()
            },
            content,
        )?;
        for (link, later) in group {
            if !later {
                emit_link(sink, link, &name)?;
            }
        }
        self.out_names.insert(meta.path, Some(name));
        Ok(())
    }

    fn hardlink(&mut self, meta: EntryMeta, sink: &mut dyn Sink) -> Result<(), MergeError> {
        let visible = self.index.admit(&meta.path, false, self.depth);
        if !visible {
            self.index.imply_parents(&meta.path, self.depth);
        }
        let Some(resolved) = self.out_names.get(&meta.link).cloned() else {
            // The target comes from a lower layer: hold the link, and any upper links waiting on this
            // one, until it shows up; they all end up naming the target's output.
            let mut held = self.take_pending(&meta.path);
            // A link to a link held in this layer waits for the same lower target.
            let target = self
                .held_here
                .get(&meta.link)
                .cloned()
                .unwrap_or_else(|| meta.link.clone());
            self.held_here.insert(meta.path.clone(), target.clone());
            if visible {
                held.insert(
                    0,
                    Pending {
                        link: meta,
                        depth: self.depth,
                    },
                );
            }
            if !held.is_empty() {
                self.pending.entry(target).or_default().extend(held);
            }
            return Ok(());
        };
        if self.hints.links.contains_key(&meta.path) {
            self.out_names.insert(meta.path.clone(), resolved.clone());
        }
        let waiting = self.take_pending(&meta.path);
        let Some(target) = resolved else {
            if visible || !waiting.is_empty() {
                return Err(MergeError::DanglingLink {
                    link: lossy(&meta.path),
                    target: lossy(&meta.link),
                });
            }
            return Ok(());
        };
        if visible && target != meta.path {
            let path = meta.path.clone();
            emit_link(sink, meta, &target)?;
            for p in waiting {
                emit_link(sink, p.link, &path)?;
            }
        } else {
            for p in waiting {
                emit_link(sink, p.link, &target)?;
            }
        }
        Ok(())
    }

    /// Links waiting for `target` that an entry of the current layer satisfies: those of upper layers.
    fn take_pending(&mut self, target: &[u8]) -> Vec<Pending> {
        let Some(all) = self.pending.remove(target) else {
            return Vec::new();
        };
        let depth = self.depth;
        let (ready, later): (Vec<_>, Vec<_>) = all.into_iter().partition(|p| p.depth < depth);
        if !later.is_empty() {
            self.pending.insert(target.to_vec(), later);
        }
        ready
    }

    /// Ends the merge: writes the directories that only exist implicitly, and checks that every
    /// held-back link found its target.
    pub fn finish(self, sink: &mut dyn Sink) -> Result<(), MergeError> {
        for dir in self.index.implied_dirs() {
            // A directory named `.wh.<name>` only exists implicitly (any member of that name is a
            // whiteout). Written out, it would be one to the loader, which would delete its sibling
            // `<name>`; left out, the loader makes it as a parent, as the layer's extractor did.
            if entry::split_parent(dir).1.starts_with(entry::WHITEOUT) {
                continue;
            }
            let meta = EntryMeta {
                path: dir.to_vec(),
                kind: Kind::Dir,
                mode: IMPLIED_DIR_MODE,
                uid: 0,
                gid: 0,
                mtime: 0,
                size: 0,
                link: Vec::new(),
                dev_major: 0,
                dev_minor: 0,
                xattrs: Vec::new(),
            };
            sink.entry(&meta, &mut io::empty())?;
        }
        let mut left: Vec<_> = self.pending.into_iter().collect();
        left.sort_by(|a, b| a.0.cmp(&b.0));
        match left.first() {
            Some((target, links)) => Err(MergeError::DanglingLink {
                link: lossy(&links[0].link.path),
                target: lossy(target),
            }),
            None => Ok(()),
        }
    }
}

fn emit_link(sink: &mut dyn Sink, mut link: EntryMeta, target: &[u8]) -> io::Result<()> {
    link.kind = Kind::Hardlink;
    link.link = target.to_vec();
    link.size = 0;
    sink.entry(&link, &mut io::empty())
}

/// Merges one layer's tar stream (already decompressed) and reads it to its very end, so the blob's
/// digest check, which happens at the end of the compressed stream, always runs.
pub fn merge_tar<R: Read>(
    merger: &mut Merger,
    tar: R,
    sink: &mut dyn Sink,
) -> Result<(), MergeError> {
    let mut archive = tar::Archive::new(tar);
    for e in archive.entries()? {
        let mut e = e?;
        if let Some(item) = entry::read_item(&mut e)? {
            merger.item(item, &mut e, sink)?;
        }
    }
    io::copy(&mut archive.into_inner(), &mut io::sink())?;
    Ok(())
}

#[cfg(test)]
mod tests;
