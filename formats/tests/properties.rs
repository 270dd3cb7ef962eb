//! Property tests over in-memory images, so they run thousands of cases in
//! seconds: random writes agree with a model of the disk, and mutated valid
//! images never make the open path panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use vsnap_formats::storage::{MemStorage, Storage};
use vsnap_formats::vhd::create::create_in;
use vsnap_formats::vhd::{CreateOptions, DiskType, Footer, VhdImage};
use vsnap_formats::ExtentKind;

#[derive(Debug, Clone)]
struct Write {
    /// Fractions of the disk, so every case fits whatever size was drawn.
    at: f64,
    len: usize,
    byte: u8,
}

fn writes() -> impl Strategy<Value = Vec<Write>> {
    prop::collection::vec(
        (0.0..1.0f64, 1usize..20_000, any::<u8>()).prop_map(|(at, len, byte)| Write {
            at,
            len,
            byte,
        }),
        1..24,
    )
}

fn disk() -> impl Strategy<Value = (DiskType, u64, u32)> {
    (
        prop_oneof![Just(DiskType::Fixed), Just(DiskType::Dynamic)],
        1u64..2048, // sectors
        prop_oneof![Just(4096u32), Just(8192), Just(65536)],
    )
        .prop_map(|(t, sectors, bs)| (t, sectors * 512, bs))
}

fn check(image: &VhdImage, model: &[u8]) {
    let mut got = vec![0u8; model.len()];
    image.read_at(&mut got, 0).unwrap();
    assert!(got == model, "image and model differ");
    // Unallocated ranges of the map really are zero.
    let map = image.allocation_map().unwrap();
    assert_eq!(map.size(), model.len() as u64);
    for e in map.extents().iter().filter(|e| e.kind != ExtentKind::Data) {
        let range = e.offset as usize..e.end() as usize;
        assert!(model[range].iter().all(|&b| b == 0), "{e:?} holds data");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn random_writes_agree_with_a_model((disk_type, size, block_size) in disk(), ops in writes()) {
        let storage = Arc::new(MemStorage::default());
        let mut opts = CreateOptions::new(disk_type, size);
        opts.block_size = block_size;
        let mut image = create_in(storage.clone(), Path::new("mem.vhd"), &opts).unwrap();
        let mut model = vec![0u8; size as usize];
        for w in &ops {
            let at = ((w.at * size as f64) as u64).min(size - 1);
            let len = w.len.min((size - at) as usize);
            let data = vec![w.byte; len];
            image.write_at(&data, at).unwrap();
            model[at as usize..at as usize + len].copy_from_slice(&data);
        }
        check(&image, &model);
        // What is on "disk" reopens to the same content: nothing lived
        // only in memory.
        let reopened = Arc::new(MemStorage::new(storage.to_vec().unwrap()));
        let image = VhdImage::from_storage(reopened, Path::new("mem.vhd")).unwrap();
        check(&image, &model);
    }

    #[test]
    fn footers_round_trip_byte_for_byte(bytes in prop::collection::vec(any::<u8>(), 512)) {
        let mut bytes = bytes;
        bytes[..8].copy_from_slice(b"conectix");
        bytes[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        bytes[60..64].copy_from_slice(&3u32.to_be_bytes());
        bytes[64..68].fill(0);
        let sum = !bytes.iter().fold(0u32, |s, &b| s.wrapping_add(b.into()));
        bytes[64..68].copy_from_slice(&sum.to_be_bytes());
        let footer = Footer::parse(&bytes).unwrap();
        prop_assert_eq!(&footer.to_bytes()[..], &bytes[..]);
    }
}

/// The valid images the mutation test starts from: the bundled fixtures
/// and a few made in memory with small blocks.
fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    SEEDS.get_or_init(make_seeds)
}

fn make_seeds() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = [
        "dynamic-16k.vhd",
        "fixed-force.vhd",
        "dynamic-empty.vhd",
        "chain/child1.vhd",
    ]
    .iter()
    .map(|n| std::fs::read(common::fixtures().join(n)).unwrap())
    .collect();
    for (t, bs) in [(DiskType::Dynamic, 4096u32), (DiskType::Fixed, 4096)] {
        let storage = Arc::new(MemStorage::default());
        let mut opts = CreateOptions::new(t, 64 << 10);
        opts.block_size = bs;
        let mut img = create_in(storage.clone(), Path::new("m.vhd"), &opts).unwrap();
        img.write_at(&[7; 5000], 3000).unwrap();
        out.push(storage.to_vec().unwrap());
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// A bounded, always-on cousin of the fuzz targets: flip bytes (biased
    /// towards the footer, header and BAT, where the parsers look), maybe
    /// truncate, then open, map and read. Errors are fine; panics are not.
    #[test]
    fn mutated_images_never_panic(
        seed in 0usize..6,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..12),
        cut in prop::option::weighted(0.1, any::<prop::sample::Index>()),
    ) {
        let seeds = seeds();
        let mut bytes = seeds[seed % seeds.len()].clone();
        let n = bytes.len();
        for (index, value, region) in flips {
            let at = match region {
                0 => n - 512 + index.index(512),             // trailing footer
                1 => 512 + index.index(1024.min(n - 512)),   // dynamic header
                2 => 1536 + index.index((n - 1536).min(2048)), // BAT and first block
                _ => index.index(n),
            };
            bytes[at.min(n - 1)] = value;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(n));
        }
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::new(bytes));
        if let Ok(image) = VhdImage::from_storage(storage, Path::new("mutant.vhd")) {
            vsnap_formats::exercise(&image);
        }
    }
}
