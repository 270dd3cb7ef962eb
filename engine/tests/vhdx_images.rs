//! VHDX images opened through `DiskImage`, against qemu-img: digests equal
//! `b3sum` of `qemu-img convert -O raw`, copies written as VHDX pass
//! `qemu-img check` and `compare`, a dirty log reads as `qemu-img check -r
//! all` replays it, differencing chains read like a raw reconstruction,
//! and each kind of corruption gives its own error.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../formats/tests/common/mod.rs"]
mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use vsnap_engine::pipeline::{copy_images, hash_images, CopySpec, Options, Progress, TargetFormat};
use vsnap_formats::vhdx::parse::{
    crc_with_field_zeroed, parse_region_table, Guid, FILE_PARAMETERS, HEADER_1_OFFSET,
    HEADER_2_OFFSET, LOGICAL_SECTOR_SIZE, REGION_TABLE_2_OFFSET, REGION_TABLE_OFFSET,
    REGION_TABLE_SIZE,
};
use vsnap_formats::vhdx::{NewVhdx, VhdxIdentity, VhdxImage, VhdxWriter};
use vsnap_formats::ErrorKind;
use vsnap_formats::{DiskImage, ExtentKind, ImageFormat};

fn b3sum(path: &Path) -> String {
    run("b3sum", &["--no-names", p(path)]).trim().to_owned()
}

fn qemu_vhdx(path: &Path, opts: &str, size: &str) {
    run(
        "qemu-img",
        &["create", "-q", "-f", "vhdx", "-o", opts, p(path), size],
    );
}

fn qio(path: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "vhdx"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(p(path));
    run("qemu-io", &args);
}

/// `b3sum` of `qemu-img convert -O raw`: the digest the contract promises.
fn qemu_raw(image: &Path, raw: &Path) -> String {
    run(
        "qemu-img",
        &["convert", "-f", "vhdx", "-O", "raw", p(image), p(raw)],
    );
    b3sum(raw)
}

fn digest(image: &dyn DiskImage) -> String {
    let out = hash_images(&[image], &Options::default(), &Progress::default()).unwrap();
    out[0].digest.to_hex().to_string()
}

fn open(path: &Path) -> Box<dyn DiskImage> {
    let image = vsnap_formats::open(path, None).unwrap();
    assert_eq!(image.format(), ImageFormat::Vhdx, "detected from the bytes");
    image
}

#[test]
fn the_vhdx_fixtures_read_as_qemu_and_the_chain_as_its_writes_say() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["dynamic-qemu", "fixed-qemu", "stale-log"] {
        let path = fixtures().join(format!("vhdx/{name}.vhdx"));
        let raw = dir.path().join(format!("{name}.raw"));
        let want = qemu_raw(&path, &raw);
        let image = open(&path);
        assert_eq!(digest(&*image), want, "{name}");
        assert_same_as_raw(&*image, &raw);
    }
    // fixtures/generate.sh: base all 0x10, then the child's and the
    // grandchild's writes.
    let mut model = vec![0x10u8; 4 << 20];
    apply(
        &mut model,
        &[
            (4096, 8192, 0x21),
            (1 << 20, 512, 0x22),
            (2 << 20, 1 << 20, 0x23),
        ],
    );
    apply(
        &mut model,
        &[(4608, 512, 0x31), ((4 << 20) - 512, 512, 0x32)],
    );
    let raw = dir.path().join("chain.raw");
    std::fs::write(&raw, &model).unwrap();
    let image = open(&fixtures().join("vhdx/chain/grandchild.avhdx"));
    assert_eq!(digest(&*image), b3sum(&raw));
    assert_same_as_raw(&*image, &raw);
}

#[test]
fn qemu_images_of_every_block_size_and_type_hash_and_read_like_qemu_convert() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases: &[(&str, &str, &str, &[&str])] = &[
        // 1 MiB blocks: a chunk ratio of 4096, so block 5000 sits past the
        // first sector-bitmap entry; 8 GiB puts data past 4 GiB, at the end.
        (
            "big.vhdx",
            "block_size=1M",
            "8G",
            &[
                "write -P 0x11 0 4k",
                "write -P 0x5a 5242880000 65536",
                "write -P 0x77 8589869056 65536",
            ],
        ),
        (
            "b8.vhdx",
            "block_size=8M",
            "64M",
            &["write -P 0x21 1000 3000", "write -P 0x22 20971520 9437184"],
        ),
        (
            "b32.vhdx",
            "block_size=32M",
            "100M",
            &["write -P 0x31 33554432 512", "write -P 0x32 104857088 512"],
        ),
        (
            "fixed.vhdx",
            "subformat=fixed,block_size=8M",
            "24M",
            &["write -P 0x41 8388608 1M"],
        ),
        (
            "fixed32.vhdx",
            "subformat=fixed,block_size=32M",
            "40M",
            &["write -P 0x51 41942528 512"],
        ),
    ];
    for (name, opts, size, writes) in cases {
        let path = d.join(name);
        qemu_vhdx(&path, opts, size);
        qio(&path, writes);
        let raw = d.join(format!("{name}.raw"));
        let want = qemu_raw(&path, &raw);
        let image = open(&path);
        assert_eq!(
            digest(&*image),
            want,
            "{name}: digest vs b3sum of qemu's raw"
        );
        assert_same_as_raw(&*image, &raw);
        let info = image.info().unwrap();
        let fixed = opts.contains("fixed");
        assert_eq!(
            info.disk_type.name(),
            if fixed { "fixed" } else { "dynamic" }
        );
        // qemu reports one extent for the whole file, so the map can only
        // be checked against what was written: every written byte is data.
        let map = image.allocation_map().unwrap();
        assert_eq!(map.size(), image.virtual_size());
        assert!(map.data_bytes() > 0, "{name}: written blocks are data");
    }
    // Block 5000 is where the interleaving puts it, past a bitmap entry.
    let big = VhdxImage::open(&d.join("big.vhdx")).unwrap();
    assert_eq!(big.top().bat()[5000] & 7, 6, "FULLY_PRESENT");
}

#[test]
fn copies_written_as_vhdx_pass_qemu_img_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src.vhdx");
    qemu_vhdx(&src, "block_size=1M", "1G");
    qio(
        &src,
        &[
            "write -P 0x61 0 1M",
            "write -P 0x62 536870912 3M",
            "write -P 0x63 1073741312 512",
        ],
    );
    let vhd = d.join("src.vhd");
    qemu_create(&vhd, "subformat=dynamic", "48M");
    qemu_write(&vhd, 0x71, 3 << 20, 5000);
    let out = d.join("out");
    std::fs::create_dir(&out).unwrap();
    let a = open(&src);
    let b = vsnap_formats::open(&vhd, None).unwrap();
    let targets = [
        (&*a, "same.vhdx", None),
        (&*a, "fixed.vhdx", Some(TargetFormat::FixedVhdx)),
        (&*a, "back.vhd", Some(TargetFormat::DynamicVhd)),
        (&*b, "fromvhd.vhdx", Some(TargetFormat::DynamicVhdx)),
    ];
    for (image, name, format) in targets {
        let target = out.join(name);
        let spec = CopySpec {
            target: target.clone(),
            format: format.unwrap_or_else(|| TargetFormat::same_as(image)),
            replace: false,
            expect: None,
            durable: true,
        };
        let r = copy_images(&[image], &[spec], &Options::default(), &Progress::default()).unwrap();
        assert_eq!(
            r[0].file_digest.to_hex().to_string(),
            b3sum(&target),
            "{name}: the file digest written to B3SUMS is b3sum's"
        );
        if name.ends_with(".vhdx") {
            let check = run("qemu-img", &["check", "-f", "vhdx", p(&target)]);
            assert!(check.contains("No errors"), "{name}: {check}");
        }
        let src_path = if std::ptr::eq(image, &*a) { &src } else { &vhd };
        run("qemu-img", &["compare", p(src_path), p(&target)]);
        let copy = vsnap_formats::open(&target, None).unwrap();
        assert_eq!(digest(&*copy), r[0].source.digest.to_hex().to_string());
    }
    // `same` keeps the VHDX's identity and block size; fixed allocates all.
    let same = VhdxImage::open(&out.join("same.vhdx")).unwrap();
    assert_eq!(same.vhdx_identity(), a.vhdx_identity());
    let fixed = VhdxImage::open(&out.join("fixed.vhdx")).unwrap();
    assert_eq!(fixed.info().unwrap().disk_type.name(), "fixed");
    assert!(fixed.top().bat().iter().all(|e| e & 7 == 6));
    // Its blocks without data are holes, mapped as zeros and never read.
    let data = |i: &dyn DiskImage| i.allocation_map().unwrap().data_bytes();
    assert_eq!(data(&fixed), data(&*a));
    // A VHD's unique id becomes the VHDX's page 83 identity.
    let from_vhd = VhdxImage::open(&out.join("fromvhd.vhdx")).unwrap();
    assert_eq!(
        from_vhd.info().unwrap().unique_id,
        b.info().unwrap().unique_id
    );
}

/// Copies of the dirty-log fixture and its stale twin. The recipe is
/// fixtures/vhdx_dirty_log.py: qemu-io writes one block and aborts, which
/// leaves the log entry that allocated it (stale: qemu clears the header's
/// LogGuid once it has applied the entry itself); the script names that
/// log in the current header again and puts the BAT back as it was before
/// the write, so the new block is reachable only by replaying the log.
fn dirty_log_image(dir: &Path) -> (PathBuf, PathBuf) {
    let (dirty, stale) = (dir.join("dirty.vhdx"), dir.join("stale.vhdx"));
    std::fs::copy(fixtures().join("vhdx/dirty-log.vhdx"), &dirty).unwrap();
    std::fs::copy(fixtures().join("vhdx/stale-log.vhdx"), &stale).unwrap();
    (dirty, stale)
}

#[test]
fn a_dirty_log_is_replayed_in_memory_exactly_as_qemu_img_check_replays_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (dirty, stale) = dirty_log_image(d);
    // qemu itself refuses to read it until the log is replayed.
    let refused = std::process::Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "vhdx",
            "-O",
            "raw",
            p(&dirty),
            p(&d.join("x.raw")),
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("log"));
    let file_before = b3sum(&dirty);
    let repaired = d.join("repaired.vhdx");
    std::fs::copy(&dirty, &repaired).unwrap();
    run(
        "qemu-img",
        &["check", "-f", "vhdx", "-r", "all", p(&repaired)],
    );
    let raw = d.join("repaired.raw");
    let want = qemu_raw(&repaired, &raw);

    let image = open(&dirty);
    assert_eq!(
        digest(&*image),
        want,
        "the bytes qemu-img check -r all produces"
    );
    assert_same_as_raw(&*image, &raw);
    let info = image.info().unwrap();
    assert_eq!(info.vhdx.as_ref().unwrap().replayed_log_entries, 1);
    assert!(info
        .warnings
        .iter()
        .any(|w| w.contains("replayed in memory")));
    // The block the log allocated is data; nothing was written to the file.
    let map = image.allocation_map().unwrap();
    assert!(map
        .extents()
        .iter()
        .any(|e| e.kind == ExtentKind::Data && e.offset <= 2 << 20 && e.end() >= 3 << 20));
    assert!(
        image.layer_paths().is_empty(),
        "reads go through the replay"
    );
    drop(image);
    assert_eq!(b3sum(&dirty), file_before, "the file is never changed");

    // Without the log guid, the same entry is stale and ignored.
    let clean = open(&stale);
    assert_eq!(clean.info().unwrap().vhdx.unwrap().replayed_log_entries, 0);
    assert_eq!(digest(&*clean), want);
}

#[test]
fn a_log_that_cannot_be_replayed_refuses_the_open_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (dirty, _) = dirty_log_image(dir.path());
    // The entry says the file held its first 8 MiB when it was written;
    // cut it shorter and the flushed data is gone.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&dirty)
        .unwrap();
    f.set_len(6 << 20).unwrap();
    let err = VhdxImage::open(&dirty).unwrap_err();
    let ErrorKind::LogReplay { reason } = err.kind() else {
        panic!("expected LogReplay, got {err}");
    };
    assert!(reason.contains("flushed"), "{reason}");
    assert!(err.to_string().contains("dirty.vhdx"), "{err}");
}

/// Writes `(offset, length, byte)` patterns into a raw model.
fn apply(model: &mut [u8], writes: &[(u64, usize, u8)]) {
    for &(at, len, b) in writes {
        model[at as usize..at as usize + len].fill(b);
    }
}

fn child(path: &Path, parent: &Path, writes: &[(u64, usize, u8)]) {
    let new = NewVhdx::child_of(parent, path).unwrap();
    let mut w = VhdxWriter::create(path, new, &[]).unwrap();
    for &(at, len, b) in writes {
        w.write(&vec![b; len], at).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn differencing_chains_read_through_their_sector_bitmaps_like_a_raw_reconstruction() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("vm");
    std::fs::create_dir(&d).unwrap();
    let base = d.join("base.vhdx");
    qemu_vhdx(&base, "block_size=1M", "12M");
    qio(&base, &["write -P 0x10 0 12M"]);
    let mut model = vec![0x10u8; 12 << 20];
    let w1: &[(u64, usize, u8)] = &[
        (4096, 8192, 0x21),
        (1 << 20, 512, 0x22),
        (3 << 20, 1 << 20, 0x23),
    ];
    let w2: &[(u64, usize, u8)] = &[
        (4608, 512, 0x31),
        ((12 << 20) - 512, 512, 0x32),
        (5 << 20, 1536, 0x33),
    ];
    child(&d.join("c1.avhdx"), &base, w1);
    child(&d.join("c2.avhdx"), &d.join("c1.avhdx"), w2);
    apply(&mut model, w1);
    apply(&mut model, w2);
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, &model).unwrap();

    // Moved elsewhere, the chain still resolves by its relative paths.
    let moved = dir.path().join("moved");
    std::fs::rename(&d, &moved).unwrap();
    let top = moved.join("c2.avhdx");
    let image = open(&top);
    assert_eq!(digest(&*image), b3sum(&raw));
    assert_same_as_raw(&*image, &raw);
    let info = image.info().unwrap();
    assert_eq!(info.disk_type.name(), "differencing");
    assert_eq!(info.parents.len(), 2);
    let map = image.allocation_map().unwrap();
    let layer_of = |at: u64| {
        map.extents()
            .iter()
            .find(|e| e.offset <= at && at < e.end())
            .and_then(|e| e.layer)
    };
    assert_eq!(layer_of(4608), Some(0), "the grandchild's sector");
    assert_eq!(layer_of(4096), Some(1), "the child's sector beside it");
    assert_eq!(layer_of(0), Some(2), "the base below both");

    // A raw copy of the chain is the model, byte for byte.
    let out = dir.path().join("out.raw");
    let spec = CopySpec {
        target: out.clone(),
        format: TargetFormat::Raw,
        replace: false,
        expect: None,
        durable: true,
    };
    copy_images(
        &[&*image],
        &[spec],
        &Options::default(),
        &Progress::default(),
    )
    .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), model);
}

#[test]
fn a_missing_or_foreign_parent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.vhdx");
    qemu_vhdx(&base, "block_size=1M", "4M");
    child(&d.join("c.avhdx"), &base, &[(0, 512, 1)]);
    // Moved away from its parent, the child finds it by its absolute path.
    std::fs::create_dir(d.join("away")).unwrap();
    std::fs::rename(d.join("c.avhdx"), d.join("away/c.avhdx")).unwrap();
    let moved = VhdxImage::open(&d.join("away/c.avhdx")).unwrap();
    assert_eq!(
        moved.layers()[1].path(),
        std::fs::canonicalize(&base).unwrap()
    );
    std::fs::rename(d.join("away/c.avhdx"), d.join("c.avhdx")).unwrap();
    std::fs::remove_file(&base).unwrap();
    let err = VhdxImage::open(&d.join("c.avhdx")).unwrap_err();
    let ErrorKind::MissingParent { tried } = err.kind() else {
        panic!("expected MissingParent, got {err}");
    };
    assert!(tried.iter().any(|t| t.ends_with("base.vhdx")), "{tried:?}");
    // Another disk under the parent's name: its DataWriteGuid differs.
    qemu_vhdx(&base, "block_size=1M", "4M");
    let err = VhdxImage::open(&d.join("c.avhdx")).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::ParentIdMismatch { .. }),
        "{err}"
    );
}

/// Complements the byte at `at`: a change whatever the byte was (writing
/// a fixed value is none where the byte already had it).
fn flip(path: &Path, at: u64) {
    let mut b = [0u8; 1];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    patch(path, at, &[!b[0]], None);
}

/// Rewrites bytes of a file, then (when asked) fixes the CRC of the
/// structure `(start, len)` whose checksum sits at its offset 4.
fn patch(path: &Path, at: u64, bytes: &[u8], crc_of: Option<(u64, usize)>) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    f.write_all_at(bytes, at).unwrap();
    if let Some((start, len)) = crc_of {
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, start).unwrap();
        let crc = crc_with_field_zeroed(&b, 4);
        f.write_all_at(&crc.to_le_bytes(), start + 4).unwrap();
    }
}

/// Where metadata item `guid`'s data is, in a file.
fn item_offset(path: &Path, guid: Guid) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let mut t = vec![0u8; REGION_TABLE_SIZE];
    f.read_exact_at(&mut t, REGION_TABLE_OFFSET).unwrap();
    let md = parse_region_table(&t).unwrap().metadata.offset;
    let mut table = vec![0u8; 64 << 10];
    f.read_exact_at(&mut table, md).unwrap();
    let count = u16::from_le_bytes([table[10], table[11]]) as usize;
    (0..count)
        .map(|i| 32 + i * 32)
        .find(|&e| table[e..e + 16] == guid.0)
        .map(|e| {
            md + u64::from(u32::from_le_bytes(
                table[e + 16..e + 20].try_into().unwrap(),
            ))
        })
        .unwrap()
}

/// qemu's `PAYLOAD_BLOCK_UNMAPPED_v095` (state 5) reads as zeros in qemu,
/// and so in vsnap: the same digest as `qemu-img convert`, and no error.
#[test]
fn bat_state_5_reads_as_zeros_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("v095.vhdx");
    qemu_vhdx(&image, "block_size=8M", "64M");
    qio(&image, &["write -P 0x44 0 64k", "write -P 0x55 8M 64k"]);
    let bat_entry = (2 << 20) + 8; // block 1
    let f = std::fs::File::open(&image).unwrap();
    let mut raw = [0u8; 8];
    f.read_exact_at(&mut raw, bat_entry).unwrap();
    let entry = u64::from_le_bytes(raw);
    assert_eq!(entry & 7, 6, "block 1 is FULLY_PRESENT before the patch");
    patch(&image, bat_entry, &((entry & !7) | 5).to_le_bytes(), None);
    let qemu = qemu_raw(&image, &dir.path().join("v095.raw"));
    let opened = open(&image);
    assert_eq!(digest(opened.as_ref()), qemu);
    let mut block1 = vec![1u8; 64 << 10];
    opened.read_at(&mut block1, 8 << 20).unwrap();
    assert!(block1.iter().all(|&b| b == 0), "state 5 reads as zeros");
    let mut block0 = vec![0u8; 64 << 10];
    opened.read_at(&mut block0, 0).unwrap();
    assert!(block0.iter().all(|&b| b == 0x44), "block 0 is untouched");
}

#[test]
fn each_corruption_gives_its_own_error_and_none_panics() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.vhdx");
    qemu_vhdx(&good, "block_size=8M", "64M");
    qio(&good, &["write -P 0x44 8M 64k"]);
    let bat_entry = (2 << 20) + 8; // block 1, the one written
    let region = |p: &Path, at: u64, bytes: &[u8]| {
        for table in [REGION_TABLE_OFFSET, REGION_TABLE_2_OFFSET] {
            patch(p, table + at, bytes, Some((table, REGION_TABLE_SIZE)));
        }
    };
    type Case = (
        &'static str,
        Box<dyn Fn(&Path)>,
        Box<dyn Fn(&ErrorKind) -> bool>,
    );
    let cases: Vec<Case> = vec![
        (
            "both headers bad",
            Box::new(|p| {
                flip(p, HEADER_1_OFFSET + 8);
                flip(p, HEADER_2_OFFSET + 8);
            }),
            Box::new(|k| matches!(k, ErrorKind::NoValidHeader { .. })),
        ),
        (
            "bad region tables",
            Box::new(|p| {
                patch(p, REGION_TABLE_OFFSET + 100, &[1], None);
                patch(p, REGION_TABLE_2_OFFSET + 100, &[1], None);
            }),
            Box::new(
                |k| matches!(k, ErrorKind::BadChecksum { what, .. } if *what == "VHDX region table"),
            ),
        ),
        (
            "a required unknown region",
            Box::new(move |p| {
                let mut e = vec![0u8; 32];
                e[..16].copy_from_slice(&Guid([0x42; 16]).0);
                e[16..24].copy_from_slice(&(32u64 << 20).to_le_bytes());
                e[24..28].copy_from_slice(&(1u32 << 20).to_le_bytes());
                e[28..32].copy_from_slice(&1u32.to_le_bytes());
                region(p, 16 + 2 * 32, &e);
                region(p, 8, &3u32.to_le_bytes());
            }),
            Box::new(|k| matches!(k, ErrorKind::UnknownRequired { what: "region", .. })),
        ),
        (
            "a bad metadata item",
            Box::new(|p| {
                patch(
                    p,
                    item_offset(p, LOGICAL_SECTOR_SIZE),
                    &1000u32.to_le_bytes(),
                    None,
                )
            }),
            Box::new(|k| {
                matches!(
                    k,
                    ErrorKind::Corrupt {
                        what: "VHDX metadata",
                        ..
                    }
                )
            }),
        ),
        (
            "a BAT entry past the end of the file",
            Box::new(move |p| patch(p, bat_entry, &((1u64 << 30) | 6).to_le_bytes(), None)),
            Box::new(|k| matches!(k, ErrorKind::BatEntryPastEnd { index: 1, .. })),
        ),
        (
            "a block size that is not a power of two",
            Box::new(|p| {
                patch(
                    p,
                    item_offset(p, FILE_PARAMETERS),
                    &(3u32 << 20).to_le_bytes(),
                    None,
                )
            }),
            Box::new(|k| matches!(k, ErrorKind::BadBlockSize(3145728))),
        ),
        (
            "a block over the metadata region",
            Box::new(move |p| patch(p, bat_entry, &((2u64 << 20) | 6).to_le_bytes(), None)),
            Box::new(|k| matches!(k, ErrorKind::BlockOverlapsMetadata { what: "BAT", .. })),
        ),
        (
            "a reserved BAT state",
            Box::new(move |p| patch(p, bat_entry, &[4], None)),
            Box::new(|k| {
                matches!(
                    k,
                    ErrorKind::Corrupt {
                        what: "VHDX BAT",
                        ..
                    }
                )
            }),
        ),
        (
            "truncated inside the header section",
            Box::new(|p| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(300 << 10)
                    .unwrap()
            }),
            Box::new(|k| {
                matches!(
                    k,
                    ErrorKind::Truncated {
                        what: "VHDX header section",
                        ..
                    }
                )
            }),
        ),
    ];
    for (name, corrupt, expect) in cases {
        let path = dir.path().join("bad.vhdx");
        std::fs::copy(&good, &path).unwrap();
        corrupt(&path);
        let err = vsnap_formats::open(&path, None).unwrap_err();
        assert!(expect(err.kind()), "{name}: got {err}");
        assert!(
            err.to_string().contains("bad.vhdx"),
            "{name}: names the file: {err}"
        );
    }

    // One bad header is survived: the other is current, with a warning.
    let path = dir.path().join("one.vhdx");
    std::fs::copy(&good, &path).unwrap();
    flip(&path, HEADER_1_OFFSET + 8);
    let image = open(&path);
    assert!(image
        .info()
        .unwrap()
        .warnings
        .iter()
        .any(|w| w.contains("header 1")));
    let raw = dir.path().join("good.raw");
    let want = qemu_raw(&good, &raw);
    assert_eq!(digest(&*image), want);
    // Nor does one damaged region table stop a read: its copy stands in.
    std::fs::copy(&good, &path).unwrap();
    patch(&path, REGION_TABLE_OFFSET + 100, &[1], None);
    let image = open(&path);
    let warnings = image.info().unwrap().warnings;
    assert!(
        warnings.iter().any(|w| w.contains("region table")),
        "{warnings:?}"
    );
    assert_eq!(digest(&*image), want);
}

#[test]
fn four_kib_logical_sectors_read_through_a_chain_by_their_own_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let size = 6u64 << 20;
    let mut id = VhdxIdentity::new(size);
    (id.block_size, id.logical_sector_size) = (1 << 20, 4096);
    let mut w = VhdxWriter::create(&base, NewVhdx::new(size, id), &[]).unwrap();
    w.write(&vec![0x10; 3 << 20], 1 << 20).unwrap();
    w.finish().unwrap();
    let writes: &[(u64, usize, u8)] = &[(4096, 4096, 0x21), ((2 << 20) - 4096, 8192, 0x22)];
    child(&dir.path().join("c.avhdx"), &base, writes);
    let mut model = vec![0u8; size as usize];
    apply(&mut model, &[(1 << 20, 3 << 20, 0x10)]);
    apply(&mut model, writes);
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, &model).unwrap();
    let image = open(&dir.path().join("c.avhdx"));
    assert_eq!(
        image.info().unwrap().vhdx.unwrap().logical_sector_size,
        4096
    );
    assert_eq!(digest(&*image), b3sum(&raw));
    assert_same_as_raw(&*image, &raw);
    // A 512-byte write is not a whole 4 KiB sector.
    let new = NewVhdx::child_of(&base, &dir.path().join("d.avhdx")).unwrap();
    let mut w = VhdxWriter::create(&dir.path().join("d.avhdx"), new, &[]).unwrap();
    let err = w.write(&[1; 512], 0).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::InvalidArgument(m) if m.contains("4096-byte")),
        "{err}"
    );
}

/// The valid images the mutation test starts from: vsnap's dynamic,
/// fixed and differencing layouts, and qemu's with a log to replay.
fn mutation_seeds(dir: &Path) -> Vec<Vec<u8>> {
    let make = |name: &str, size: u64, fixed: bool, writes: &[(u64, usize, u8)]| {
        let path = dir.join(name);
        let mut id = VhdxIdentity::new(size);
        id.block_size = 1 << 20;
        id.fixed = fixed;
        let mut w = VhdxWriter::create(&path, NewVhdx::new(size, id), &[]).unwrap();
        for &(at, len, b) in writes {
            w.write(&vec![b; len], at).unwrap();
        }
        w.finish().unwrap();
        path
    };
    let dynamic = make(
        "d.vhdx",
        4 << 20,
        false,
        &[(4096, 512, 1), (3 << 20, 8192, 2)],
    );
    let fixed = make("f.vhdx", 2 << 20, true, &[(0, 4096, 3)]);
    let diff = dir.join("c.avhdx");
    child(
        &diff,
        &dynamic,
        &[(512, 1024, 4), ((2 << 20) + 4096, 512, 5)],
    );
    let (dirty, _) = dirty_log_image(dir);
    [dynamic, fixed, diff, dirty]
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

fn fix_crc(bytes: &mut [u8], start: usize, len: usize) {
    if start + len <= bytes.len() {
        let crc = crc_with_field_zeroed(&bytes[start..start + len], 4);
        bytes[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }
}

/// A bounded, always-on cousin of the `vhdx_open` fuzz target: flip bytes
/// in the headers, region table, log, BAT and metadata (fixing the CRCs
/// that guard them, so the flips reach the checks behind), maybe cut the
/// file short, then open, map and read. Errors are fine; panics are not.
#[test]
fn mutated_vhdx_images_never_panic() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use std::sync::Arc;
    use vsnap_formats::storage::{MemStorage, Storage};

    let dir = tempfile::tempdir().unwrap();
    let seeds = mutation_seeds(dir.path());
    let mut runner = TestRunner::new(Config::with_cases(2000));
    let flips = prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..6), 1..10);
    let cut = prop::option::weighted(0.1, any::<prop::sample::Index>());
    runner
        .run(&(0usize..4, flips, cut), |(seed, flips, cut)| {
            let mut bytes = seeds[seed].clone();
            let n = bytes.len();
            let mib = 1usize << 20;
            for (index, value, region) in flips {
                let (at, crc) = match region {
                    0 => (64 * 1024 + index.index(128), Some((64 * 1024, 4096))),
                    1 => (192 * 1024 + index.index(128), Some((192 * 1024, 64 * 1024))),
                    2 => (mib + index.index(8192), None),
                    3 => (2 * mib + index.index(4096), None),
                    4 => (3 * mib + index.index(64 * 1024 + 256), None),
                    _ => (index.index(n), None),
                };
                if at < n {
                    bytes[at] = value;
                }
                if let Some((start, len)) = crc {
                    fix_crc(&mut bytes, start, len);
                }
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(n));
            }
            let storage: Arc<dyn Storage> = Arc::new(MemStorage::new(bytes));
            if let Ok(image) = VhdxImage::from_storage(storage, Path::new("mutant.vhdx")) {
                vsnap_formats::exercise(&image);
            }
            Ok(())
        })
        .unwrap();
}
