//! The virtual-disk digest equals `b3sum` of `qemu-img convert -O raw`:
//! the promise that lets auditors check vsnap with stock tools.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../formats/tests/common/mod.rs"]
mod common;

use std::path::Path;

use common::*;
use vsnap_engine::io::IoMode;
use vsnap_engine::pipeline::{
    hash_images, run as run_pipeline, Buffer, ChunkKind, ChunkRecord, Options, Progress, Sink,
    Stored,
};
use vsnap_formats::DiskImage;

fn b3sum(path: &Path) -> String {
    run("b3sum", &["--no-names", p(path)]).trim().to_owned()
}

fn vsnap_digests(paths: &[&Path], opts: &Options) -> Vec<String> {
    let images: Vec<Box<dyn DiskImage>> = paths
        .iter()
        .map(|p| vsnap_formats::open(p, None).unwrap())
        .collect();
    let refs: Vec<&dyn DiskImage> = images.iter().map(|b| &**b).collect();
    let progress = Progress::default();
    let out = hash_images(&refs, opts, &progress).unwrap();
    let size: u64 = refs.iter().map(|i| i.virtual_size()).sum();
    assert_eq!(
        Progress::get(&progress.done),
        size,
        "progress reaches the total"
    );
    out.iter().map(|d| d.digest.to_hex().to_string()).collect()
}

#[test]
fn fixture_digests_equal_b3sum_of_the_qemu_raw_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let names = [
        "fixed-qemu.vhd",
        "fixed-force.vhd",
        "dynamic-16k.vhd",
        "dynamic-empty.vhd",
        "chain/base.vhd",
    ];
    let paths: Vec<_> = names.iter().map(|n| fixtures().join(n)).collect();
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    // Small chunks so even the fixtures span many leaves of the tree.
    for chunk_size in [1024, 64 << 10, 4 << 20] {
        let opts = Options {
            chunk_size,
            ..Options::default()
        };
        let ours = vsnap_digests(&refs, &opts);
        for (path, digest) in paths.iter().zip(&ours) {
            let raw = dir.path().join("x.raw");
            qemu_to_raw(path, &raw);
            assert_eq!(
                *digest,
                b3sum(&raw),
                "{} at chunk size {chunk_size}",
                path.display()
            );
        }
    }
}

#[test]
fn a_multi_gib_sparse_disk_hashes_like_b3sum_without_reading_its_holes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.vhd");
    qemu_create(&path, "subformat=dynamic,force_size=on", "5G");
    for (byte, off) in [(0x11u8, 0u64), (0x22, 3 << 30), (0x33, (5 << 30) - 4096)] {
        qemu_write(&path, byte, off, 4096);
    }
    let raw = dir.path().join("big.raw");
    qemu_to_raw(&path, &raw);
    let image = vsnap_formats::open(&path, None).unwrap();
    let progress = Progress::default();
    let opts = Options {
        keep_chunks: true,
        ..Options::default()
    };
    let d = &hash_images(&[&*image], &opts, &progress).unwrap()[0];
    assert_eq!(d.digest.to_hex().to_string(), b3sum(&raw));
    // Three allocated 2 MiB blocks, each inside one 4 MiB chunk: only those
    // blocks were read.
    assert_eq!(d.data_chunks, 3);
    assert_eq!(Progress::get(&progress.read), 3 * (2 << 20));
    assert_eq!(d.bytes_read, 3 * (2 << 20));
    assert_eq!(d.unallocated_chunks, (5 << 30) / (4 << 20) - 3);
    let ids: Vec<_> = d
        .chunks
        .iter()
        .filter(|c| c.kind == ChunkKind::Data)
        .map(|c| c.id.unwrap())
        .collect();
    assert_eq!(ids.len(), 3);
    assert_ne!(ids[0], ids[1], "chunk identities differ with content");
    // The zero-leaf cache changes nothing, cold or warm.
    let cache = std::sync::Arc::new(vsnap_engine::digest::ZeroCache::in_memory(4 << 20));
    let cached = Options {
        zero_cache: Some(cache.clone()),
        ..Options::default()
    };
    for _ in 0..2 {
        let again = &hash_images(&[&*image], &cached, &Progress::default()).unwrap()[0];
        assert_eq!(again.digest, d.digest);
    }
    assert_eq!(cache.len() as u64, d.unallocated_chunks);
}

#[test]
fn a_raw_image_and_its_vhd_have_the_same_digest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    qemu_create(&path, "subformat=dynamic", "40M");
    qemu_write(&path, 0x5a, 7 << 20, 3 << 20);
    let raw = dir.path().join("d.raw");
    qemu_to_raw(&path, &raw);
    let opts = Options::default();
    let digests = vsnap_digests(&[&path, &raw], &opts);
    assert_eq!(digests[0], digests[1]);
    assert_eq!(digests[0], b3sum(&raw));
}

#[test]
fn thread_counts_do_not_change_the_digest_and_zero_chunks_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z.vhd");
    qemu_create(&path, "subformat=dynamic", "20M");
    qemu_write(&path, 0x00, 0, 4 << 20); // allocated, but zeros
    qemu_write(&path, 0x7f, 9 << 20, 1);
    let mut seen = Vec::new();
    for threads in [1, 2, 7] {
        let opts = Options {
            threads,
            keep_chunks: true,
            ..Options::default()
        };
        let image = vsnap_formats::open(&path, None).unwrap();
        let d = &hash_images(&[&*image], &opts, &Progress::default()).unwrap()[0];
        assert_eq!(d.zero_chunks, 1, "the allocated zero chunk is detected");
        assert_eq!(d.data_chunks, 1);
        seen.push(d.digest);
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn a_read_error_names_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.vhd");
    qemu_create(&path, "subformat=fixed", "8M");
    let image = vsnap_formats::open(&path, None).unwrap();
    // Truncate after opening: the read in the middle must fail clearly.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    // Either read engine: they handle short reads and end of file themselves.
    for io in [IoMode::Sync, IoMode::Uring] {
        let opts = Options {
            io,
            ..Options::default()
        };
        let err = hash_images(&[&*image], &opts, &Progress::default()).unwrap_err();
        assert!(err.to_string().contains("t.vhd"), "{io:?}: {err}");
        assert!(
            matches!(
                err.format_kind(),
                Some(vsnap_formats::ErrorKind::Truncated { .. })
            ),
            "{io:?}: {err}"
        );
    }
}

#[test]
fn a_source_truncated_during_a_copy_fails_naming_it_and_leaves_no_files() {
    use vsnap_engine::pipeline::{copy_images, CopySpec, TargetFormat};
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.vhd");
    qemu_create(&src, "subformat=fixed", "32M");
    qemu_write(&src, 0x42, 0, 32 << 20);
    let image = vsnap_formats::open(&src, None).unwrap();
    // Opened whole; then cut in the middle of the data, as a source that
    // changes under a copy would be.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    // Every target format, with both read engines.
    for format in [
        TargetFormat::Raw,
        TargetFormat::FixedVhd,
        TargetFormat::DynamicVhd,
    ] {
        for io in [IoMode::Sync, IoMode::Uring] {
            let spec = CopySpec {
                target: out.join("copy"),
                format,
                replace: false,
                expect: None,
                durable: true,
            };
            let opts = Options {
                io,
                ..Options::default()
            };
            let err = copy_images(&[&*image], &[spec], &opts, &Progress::default()).unwrap_err();
            assert!(err.to_string().contains("src.vhd"), "{err}");
            let left: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
            assert!(left.is_empty(), "{format:?} left {left:?}");
        }
    }
}

#[test]
fn compression_in_the_same_pass_skips_zeros_and_keeps_incompressible_chunks_raw() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.vhd");
    qemu_create(&path, "subformat=dynamic", "16M");
    let text: Vec<u8> = b"the guest froze and thawed; "
        .iter()
        .copied()
        .cycle()
        .take(4 << 20)
        .collect();
    let mut img = vsnap_formats::vhd::VhdImage::open_rw(&path).unwrap();
    img.write_at(&text, 0).unwrap();
    img.write_at(&pattern(9, 4 << 20), 4 << 20).unwrap();
    img.write_at(&vec![0u8; 4 << 20], 8 << 20).unwrap();
    img.flush().unwrap();
    drop(img);
    let image = vsnap_formats::open(&path, None).unwrap();
    let opts = Options {
        compress: Some(1),
        keep_chunks: true,
        ..Options::default()
    };
    let d = &hash_images(&[&*image], &opts, &Progress::default()).unwrap()[0];
    let c = &d.chunks;
    assert_eq!(
        (c[0].kind, c[1].kind, c[2].kind, c[3].kind),
        (
            ChunkKind::Data,
            ChunkKind::Data,
            ChunkKind::Zero,
            ChunkKind::Unallocated
        )
    );
    assert!(
        c[0].stored.unwrap() < 64 << 10,
        "text compresses: {:?}",
        c[0].stored
    );
    assert_eq!(c[1].stored, Some(4 << 20), "random bytes are stored raw");
    assert_eq!(
        (c[2].stored, c[3].stored),
        (None, None),
        "zeros are never compressed"
    );
    assert_eq!(d.stored_bytes, c[0].stored.unwrap() + (4 << 20));
    // Compression changes nothing about the digest.
    let plain = &hash_images(&[&*image], &Options::default(), &Progress::default()).unwrap()[0];
    assert_eq!(plain.digest, d.digest);
}

/// A chunk as a sink saw it: the record, its bytes, its stored form.
type Got = (ChunkRecord, Option<Vec<u8>>, Option<Vec<u8>>);

/// A sink that keeps what the workers hand it, and skips one chunk as if
/// it held it already.
struct Collect {
    skip: blake3::Hash,
    got: std::sync::Mutex<Vec<Got>>,
}

impl Sink for Collect {
    fn wants_ids(&self) -> bool {
        true
    }
    fn wants_payload(&self, _: usize, record: &ChunkRecord) -> vsnap_engine::Result<bool> {
        Ok(record.id != Some(self.skip))
    }
    fn put(
        &self,
        _: usize,
        record: ChunkRecord,
        data: Option<Buffer>,
        stored: Option<Stored<'_>>,
    ) -> vsnap_engine::Result<()> {
        let stored = stored.map(|s| match s {
            Stored::Compressed(b) => b.to_vec(),
            Stored::Raw => b"raw".to_vec(),
        });
        let data = data.map(|d| d.to_vec());
        self.got.lock().unwrap().push((record, data, stored));
        Ok(())
    }
}

#[test]
fn the_sink_gets_each_data_chunk_compressed_or_raw_unless_it_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.raw");
    let chunk = 64 << 10;
    // Chunks: text, random, zeros, a hole, the text again (same id).
    let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog. "
        .iter()
        .copied()
        .cycle()
        .take(chunk)
        .collect();
    let mut disk = text.clone();
    disk.extend(pattern(7, chunk));
    disk.extend(vec![0u8; chunk]);
    std::fs::write(&path, &disk).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&text, 4 * chunk as u64).unwrap();
    drop(f);
    let image = vsnap_formats::open(&path, None).unwrap();
    let random_id = blake3::hash(&pattern(7, chunk));
    let sink = Collect {
        skip: random_id,
        got: Default::default(),
    };
    let opts = Options {
        chunk_size: chunk as u64,
        compress: Some(1),
        ..Options::default()
    };
    let map = image.allocation_map().unwrap();
    run_pipeline(&[&*image], &[map], &opts, &Progress::default(), &sink).unwrap();
    let mut got = sink.got.into_inner().unwrap();
    got.sort_by_key(|g| g.0.offset);
    let kinds: Vec<ChunkKind> = got.iter().map(|g| g.0.kind).collect();
    use ChunkKind::*;
    assert_eq!(kinds, [Data, Data, Zero, Unallocated, Data]);
    for (record, data, stored) in &got {
        match record.kind {
            Data => {
                let data = data.as_ref().unwrap();
                assert_eq!(record.id, Some(blake3::hash(data)));
                if record.id == Some(random_id) {
                    assert_eq!((stored, record.stored), (&None, None), "held already");
                    continue;
                }
                let frame = stored.as_ref().unwrap();
                assert_eq!(record.stored, Some(frame.len() as u64));
                assert!(frame.len() < chunk / 10, "text compresses");
                assert_eq!(zstd::decode_all(&frame[..]).unwrap(), *data);
            }
            _ => assert_eq!((record.id, stored), (None, &None), "{:?}", record.kind),
        }
    }
    assert!(got[3].1.is_none(), "a hole is never read");
}
