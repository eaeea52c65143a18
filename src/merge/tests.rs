//! The merger against a model extractor: layers applied bottom-up to an in-memory file system the way
//! the OCI spec says (a layer's whiteouts act on lower layers only, later entries replace earlier ones,
//! hardlinks share the content the target has at that point), compared with extracting the merged
//! output onto an empty one. Hand-written scenarios cover FORMATS.md §3; a seeded random walk covers
//! their combinations.

use std::collections::BTreeMap;
use std::io::Read;

use super::*;
use crate::entry::{write_end, write_entry};
use crate::summary;

#[derive(Debug, Clone, PartialEq)]
struct Node {
    kind: Kind,
    mode: u32,
    uid: u64,
    content: Vec<u8>,
    link: Vec<u8>,
}

type Fs = BTreeMap<Vec<u8>, Node>;

fn under(path: &[u8], dir: &[u8]) -> bool {
    dir.is_empty() || (path.len() > dir.len() && path.starts_with(dir) && path[dir.len()] == b'/')
}

fn remove_tree(fs: &mut Fs, path: &[u8]) {
    fs.retain(|p, _| p != path && !under(p, path));
}

/// Extracts entries in order onto `fs`, as a layer applier would. Errors where extraction would fail.
fn apply(fs: &mut Fs, layer: &[(Item, Vec<u8>)]) -> Result<(), String> {
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
                content: content.clone(),
                link: m.link.clone(),
            },
        };
        // Missing parents are created the way extractors do (MkdirAll, 0755).
        let mut parent = entry::split_parent(&m.path).0;
        while !parent.is_empty() {
            match fs.get(parent) {
                Some(n) if n.kind != Kind::Dir => {
                    return Err(format!("{:?}: parent is not a directory", lossy(&m.path)));
                }
                Some(_) => {}
                None => {
                    let implied = Node {
                        kind: Kind::Dir,
                        mode: 0o755,
                        uid: 0,
                        content: Vec::new(),
                        link: Vec::new(),
                    };
                    fs.insert(parent.to_vec(), implied);
                }
            }
            parent = entry::split_parent(parent).0;
        }
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

fn meta(path: &str, kind: Kind, mode: u32) -> EntryMeta {
    EntryMeta {
        path: path.as_bytes().to_vec(),
        kind,
        mode,
        uid: 0,
        gid: 0,
        mtime: 0,
        size: 0,
        link: Vec::new(),
        dev_major: 0,
        dev_minor: 0,
        xattrs: Vec::new(),
    }
}

/// A layer under construction, entries in tar order.
#[derive(Default, Clone)]
struct L(Vec<(Item, Vec<u8>)>);

impl L {
    fn dir(mut self, p: &str, mode: u32) -> L {
        self.0
            .push((Item::Entry(meta(p, Kind::Dir, mode)), Vec::new()));
        self
    }
    fn file(mut self, p: &str, content: &str) -> L {
        let mut m = meta(p, Kind::File, 0o644);
        m.size = content.len() as u64;
        self.0.push((Item::Entry(m), content.as_bytes().to_vec()));
        self
    }
    fn symlink(mut self, p: &str, target: &str) -> L {
        let mut m = meta(p, Kind::Symlink, 0o777);
        m.link = target.as_bytes().to_vec();
        self.0.push((Item::Entry(m), Vec::new()));
        self
    }
    fn hardlink(mut self, p: &str, target: &str) -> L {
        let mut m = meta(p, Kind::Hardlink, 0o644);
        m.link = target.as_bytes().to_vec();
        self.0.push((Item::Entry(m), Vec::new()));
        self
    }
    fn whiteout(mut self, p: &str) -> L {
        self.0
            .push((Item::Whiteout(p.as_bytes().to_vec()), Vec::new()));
        self
    }
    fn opaque(mut self, d: &str) -> L {
        self.0
            .push((Item::Opaque(d.as_bytes().to_vec()), Vec::new()));
        self
    }

    /// The layer as tar bytes, whiteouts as `.wh.` members, the way images carry them.
    fn tar(&self) -> Vec<u8> {
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
struct ShortReads<'a> {
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
fn merge_all(tars: &[Vec<u8>], short: bool) -> (Vec<Vec<Item>>, Vec<u8>) {
    fn input(t: &[u8], short: bool) -> Box<dyn Read + '_> {
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

/// Merges layers (bottom first) through the real tar path and checks it against the model.
fn check(layers: &[L]) -> Fs {
    let tars: Vec<Vec<u8>> = layers.iter().map(L::tar).collect();
    let (summaries, out) = merge_all(&tars, false);
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
    got
}

#[test]
fn basic_replacement_and_dirs() {
    check(&[
        L::default()
            .dir("etc", 0o755)
            .file("etc/a", "1")
            .file("etc/b", "2")
            .dir("usr", 0o755),
        L::default().dir("etc", 0o700).file("etc/a", "new"),
    ]);
}

#[test]
fn opaque_after_own_children() {
    let fs = check(&[
        L::default()
            .dir("d", 0o755)
            .file("d/lower", "x")
            .dir("d/sub", 0o755)
            .file("d/sub/deep", "y"),
        L::default().dir("d", 0o755).file("d/mine", "m").opaque("d"),
    ]);
    assert!(fs.contains_key(&b"d/mine"[..]) && !fs.contains_key(&b"d/lower"[..]));
}

#[test]
fn whiteout_then_recreate_in_one_layer() {
    check(&[
        L::default()
            .dir("d", 0o755)
            .file("d/old", "o")
            .file("f", "old"),
        L::default()
            .whiteout("d")
            .dir("d", 0o700)
            .file("d/new", "n")
            .whiteout("f")
            .file("f", "new"),
    ]);
}

#[test]
fn file_or_symlink_replaces_directory_and_back() {
    check(&[
        L::default()
            .dir("a", 0o755)
            .file("a/x", "x")
            .dir("b", 0o755)
            .file("b/y", "y")
            .file("c", "c"),
        L::default()
            .file("a", "now a file")
            .symlink("b", "/elsewhere")
            .dir("c", 0o755)
            .file("c/z", "z"),
    ]);
}

#[test]
fn duplicates_in_one_layer_last_wins() {
    let mut dup = L::default()
        .dir("x", 0o755)
        .file("x/f", "first")
        .file("x/f", "second");
    // `./x` and `x` in one layer, as some tools write them.
    if let (Item::Entry(m), _) = &mut dup.0[0] {
        m.path = b"x".to_vec();
    }
    dup = dup.dir("x", 0o700);
    check(&[L::default().file("base", "b"), dup]);
}

#[test]
fn whiteout_only_and_empty_layers() {
    check(&[
        L::default()
            .dir("a", 0o755)
            .file("a/1", "1")
            .file("a/2", "2"),
        L::default(),
        L::default().whiteout("a/1"),
        L::default(),
    ]);
}

#[test]
fn hardlink_same_layer() {
    check(&[L::default()
        .file("bin/busybox", "bb")
        .hardlink("bin/sh", "bin/busybox")
        .hardlink("bin/ls", "bin/busybox")]);
}

#[test]
fn hardlink_to_lower_layer() {
    check(&[
        L::default().file("usr/lib/a.so", "lib").file("other", "o"),
        L::default().hardlink("usr/lib/b.so", "usr/lib/a.so"),
    ]);
}

#[test]
fn hardlink_whose_target_an_upper_layer_deleted() {
    check(&[
        L::default()
            .file("t", "content")
            .hardlink("l1", "t")
            .hardlink("l2", "t"),
        L::default().whiteout("t"),
    ]);
}

#[test]
fn hardlink_whose_target_an_upper_layer_overwrote() {
    check(&[
        L::default().file("t", "old").hardlink("l", "t"),
        L::default().file("t", "new"),
    ]);
}

#[test]
fn hardlink_to_lower_file_later_overwritten_and_deleted() {
    check(&[
        L::default().file("t", "v1").file("u", "u1"),
        L::default().hardlink("l", "t").hardlink("m", "u"),
        L::default().file("t", "v2").whiteout("u"),
    ]);
}

#[test]
fn hardlink_chains_across_layers() {
    check(&[
        L::default().file("t", "base").hardlink("t2", "t"),
        L::default().hardlink("l", "t2").whiteout("t"),
        L::default().hardlink("m", "l").whiteout("t2"),
    ]);
}

#[test]
fn hardlink_hidden_by_upper_layer_is_dropped() {
    check(&[
        L::default().file("t", "x").hardlink("l", "t"),
        L::default().whiteout("l"),
    ]);
}

#[test]
fn dangling_link_is_an_error() {
    let layer = L::default().hardlink("l", "missing").tar();
    let items = summary::scan(&layer[..]).unwrap();
    let mut merger = Merger::new();
    merger.begin_layer(0, LayerHints::from_items(&items));
    merge_tar(&mut merger, &layer[..], &mut CountingSink::default()).unwrap();
    assert!(matches!(
        merger.finish(&mut CountingSink::default()),
        Err(MergeError::DanglingLink { .. })
    ));
}

/// A directory named like a whiteout can only exist implicitly, as the parent of an entry; written out
/// as an implied directory it would be a whiteout, and a loader would delete its sibling. Found by the
/// merge fuzz target.
#[test]
fn implied_dirs_named_like_whiteouts_are_left_to_the_loader() {
    check(&[
        L::default().file("x", "lower"),
        L::default()
            .dir("a", 0o755)
            .file("a/x", "kept")
            .file("a/.wh.x/c", "c")
            .file(".wh.x/d", "d")
            .file("a/.wh..wh.plnk/e", "e"),
    ]);
}

/// xorshift: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[(self.next() % v.len() as u64) as usize]
    }
}

/// Random stacks of layers over a small name space, so replacements, whiteouts, opaque dirs and
/// hardlinks collide often. Each layer is only kept if the model can apply it (no dangling links).
/// Enough to have found every bug the scenarios above were written after, in well under a second.
const SEEDS: u64 = 3000;

#[test]
fn random_layer_stacks_match_the_model() {
    let names = ["a", "b", "a/x", "a/y", "b/x", "a/x/z", "c"];
    for seed in 1..SEEDS {
        let mut rng = Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1);
        let mut layers: Vec<L> = Vec::new();
        let mut model = Fs::new();
        for _ in 0..(1 + rng.next() % 4) {
            let mut layer = L::default();
            for _ in 0..(rng.next() % 6) {
                let p = *rng.pick(&names);
                let content = format!("{seed}-{}", rng.next() % 1000);
                layer = match rng.next() % 7 {
                    0 | 1 => layer.file(p, &content),
                    2 => layer.dir(p, 0o700 + (rng.next() % 8) as u32),
                    3 => layer.whiteout(p),
                    4 => layer.opaque(p),
                    5 => layer.symlink(p, "/t"),
                    _ => match *rng.pick(&names) {
                        t if t == p => layer,
                        t => layer.hardlink(p, t),
                    },
                };
            }
            let mut trial = model.clone();
            let ok = apply(&mut trial, &layer.0).is_ok()
                && !layer.0.iter().any(|(i, _)| {
                    matches!(i, Item::Entry(m) if m.kind == Kind::Hardlink
                    && trial.get(&m.link).is_some_and(|n| n.kind == Kind::Dir))
                });
            // Entries below a non-directory of the same layer make extraction fail; skip such layers.
            let nested_under_file = layer.0.iter().any(|(i, _)| match i {
                Item::Entry(m) => trial_parent_not_dir(&trial, &m.path),
                _ => false,
            });
            // A non-directory replacing, later in one layer, a directory that layer filled: no tool
            // writes that, and the merger keeps the directory.
            let replaces_own_dir = layer.0.iter().enumerate().any(|(i, (item, _))| match item {
                Item::Entry(m) if m.kind != Kind::Dir => layer.0[..i]
                    .iter()
                    .any(|(e, _)| matches!(e, Item::Entry(o) if under(&o.path, &m.path))),
                _ => false,
            });
            // A link to a file its own layer writes twice: the merger refuses it (a visible error).
            let link_to_duplicate = layer.0.iter().any(|(item, _)| match item {
                Item::Entry(m) if m.kind == Kind::Hardlink => {
                    layer
                        .0
                        .iter()
                        .filter(|(e, _)| matches!(e, Item::Entry(o) if o.path == m.link))
                        .count()
                        > 1
                }
                _ => false,
            });
            if ok
                && !nested_under_file
                && !replaces_own_dir
                && !link_to_duplicate
                && !links_to_dirs(&model, &layer)
            {
                model = trial;
                layers.push(layer);
            }
        }
        let result = std::panic::catch_unwind(|| check(&layers));
        if result.is_err() {
            for (i, l) in layers.iter().enumerate() {
                eprintln!(
                    "layer {i}: {:?}",
                    l.0.iter().map(|(i, _)| describe(i)).collect::<Vec<_>>()
                );
            }
            panic!("seed {seed} failed");
        }
    }
}

fn trial_parent_not_dir(fs: &Fs, path: &[u8]) -> bool {
    let (parent, _) = entry::split_parent(path);
    !parent.is_empty() && fs.get(parent).is_some_and(|n| n.kind != Kind::Dir)
}

fn links_to_dirs(fs: &Fs, layer: &L) -> bool {
    layer.0.iter().any(|(i, _)| matches!(i, Item::Entry(m) if m.kind == Kind::Hardlink && fs.get(&m.link).is_some_and(|n| n.kind == Kind::Dir)))
}

fn describe(i: &Item) -> String {
    match i {
        Item::Whiteout(p) => format!("wh {}", lossy(p)),
        Item::Opaque(p) => format!("opq {}", lossy(p)),
        Item::Entry(m) => format!("{:?} {} {}", m.kind, lossy(&m.path), lossy(&m.link)),
    }
}
