//! Differencing chains. qemu cannot make or read them (it opens a child as a
//! plain dynamic disk), so the oracle is a raw reconstruction: qemu-img's
//! conversion of the base, with each child's writes applied by plain
//! pwrite.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use vsnap_formats::vhd::{self, CreateOptions, DiskType, VhdImage};
use vsnap_formats::ErrorKind;
use vsnap_formats::ExtentKind;

const SIZE: u64 = 24 << 20;

/// Writes that cross blocks and cut sectors, so the child's bitmaps are
/// partial and reads must fall through to the parent mid-block.
fn child_writes(seed: u64) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    for i in 0..10u64 {
        let off = (seed * 7_777_777 + i * 2_345_679) % (SIZE - 1);
        let len = ((seed + i) * 48_271 % 200_000 + 1).min(SIZE - off);
        out.push((off, pattern(seed * 100 + i, len as usize)));
    }
    out.push((SIZE - 100, pattern(seed + 999, 100)));
    out
}

fn differencing(child: &Path, parent: &Path, block_size: u32) {
    let mut opts = CreateOptions::new(DiskType::Differencing, 0);
    opts.parent = Some(parent.to_path_buf());
    opts.block_size = block_size;
    vhd::create(child, &opts).unwrap();
}

/// Builds base (qemu) -> c1 -> c2 -> c3 (vsnap) and the raw oracle of each.
fn build_chain(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let base = dir.join("base.vhd");
    qemu_create(&base, "subformat=dynamic,force_size=on", &SIZE.to_string());
    qemu_write(&base, 0x10, 0, 6 << 20);
    qemu_write(&base, 0x11, 13 << 20, 3 << 20);
    let raw0 = dir.join("level0.raw");
    qemu_to_raw(&base, &raw0);
    let mut images = vec![base];
    let mut raws = vec![raw0];
    for (level, bs) in [(1u64, 2u32 << 20), (2, 64 << 10), (3, 512 << 10)] {
        let child = dir.join(format!("child{level}.vhd"));
        differencing(&child, images.last().unwrap(), bs);
        let raw = dir.join(format!("level{level}.raw"));
        std::fs::copy(raws.last().unwrap(), &raw).unwrap();
        let oracle = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        let mut img = VhdImage::open_rw(&child).unwrap();
        for (off, data) in child_writes(level) {
            img.write_at(&data, off).unwrap();
            oracle.write_all_at(&data, off).unwrap();
        }
        img.flush().unwrap();
        images.push(child);
        raws.push(raw);
    }
    (images, raws)
}

#[test]
fn a_chain_of_depth_three_reads_like_its_raw_reconstruction() {
    let dir = tempfile::tempdir().unwrap();
    let (images, raws) = build_chain(dir.path());
    for (img, raw) in images.iter().zip(&raws) {
        let image = VhdImage::open(img).unwrap();
        assert_same_as_raw(&image, raw);
    }
    let top = VhdImage::open(images.last().unwrap()).unwrap();
    assert_eq!(top.layers().len(), 4);
    assert_eq!(top.top().disk_type(), DiskType::Differencing);
}

#[test]
fn the_chain_map_names_the_layer_and_file_offset_of_every_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (images, raws) = build_chain(dir.path());
    let top = VhdImage::open(images.last().unwrap()).unwrap();
    let map = top.allocation_map().unwrap();
    assert_eq!(map.size(), SIZE);
    let oracle = File::open(raws.last().unwrap()).unwrap();
    let mut layers_seen = std::collections::BTreeSet::new();
    for e in map.extents() {
        let mut want = vec![0u8; e.length as usize];
        oracle.read_exact_at(&mut want, e.offset).unwrap();
        match e.kind {
            ExtentKind::Data => {
                let layer = e.layer.unwrap();
                layers_seen.insert(layer);
                // Reading the named file at the named offset gives the
                // virtual bytes: what the engine will rely on.
                let file = File::open(&images[images.len() - 1 - layer]).unwrap();
                let mut got = vec![0u8; e.length as usize];
                file.read_exact_at(&mut got, e.file_offset.unwrap())
                    .unwrap();
                assert!(got == want, "extent {e:?} holds the wrong bytes");
            }
            _ => assert!(
                want.iter().all(|&b| b == 0),
                "unallocated {e:?} is not zero"
            ),
        }
    }
    assert_eq!(
        layers_seen.len(),
        4,
        "every layer contributes: {layers_seen:?}"
    );
}

#[test]
fn parents_resolve_by_relative_path_then_absolute_path_then_name() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("vms/a/disks")).unwrap();
    let base = root.join("vms/a/base.vhd");
    vhd::create(&base, &CreateOptions::new(DiskType::Dynamic, 4 << 20)).unwrap();
    let child = root.join("vms/a/disks/child.vhd");
    differencing(&child, &base, 2 << 20);
    let mut img = VhdImage::open_rw(&base).unwrap();
    img.write_at(&[0xba; 512], 4096).unwrap();
    drop(img);
    let read_sector = |p: &Path| {
        let img = VhdImage::open(p).unwrap();
        let mut s = [0u8; 512];
        img.read_at(&mut s, 4096).unwrap();
        assert_eq!(s, [0xba; 512]);
        img.layers()[1].path().to_path_buf()
    };
    // Relative ("..\base.vhd"): survives moving the whole tree.
    std::fs::rename(root.join("vms"), root.join("moved")).unwrap();
    let parent = read_sector(&root.join("moved/a/disks/child.vhd"));
    assert_eq!(parent, root.join("moved/a/disks/../base.vhd"));
    // Absolute: the child moved alone, the parent is back where it was.
    std::fs::rename(root.join("moved"), root.join("vms")).unwrap();
    std::fs::rename(&child, root.join("child.vhd")).unwrap();
    assert_eq!(
        read_sector(&root.join("child.vhd")),
        std::fs::canonicalize(&base).unwrap()
    );
    // By name: both copied to a new directory, side by side.
    std::fs::create_dir(root.join("flat")).unwrap();
    std::fs::copy(root.join("child.vhd"), root.join("flat/child.vhd")).unwrap();
    std::fs::rename(&base, root.join("flat/base.vhd")).unwrap();
    assert_eq!(
        read_sector(&root.join("flat/child.vhd")),
        root.join("flat/base.vhd")
    );
}

#[test]
fn a_missing_parent_lists_every_path_it_tried() {
    let err = VhdImage::open(&fixtures().join("orphan/child.vhd")).unwrap_err();
    let ErrorKind::MissingParent { tried } = err.kind() else {
        panic!("expected MissingParent, got {err}");
    };
    assert!(
        tried.iter().any(|p| p.ends_with("orphan/gone.vhd")),
        "{tried:?}"
    );
    assert!(err.to_string().contains("orphan/child.vhd"), "{err}");
}

#[test]
fn a_chain_150_deep_reads_without_deep_recursion() {
    const DEPTH: usize = 150;
    let dir = tempfile::tempdir().unwrap();
    let mut prev = dir.path().join("l0.vhd");
    let mut opts = CreateOptions::new(DiskType::Dynamic, 1 << 20);
    opts.block_size = 4096;
    vhd::create(&prev, &opts).unwrap();
    // Layer i writes the sector numbered i, so every layer shows through.
    for i in 1..=DEPTH {
        let path = dir.path().join(format!("l{i}.vhd"));
        let mut child = CreateOptions::new(DiskType::Differencing, 0);
        child.parent = Some(prev.clone());
        child.block_size = 4096;
        let mut img = vhd::create(&path, &child).unwrap();
        img.write_at(&[i as u8; 512], i as u64 * 512).unwrap();
        drop(img);
        prev = path;
    }
    // A 128 KiB stack: recursing through 150 layers would not fit in it
    // (the recursive reader this replaced overflowed here).
    let top = prev.clone();
    let read = std::thread::Builder::new()
        .stack_size(128 << 10)
        .spawn(move || {
            let img = VhdImage::open(&top).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            img.read_at(&mut buf, 0).unwrap();
            (img.layers().len(), buf)
        })
        .unwrap();
    let (layers, buf) = read.join().unwrap();
    assert_eq!(layers, DEPTH + 1);
    for (sector, chunk) in buf.chunks(512).enumerate() {
        let want = if (1..=DEPTH).contains(&sector) {
            sector as u8
        } else {
            0
        };
        assert!(chunk.iter().all(|&b| b == want), "sector {sector}");
    }
}

#[test]
fn a_parent_that_is_not_a_vhd_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    vhd::create(&base, &CreateOptions::new(DiskType::Dynamic, 1 << 20)).unwrap();
    let child = dir.path().join("child.vhd");
    differencing(&child, &base, 2 << 20);
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let err = VhdImage::open(&child).unwrap_err();
    let ErrorKind::ParentWrongFormat { path, .. } = err.kind() else {
        panic!("expected ParentWrongFormat, got {err}");
    };
    assert!(path.ends_with("base.vhd"), "{path:?}");
}
