//! gc of a repository in a directory.
//!
//! gc deletes only while it holds the repository lock alone. Backups hold
//! it shared for their whole run, so while gc deletes no backup is running,
//! and none can have decided to reuse a chunk that gc then removes. gc
//! marks from the manifests it reads after taking the lock, so snapshots
//! committed while it waited are kept too.

use super::tree::Kind;
use super::Dir;
use crate::backend::Backend;
use crate::error::{Error, ErrorKind, Result};
use crate::gc::{mark, recorded_bases, GcOptions, GcReport};
use crate::Repository;

/// Removes every chunk and index that no snapshot references, and the
/// temporary files of backups that died. `wait`: wait for running backups
/// to end; otherwise fail at once if one is running.
pub(super) fn gc(dir: &Dir, repo: &Repository, opts: &GcOptions) -> Result<GcReport> {
    let Some(_lock) = dir.lock_exclusive(opts.wait)? else {
        return Err(Error::from(ErrorKind::InvalidArgument(
            "a backup is running; run gc when it ends, or without --no-wait to wait for it".into(),
        ))
        .in_file(repo.root()));
    };
    let mut report = GcReport::default();
    let marked = mark(repo)?;
    report.snapshots = marked.snapshots;
    let (chunks, indexes, bases) = (marked.chunks, marked.indexes, marked.bases);
    let tree = &dir.tree;
    let mut freed = 0u64;
    // Removes a name in the tree (a link itself, never what it points
    // at), counting the bytes a regular file held.
    let mut remove = |rel: &str, counter: &mut u64| -> Result<()> {
        freed += tree.remove(rel, "gc: remove")?;
        *counter += 1;
        Ok(())
    };
    // No backup runs: every temporary file is a dead one's, and no
    // snapshot names one.
    for entry in tree.list("tmp", "gc: list tmp")? {
        if entry.kind != Kind::Dir {
            remove(
                &format!("tmp/{}", entry.name),
                &mut report.temporary_removed,
            )?;
        }
    }
    if !marked.damaged.is_empty() {
        // What the damaged snapshots reference is unknown: every chunk,
        // index and base stays.
        report.damaged = marked.damaged;
        report.bytes_freed = freed;
        dir.sync_all()?;
        return Ok(report);
    }
    for prefix in tree.list("chunks", "gc: list chunks")? {
        if prefix.kind != Kind::Dir {
            // A link where a chunk directory belongs is damage for verify
            // to report; gc neither follows it nor removes it.
            continue;
        }
        let dir = format!("chunks/{}", prefix.name);
        for entry in tree.list(&dir, "gc: list chunks")? {
            let id = blake3::Hash::from_hex(&entry.name).ok();
            match id {
                Some(id) if chunks.contains(&id) && entry.kind == Kind::File => {
                    report.chunks_kept += 1
                }
                // Unreferenced chunks, bad ones verify moved aside, and
                // links or special files where chunks belong.
                _ if entry.kind != Kind::Dir => {
                    remove(&format!("{dir}/{}", entry.name), &mut report.chunks_removed)?
                }
                _ => {}
            }
        }
    }
    for entry in tree.list("indexes", "gc: list indexes")? {
        if entry.kind != Kind::Dir && !(entry.kind == Kind::File && indexes.contains(&entry.name)) {
            remove(
                &format!("indexes/{}", entry.name),
                &mut report.indexes_removed,
            )?;
        }
    }
    report.bases_removed = crate::bases::sweep_bases(repo, &bases, &|| recorded_bases(repo))?;
    report.bytes_freed = freed;
    dir.sync_all()?;
    Ok(report)
}
