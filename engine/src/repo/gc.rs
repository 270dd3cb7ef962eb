//! Forgetting snapshots and collecting what no snapshot uses any more.
//!
//! gc deletes only while it holds the repository lock alone. Backups hold
//! it shared for their whole run, so while gc deletes no backup is running,
//! and none can have decided to reuse a chunk that gc then removes. gc
//! marks from the manifests it reads after taking the lock, so snapshots
//! committed while it waited are kept too.

use std::collections::HashSet;
use std::path::Path;

use serde::Serialize;

use super::Repository;
use crate::error::{Error, ErrorKind, Result, ResultExt};

/// Removes snapshots' manifests; their chunks stay until gc.
pub fn forget(repo: &Repository, ids: &[String]) -> Result<Vec<String>> {
    let mut gone = Vec::new();
    for prefix in ids {
        let m = repo.find(prefix)?;
        let path = repo.manifest_path(&m.id);
        std::fs::remove_file(&path).ctx_file(&path, "remove manifest")?;
        gone.push(m.id);
    }
    super::sync_dir(&repo.root().join("snapshots"))?;
    Ok(gone)
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub snapshots: usize,
    pub chunks_kept: u64,
    pub chunks_removed: u64,
    pub indexes_removed: u64,
    pub temporary_removed: u64,
    /// Bytes freed, chunks, indexes and temporary files together.
    pub bytes_freed: u64,
}

/// Removes every chunk and index that no snapshot references, and the
/// temporary files of backups that died. `wait`: wait for running backups
/// to end; otherwise fail at once if one is running.
pub fn gc(repo: &Repository, wait: bool) -> Result<GcReport> {
    let Some(_lock) = repo.lock_exclusive(wait)? else {
        return Err(Error::from(ErrorKind::InvalidArgument(
            "a backup is running; run gc when it ends, or without --no-wait to wait for it".into(),
        ))
        .in_file(repo.root()));
    };
    let mut report = GcReport::default();
    let mut chunks: HashSet<blake3::Hash> = HashSet::new();
    let mut indexes: HashSet<String> = HashSet::new();
    for listed in repo.list()? {
        // Deleting with a snapshot unreadable would delete its chunks:
        // a damaged manifest stops gc until verify or forget deals with it.
        let m = listed
            .manifest
            .map_err(|e| e.during("gc: read every manifest"))?;
        report.snapshots += 1;
        for disk in &m.disks {
            let index = repo
                .read_index(&disk.index)
                .map_err(|e| e.during("gc: read every index"))?;
            indexes.insert(disk.index.clone());
            for e in &index.entries {
                if let super::Entry::Data(id) = e {
                    chunks.insert(*id);
                }
            }
        }
    }
    let remove = |path: &Path, counter: &mut u64, bytes: &mut u64| -> Result<()> {
        let len = path.metadata().map(|m| m.len()).unwrap_or(0);
        std::fs::remove_file(path).ctx_file(path, "gc: remove")?;
        *counter += 1;
        *bytes += len;
        Ok(())
    };
    let mut freed = 0u64;
    let chunk_root = repo.root().join("chunks");
    for prefix in std::fs::read_dir(&chunk_root).ctx_file(&chunk_root, "gc: list chunks")? {
        let dir = prefix.ctx_file(&chunk_root, "gc: list chunks")?.path();
        if !dir.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(&dir).ctx_file(&dir, "gc: list chunks")? {
            let path = entry.ctx_file(&dir, "gc: list chunks")?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let id = name.as_deref().and_then(|n| blake3::Hash::from_hex(n).ok());
            match id {
                Some(id) if chunks.contains(&id) => report.chunks_kept += 1,
                // Unreferenced chunks, and bad ones verify moved aside.
                _ => remove(&path, &mut report.chunks_removed, &mut freed)?,
            }
        }
    }
    let index_root = repo.root().join("indexes");
    for entry in std::fs::read_dir(&index_root).ctx_file(&index_root, "gc: list indexes")? {
        let path = entry.ctx_file(&index_root, "gc: list indexes")?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if !name.is_some_and(|n| indexes.contains(&n)) {
            remove(&path, &mut report.indexes_removed, &mut freed)?;
        }
    }
    // No backup runs: every temporary file is a dead one's.
    let tmp_root = repo.root().join("tmp");
    for entry in std::fs::read_dir(&tmp_root).ctx_file(&tmp_root, "gc: list tmp")? {
        let path = entry.ctx_file(&tmp_root, "gc: list tmp")?.path();
        remove(&path, &mut report.temporary_removed, &mut freed)?;
    }
    report.bytes_freed = freed;
    repo.sync_all()?;
    Ok(report)
}
