//! The path index of a top-down merge: for every path an upper layer decided, what it decided and at
//! which depth, so each lower-layer entry is answered "emit" or "hidden" on sight.
//!
//! Depth 0 is the topmost layer. The rules are OCI image-spec layer.md: an upper non-directory replaces
//! the path and hides the lower subtree; an upper directory keeps lower children (its own attributes
//! win); a whiteout hides the path and its subtree in *lower* layers only; an opaque marker hides the
//! lower children of its directory, not the directory itself; at the root, every lower entry.
//!
//! A parent that a layer's entries imply without an entry of its own is that layer's own directory,
//! as overlay-based stores (overlay2, containerd's overlayfs) extract each layer apart and stack them:
//! it replaces a lower non-directory at its path (a lower symlink `bin → usr/bin` under an upper
//! `bin/tool` gives a directory `bin`), while a lower directory there keeps its attributes. vfs would
//! follow the symlink instead; README.md, "Merge semantics", says why strata does not. Memory grows
//! with the number of paths.

use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A directory entry was emitted.
    Dir,
    /// No entry yet, but an emitted path lies below: a directory exists here.
    ImpliedDir,
    /// A file, symlink, device, fifo or hardlink was emitted (or claimed by a pending hardlink).
    NonDir,
    /// Only a whiteout names it.
    Absent,
}

#[derive(Debug, Clone, Copy)]
struct Node {
    /// Depth of the layer that created the record.
    depth: u32,
    kind: Kind,
    /// Entries at this path from layers deeper than this are hidden (a whiteout).
    gone_below: Option<u32>,
    /// Children from layers deeper than this are hidden (a whiteout or an opaque marker).
    children_cut: Option<u32>,
    /// An implied directory that some layer's entry really creates (extractors make missing parents),
    /// so it exists in the image even if every entry below it ends up hidden.
    created: bool,
}

fn min_depth(a: Option<u32>, b: u32) -> Option<u32> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// Parents of `path`, shallowest first: `a/b/c` → `a`, `a/b`.
fn ancestors(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.iter()
        .enumerate()
        .filter(|&(_, &b)| b == b'/')
        .map(move |(i, _)| &path[..i])
}

#[derive(Debug, Default)]
pub struct Index {
    nodes: HashMap<Vec<u8>, Node>,
    /// Entries from layers deeper than this are hidden: an opaque marker at the root
    /// (`.wh..wh..opq` with no directory part), whose directory no path lists as an ancestor.
    root_cut: Option<u32>,
}

impl Index {
    fn hidden_by_ancestor(&self, path: &[u8], depth: u32) -> bool {
        self.root_cut.is_some_and(|c| depth > c)
            || ancestors(path).any(|a| {
                self.nodes.get(a).is_some_and(|n| {
                    n.children_cut.is_some_and(|c| depth > c)
                        || (n.depth < depth && n.kind == Kind::NonDir)
                })
            })
    }

    /// Whether an entry at `path` from the layer at `depth` belongs in the output, without recording it.
    pub fn would_admit(&self, path: &[u8], is_dir: bool, depth: u32) -> bool {
        if self.hidden_by_ancestor(path, depth) {
            return false;
        }
        match self.nodes.get(path) {
            None => true,
            Some(n) if n.gone_below.is_some_and(|c| depth > c) => false,
            Some(n) if n.kind == Kind::ImpliedDir => is_dir,
            // Re-created in the layer that whited it out (whiteout first: it applies to lower layers only).
            Some(n) if n.kind == Kind::Absent => n.depth == depth,
            Some(_) => false,
        }
    }

    /// Decides an entry and records it: `true` means emit it.
    pub fn admit(&mut self, path: &[u8], is_dir: bool, depth: u32) -> bool {
        if !self.would_admit(path, is_dir, depth) {
            // A non-directory under an upper directory still replaced, in its own layer, whatever
            // deeper layers had below that path.
            if !is_dir && !self.hidden_by_ancestor(path, depth) {
                if let Some(n) = self.nodes.get_mut(path) {
                    if matches!(n.kind, Kind::Dir | Kind::ImpliedDir) && n.depth < depth {
                        n.children_cut = min_depth(n.children_cut, depth);
                        // The directory an upper entry implies here is its layer's own, made anew
                        // (0755): a deeper directory entry at this path was replaced by this one.
                        if n.kind == Kind::ImpliedDir {
                            n.gone_below = min_depth(n.gone_below, depth);
                        }
                    }
                }
            }
            return false;
        }
        let kind = if is_dir { Kind::Dir } else { Kind::NonDir };
        self.nodes
            .entry(path.to_vec())
            .and_modify(|n| n.kind = kind)
            .or_insert(Node {
                depth,
                kind,
                gone_below: None,
                children_cut: None,
                created: false,
            });
        self.imply_parents(path, depth);
        true
    }

    /// Records that an entry of the layer at `depth` creates the missing parents of `path`, whether or
    /// not the entry itself is kept: parents that no upper layer hides exist in the image.
    pub fn imply_parents(&mut self, path: &[u8], depth: u32) {
        if self.root_cut.is_some_and(|c| depth > c) {
            return;
        }
        for a in ancestors(path) {
            match self.nodes.get_mut(a) {
                None => {
                    self.nodes.insert(
                        a.to_vec(),
                        Node {
                            depth,
                            kind: Kind::ImpliedDir,
                            gone_below: None,
                            children_cut: None,
                            created: true,
                        },
                    );
                }
                Some(n) => {
                    if n.gone_below.is_some_and(|c| depth > c)
                        || (n.depth < depth && n.kind == Kind::NonDir)
                    {
                        return;
                    }
                    // A parent whited out in this very layer is re-created by the entry below it.
                    if n.kind == Kind::ImpliedDir || (n.kind == Kind::Absent && n.depth == depth) {
                        n.kind = Kind::ImpliedDir;
                        n.created = true;
                    }
                    if n.children_cut.is_some_and(|c| depth > c) {
                        return;
                    }
                }
            }
        }
    }

    /// Directories that exist only because entries below them were extracted, never by an entry of
    /// their own, sorted.
    pub fn implied_dirs(&self) -> Vec<&[u8]> {
        let mut dirs: Vec<&[u8]> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.kind == Kind::ImpliedDir && n.created)
            .map(|(p, _)| &p[..])
            .collect();
        dirs.sort();
        dirs
    }

    /// `.wh.<name>` at `depth`: lower entries at `path` and below are hidden.
    pub fn whiteout(&mut self, path: &[u8], depth: u32) {
        let n = self.nodes.entry(path.to_vec()).or_insert(Node {
            depth,
            kind: Kind::Absent,
            gone_below: None,
            children_cut: None,
            created: false,
        });
        n.gone_below = min_depth(n.gone_below, depth);
        n.children_cut = min_depth(n.children_cut, depth);
    }

    /// `.wh..wh..opq` in `dir` at `depth`: lower children of `dir` are hidden.
    pub fn opaque(&mut self, dir: &[u8], depth: u32) {
        if dir.is_empty() {
            self.root_cut = min_depth(self.root_cut, depth);
            return;
        }
        let n = self.nodes.entry(dir.to_vec()).or_insert(Node {
            depth,
            kind: Kind::ImpliedDir,
            gone_below: None,
            children_cut: None,
            created: false,
        });
        n.children_cut = min_depth(n.children_cut, depth);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    enum Op {
        Dir(&'static str, u32),
        File(&'static str, u32),
        Whiteout(&'static str, u32),
        Opaque(&'static str, u32),
    }
    use Op::*;

    /// Applies ops in merge order (top layer first) and returns which entries were emitted.
    fn run(ops: &[Op]) -> Vec<String> {
        let mut index = Index::default();
        let mut out = Vec::new();
        for op in ops {
            match *op {
                Dir(p, d) | File(p, d) => {
                    if index.admit(p.as_bytes(), matches!(op, Dir(..)), d) {
                        out.push(format!("{p}@{d}"));
                    }
                }
                Whiteout(p, d) => index.whiteout(p.as_bytes(), d),
                Opaque(p, d) => index.opaque(p.as_bytes(), d),
            }
        }
        out
    }

    #[test]
    fn rules_table() {
        let cases: Vec<(&str, Vec<Op>, Vec<&str>)> = vec![
            (
                "upper file replaces lower file",
                vec![File("a", 0), File("a", 1)],
                vec!["a@0"],
            ),
            (
                "upper dir keeps lower children",
                vec![Dir("d", 0), Dir("d", 1), File("d/x", 1)],
                vec!["d@0", "d/x@1"],
            ),
            (
                "upper file hides lower subtree",
                vec![File("d", 0), Dir("d", 1), File("d/x", 1)],
                vec!["d@0"],
            ),
            (
                "whiteout hides lower path and subtree",
                vec![Whiteout("d", 0), Dir("d", 1), File("d/x", 1)],
                vec![],
            ),
            (
                "whiteout does not hide its own layer",
                vec![Whiteout("a", 0), File("a", 0), File("a", 1)],
                vec!["a@0"],
            ),
            (
                "whiteout then dir re-created in one layer: lower children gone",
                vec![
                    Whiteout("d", 0),
                    Dir("d", 0),
                    File("d/new", 0),
                    Dir("d", 1),
                    File("d/old", 1),
                ],
                vec!["d@0", "d/new@0"],
            ),
            (
                "entry then whiteout of it in one layer: entry stays",
                vec![File("a", 0), Whiteout("a", 0), File("a", 1)],
                vec!["a@0"],
            ),
            (
                "opaque after own children",
                vec![
                    Dir("d", 0),
                    File("d/mine", 0),
                    Opaque("d", 0),
                    Dir("d", 1),
                    File("d/lower", 1),
                ],
                vec!["d@0", "d/mine@0"],
            ),
            (
                "opaque without a dir entry keeps the lower dir itself",
                vec![Opaque("d", 0), Dir("d", 1), File("d/x", 1)],
                vec!["d@1"],
            ),
            (
                "opaque in a middle layer",
                vec![
                    File("d/top", 0),
                    Opaque("d", 1),
                    File("d/mid", 1),
                    File("d/low", 2),
                    Dir("d", 2),
                ],
                vec!["d/top@0", "d/mid@1", "d@2"],
            ),
            (
                "implied dir: lower dir entry emitted, lower file at that path hidden",
                vec![File("d/x", 0), Dir("d", 1), File("e/y", 0), File("e", 1)],
                vec!["d/x@0", "d@1", "e/y@0"],
            ),
            (
                "whiteout below an upper dir still cuts deeper layers",
                vec![Dir("d", 0), Whiteout("d", 1), File("d/x", 2), Dir("d", 2)],
                vec!["d@0"],
            ),
            (
                "whiteout of a nested path only",
                vec![
                    Whiteout("d/x", 0),
                    File("d/x", 1),
                    File("d/y", 1),
                    File("d/x/z", 1),
                ],
                vec!["d/y@1"],
            ),
            (
                "opaque at the root hides every lower entry",
                vec![
                    File("top", 0),
                    File("new", 1),
                    Opaque("", 1),
                    Dir("d", 2),
                    File("d/x", 2),
                    File("new", 2),
                ],
                vec!["top@0", "new@1"],
            ),
            (
                "implied dir over a middle file: the deeper dir is gone",
                vec![
                    File("a/x/z", 0),
                    File("a/x", 1),
                    Dir("a/x", 2),
                    File("a/x/y", 2),
                ],
                vec!["a/x/z@0"],
            ),
            (
                "root whiteout prefix is not a match",
                vec![Whiteout("ab", 0), File("abc", 1)],
                vec!["abc@1"],
            ),
        ];
        for (name, ops, want) in cases {
            assert_eq!(run(&ops), want, "{name}");
        }
    }
}
