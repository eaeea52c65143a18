//! Inflating a gzip layer, the step a conversion spends most of its time on: strata's decoder
//! (ISA-L with the default `isal` feature) against flate2's `MultiGzDecoder` on zlib-rs, over the
//! same blob, read the way the merger reads it (through a 256 KiB buffer).

use std::hint::black_box;
use std::io::{self, Read, Write};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use strata::layer::{decompress, Compression};

/// 32 MiB like layer content: runs of text-like bytes and of incompressible ones.
fn content() -> Vec<u8> {
    let mut x = 0x9e37_79b9_u32;
    (0..32 << 20)
        .map(|i: usize| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if (i >> 14) % 3 == 0 {
                x as u8
            } else {
                b"lib/x86_64-linux-gnu/ usr share doc\n"[(x % 36) as usize]
            }
        })
        .collect()
}

fn drain(mut r: impl Read) -> u64 {
    let mut buf = vec![0u8; 64 << 10];
    let mut n = 0;
    loop {
        match r.read(&mut buf).unwrap() {
            0 => return n,
            k => n += k as u64,
        }
    }
}

fn inflate(c: &mut Criterion) {
    let data = content();
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    e.write_all(&data).unwrap();
    let blob = e.finish().unwrap();
    let mut group = c.benchmark_group("inflate");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function(BenchmarkId::new("strata", "32MiB"), |b| {
        b.iter(|| {
            let input = io::BufReader::with_capacity(256 << 10, &blob[..]);
            black_box(drain(decompress(Compression::Gzip, input)))
        })
    });
    group.bench_function(BenchmarkId::new("flate2-zlib-rs", "32MiB"), |b| {
        b.iter(|| {
            let input = io::BufReader::with_capacity(256 << 10, &blob[..]);
            black_box(drain(flate2::bufread::MultiGzDecoder::new(input)))
        })
    });
    group.finish();
}

criterion_group!(benches, inflate);
criterion_main!(benches);
