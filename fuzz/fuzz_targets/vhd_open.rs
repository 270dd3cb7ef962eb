//! The whole open path over in-memory bytes: parse, validate, build the
//! allocation map, and read the first and last sectors. Nothing may panic.
#![no_main]

use std::path::Path;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vsnap_formats::vhd::VhdImage;
use vsnap_formats::storage::MemStorage;

fuzz_target!(|data: &[u8]| {
    let storage = Arc::new(MemStorage::new(data.to_vec()));
    let Ok(image) = VhdImage::from_storage(storage, Path::new("fuzz.vhd")) else {
        return;
    };
    vsnap_formats::exercise(&image);
});
