//! The pure parsers on arbitrary bytes: they must return, never panic, and
//! what they accept must serialise back to bytes they accept again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vsnap_formats::vhd::{bat, DynamicHeader, Footer};

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = Footer::parse(data) {
        let again = Footer::parse(&f.to_bytes()).ok();
        assert_eq!(again.as_ref(), Some(&f));
        let _ = f.disk_size();
    }
    if let Ok(h) = DynamicHeader::parse(data) {
        let _ = DynamicHeader::parse(&h.to_bytes());
    }
    let entries = u32::try_from(data.len() / 4).unwrap_or(0);
    if let Ok(table) = bat::parse_bat(data, entries) {
        let _ = bat::validate_bat(&table, 4096, 1 << 40, &[]);
    }
});
