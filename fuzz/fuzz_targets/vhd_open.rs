//! The whole open path over in-memory bytes: parse, validate, build the
//! allocation map, and read the first and last sectors. Nothing may panic.
#![no_main]

use std::path::Path;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vsnap_engine::format::vhd::VhdImage;
use vsnap_engine::io::MemStorage;

fuzz_target!(|data: &[u8]| {
    let storage = Arc::new(MemStorage::new(data.to_vec()));
    let Ok(image) = VhdImage::from_storage(storage, Path::new("fuzz.vhd")) else {
        return;
    };
    let _ = image.allocation_map();
    let size = image.virtual_size();
    let mut buf = vec![0u8; 4096];
    for at in [0, size.saturating_sub(4096) / 512 * 512] {
        let n = 4096.min(size.saturating_sub(at)) as usize;
        let _ = image.read_at(&mut buf[..n], at);
    }
});
