//! Several snapshots in one engine run: each is committed on its own, and
//! a failure of one snapshot's disk fails that snapshot only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use vsnap_engine::pipeline::{Options, Progress};
use vsnap_formats::raw::RawImage;
use vsnap_formats::{AllocationMap, DiskImage, ImageFormat, ImageInfo};
use vsnap_repo::{backup_all, BackupOptions, Consistency, Repository, SnapshotPlan};

/// A real raw image whose reads fail past `fail_from`: a disk that goes
/// bad in the middle of a run, which no file here can be made to do.
#[derive(Debug)]
struct Failing {
    inner: RawImage,
    fail_from: u64,
}

impl DiskImage for Failing {
    fn format(&self) -> ImageFormat {
        self.inner.format()
    }
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn allocation_map(&self) -> vsnap_formats::Result<AllocationMap> {
        self.inner.allocation_map()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> vsnap_formats::Result<()> {
        if offset + buf.len() as u64 > self.fail_from {
            return Err(std::io::Error::from_raw_os_error(5).into());
        }
        self.inner.read_at(buf, offset)
    }
    fn info(&self) -> vsnap_formats::Result<ImageInfo> {
        self.inner.info()
    }
    fn layer_paths(&self) -> Vec<PathBuf> {
        Vec::new()
    }
}

fn raw(dir: &Path, name: &str, size: usize, seed: u8) -> PathBuf {
    let path = dir.join(name);
    let bytes: Vec<u8> = (0..size)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

fn plan<'a>(vm: &str, images: Vec<&'a dyn DiskImage>, sources: Vec<PathBuf>) -> SnapshotPlan<'a> {
    SnapshotPlan {
        images,
        sources,
        options: BackupOptions {
            vm: vm.into(),
            host: "h".into(),
            consistency: Consistency::CrashConsistent,
            freeze: None,
            level: 1,
            known: Default::default(),
        },
        tracking: Vec::new(),
    }
}

#[test]
fn one_snapshot_failing_leaves_the_others_committed() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(&dir.path().join("repo"), 64 << 10).unwrap();
    let a = raw(dir.path(), "a.raw", 1 << 20, 1);
    let b = raw(dir.path(), "b.raw", 1 << 20, 2);
    let c = raw(dir.path(), "c.raw", 1 << 20, 3);
    let d = raw(dir.path(), "d.raw", 1 << 20, 4);
    let ia = RawImage::open(&a).unwrap();
    let ib = Failing {
        inner: RawImage::open(&b).unwrap(),
        fail_from: 512 << 10,
    };
    let ic = RawImage::open(&c).unwrap();
    // d is cut short after it was opened: its map fails before the run.
    let id = RawImage::open(&d).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&d)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let plans = vec![
        plan("a", vec![&ia], vec![a.clone()]),
        plan("b", vec![&ib, &ic], vec![b.clone(), c.clone()]),
        plan("c", vec![&ic], vec![c.clone()]),
        plan("d", vec![&id], vec![d.clone()]),
    ];
    let seen = Mutex::new(Vec::new());
    let opts = Options {
        chunk_size: 64 << 10,
        threads: 2,
        zero_cache: None,
        ..Options::default()
    };
    let out = backup_all(&repo, &plans, &opts, &Progress::default(), &|g, r| {
        seen.lock().unwrap().push((g, r.is_ok()));
    })
    .unwrap();
    assert_eq!(out.len(), 4);
    assert!(out[0].is_ok(), "{:?}", out[0].as_ref().err());
    let e = out[1].as_ref().unwrap_err();
    assert!(
        matches!(e.format_kind(), Some(vsnap_formats::ErrorKind::Io(_))),
        "{e}"
    );
    assert!(out[2].is_ok());
    let e = out[3].as_ref().unwrap_err();
    assert!(e.to_string().contains("d.raw"), "{e}");
    let mut seen = seen.into_inner().unwrap();
    seen.sort();
    assert_eq!(seen, vec![(0, true), (1, false), (2, true), (3, false)]);
    // Exactly the two committed snapshots are in the repository, readable.
    let listed = repo.list().unwrap();
    let vms: Vec<String> = listed
        .iter()
        .map(|l| l.manifest.as_ref().unwrap().vm.clone())
        .collect();
    assert_eq!(vms.len(), 2, "{vms:?}");
    assert!(vms.contains(&"a".to_string()) && vms.contains(&"c".to_string()));
    let a_digest = blake3::hash(&std::fs::read(&a).unwrap())
        .to_hex()
        .to_string();
    assert_eq!(out[0].as_ref().unwrap().manifest.disks[0].digest, a_digest);
}
