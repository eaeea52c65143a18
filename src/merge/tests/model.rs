//! The model extractor the merger is checked against, the layer builder, and `check`.

use std::collections::BTreeMap;
use std::io::Read;

use super::super::*;
use crate::entry::{write_end, write_entry};
use crate::summary;

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Node {
    pub(super) kind: Kind,
    pub(super) mode: u32,
    pub(super) uid: u64,
    pub(super) gid: u64,
    pub(super) mtime: (u64, u32),
    pub(super) content: Vec<u8>,
    pub(super) link: Vec<u8>,
    pub(super) dev: (u32, u32),
    pub(super) xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Node {
    /// A parent the extractor makes (MkdirAll, 0755, root, time 0 as strata writes it).
    pub(super) fn implied() -> Node {
        Node {
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: (0, 0),
            content: Vec::new(),
            link: Vec::new(),
            dev: (0, 0),
            xattrs: Vec::new(),
        }
    }
}

pub(super) type Fs = BTreeMap<Vec<u8>, Node>;

pub(super) fn under(path: &[u8], dir: &[u8]) -> bool {
    dir.is_empty() || (path.len() > dir.len() && path.starts_with(dir) && path[dir.len()] == b'/')
}

pub(super) fn remove_tree(fs: &mut Fs, path: &[u8]) {
    fs.retain(|p, _| p != path && !under(p, path));
}

/// Extracts entries in order onto `fs`, as an overlay-based layer applier would: each layer into its
/// own directory, stacked on the lower ones, so a parent the layer creates replaces a lower
/// non-directory at that path (README, "Merge semantics"). Errors where extraction would fail.
pub(super) fn apply(fs: &mut Fs, layer: &[(Item, Vec<u8>)]) -> Result<(), String> {
    let mut written: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
    for (item, _) in layer {
        // A whiteout lives in its parent directory: a non-directory there makes the layer invalid.
        let dir = match item {
            Item::Whiteout(p) => entry::split_parent(p).0,
            Item::Opaque(d) => d,
            Item::Entry(_) => &[][..],
        };
        let mut d = dir;
        while !d.is_empty() {
            if fs.get(d).is_some_and(|n| n.kind != Kind::Dir) {
                return Err(format!("whiteout in {:?}, not a directory", lossy(dir)));
            }
            d = entry::split_parent(d).0;
        }
        match item {
            Item::Whiteout(p) => remove_tree(fs, p),
            Item::Opaque(d) => fs.retain(|p, _| !under(p, d)),
            Item::Entry(_) => {}
        }
    }
    for (item, content) in layer {
        let Item::Entry(m) = item else { continue };
        let node = match m.kind {
            Kind::Hardlink => {
                let t = fs.get(&m.link).ok_or_else(|| {
                    format!("link {:?}: no target {:?}", lossy(&m.path), lossy(&m.link))
                })?;
                if t.kind == Kind::Dir {
                    return Err(format!("link {:?} to a directory", lossy(&m.path)));
                }
                t.clone()
            }
            _ => Node {
                kind: m.kind,
                mode: m.mode,
                uid: m.uid,
                gid: m.gid,
                mtime: (m.mtime, m.mtime_nsec),
                content: content.clone(),
                link: m.link.clone(),
                dev: (m.dev_major, m.dev_minor),
                xattrs: m.xattrs.clone(),
            },
        };
        // Missing parents are created the way extractors do (MkdirAll, 0755), shallowest first; in
        // the layer's own directory, so a lower non-directory there is replaced.
        let parents: Vec<&[u8]> = m
            .path
            .iter()
            .enumerate()
            .filter(|&(_, &b)| b == b'/')
            .map(|(i, _)| &m.path[..i])
            .collect();
        for parent in parents {
            match fs.get(parent) {
                Some(n) if n.kind == Kind::Dir => {}
                Some(_) if written.contains(parent) => {
                    return Err(format!("{:?}: parent is not a directory", lossy(&m.path)));
                }
                Some(_) | None => {
                    remove_tree(fs, parent);
                    fs.insert(parent.to_vec(), Node::implied());
                }
            }
            written.insert(parent.to_vec());
        }
        written.insert(m.path.clone());
        match fs.get(&m.path) {
            Some(old) if old.kind == Kind::Dir && node.kind == Kind::Dir => {}
            Some(_) => remove_tree(fs, &m.path),
            None => {}
        }
        fs.insert(m.path.clone(), node);
    }
    for (item, _) in layer {
        let dir = match item {
            Item::Whiteout(p) => entry::split_parent(p).0,
            Item::Opaque(d) => d,
            Item::Entry(_) => continue,
        };
        if fs.get(dir).is_some_and(|n| n.kind != Kind::Dir) {
            return Err(format!(
                "whiteout in {:?}, which the layer makes a non-directory",
                lossy(dir)
            ));
        }
    }
    Ok(())
}

pub(super) fn meta(path: &str, kind: Kind, mode: u32) -> EntryMeta {
    EntryMeta::synthetic(path.as_bytes(), kind, mode, 0)
}

/// A layer under construction, entries in tar order.
#[derive(Default, Clone)]
pub(super) struct L(pub(super) Vec<(Item, Vec<u8>)>);

impl L {
    pub(super) fn dir(mut self, p: &str, mode: u32) -> L {
        self.0
            .push((Item::Entry(meta(p, Kind::Dir, mode)), Vec::new()));
        self
    }
    pub(super) fn file(mut self, p: &str, content: &str) -> L {
        let mut m = meta(p, Kind::File, 0o644);
        m.size = content.len() as u64;
        self.0.push((Item::Entry(m), content.as_bytes().to_vec()));
        self
    }
    pub(super) fn symlink(mut self, p: &str, target: &str) -> L {
        let mut m = meta(p, Kind::Symlink, 0o777);
        m.link = target.as_bytes().to_vec();
        self.0.push((Item::Entry(m), Vec::new()));
        self
    }
    pub(super) fn hardlink(mut self, p: &str, target: &str) -> L {
        let mut m = meta(p, Kind::Hardlink, 0o644);
        m.link = target.as_bytes().to_vec();
        self.0.push((Item::Entry(m), Vec::new()));
        self
    }
    /// A device, fifo or file with every attribute the output must keep set from `n`.
    pub(super) fn special(mut self, p: &str, kind: Kind, n: u64) -> L {
        let mut m = meta(p, kind, 0o600 + (n % 0o100) as u32);
        m.uid = n % 3;
        m.gid = n % 5 + 1_000_000_000 * (n % 2);
        m.mtime = 1_700_000_000 + n % 7;
        m.mtime_nsec = [0, 1, 500_000_000, 999_999_999][(n % 4) as usize];
        if matches!(kind, Kind::Char | Kind::Block) {
            m.dev_major = (n % 300) as u32;
            m.dev_minor = (n % 70_000) as u32;
        }
        if n % 3 == 0 {
            m.xattrs = vec![(b"user.n".to_vec(), n.to_string().into_bytes())];
        }
        let content = if kind == Kind::File {
            n.to_string().into_bytes()
        } else {
            Vec::new()
        };
        m.size = content.len() as u64;
        self.0.push((Item::Entry(m), content));
        self
    }
    pub(super) fn whiteout(mut self, p: &str) -> L {
        self.0
            .push((Item::Whiteout(p.as_bytes().to_vec()), Vec::new()));
        self
    }
    pub(super) fn opaque(mut self, d: &str) -> L {
        self.0
            .push((Item::Opaque(d.as_bytes().to_vec()), Vec::new()));
        self
    }

    /// The layer as tar bytes, whiteouts as `.wh.` members, the way images carry them.
    pub(super) fn tar(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (item, content) in &self.0 {
            let m = match item {
                Item::Entry(m) => m.clone(),
                Item::Whiteout(p) => {
                    let (parent, name) = entry::split_parent(p);
                    let mut w = parent.to_vec();
                    if !w.is_empty() {
                        w.push(b'/');
                    }
                    w.extend_from_slice(b".wh.");
                    w.extend_from_slice(name);
                    EntryMeta {
                        path: w,
                        ..meta("", Kind::File, 0o600)
                    }
                }
                Item::Opaque(d) => {
                    let mut w = d.clone();
                    if !w.is_empty() {
                        w.push(b'/');
                    }
                    w.extend_from_slice(b".wh..wh..opq");
                    EntryMeta {
                        path: w,
                        ..meta("", Kind::File, 0o600)
                    }
                }
            };
            write_entry(&mut out, &m, &mut &content[..]).unwrap();
        }
        write_end(&mut out).unwrap();
        out
    }
}

/// A reader that hands out 1 to 13 bytes per call, the way a network stream may (tar-rs `RandomReader`).
pub(super) struct ShortReads<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for ShortReads<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.step = self.step % 13 + 1;
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Scans and merges the layer tars (bottom first), each read whole or in short reads.
pub(super) fn merge_all(tars: &[Vec<u8>], short: bool) -> (Vec<Vec<Item>>, Vec<u8>) {
    pub(super) fn input(t: &[u8], short: bool) -> Box<dyn Read + '_> {
        if short {
            Box::new(ShortReads { data: t, step: 0 })
        } else {
            Box::new(t)
        }
    }
    let summaries: Vec<Vec<Item>> = tars
        .iter()
        .map(|t| summary::scan(input(t, short)).unwrap())
        .collect();
    let mut merger = Merger::new();
    let mut sink = TarSink(Vec::new());
    for (depth, (tar, items)) in tars.iter().zip(&summaries).rev().enumerate() {
        merger.begin_layer(depth as u32, LayerHints::from_items(items));
        merge_tar(&mut merger, input(tar, short), &mut sink).unwrap();
    }
    merger.finish(&mut sink).unwrap();
    let mut out = sink.0;
    write_end(&mut out).unwrap();
    (summaries, out)
}

/// Merges layers (bottom first) without their summaries, as a cold conversion does.
pub(super) fn merge_watched(tars: &[Vec<u8>]) -> Result<Vec<u8>, MergeError> {
    let mut merger = Merger::new();
    let mut sink = TarSink(Vec::new());
    for (depth, tar) in tars.iter().rev().enumerate() {
        merger.begin_watched(depth as u32);
        merge_tar(&mut merger, &tar[..], &mut sink)?;
    }
    merger.finish(&mut sink)?;
    let mut out = sink.0;
    write_end(&mut out)?;
    Ok(out)
}

/// Merges layers (bottom first) through the real tar path and checks it against the model.
pub(super) fn check(layers: &[L]) -> Fs {
    check_watched(layers).0
}

/// [`check`], and whether the merge without summaries gave the same bytes (`true`) or stopped for
/// them (`false`): it must do one or the other.
pub(super) fn check_watched(layers: &[L]) -> (Fs, bool) {
    let tars: Vec<Vec<u8>> = layers.iter().map(L::tar).collect();
    let (summaries, out) = merge_all(&tars, false);
    let watched = match merge_watched(&tars) {
        Ok(bytes) => {
            assert!(
                bytes == out,
                "a merge without summaries that succeeds must give the same bytes"
            );
            true
        }
        Err(MergeError::NeedsSummary(_)) => false,
        Err(e) => panic!("a merge without summaries failed otherwise: {e}"),
    };
    assert!(
        merge_all(&tars, true).1 == out,
        "short reads must give the same output"
    );
    let refs: Vec<&[Item]> = summaries.iter().map(|s| &s[..]).collect();
    assert_eq!(
        summary::merged_size(&refs).unwrap(),
        out.len() as u64,
        "sizing run must match the output"
    );

    let mut want = Fs::new();
    for l in layers {
        apply(&mut want, &l.0).unwrap();
    }
    let mut merged = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut archive = tar::Archive::new(&out[..]);
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let Some(item) = entry::read_item(&mut e).unwrap() else {
            continue;
        };
        let Item::Entry(m) = &item else {
            panic!("whiteout in output: {item:?}")
        };
        assert!(
            seen.insert(m.path.clone()),
            "duplicate {:?} in output",
            lossy(&m.path)
        );
        let mut content = Vec::new();
        e.read_to_end(&mut content).unwrap();
        merged.push((item, content));
    }
    let mut got = Fs::new();
    apply(&mut got, &merged).unwrap();
    assert_eq!(got, want);
    (got, watched)
}
