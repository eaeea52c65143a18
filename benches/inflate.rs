//! Inflating a gzip layer, the step a conversion spends most of its time on: strata's decoder
//! (ISA-L with the default `isal` feature) against flate2's `MultiGzDecoder` on zlib-rs, over the
//! same blob, its input through the merger's 256 KiB buffer, read in large and in 512-byte reads.

use std::hint::black_box;
use std::io::{self, Read, Write};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use strata::layer::{decompress, Compression};

/// 32 MiB like layer content: a third incompressible (binaries' compressed sections, media), the
/// rest text made of repeated words (paths, scripts, docs), which deflate codes as matches.
fn content() -> Vec<u8> {
    const WORDS: [&[u8]; 12] = [
        b"usr/",
        b"lib/",
        b"x86_64-linux-gnu/",
        b"share/",
        b"doc/",
        b"python3",
        b".so.",
        b"\n",
        b"#!/bin/sh\n",
        b"copyright",
        b"set -e\n",
        b" ",
    ];
    let mut x = 0x9e37_79b9_u32;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    let mut out = Vec::with_capacity(32 << 20);
    while out.len() < 32 << 20 {
        if (out.len() >> 14) % 3 == 0 {
            out.extend((0..1024).map(|_| next() as u8));
        } else {
            out.extend_from_slice(WORDS[(next() % 12) as usize]);
        }
    }
    out.truncate(32 << 20);
    out
}

/// Reads `r` to its end `read` bytes at a time: 64 KiB as a large file's content is read, 512 as
/// the tar reader reads headers and the smallest files.
fn drain(mut r: impl Read, read: usize) -> u64 {
    let mut buf = vec![0u8; read];
    let mut n = 0;
    loop {
        match r.read(&mut buf).unwrap() {
            0 => return n,
            k => n += k as u64,
        }
    }
}

fn inflate(c: &mut Criterion) {
    // STRATA_INFLATE_BLOB: a real layer blob instead (the two inflates rank differently by data).
    let (blob, size) = match std::env::var_os("STRATA_INFLATE_BLOB") {
        Some(path) => {
            let blob = std::fs::read(path).unwrap();
            let size = drain(flate2::read::MultiGzDecoder::new(&blob[..]), 64 << 10);
            (blob, size)
        }
        None => {
            let data = content();
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            e.write_all(&data).unwrap();
            (e.finish().unwrap(), data.len() as u64)
        }
    };
    let mut group = c.benchmark_group("inflate");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(size));
    for read in [64 << 10, 512] {
        group.bench_function(
            BenchmarkId::new(format!("strata/{read}B-reads"), size),
            |b| {
                b.iter(|| {
                    let input = io::BufReader::with_capacity(256 << 10, &blob[..]);
                    black_box(drain(decompress(Compression::Gzip, input), read))
                })
            },
        );
        group.bench_function(
            BenchmarkId::new(format!("flate2-zlib-rs/{read}B-reads"), size),
            |b| {
                b.iter(|| {
                    let input = io::BufReader::with_capacity(256 << 10, &blob[..]);
                    black_box(drain(flate2::bufread::MultiGzDecoder::new(input), read))
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, inflate);
criterion_main!(benches);
