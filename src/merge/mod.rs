//! The top-down layer merger: layers arrive newest first, each entry is decided on sight against the
//! [`index::Index`] of what upper layers decided, and kept entries go straight to a [`Sink`]. Nothing
//! but paths is remembered; file contents pass through.
//!
//! Hardlinks are the one thing a top-down pass cannot decide alone (docs/FORMATS.md §3):
//! - a link to a file of a lower layer is held back until that layer yields the target, then written
//!   right after it (extraction needs the target first);
//! - a link whose target an upper layer deleted or replaced gets the target's content itself: the target
//!   is written under the link's name, and the group's other links point there;
//! - for a link to an earlier file of the same layer, the merger must know when it meets that file that a
//!   link will follow, if an upper layer hid the file: [`LayerHints`], computed from the layer's
//!   summary, tell it. Merged without them ([`Merger::begin_watched`]), a layer is learnt as it comes,
//!   and a layer that needed them stops the merge ([`NeedsSummary`]).

mod hints;
pub mod index;

use std::collections::HashMap;
use std::io::{self, Read};

use crate::entry::{self, EntryMeta, Item, Kind};
pub use hints::{LayerHints, NeedsSummary};
use hints::{Source, Watch};
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
    NeedsSummary(#[from] NeedsSummary),
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
    /// Set when the current layer is merged without its summary.
    watch: Option<Watch>,
    /// Ordinal of the next item of the current layer.
    ordinal: u32,
    /// For link groups of the current layer, by the ordinal of the entry holding the content: the
    /// name that content went out under (`None`: every name of the group is hidden).
    out_names: HashMap<u32, Option<Vec<u8>>>,
    /// Watching: ordinals of the layer's content that went out under an upper link's name.
    renamed: Vec<u32>,
}

impl Merger {
    pub fn new() -> Merger {
        Merger::default()
    }

    /// Starts the next layer down (the first call starts the top layer), knowing its hints.
    pub fn begin_layer(&mut self, depth: u32, hints: LayerHints) {
        self.depth = depth;
        self.hints = hints;
        self.watch = None;
        self.ordinal = 0;
        self.out_names.clear();
        self.renamed.clear();
    }

    /// Starts the next layer down without its summary: the merge learns the layer as it goes, and
    /// fails with [`NeedsSummary`] where the hints would have changed its output.
    pub fn begin_watched(&mut self, depth: u32) {
        self.begin_layer(depth, LayerHints::default());
        self.watch = Some(Watch::default());
    }

    /// Feeds one member of the current layer.
    pub fn item(
        &mut self,
        item: Item,
        content: &mut dyn Read,
        sink: &mut dyn Sink,
    ) -> Result<(), MergeError> {
        let ordinal = self.ordinal;
        self.ordinal += 1;
        if let Some(watch) = &mut self.watch {
            if let Some(source) = watch.observe(&item, ordinal)? {
                self.hints.sources.insert(ordinal, source);
            }
        }
        match item {
            Item::Whiteout(path) => self.index.whiteout(&path, self.depth),
            Item::Opaque(dir) => self.index.opaque(&dir, self.depth),
            Item::Entry(meta) if self.hints.superseded(ordinal) => {
                // A non-directory still replaced, when extracted, whatever lower layers had at its
                // path, subtree included; what replaces it decides the rest.
                if meta.kind != Kind::Dir {
                    self.index.whiteout(&meta.path, self.depth);
                }
                // Links made to it before it was replaced keep its content.
                if let Some(links) = self.hints.group(ordinal).cloned() {
                    self.emit_group(ordinal, &meta, content, Vec::new(), &links, sink)?;
                }
            }
            Item::Entry(meta) if meta.kind == Kind::Hardlink => {
                self.hardlink(ordinal, meta, sink)?
            }
            Item::Entry(meta) => self.node(ordinal, meta, content, sink)?,
        }
        Ok(())
    }

    fn node(
        &mut self,
        ordinal: u32,
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
                if self.watch.is_some() {
                    // A later entry of the layer may replace the directory, and be the target.
                    return Err(NeedsSummary {
                        path: lossy(&meta.path),
                        why: "is a directory an upper layer's link names",
                    }
                    .into());
                }
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
        let same_layer = self.hints.group(ordinal).cloned();
        if visible {
            sink.entry(&meta, content)?;
            // Watching, any later link of the layer may name it.
            if same_layer.is_some() || self.watch.is_some() {
                self.out_names.insert(ordinal, Some(meta.path.clone()));
            }
            for p in waiting {
                emit_link(sink, p.link, &meta.path)?;
            }
            return Ok(());
        }
        if waiting.is_empty() && same_layer.is_none() {
            return Ok(());
        }
        self.emit_group(
            ordinal,
            &meta,
            content,
            waiting,
            &same_layer.unwrap_or_default(),
            sink,
        )
    }

    /// Content whose own name does not survive, with links that do: it goes out under the first
    /// surviving link, and the group's other links point there. The group: links from upper layers
    /// waiting on it, and for each same-layer link, the link itself (written when the layer reaches
    /// it) and upper links waiting on that link.
    fn emit_group(
        &mut self,
        ordinal: u32,
        meta: &EntryMeta,
        content: &mut dyn Read,
        waiting: Vec<Pending>,
        same_layer: &[Vec<u8>],
        sink: &mut dyn Sink,
    ) -> Result<(), MergeError> {
        let mut group: Vec<(EntryMeta, bool)> =
            waiting.into_iter().map(|p| (p.link, false)).collect();
        for l in same_layer {
            if self.index.would_admit(l, false, self.depth) {
                group.push((
                    EntryMeta {
                        path: l.clone(),
                        ..meta.clone()
                    },
                    true,
                ));
            }
            group.extend(self.take_pending(l).into_iter().map(|p| (p.link, false)));
        }
        let mut group = group.into_iter();
        let Some((first, _)) = group.next() else {
            self.out_names.insert(ordinal, None);
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
        self.out_names.insert(ordinal, Some(name));
        if self.watch.is_some() {
            self.renamed.push(ordinal);
        }
        Ok(())
    }

    fn hardlink(
        &mut self,
        ordinal: u32,
        meta: EntryMeta,
        sink: &mut dyn Sink,
    ) -> Result<(), MergeError> {
        let visible = self.index.admit(&meta.path, false, self.depth);
        if !visible {
            self.index.imply_parents(&meta.path, self.depth);
        }
        let source = self.hints.sources.get(&ordinal).cloned();
        let here = match source {
            Some(Source::Here(k)) => k,
            Some(Source::Dir) => {
                if !visible {
                    return Ok(());
                }
                return Err(MergeError::LinkToDir {
                    link: lossy(&meta.path),
                    target: lossy(&meta.link),
                });
            }
            lower => {
                // The target comes from a lower layer: hold the link, and any upper links waiting on
                // this one, until it shows up; they all end up naming the target's output.
                let target = match lower {
                    Some(Source::Lower(t)) => t,
                    _ => meta.link.clone(),
                };
                let mut held = self.take_pending(&meta.path);
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
            }
        };
        let resolved = self.out_names.get(&here).cloned().flatten();
        let waiting = self.take_pending(&meta.path);
        let Some(target) = resolved else {
            if (visible || !waiting.is_empty()) && self.watch.is_some() {
                // The hints would have sent the target's content out under a link's name when the
                // merge met it: too late now.
                return Err(NeedsSummary {
                    path: lossy(&meta.path),
                    why: "links to a file of its own layer that an upper layer hid",
                }
                .into());
            }
            if visible || !waiting.is_empty() {
                return Err(MergeError::DanglingLink {
                    link: lossy(&meta.path),
                    target: lossy(&meta.link),
                });
            }
            return Ok(());
        };
        if !waiting.is_empty() && self.renamed.contains(&here) {
            // With hints, the links waiting on this one would have gone out beside the content.
            return Err(NeedsSummary {
                path: lossy(&meta.path),
                why: "is named by upper links and links to a file of its own layer an upper layer hid",
            }
            .into());
        }
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
                mtime_nsec: 0,
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
        match entry::read_member(&mut e)? {
            Some((item, None)) => merger.item(item, &mut e, sink)?,
            Some((item, Some(sparse))) => merger.item(item, &mut sparse.expand(&mut e), sink)?,
            None => {}
        }
    }
    io::copy(&mut archive.into_inner(), &mut io::sink())?;
    Ok(())
}

#[cfg(test)]
mod tests;
