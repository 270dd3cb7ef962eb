//! Copying snapshots from one repository into another: a directory to a
//! bucket for the off-site copy, a bucket back to a directory, or any
//! other pair with the same chunk grid.
//!
//! Only what the destination lacks is copied: snapshots it has are
//! skipped, and so are chunks it holds already (any snapshot's). Every
//! chunk is read with a restore's checks (CRC, decompression, BLAKE3 of
//! its plaintext against its name) before it is written, as it was stored,
//! so damage in the source is never carried over. Each snapshot commits
//! as a backup does: chunks, then indexes, then (made durable and
//! findable) its manifest, byte for byte the source's. A sync killed at
//! any point leaves whole snapshots and reusable chunks; run again, it goes
//! on from there. Within a long snapshot the destination is flushed every
//! [`FLUSH_EVERY`] bytes, so a bucket keeps what was uploaded before the
//! kill findable too.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use super::{Entry, Repository};
use crate::error::{Error, ErrorKind, Result};
use vsnap_engine::pipeline::Progress;

/// A destination is flushed after about this many bytes copied into it.
const FLUSH_EVERY: u64 = 1 << 30;

#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Snapshot ids or unique prefixes to copy; every one when empty.
    pub only: Vec<String>,
    /// Chunks copied at once: reads from a bucket and uploads to one wait
    /// on the network, so more than the cores pays.
    pub threads: usize,
}

/// A snapshot that was not copied, and why.
#[derive(Debug, Clone, Serialize)]
pub struct SyncFailure {
    pub snapshot: String,
    pub error: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncReport {
    /// Snapshots in the source that were asked for.
    pub snapshots: usize,
    /// Those copied by this run, oldest first.
    pub copied: Vec<String>,
    /// Those the destination had already.
    pub present: usize,
    pub chunks_copied: u64,
    /// Chunks the copied snapshots name that the destination had.
    pub chunks_present: u64,
    /// Stored (compressed) bytes written into the destination.
    pub bytes_copied: u64,
    /// Plaintext bytes of the chunks copied.
    pub plain_bytes_copied: u64,
    pub failed: Vec<SyncFailure>,
    /// Objects of the destination that could not be used (a pack its
    /// pack index names that the bucket lost, say): the chunks they held
    /// counted as absent, and were copied again where a snapshot needed
    /// them.
    pub damage_met: Vec<String>,
}

impl SyncReport {
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

fn poisoned() -> Error {
    Error::worker_panicked()
}

/// Copies the snapshots of `src` that `dst` lacks into `dst`. A snapshot
/// that cannot be copied (its manifest, an index or a chunk is damaged or
/// missing in the source) is reported in [`SyncReport::failed`] and the
/// others are copied; an error that stops every snapshot (a repository
/// that cannot be reached, grids that differ) is returned.
pub fn sync(
    src: &Repository,
    dst: &Repository,
    opts: &SyncOptions,
    progress: &Progress,
) -> Result<SyncReport> {
    let (from, to) = (src.config().chunk_size, dst.config().chunk_size);
    if from != to {
        return Err(Error::from(ErrorKind::InvalidArgument(format!(
            "the source's chunks are {from} bytes and the destination's {to}: a snapshot's index only fits a repository with its grid; make the destination with `vsnap repo init --chunk-size {from}`"
        )))
        .in_file(dst.root()));
    }
    if src.is_bucket() == dst.is_bucket() && src.root() == dst.root() {
        return Err(Error::from(ErrorKind::InvalidArgument(
            "the source and the destination are the same repository".into(),
        ))
        .in_file(dst.root()));
    }
    // A lease (or shared lock) on each side: gc of either waits for, or
    // keeps clear of, what this run reads and writes.
    let _src_lock = src.lock_shared()?;
    let _dst_lock = dst.lock_shared()?;
    let listed = src.list_only(&opts.only)?;
    let there: HashSet<String> = dst.list()?.into_iter().map(|l| l.id).collect();
    let mut report = SyncReport::default();
    for l in listed {
        report.snapshots += 1;
        if there.contains(&l.id) {
            match same_snapshot(src, dst, &l.id) {
                Ok(()) => report.present += 1,
                Err(e) => report.failed.push(SyncFailure {
                    snapshot: l.id,
                    error: e.to_string(),
                }),
            }
            continue;
        }
        match copy_snapshot(src, dst, &l.id, opts.threads.max(1), progress, &mut report) {
            Ok(()) => report.copied.push(l.id),
            Err(e) => report.failed.push(SyncFailure {
                snapshot: l.id,
                error: e.to_string(),
            }),
        }
    }
    report.damage_met = dst
        .damaged_objects()?
        .iter()
        .map(ToString::to_string)
        .collect();
    Ok(report)
}

/// A snapshot id both sides have must be one snapshot: the destination's
/// manifest is never replaced, so a different one there is reported.
fn same_snapshot(src: &Repository, dst: &Repository, id: &str) -> Result<()> {
    let (mine, _) = src.read_manifest_bytes(id)?;
    let (theirs, _) = dst
        .read_manifest_bytes(id)
        .map_err(|e| e.during("read the destination's manifest"))?;
    if mine.self_blake3 != theirs.self_blake3 {
        return Err(Error::from(ErrorKind::Exists(
            dst.display(&format!("snapshots/{id}.json")),
        ))
        .during("compare with the source's manifest"));
    }
    Ok(())
}

/// Copies one snapshot's missing chunks, its indexes, then its manifest.
fn copy_snapshot(
    src: &Repository,
    dst: &Repository,
    id: &str,
    threads: usize,
    progress: &Progress,
    report: &mut SyncReport,
) -> Result<()> {
    let (manifest, bytes) = src.read_manifest_bytes(id)?;
    let mut indexes = Vec::with_capacity(manifest.disks.len());
    let mut chunks: HashMap<blake3::Hash, u64> = HashMap::new();
    for disk in &manifest.disks {
        let index = src
            .read_index(disk)
            .map_err(|e| e.during("read the source's index"))?;
        for (i, e) in index.entries.iter().enumerate() {
            if let Entry::Data(c) = e {
                chunks.insert(*c, index.range(i).1);
            }
        }
        indexes.push(index);
    }
    let mut todo = Vec::new();
    for (c, len) in chunks {
        if dst.has_chunk(&c)? {
            report.chunks_present += 1;
        } else {
            todo.push((src.chunk_inode(&c), c, len));
        }
    }
    // In the order the source holds them: a directory's inodes, or a
    // bucket's packs, so neighbouring chunks share one ranged read.
    todo.sort_unstable_by_key(|t| (t.0, *t.1.as_bytes()));
    src.plan_reads(todo.iter().map(|t| &t.1))?;
    let plain: u64 = todo.iter().map(|t| t.2).sum();
    Progress::add(&progress.total, plain);
    let copied = copy_chunks(src, dst, &todo, threads, progress)?;
    report.chunks_copied += todo.len() as u64;
    report.bytes_copied += copied;
    report.plain_bytes_copied += plain;
    for (disk, index) in manifest.disks.iter().zip(&indexes) {
        let name = dst.write_index(index)?;
        if name.to_hex().as_str() != disk.index {
            return Err(Error::from(ErrorKind::DigestMismatch {
                what: "index",
                expected: disk.index.clone().into(),
                found: name.to_hex().to_string().into(),
            })
            .during("write the destination's index"));
        }
    }
    dst.sync_all()?;
    dst.place_manifest(id, &bytes)
}

/// Copies `todo` (order key, chunk, plaintext length) with `threads`
/// workers; the first error stops them all. Returns the bytes written.
fn copy_chunks(
    src: &Repository,
    dst: &Repository,
    todo: &[(u64, blake3::Hash, u64)],
    threads: usize,
    progress: &Progress,
) -> Result<u64> {
    let next = AtomicUsize::new(0);
    let written = AtomicU64::new(0);
    let since_flush = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let work = || -> Result<()> {
        let mut stored = Vec::new();
        let mut plain = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let Some(&(_, c, len)) = todo.get(next.fetch_add(1, Ordering::Relaxed)) else {
                return Ok(());
            };
            let len_usize = usize::try_from(len).map_err(|_| {
                Error::from(ErrorKind::TooLarge {
                    what: "chunk",
                    claimed: len,
                    limit: usize::MAX as u64,
                })
            })?;
            plain.resize(len_usize, 0);
            let n = dst
                .copy_chunk_from(src, &c, &mut stored, &mut plain)
                .map_err(|e| e.during("copy chunk"))?;
            written.fetch_add(n, Ordering::Relaxed);
            Progress::add(&progress.done, len);
            Progress::add(&progress.read, stored.len() as u64);
            let before = since_flush.fetch_add(n, Ordering::Relaxed);
            if before / FLUSH_EVERY != (before + n) / FLUSH_EVERY {
                dst.sync_all()?;
            }
        }
        Ok(())
    };
    std::thread::scope(|s| {
        for _ in 0..threads.min(todo.len().max(1)) {
            s.spawn(|| {
                if let Err(e) = work() {
                    stop.store(true, Ordering::Relaxed);
                    if let Ok(mut slot) = first_error.lock() {
                        slot.get_or_insert(e);
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().map_err(|_| poisoned())? {
        return Err(e);
    }
    Ok(written.into_inner())
}
