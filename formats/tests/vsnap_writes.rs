//! vsnap writes, qemu-img reads: images vsnap creates and writes must pass
//! `qemu-img compare` against the raw content we expect, and `qemu-img info`
//! must see the size we asked for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::*;
use vsnap_formats::vhd::{self, CreateOptions, DiskType, VhdImage};

/// Deterministic writes: unaligned, block-crossing, and the last byte.
fn writes(size: u64, seed: u64) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let r = pattern(seed, 64);
    for i in 0..12u64 {
        let x = u64::from_le_bytes(r[(i as usize % 8) * 8..][..8].try_into().unwrap());
        let off = (x.rotate_left(i as u32 * 7)) % size;
        let len = ((x >> 20) % (300 * 1024) + 1).min(size - off);
        out.push((off, pattern(seed + i, len as usize)));
    }
    out.push((size - 1, vec![0xfe]));
    out.push((0, pattern(seed ^ 7, 700.min(size as usize))));
    out
}

fn qemu_compare(image: &Path, raw: &Path) {
    let st = Command::new("qemu-img")
        .args(["compare", "-f", "vpc", "-F", "raw", p(image), p(raw)])
        .output()
        .unwrap();
    assert!(
        st.status.code() == Some(0),
        "qemu-img compare {} {}: {}{}",
        image.display(),
        raw.display(),
        String::from_utf8_lossy(&st.stdout),
        String::from_utf8_lossy(&st.stderr)
    );
}

fn write_and_check(dir: &Path, name: &str, opts: &CreateOptions, seed: u64) {
    let path = dir.join(name);
    let raw = dir.join(format!("{name}.raw"));
    let mut img = vhd::create(&path, opts).unwrap();
    let expected = std::fs::File::create(&raw).unwrap();
    expected.set_len(opts.size).unwrap();
    for (off, data) in writes(opts.size, seed) {
        img.write_at(&data, off).unwrap();
        expected.write_all_at(&data, off).unwrap();
    }
    img.flush().unwrap();
    drop(img);
    assert_eq!(
        qemu_virtual_size(&path, "vpc"),
        opts.size,
        "{name}: qemu-img info size"
    );
    qemu_compare(&path, &raw);
    // And vsnap reads back what it wrote, after a fresh open.
    let img = VhdImage::open(&path).unwrap();
    assert_same_as_raw(&img, &raw);
}

#[test]
fn fixed_images_vsnap_writes_compare_equal_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    // CHS-exact, not CHS-representable, and a 1-sector disk.
    for (i, size) in [104_865_792u64, (100 << 20) + 512, 1 << 20, 512]
        .into_iter()
        .enumerate()
    {
        let opts = CreateOptions::new(DiskType::Fixed, size);
        write_and_check(dir.path(), &format!("fixed-{size}.vhd"), &opts, i as u64);
    }
}

#[test]
fn dynamic_images_of_every_block_size_compare_equal_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (i, bs) in [4096u32, 64 << 10, 2 << 20, 8 << 20]
        .into_iter()
        .enumerate()
    {
        for size in [(24 << 20) + 1536, 104_865_792] {
            let mut opts = CreateOptions::new(DiskType::Dynamic, size);
            opts.block_size = bs;
            write_and_check(
                dir.path(),
                &format!("dyn-{bs}-{size}.vhd"),
                &opts,
                100 + i as u64,
            );
        }
    }
}

#[test]
fn qemu_io_reads_a_block_vsnap_wrote_and_vsnap_reads_what_qemu_io_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.vhd");
    let mut img = vhd::create(&path, &CreateOptions::new(DiskType::Dynamic, 16 << 20)).unwrap();
    img.write_at(&[0x5a; 4096], 3 << 20).unwrap();
    img.flush().unwrap();
    drop(img);
    let out = run(
        "qemu-io",
        &["-f", "vpc", "-c", "read -P 0x5a 3145728 4096", p(&path)],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    qemu_write(&path, 0x77, 9 << 20, 8192);
    let img = VhdImage::open(&path).unwrap();
    let mut buf = vec![0u8; 8192];
    img.read_at(&mut buf, 9 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0x77));
    img.read_at(&mut buf[..4096], 3 << 20).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0x5a));
}

#[test]
fn create_refuses_bad_sizes_block_sizes_and_existing_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.vhd");
    let err = vhd::create(&path, &CreateOptions::new(DiskType::Fixed, 1000)).unwrap_err();
    assert!(matches!(
        err.kind(),
        vsnap_formats::ErrorKind::BadSize { size: 1000, .. }
    ));
    let err = vhd::create(&path, &CreateOptions::new(DiskType::Dynamic, 2041 << 30)).unwrap_err();
    assert!(matches!(
        err.kind(),
        vsnap_formats::ErrorKind::BadSize { .. }
    ));
    let mut opts = CreateOptions::new(DiskType::Dynamic, 1 << 20);
    opts.block_size = 3000;
    let err = vhd::create(&path, &opts).unwrap_err();
    assert!(matches!(
        err.kind(),
        vsnap_formats::ErrorKind::BadBlockSize(3000)
    ));
    opts.block_size = 2048;
    let err = vhd::create(&path, &opts).unwrap_err();
    assert!(err.to_string().contains("qemu misreads"), "{err}");
    assert!(!path.exists(), "a failed create leaves no file");
    vhd::create(&path, &CreateOptions::new(DiskType::Dynamic, 1 << 20)).unwrap();
    let err = vhd::create(&path, &CreateOptions::new(DiskType::Dynamic, 1 << 20)).unwrap_err();
    assert!(
        matches!(err.kind(), vsnap_formats::ErrorKind::Io(e) if e.kind() == std::io::ErrorKind::AlreadyExists)
    );
}
