//! Helpers for tests that check vsnap against the real qemu-img.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use vsnap_formats::DiskImage;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// Runs a qemu tool and returns its stdout; fails the test on error.
pub fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} could not start ({e}); scripts/test.sh installs it"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

pub fn qemu_create(path: &Path, opts: &str, size: &str) {
    run(
        "qemu-img",
        &["create", "-q", "-f", "vpc", "-o", opts, p(path), size],
    );
}

/// `qemu-io -f vpc -c 'write -P BYTE OFF LEN'`.
pub fn qemu_write(path: &Path, byte: u8, offset: u64, len: u64) {
    let cmd = format!("write -P {byte:#x} {offset} {len}");
    run("qemu-io", &["-f", "vpc", "-c", &cmd, p(path)]);
}

pub fn qemu_virtual_size(path: &Path, format: &str) -> u64 {
    let out = run(
        "qemu-img",
        &["info", "-f", format, "--output=json", p(path)],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// qemu-img map's data extents as (start, length, file offset).
pub fn qemu_data_extents(path: &Path) -> Vec<(u64, u64, u64)> {
    let out = run("qemu-img", &["map", "-f", "vpc", "--output=json", p(path)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"].as_bool() == Some(true))
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["offset"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// `qemu-img convert -O raw`, the oracle for virtual contents.
pub fn qemu_to_raw(image: &Path, raw: &Path) {
    run(
        "qemu-img",
        &["convert", "-f", "vpc", "-O", "raw", p(image), p(raw)],
    );
}

/// Compares an image's virtual contents with a raw file, byte for byte.
/// Large sparse disks are compared on the ranges that matter: every data
/// extent of the raw file (by SEEK_DATA), and the first and last MiB.
pub fn assert_same_as_raw(image: &dyn DiskImage, raw: &Path) {
    let f = File::open(raw).unwrap();
    let size = f.metadata().unwrap().len();
    assert_eq!(
        image.virtual_size(),
        size,
        "virtual size vs {}",
        raw.display()
    );
    let mut ranges: Vec<(u64, u64)> = if size <= 256 << 20 {
        vec![(0, size)]
    } else {
        let storage: &dyn vsnap_formats::storage::Storage = &f;
        let mut r = storage.data_ranges(0..size).unwrap().expect("SEEK_DATA");
        r.push((0, 1 << 20));
        r.push((size - (1 << 20), size));
        r
    };
    ranges.sort_unstable();
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    for (start, end) in ranges {
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(a.len());
            image.read_at(&mut a[..n], pos).unwrap();
            f.read_exact_at(&mut b[..n], pos).unwrap();
            if a[..n] != b[..n] {
                let i = a[..n]
                    .iter()
                    .zip(&b[..n])
                    .position(|(x, y)| x != y)
                    .unwrap();
                panic!(
                    "content differs at virtual offset {}: vsnap {:#x}, raw {:#x}",
                    pos + i as u64,
                    a[i],
                    b[i]
                );
            }
            pos += n as u64;
        }
    }
}

/// Patches the creator application (and optionally the C/H/S geometry) in
/// both footer copies, fixing their checksums, as another tool would have
/// written them.
pub fn patch_footer(path: &Path, creator: &[u8; 4], chs: Option<(u16, u8, u8)>) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let mut at = vec![len - 512];
    let mut head = [0u8; 8];
    f.read_exact_at(&mut head, 0).unwrap();
    if &head == b"conectix" {
        at.push(0);
    }
    for off in at {
        let mut footer = [0u8; 512];
        f.read_exact_at(&mut footer, off).unwrap();
        footer[28..32].copy_from_slice(creator);
        if let Some((c, h, spt)) = chs {
            footer[56..58].copy_from_slice(&c.to_be_bytes());
            footer[58] = h;
            footer[59] = spt;
        }
        footer[64..68].fill(0);
        let sum = !footer.iter().fold(0u32, |s, &b| s.wrapping_add(b.into()));
        footer[64..68].copy_from_slice(&sum.to_be_bytes());
        f.write_all_at(&footer, off).unwrap();
    }
}

/// A deterministic pseudo-random byte pattern, so failures reproduce.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    use rand::{Rng as _, SeedableRng};
    let mut v = vec![0u8; len];
    rand::rngs::SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}
