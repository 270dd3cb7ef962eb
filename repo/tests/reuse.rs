//! An incremental backup takes the cells tracking found unchanged from the
//! snapshot before, unread, and must come out exactly as a full backup of
//! the same disk: the same index (entries, piece map, leaves) and the same
//! digest, `b3sum` of the disk.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vsnap_engine::pipeline::{Options, Progress};
use vsnap_formats::raw::RawImage;
use vsnap_formats::DiskImage;
use vsnap_repo::backup::{DiskTracking, Reuse};
use vsnap_repo::{
    backup_all, BackupOptions, Consistency, Disk, Index, Manifest, Repository, SnapshotPlan,
};

const CELL: u64 = 64 << 10;
const CELLS: u64 = 32;

fn options() -> Options {
    Options {
        chunk_size: CELL,
        threads: 2,
        zero_cache: None,
        ..Options::default()
    }
}

fn backup(repo: &Repository, path: &Path, tracking: Vec<DiskTracking>) -> Manifest {
    let image = RawImage::open(path).unwrap();
    let plan = SnapshotPlan {
        images: vec![&image as &dyn DiskImage],
        sources: vec![path.to_path_buf()],
        options: BackupOptions {
            vm: "vm".into(),
            host: "h".into(),
            consistency: Consistency::CrashConsistent,
            freeze: None,
            level: 1,
            known: Default::default(),
        },
        tracking,
    };
    let mut out = backup_all(repo, &[plan], &options(), &Progress::default(), &|_, _| {}).unwrap();
    out.pop().unwrap().unwrap().manifest
}

fn disk(m: &Manifest) -> &Disk {
    &m.disks[0]
}

fn write(path: &Path, at: u64, bytes: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(bytes, at)
        .unwrap();
}

/// Every cell holds distinct data, but cell 9, which is all zeros.
fn image(dir: &Path) -> PathBuf {
    let path = dir.join("d.raw");
    let bytes: Vec<u8> = (0..CELL * CELLS)
        .map(|i| match i / CELL {
            9 => 0,
            cell => (i / 512) as u8 ^ (cell as u8).wrapping_mul(37) ^ 0x5a,
        })
        .collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

fn reuse(repo: &Repository, before: &Manifest, changed: &[u64]) -> DiskTracking {
    DiskTracking {
        reuse: Some(Reuse {
            since: before.id.clone(),
            index: repo.read_index(disk(before)).unwrap(),
            unchanged: (0..CELLS).map(|c| !changed.contains(&c)).collect(),
        }),
        fallback: None,
        base: None,
    }
}

fn same_index(repo: &Repository, a: &Manifest, b: &Manifest) -> Index {
    let (x, y) = (
        repo.read_index(disk(a)).unwrap(),
        repo.read_index(disk(b)).unwrap(),
    );
    assert_eq!(x, y, "the indexes differ");
    assert_eq!(disk(a).index, disk(b).index);
    x
}

#[test]
fn unchanged_cells_come_from_the_snapshot_before_and_the_result_is_a_full_backups() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(&dir.path().join("repo"), CELL).unwrap();
    let path = image(dir.path());
    let first = backup(&repo, &path, Vec::new());

    // Cell 3 rewritten, cell 5 zeroed, cell 9 (zeros) given data, and one
    // byte of cell 31 changed.
    write(&path, 3 * CELL + 100, &[1u8; 5000]);
    write(&path, 5 * CELL, &vec![0u8; CELL as usize]);
    write(&path, 9 * CELL + 7, b"data");
    write(&path, 31 * CELL + CELL - 1, &[0xff]);
    let changed = [3, 5, 9, 31];
    let full = backup(&repo, &path, Vec::new());
    let inc = backup(&repo, &path, vec![reuse(&repo, &first, &changed)]);

    let b3 = blake3::hash(&std::fs::read(&path).unwrap())
        .to_hex()
        .to_string();
    assert_eq!(disk(&full).digest, b3);
    assert_eq!(
        disk(&inc).digest,
        b3,
        "the incremental digest is b3sum of the disk"
    );
    let index = same_index(&repo, &full, &inc);
    assert!(index.leaves.is_some() && index.pieces.is_some());

    // Only the changed cells were read; the rest were taken unread.
    let (f, i) = (&disk(&full).stats, &disk(&inc).stats);
    assert_eq!(f.bytes_read, CELL * CELLS);
    assert_eq!(i.bytes_read, CELL * changed.len() as u64);
    assert_eq!(
        (i.data_chunks, i.zero_chunks),
        (f.data_chunks, f.zero_chunks)
    );
    let t = disk(&inc).tracking.as_ref().unwrap();
    assert_eq!(t.since.as_deref(), Some(first.id.as_str()));
    assert_eq!(t.reused_cells, CELLS - changed.len() as u64);
    assert_eq!(t.fallback, None);
    assert!(disk(&full).tracking.is_none());

    // verify proves it like any other snapshot.
    let report = vsnap_repo::verify::verify(
        &repo,
        std::slice::from_ref(&inc.id),
        2,
        None,
        &Progress::default(),
    )
    .unwrap();
    assert!(report.ok(), "{:?}", report.problems);
}

#[test]
fn a_cell_whose_chunk_is_gone_is_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(&dir.path().join("repo"), CELL).unwrap();
    let path = image(dir.path());
    let first = backup(&repo, &path, Vec::new());
    let index = repo.read_index(disk(&first)).unwrap();
    // Cell 4's chunk removed (gc, or rot moved aside by verify).
    let vsnap_repo::Entry::Data(id) = index.entries[4] else {
        panic!("cell 4 is data");
    };
    let hex = id.to_hex();
    std::fs::remove_file(
        dir.path()
            .join("repo/chunks")
            .join(&hex[..2])
            .join(hex.as_str()),
    )
    .unwrap();
    let inc = backup(&repo, &path, vec![reuse(&repo, &first, &[])]);
    assert_eq!(disk(&inc).stats.bytes_read, CELL, "cell 4 alone is read");
    assert_eq!(disk(&inc).stats.new_chunks, 1, "and stored again");
    assert_eq!(
        disk(&inc).tracking.as_ref().unwrap().reused_cells,
        CELLS - 1
    );
    let full = backup(&repo, &path, Vec::new());
    same_index(&repo, &full, &inc);
    assert!(repo.has_chunk(&id).unwrap());
}

#[test]
fn an_index_that_does_not_fit_the_disk_reuses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(&dir.path().join("repo"), CELL).unwrap();
    let path = image(dir.path());
    let first = backup(&repo, &path, Vec::new());
    // The disk grew by a cell: the index before covers another disk.
    write(&path, CELL * CELLS, &[3u8; CELL as usize]);
    let mut t = reuse(&repo, &first, &[]);
    if let Some(r) = t.reuse.as_mut() {
        r.unchanged.push(false);
    }
    let inc = backup(&repo, &path, vec![t]);
    assert_eq!(disk(&inc).stats.bytes_read, CELL * (CELLS + 1));
    assert_eq!(disk(&inc).tracking.as_ref().unwrap().reused_cells, 0);
    let b3 = blake3::hash(&std::fs::read(&path).unwrap())
        .to_hex()
        .to_string();
    assert_eq!(disk(&inc).digest, b3);
}
