//! Micro-benchmarks of the engine's per-chunk work, at the default 4 MiB
//! chunk: BLAKE3 leaves (data and zeros), zero detection, zstd, and block
//! mapping (a VHD read through its BAT, in memory, so only the mapping and
//! the copy are measured).
#![allow(clippy::panic)]

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vsnap_engine::digest::{is_zero, DigestPlan};
use vsnap_formats::storage::MemStorage;
use vsnap_formats::vhd::create::create_in;
use vsnap_formats::vhd::{CreateOptions, DiskType};

const CHUNK: usize = 4 << 20;

fn random(len: usize) -> Vec<u8> {
    use rand::{Rng as _, SeedableRng};
    let mut v = vec![0u8; len];
    rand::rngs::SmallRng::seed_from_u64(0x9E37_79B9_7F4A_7C15).fill_bytes(&mut v);
    v
}

fn text(len: usize) -> Vec<u8> {
    let words = [
        "backup ",
        "of ",
        "the ",
        "guest ",
        "disk ",
        "snapshot. ",
        "freeze ",
        "thaw\n",
    ];
    let mut x = 7u64;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.extend_from_slice(words[(x >> 60) as usize % words.len()].as_bytes());
    }
    out.truncate(len);
    out
}

fn hashing(c: &mut Criterion) {
    let mut g = c.benchmark_group("hash");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    let plan = DigestPlan::new(1 << 40, CHUNK as u64).unwrap_or_else(|e| panic!("{e}"));
    let data = random(CHUNK);
    g.bench_function("leaf_cv_4MiB", |b| {
        b.iter(|| black_box(plan.leaf(8 << 20, &data)))
    });
    g.bench_function("zero_leaf_cv_4MiB", |b| {
        b.iter(|| black_box(plan.zero_leaf(8 << 20, CHUNK as u64)))
    });
    g.bench_function("chunk_id_4MiB", |b| {
        b.iter(|| black_box(blake3::hash(&data)))
    });
    g.finish();
}

fn zero_detection(c: &mut Criterion) {
    let mut g = c.benchmark_group("is_zero");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    let zeros = vec![0u8; CHUNK];
    let mut late = vec![0u8; CHUNK];
    late[CHUNK - 1] = 1;
    let early = random(CHUNK);
    g.bench_function("all_zero_4MiB", |b| b.iter(|| black_box(is_zero(&zeros))));
    g.bench_function("last_byte_set_4MiB", |b| {
        b.iter(|| black_box(is_zero(&late)))
    });
    g.bench_function("random_4MiB", |b| b.iter(|| black_box(is_zero(&early))));
    g.finish();
}

fn compression(c: &mut Criterion) {
    let mut g = c.benchmark_group("zstd");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    let inputs = [("text", text(CHUNK)), ("random", random(CHUNK))];
    for level in [1, 3] {
        let mut ctx = zstd::bulk::Compressor::new(level).unwrap_or_else(|e| panic!("{e}"));
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(CHUNK));
        for (name, data) in &inputs {
            g.bench_with_input(
                BenchmarkId::new(format!("compress_l{level}"), name),
                data,
                |b, d| {
                    b.iter(|| {
                        out.clear();
                        black_box(
                            ctx.compress_to_buffer(d, &mut out)
                                .unwrap_or_else(|e| panic!("{e}")),
                        )
                    })
                },
            );
        }
    }
    let packed = zstd::bulk::compress(&inputs[0].1, 1).unwrap_or_else(|e| panic!("{e}"));
    g.bench_function("decompress_l1/text", |b| {
        b.iter(|| {
            black_box(zstd::bulk::decompress(&packed, CHUNK).unwrap_or_else(|e| panic!("{e}")))
        })
    });
    g.finish();
}

fn block_mapping(c: &mut Criterion) {
    let mut g = c.benchmark_group("vhd_read");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    // A 256 MiB dynamic disk in memory, every other 2 MiB block written:
    // each 4 MiB read maps one allocated block and one hole.
    let storage = Arc::new(MemStorage::default());
    let mut img = create_in(
        storage,
        Path::new("bench.vhd"),
        &CreateOptions::new(DiskType::Dynamic, 256 << 20),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let block = random(2 << 20);
    for b in (0..128u64).step_by(2) {
        img.write_at(&block, b * (2 << 20))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let mut buf = vec![0u8; CHUNK];
    let mut i = 0u64;
    g.bench_function("read_4MiB_half_allocated", |b| {
        b.iter(|| {
            i = (i + 1) % 64;
            img.read_at(&mut buf, i * CHUNK as u64)
                .unwrap_or_else(|e| panic!("{e}"));
            black_box(&buf);
        })
    });
    g.finish();
}

criterion_group!(benches, hashing, zero_detection, compression, block_mapping);
criterion_main!(benches);
