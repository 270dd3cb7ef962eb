//! The VHDX parsers against images qemu-img wrote: every structure parses
//! with its CRC, and a block past the first chunk of payload entries is
//! found where the interleaving says (the mistake a published crate makes).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::FileExt;

use common::{p, run};
use vsnap_formats::vhdx::parse::*;

fn read(file: &std::fs::File, at: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    file.read_exact_at(&mut b, at).unwrap();
    b
}

#[test]
fn qemu_img_vhdx_structures_parse_and_the_bat_interleaves_by_the_chunk_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.vhdx");
    // 1 MiB blocks: a chunk ratio of 4096, so 8 GiB holds 8192 blocks and a
    // sector-bitmap entry sits among the payload entries.
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            "block_size=1M",
            p(&path),
            "8G",
        ],
    );
    let block = 5000u64;
    let cmd = format!("write -P 0x5a {} 65536", block << 20);
    run("qemu-io", &["-f", "vhdx", "-c", &cmd, p(&path)]);
    let f = std::fs::File::open(&path).unwrap();

    let creator = parse_identifier(&read(&f, 0, 520)).unwrap();
    assert!(creator.contains("QEMU"), "{creator:?}");
    let h1 = parse_header(&read(&f, HEADER_1_OFFSET, HEADER_SIZE), "VHDX header 1");
    let h2 = parse_header(&read(&f, HEADER_2_OFFSET, HEADER_SIZE), "VHDX header 2");
    let (_, header) = choose_header(h1, h2).unwrap();
    assert!(
        header.log_guid.is_zero(),
        "a clean image has no log to replay"
    );
    let regions = parse_region_table(&read(&f, REGION_TABLE_OFFSET, REGION_TABLE_SIZE)).unwrap();
    assert_eq!(
        regions,
        parse_region_table(&read(&f, REGION_TABLE_2_OFFSET, REGION_TABLE_SIZE)).unwrap()
    );
    let md = parse_metadata(&read(
        &f,
        regions.metadata.offset,
        regions.metadata.length as usize,
    ))
    .unwrap();
    assert_eq!(md.block_size, 1 << 20);
    assert_eq!(md.virtual_size, 8 << 30);
    assert_eq!(md.logical_sector_size, 512);
    assert!(!md.has_parent && md.parent_locator.is_none());

    let ratio = chunk_ratio(md.logical_sector_size, md.block_size);
    assert_eq!(ratio, 4096);
    let entries = bat_entries(
        md.virtual_size,
        md.block_size,
        md.logical_sector_size,
        md.has_parent,
    );
    // One sector-bitmap slot between the two chunks, none after the last.
    assert_eq!(entries, 8192 + 1);
    let bat = read(&f, regions.bat.offset, (entries * 8) as usize);
    let entry = |i: u64| {
        let at = (i * 8) as usize;
        u64::from_le_bytes(bat[at..at + 8].try_into().unwrap())
    };
    let mut present = Vec::new();
    for b in 0..8192u64 {
        let e = parse_payload_entry(entry(payload_bat_index(b, ratio)), b).unwrap();
        if e.state == PayloadState::FullyPresent {
            present.push((b, e.file_offset));
        }
    }
    assert_eq!(present.len(), 1, "{present:?}");
    let (b, offset) = present[0];
    assert_eq!(b, block);
    assert_eq!(read(&f, offset, 65536), vec![0x5a; 65536]);
    // The naive index (no interleaving) would have found nothing there.
    let naive = parse_payload_entry(entry(block), block).unwrap();
    assert_ne!(naive.state, PayloadState::FullyPresent);
}
