//! qemu-img writes, vsnap reads: every image must read byte-identically to
//! `qemu-img convert -O raw`, with the virtual size `qemu-img info` reports.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use vsnap_formats::vhd::{Geometry, VhdImage};
use vsnap_formats::{ExtentKind, ImageFormat};

/// Writes a sparse pattern: the first sector, a run crossing a 2 MiB block
/// boundary, an odd-sized run, and the very last sector.
fn write_patterns(path: &std::path::Path, size: u64) {
    qemu_write(path, 0x11, 0, 512);
    if size > 4 << 20 {
        qemu_write(path, 0x22, (2 << 20) - 4096, 8192);
        qemu_write(path, 0x33, size / 2 / 512 * 512, 3 * 512);
    }
    qemu_write(path, 0xee, size - 512, 512);
}

fn check_against_qemu(path: &std::path::Path) {
    let dir = path.parent().unwrap();
    let raw = dir.join("oracle.raw");
    qemu_to_raw(path, &raw);
    let image = vsnap_formats::open(path, None).unwrap();
    assert_eq!(image.format(), ImageFormat::Vhd);
    assert_eq!(image.virtual_size(), qemu_virtual_size(path, "vpc"));
    assert_same_as_raw(&*image, &raw);
    std::fs::remove_file(raw).unwrap();
}

#[test]
fn fixed_and_dynamic_with_force_size_on_and_off_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["fixed", "dynamic"] {
        for force in ["off", "on"] {
            for size in ["1M", "100M", "300M"] {
                let path = dir.path().join(format!("{sub}-{force}-{size}.vhd"));
                qemu_create(&path, &format!("subformat={sub},force_size={force}"), size);
                let vsize = qemu_virtual_size(&path, "vpc");
                write_patterns(&path, vsize);
                check_against_qemu(&path);
                std::fs::remove_file(&path).unwrap();
            }
        }
    }
}

#[test]
fn sizes_at_the_chs_rounding_boundaries_agree_with_qemu() {
    let dir = tempfile::tempdir().unwrap();
    // Sector counts where the geometry algorithm changes its sectors per
    // track (17 -> 31 -> 63 -> 255) and where CHS runs out.
    let boundaries: [u64; 5] = [
        16 * 1024 * 17,
        16 * 1024 * 31,
        65535 * 16 * 63,
        65535 * 16 * 255,
        0xFF00_0000, // 2040 GiB, the VHD maximum
    ];
    for &sectors in &boundaries {
        for delta in [-1i64, 0, 1] {
            let bytes = (sectors as i64 + delta) as u64 * 512;
            if bytes > 0xFF00_0000 * 512 {
                continue;
            }
            for (sub, force) in [("dynamic", "off"), ("dynamic", "on"), ("fixed", "off")] {
                if sub == "fixed" && bytes > 200 << 30 {
                    continue;
                }
                let path = dir.path().join(format!("{sub}-{force}-{bytes}.vhd"));
                qemu_create(
                    &path,
                    &format!("subformat={sub},force_size={force}"),
                    &bytes.to_string(),
                );
                let qsize = qemu_virtual_size(&path, "vpc");
                let img = VhdImage::open(&path).unwrap();
                assert_eq!(
                    img.virtual_size(),
                    qsize,
                    "{sub} force_size={force} {bytes}"
                );
                // Data in the very last sector reads back.
                qemu_write(&path, 0xe7, qsize - 512, 512);
                let img = VhdImage::open(&path).unwrap();
                let mut last = [0u8; 512];
                img.read_at(&mut last, qsize - 512).unwrap();
                assert!(
                    last.iter().all(|&b| b == 0xe7),
                    "{sub} {bytes}: last sector"
                );
                let mut before = [1u8; 512];
                img.read_at(&mut before, qsize - 1024).unwrap();
                assert!(
                    before.iter().all(|&b| b == 0),
                    "{sub} {bytes}: sector before"
                );
                std::fs::remove_file(&path).unwrap();
            }
        }
    }
}

#[test]
fn every_creator_application_is_sized_the_way_qemu_sizes_it() {
    let dir = tempfile::tempdir().unwrap();
    let creators: [&[u8; 4]; 9] = [
        b"vpc ", b"qemu", b"qem2", b"win ", b"vs  ", b"d2v ", b"tap\0", b"CTXS", b"xyz ",
    ];
    // An exact 100 MiB disk whose CHS geometry (1003/12/17) is 96 KiB
    // short: CHS creators see the short size, the rest see 100 MiB.
    let g = Geometry::from_sectors((100 << 20) / 512);
    assert_ne!(g.sectors() * 512, 100 << 20);
    let chs = Some((g.cylinders, g.heads, g.sectors_per_track));
    let mut seen = std::collections::BTreeSet::new();
    for sub in ["fixed", "dynamic"] {
        for creator in creators {
            let name: String = creator
                .iter()
                .map(|&b| {
                    if b.is_ascii_alphanumeric() {
                        b as char
                    } else {
                        '_'
                    }
                })
                .collect();
            let path = dir.path().join(format!("{sub}-{name}.vhd"));
            qemu_create(&path, &format!("subformat={sub},force_size=on"), "100M");
            write_patterns(&path, 100 << 20);
            patch_footer(&path, creator, chs);
            seen.insert(qemu_virtual_size(&path, "vpc"));
            check_against_qemu(&path);
        }
    }
    // Both rules were exercised.
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[test]
fn the_allocation_map_matches_qemu_img_map() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    qemu_create(&path, "subformat=dynamic", "64M");
    for (byte, off, len) in [(1, 0, 4096), (2, 5 << 20, 3 << 20), (3, 40 << 20, 512)] {
        qemu_write(&path, byte, off, len);
    }
    let img = VhdImage::open(&path).unwrap();
    let map = img.allocation_map().unwrap();
    let ours: Vec<(u64, u64, u64)> = map
        .extents()
        .iter()
        .filter(|e| e.kind == ExtentKind::Data)
        .map(|e| (e.offset, e.length, e.file_offset.unwrap()))
        .collect();
    assert_eq!(ours, qemu_data_extents(&path));
    assert_eq!(map.size(), img.virtual_size());
    // qemu allocates whole 2 MiB blocks: block 0, blocks 2 and 3 (for
    // 5M..8M), block 20.
    assert_eq!(map.data_bytes(), 4 * (2 << 20));
}

#[test]
fn the_bundled_qemu_fixtures_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "fixed-qemu.vhd",
        "fixed-force.vhd",
        "dynamic-16k.vhd",
        "dynamic-empty.vhd",
    ] {
        let copy = dir.path().join(name);
        std::fs::copy(fixtures().join(name), &copy).unwrap();
        check_against_qemu(&copy);
    }
}

#[test]
fn a_dynamic_disk_with_clear_bitmap_bits_over_data_reads_like_qemu() {
    // Another tool may leave bits clear over written data. The digest is
    // promised to match `qemu-img convert`, and qemu reads the block whole.
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    qemu_create(&path, "subformat=dynamic", "16M");
    qemu_write(&path, 0xab, 0, 2 << 20);
    let img = VhdImage::open(&path).unwrap();
    let block0 = img.allocation_map().unwrap().extents()[0]
        .file_offset
        .unwrap()
        - 512;
    drop(img);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0x00, 0x0f], block0).unwrap(); // sectors 0..12 clear
    drop(f);
    check_against_qemu(&path);
    let img = VhdImage::open(&path).unwrap();
    let mut first = [0u8; 512];
    img.read_at(&mut first, 0).unwrap();
    assert_eq!(first, [0xab; 512]);
}
