//! Opening the largest dynamic VHD there is (2040 GiB: 1,044,480 BAT
#![allow(clippy::panic)]
//! entries) with a few thousand allocated blocks, and building its
//! allocation map. Target: under 100 ms. The image is built once, before
//! measuring, with vsnap's own writer; it is sparse, so it takes a few MiB.

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use vsnap_formats::vhd::{self, CreateOptions, DiskType, VhdImage};

const SIZE: u64 = 0xFF00_0000 * 512;
const ALLOCATED: u64 = 4000;

fn build(path: &Path) -> u64 {
    let mut img = vhd::create(path, &CreateOptions::new(DiskType::Dynamic, SIZE))
        .unwrap_or_else(|e| panic!("create: {e}"));
    let blocks = SIZE / (2 << 20);
    let stride = blocks / ALLOCATED;
    for i in 0..ALLOCATED {
        // One write in every stride-th block, shifted by 0 to 2 blocks so
        // the layout is not perfectly regular.
        let blk = i * stride + (i % 3);
        img.write_at(&[0xab; 4096], blk * (2 << 20) + 8192)
            .unwrap_or_else(|e| panic!("write: {e}"));
    }
    img.flush().unwrap_or_else(|e| panic!("flush: {e}"));
    blocks
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let path = dir.path().join("2040g.vhd");
    let blocks = build(&path);
    let check = VhdImage::open(&path).unwrap_or_else(|e| panic!("open: {e}"));
    let map = check
        .allocation_map()
        .unwrap_or_else(|e| panic!("map: {e}"));
    // A dynamic disk maps whole allocated blocks, as qemu-img map does.
    assert_eq!(map.data_bytes(), ALLOCATED * (2 << 20));
    eprintln!(
        "image: {} GiB virtual, {blocks} BAT entries, {ALLOCATED} allocated, {} map extents",
        SIZE >> 30,
        map.extents().len()
    );

    let mut group = c.benchmark_group("vhd_2040g_dynamic");
    group.sample_size(30);
    group.bench_function("open", |b| {
        b.iter(|| black_box(VhdImage::open(&path).unwrap_or_else(|e| panic!("{e}"))))
    });
    group.bench_function("open_and_map", |b| {
        b.iter(|| {
            let img = VhdImage::open(&path).unwrap_or_else(|e| panic!("{e}"));
            black_box(img.allocation_map().unwrap_or_else(|e| panic!("{e}")))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
