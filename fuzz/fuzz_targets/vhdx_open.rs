//! The whole VHDX open path over in-memory bytes: headers, log replay,
//! region table, metadata, BAT validation, the allocation map, and reads of
//! the first and last sectors. Nothing may panic.
#![no_main]

use std::path::Path;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vsnap_formats::vhdx::VhdxImage;
use vsnap_formats::storage::MemStorage;

fuzz_target!(|data: &[u8]| {
    let storage = Arc::new(MemStorage::new(data.to_vec()));
    let Ok(image) = VhdxImage::from_storage(storage, Path::new("fuzz.vhdx")) else {
        return;
    };
    vsnap_formats::exercise(&image);
});
