//! The VHDX parsers on arbitrary bytes: they must return, never panic.
//! Checksums are patched in before parsing, so the fuzzer reaches what
//! lies behind them instead of stopping at the CRC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vsnap_formats::vhdx::log::{parse_entry, replay, LOG_SECTOR};
use vsnap_formats::vhdx::parse::*;

fn with_crc(data: &[u8], len: usize) -> Vec<u8> {
    let mut b = data.to_vec();
    b.resize(len, 0);
    let crc = crc_with_field_zeroed(&b, 4);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    b
}

fuzz_target!(|data: &[u8]| {
    let _ = parse_identifier(data);
    let _ = parse_header(data, "header");
    let _ = parse_header(&with_crc(data, HEADER_SIZE), "header");
    let _ = parse_region_table(&with_crc(data, REGION_TABLE_SIZE));
    if let Ok(md) = parse_metadata(data) {
        let ratio = chunk_ratio(md.logical_sector_size, md.block_size);
        let n = bat_entries(md.virtual_size, md.block_size, md.logical_sector_size, md.has_parent);
        let _ = (payload_bat_index(n, ratio), bitmap_bat_index(n, ratio));
    }
    // The log: one entry with its CRC made good, and the whole input as a
    // circular log for the entry's GUID.
    if data.len() >= 48 {
        let guid = Guid(data[32..48].try_into().unwrap_or([0; 16]));
        let len = (data.len() / LOG_SECTOR).max(1) * LOG_SECTOR;
        let _ = parse_entry(&with_crc(data, len), guid);
        let mut log = data.to_vec();
        log.resize(len, 0);
        let _ = replay(&log, guid);
    }
    for (i, w) in data.chunks_exact(8).enumerate() {
        let raw = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
        let _ = parse_payload_entry(raw, i as u64);
    }
});
