//! Forgetting snapshots and collecting what no snapshot uses any more.
//!
//! gc deletes only while it holds the repository lock alone. Backups hold
//! it shared for their whole run, so while gc deletes no backup is running,
//! and none can have decided to reuse a chunk that gc then removes. gc
//! marks from the manifests it reads after taking the lock, so snapshots
//! committed while it waited are kept too.

use std::collections::HashSet;

use serde::Serialize;

use super::tree::Kind;
use super::Repository;
use crate::error::{Error, ErrorKind, Result};

/// Removes snapshots' manifests; their chunks stay until gc. A manifest is
/// removed by the name of its file, which a valid manifest's id equals;
/// a damaged one is refused, naming the manifest and what is wrong.
pub fn forget(repo: &Repository, ids: &[String]) -> Result<Vec<String>> {
    let mut gone = Vec::new();
    let mut bases = Vec::new();
    for prefix in ids {
        let m = repo.find(prefix)?;
        repo.remove_manifest(&m.id)?;
        bases.extend(bases_of(&m));
        gone.push(m.id);
    }
    if let super::Backing::Dir(tree) = &repo.backing {
        tree.sync_dir("snapshots")?;
    }
    // A base stands for its snapshot's content: with the snapshot gone it
    // can serve no backup. Only a file where vsnap keeps bases, and still
    // the one recorded, is removed.
    for b in &bases {
        crate::bases::release(b)?;
    }
    Ok(gone)
}

/// The bases the snapshots record now, every manifest read.
pub(super) fn recorded_bases(repo: &Repository) -> Result<HashSet<std::path::PathBuf>> {
    let mut out = HashSet::new();
    for listed in repo.list()? {
        let manifest = listed
            .manifest
            .map_err(|e| e.during("gc: read every manifest"))?;
        out.extend(bases_of(&manifest).map(|b| b.path));
    }
    Ok(out)
}

fn bases_of(m: &super::Manifest) -> impl Iterator<Item = super::BaseRecord> + '_ {
    m.disks
        .iter()
        .filter_map(|d| d.tracking.as_ref().and_then(|t| t.base.clone()))
}

/// What the snapshots reference, as gc's mark finds it.
pub(super) struct Marked {
    pub snapshots: usize,
    pub chunks: HashSet<blake3::Hash>,
    /// Index names.
    pub indexes: HashSet<String>,
    /// Kept clones the snapshots record.
    pub bases: HashSet<std::path::PathBuf>,
}

/// Reads every manifest and every index they name. Deleting with a
/// snapshot unreadable would delete its chunks: a damaged manifest or
/// index stops gc until verify or forget deals with it.
pub(super) fn mark(repo: &Repository) -> Result<Marked> {
    let mut m = Marked {
        snapshots: 0,
        chunks: HashSet::new(),
        indexes: HashSet::new(),
        bases: HashSet::new(),
    };
    for listed in repo.list()? {
        let manifest = listed
            .manifest
            .map_err(|e| e.during("gc: read every manifest"))?;
        m.snapshots += 1;
        m.bases.extend(bases_of(&manifest).map(|b| b.path));
        for disk in &manifest.disks {
            let index = repo
                .read_index(disk)
                .map_err(|e| e.during("gc: read every index"))?;
            m.indexes.insert(disk.index.clone());
            for e in &index.entries {
                if let super::Entry::Data(id) = e {
                    m.chunks.insert(*id);
                }
            }
        }
    }
    Ok(m)
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub snapshots: usize,
    pub chunks_kept: u64,
    pub chunks_removed: u64,
    pub indexes_removed: u64,
    pub temporary_removed: u64,
    /// Kept clones in the `.vsnap-base` directories the snapshots name
    /// that no snapshot records (a backup killed before its commit).
    pub bases_removed: u64,
    /// Bytes freed, chunks, indexes and temporary files together.
    pub bytes_freed: u64,
    /// In a bucket: packs found dead and condemned by this run, deleted
    /// by a later one (docs/repository.md has the rule).
    pub packs_condemned: u64,
    /// In a bucket: packs deleted, condemned ones and unindexed ones.
    pub packs_removed: u64,
    /// In a bucket: condemned packs kept for now, because a backup that
    /// began before their condemnation still runs or the grace period
    /// has not passed.
    pub packs_waiting: u64,
    /// In a bucket: unindexed packs too young to remove (a running
    /// backup's, perhaps).
    pub packs_young: u64,
    pub pack_indexes_rewritten: u64,
    /// In a bucket: mostly dead packs whose live chunks this run copied
    /// into new packs, and condemned.
    pub packs_repacked: u64,
    pub chunks_repacked: u64,
    /// Stored bytes those copies wrote.
    pub bytes_repacked: u64,
    pub stale_leases_removed: u64,
    /// Backups running while gc ran, by their leases.
    pub running_backups: u64,
}

/// How gc runs.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// In a directory: wait for running backups to end; otherwise fail at
    /// once if one is running.
    pub wait: bool,
    /// In a bucket: nothing younger than this is removed or condemned,
    /// and a condemnation is this old before its packs go.
    pub grace: std::time::Duration,
    /// In a bucket: a pack whose live chunks fill less than this percent
    /// of it is repacked; 0 never repacks.
    pub repack_below: u8,
}

/// The default share under which a pack is repacked: half. A pack more
/// than half dead costs more to keep than its live half costs to copy
/// once (a PUT and a GET per pack, against storage paid every month).
pub const DEFAULT_REPACK_BELOW: u8 = 50;

/// The default grace period in a bucket.
pub const DEFAULT_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            wait: true,
            grace: DEFAULT_GRACE,
            repack_below: DEFAULT_REPACK_BELOW,
        }
    }
}

/// Removes every chunk and index that no snapshot references, and the
/// temporary files of backups that died. `wait`: wait for running backups
/// to end; otherwise fail at once if one is running.
///
/// In a bucket gc takes no lock: it runs beside backups, by the lease
/// rule of [`super::bucket_gc`].
pub fn gc(repo: &Repository, opts: &GcOptions) -> Result<GcReport> {
    if let super::Backing::Bucket(b) = &repo.backing {
        return super::bucket_gc::gc(repo, b, opts);
    }
    let Some(_lock) = repo.lock_exclusive(opts.wait)? else {
        return Err(Error::from(ErrorKind::InvalidArgument(
            "a backup is running; run gc when it ends, or without --no-wait to wait for it".into(),
        ))
        .in_file(repo.root()));
    };
    let mut report = GcReport::default();
    let marked = mark(repo)?;
    report.snapshots = marked.snapshots;
    let (chunks, indexes, bases) = (marked.chunks, marked.indexes, marked.bases);
    let tree = repo.tree("gc")?;
    let mut freed = 0u64;
    // Removes a name in the tree (a link itself, never what it points
    // at), counting the bytes a regular file held.
    let mut remove = |rel: &str, counter: &mut u64| -> Result<()> {
        freed += tree.remove(rel, "gc: remove")?;
        *counter += 1;
        Ok(())
    };
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
    // No backup runs: every temporary file is a dead one's.
    for entry in tree.list("tmp", "gc: list tmp")? {
        if entry.kind != Kind::Dir {
            remove(
                &format!("tmp/{}", entry.name),
                &mut report.temporary_removed,
            )?;
        }
    }
    report.bases_removed = crate::bases::sweep_bases(repo, &bases, &|| recorded_bases(repo))?;
    report.bytes_freed = freed;
    repo.sync_all()?;
    Ok(report)
}
