//! The merger over in-memory layers: many small files, few large files, deep whiteout/opaque trees,
//! hardlink-heavy layers; and the canonical tar writer alone. Inputs are built once per benchmark.

use std::hint::black_box;
use std::io;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use strata::entry::{write_end, write_entry, EntryMeta, Kind};
use strata::merge::{merge_tar, LayerHints, Merger, TarSink};
use strata::summary;

fn meta(path: String, kind: Kind, size: u64, link: &str) -> EntryMeta {
    EntryMeta {
        path: path.into_bytes(),
        kind,
        mode: if kind == Kind::Dir { 0o755 } else { 0o644 },
        uid: 0,
        gid: 0,
        mtime: 1_700_000_000,
        mtime_nsec: 0,
        size,
        link: link.as_bytes().to_vec(),
        dev_major: 0,
        dev_minor: 0,
        xattrs: Vec::new(),
    }
}

/// A layer tar from (meta, content length) pairs; content is a repeating byte.
fn layer(entries: Vec<EntryMeta>) -> Vec<u8> {
    let mut out = Vec::new();
    for m in entries {
        let content = vec![0x5a; m.size as usize];
        write_entry(&mut out, &m, &mut &content[..]).unwrap();
    }
    write_end(&mut out).unwrap();
    out
}

fn small_files(layer_no: usize, dirs: usize, per_dir: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for d in 0..dirs {
        v.push(meta(format!("usr/share/d{d}"), Kind::Dir, 0, ""));
        for f in 0..per_dir {
            v.push(meta(
                format!("usr/share/d{d}/file-{layer_no}-{f}"),
                Kind::File,
                700,
                "",
            ));
        }
    }
    layer(v)
}

fn large_files(count: usize, size: u64) -> Vec<u8> {
    layer(
        (0..count)
            .map(|i| meta(format!("opt/blob{i}"), Kind::File, size, ""))
            .collect(),
    )
}

fn whiteout_tree(depth: usize) -> (Vec<u8>, Vec<u8>) {
    let mut lower = Vec::new();
    let mut upper = Vec::new();
    let mut dir = String::from("t");
    for i in 0..depth {
        lower.push(meta(dir.clone(), Kind::Dir, 0, ""));
        for f in 0..50 {
            lower.push(meta(format!("{dir}/f{f}"), Kind::File, 100, ""));
        }
        if i % 2 == 0 {
            upper.push(meta(format!("{dir}/.wh..wh..opq"), Kind::File, 0, ""));
        } else {
            upper.push(meta(format!("{dir}/.wh.f{i}"), Kind::File, 0, ""));
        }
        dir = format!("{dir}/n{i}");
    }
    (layer(lower), layer(upper))
}

fn hardlinks(count: usize) -> (Vec<u8>, Vec<u8>) {
    let lower = layer(
        (0..count)
            .map(|i| meta(format!("lib/f{i}"), Kind::File, 300, ""))
            .collect(),
    );
    let mut up = Vec::new();
    for i in 0..count {
        up.push(meta(
            format!("lib/l{i}"),
            Kind::Hardlink,
            0,
            &format!("lib/f{i}"),
        ));
        if i % 3 == 0 {
            up.push(meta(format!("lib/.wh.f{i}"), Kind::File, 0, ""));
        }
    }
    (lower, layer(up))
}

/// Merges layers (bottom first) into a byte counter through the tar writer.
fn merge(layers: &[Vec<u8>]) -> u64 {
    let hints: Vec<LayerHints> = layers
        .iter()
        .map(|l| LayerHints::from_items(&summary::scan(&l[..]).unwrap()))
        .collect();
    let mut sink = TarSink(Counter(0));
    let mut merger = Merger::new();
    for (depth, (l, h)) in layers.iter().zip(hints).rev().enumerate() {
        merger.begin_layer(depth as u32, h);
        merge_tar(&mut merger, &l[..], &mut sink).unwrap();
    }
    merger.finish(&mut sink).unwrap();
    sink.0 .0
}

struct Counter(u64);
impl io::Write for Counter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(black_box(b).len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn bench_merge(c: &mut Criterion) {
    let mut g = c.benchmark_group("merge");
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        (
            "small_files",
            (0..3).map(|i| small_files(i, 100, 100)).collect(),
        ),
        (
            "large_files",
            vec![large_files(4, 16 << 20), large_files(2, 16 << 20)],
        ),
        ("whiteout_tree", {
            let (l, u) = whiteout_tree(200);
            vec![l, u]
        }),
        ("hardlinks", {
            let (l, u) = hardlinks(10_000);
            vec![l, u]
        }),
    ];
    for (name, layers) in &cases {
        let bytes: usize = layers.iter().map(Vec::len).sum();
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), layers, |b, layers| {
            b.iter(|| merge(layers))
        });
    }
    g.finish();
}

fn bench_writer(c: &mut Criterion) {
    let entries: Vec<EntryMeta> = (0..10_000)
        .map(|i| meta(format!("usr/lib/x/file{i}"), Kind::File, 0, ""))
        .collect();
    let mut g = c.benchmark_group("writer");
    g.throughput(Throughput::Elements(entries.len() as u64));
    g.bench_function("headers", |b| {
        b.iter(|| {
            let mut out = Counter(0);
            for m in &entries {
                write_entry(&mut out, m, &mut io::empty()).unwrap();
            }
            out.0
        })
    });
    g.finish();
}

criterion_group!(benches, bench_merge, bench_writer);
criterion_main!(benches);
