//! Every kind of broken VHD gets its own error, naming the file and the
//! offset of the fault; none panics. The images are the hand-corrupted
//! fixtures that fixtures/corrupt.py makes, one fault each.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use common::fixtures;
use vsnap_formats::vhd::VhdImage;
use vsnap_formats::{Error, ErrorKind};

const BAT: u64 = 1536;

fn open_err(name: &str) -> Error {
    let path = fixtures().join(name);
    let err = VhdImage::open(&path).expect_err(name);
    assert_eq!(err.path(), Some(path.as_path()), "{name}: {err}");
    assert!(
        err.to_string().contains(name),
        "{name}: the message names the file: {err}"
    );
    err
}

fn len(name: &str) -> u64 {
    std::fs::metadata(fixtures().join(name)).unwrap().len()
}

#[test]
fn a_truncated_file_says_which_structure_is_cut() {
    let err = open_err("bad-truncated.vhd");
    assert!(
        matches!(
            err.kind(),
            ErrorKind::Truncated {
                what: "VHD BAT",
                at: BAT,
                available: 64,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.offset(), Some(BAT));
}

#[test]
fn a_file_too_short_for_a_footer_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.vhd");
    std::fs::write(&path, b"conectix").unwrap();
    let err = VhdImage::open(&path).unwrap_err();
    assert!(matches!(
        err.kind(),
        ErrorKind::Truncated {
            what: "VHD footer",
            available: 8,
            ..
        }
    ));
}

#[test]
fn a_bad_footer_checksum_is_found_at_the_footer() {
    let err = open_err("bad-footer-checksum.vhd");
    assert!(
        matches!(
            err.kind(),
            ErrorKind::BadChecksum {
                what: "VHD footer",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.offset(),
        Some(len("bad-footer-checksum.vhd") - 512 + 64)
    );
}

#[test]
fn a_bad_dynamic_header_checksum_is_found_at_the_header() {
    let err = open_err("bad-header-checksum.vhd");
    assert!(
        matches!(
            err.kind(),
            ErrorKind::BadChecksum {
                what: "VHD dynamic header",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.offset(), Some(512 + 36));
}

#[test]
fn a_bat_entry_past_the_end_of_the_file_names_the_entry() {
    let err = open_err("bad-bat-past-end.vhd");
    let ErrorKind::BatEntryPastEnd {
        index: 0,
        start,
        limit,
        ..
    } = *err.kind()
    else {
        panic!("{err}");
    };
    assert_eq!(start, 0x00FF_FF00 * 512);
    assert_eq!(limit, len("bad-bat-past-end.vhd") - 512);
    assert_eq!(err.offset(), Some(BAT));
}

#[test]
fn overlapping_blocks_name_both_entries() {
    let err = open_err("bad-overlapping-blocks.vhd");
    let ErrorKind::OverlappingBlocks {
        first: 0, second, ..
    } = *err.kind()
    else {
        panic!("{err}");
    };
    assert!(second > 0);
    assert_eq!(err.offset(), Some(BAT + u64::from(second) * 4));
}

#[test]
fn a_block_size_that_is_not_a_power_of_two_is_refused() {
    let err = open_err("bad-block-size.vhd");
    assert!(
        matches!(err.kind(), ErrorKind::BadBlockSize(196_608)),
        "{err}"
    );
    assert_eq!(err.offset(), Some(512 + 32));
}

#[test]
fn too_few_bat_entries_for_the_size_is_refused() {
    let err = open_err("bad-too-few-bat-entries.vhd");
    assert!(
        matches!(
            err.kind(),
            ErrorKind::TooFewBatEntries {
                entries: 64,
                needed: 128,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.offset(), Some(512 + 28));
}

#[test]
fn a_missing_parent_is_refused() {
    let err = open_err("orphan/child.vhd");
    assert!(
        matches!(err.kind(), ErrorKind::MissingParent { .. }),
        "{err}"
    );
}

#[test]
fn a_parent_with_the_wrong_unique_id_is_refused() {
    let err = open_err("wrongid/child.vhd");
    let ErrorKind::ParentIdMismatch {
        parent,
        expected,
        found,
    } = err.kind()
    else {
        panic!("{err}");
    };
    assert!(parent.ends_with("wrongid/base.vhd"));
    assert_ne!(expected, found);
}

#[test]
fn a_loop_in_the_parent_chain_is_refused() {
    let err = VhdImage::open(&fixtures().join("loop/x3.vhd")).unwrap_err();
    let ErrorKind::ParentLoop { path } = err.kind() else {
        panic!("{err}");
    };
    assert!(path.ends_with("loop/x3.vhd"), "{path:?}");
    assert!(err.to_string().contains("loop/x2.vhd"), "{err}");
}

#[test]
fn a_corrupt_vhd_is_never_mistaken_for_a_raw_image() {
    for name in [
        "bad-footer-checksum.vhd",
        "bad-bat-past-end.vhd",
        "bad-truncated.vhd",
    ] {
        let err = vsnap_formats::open(&fixtures().join(name), None).unwrap_err();
        assert!(!matches!(err.kind(), ErrorKind::Io(_)), "{name}: {err}");
    }
}

#[test]
fn a_dynamic_disk_whose_trailing_footer_was_lost_opens_from_its_copy() {
    // A crash while appending a block can leave the end of the file without
    // a footer; qemu reads the copy at offset 0, and so must we.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    let mut bytes = std::fs::read(fixtures().join("dynamic-16k.vhd")).unwrap();
    let n = bytes.len();
    bytes[n - 512..n - 504].copy_from_slice(b"garbage!");
    std::fs::write(&path, &bytes).unwrap();
    let img = VhdImage::open(&path).unwrap();
    assert_eq!(img.virtual_size(), 2 << 20);
    assert!(img.top().warnings()[0].contains("using the copy at offset 0"));
    let good = VhdImage::open(Path::new(&fixtures().join("dynamic-16k.vhd"))).unwrap();
    let (mut a, mut b) = (vec![0u8; 2 << 20], vec![0u8; 2 << 20]);
    img.read_at(&mut a, 0).unwrap();
    good.read_at(&mut b, 0).unwrap();
    assert!(a == b);
}
