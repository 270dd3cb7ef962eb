//! Forgetting snapshots, and what both garbage collectors share: the
//! options, the report, and the mark (what the snapshots reference). Each
//! layout sweeps by its own rule: a directory's under the repository lock
//! (`dir/gc.rs`), a bucket's beside running backups, by leases
//! (`bucket/gc.rs`); [`crate::gc`] asks the repository's backend.

use std::collections::HashSet;

use serde::Serialize;

use super::{Damaged, Repository};
use crate::error::Result;

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
    repo.sync_snapshots()?;
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
    /// Manifests and indexes that could not be read. With any, what the
    /// snapshots reference is not known, so gc deletes no chunk, index,
    /// pack or base: it reports them, and clears only what no snapshot
    /// can name (see [`crate::quarantine`]).
    pub damaged: Vec<Damaged>,
}

/// `e`, met reading `what` at `path`, as damage for gc to report; an
/// error that is not damage (a store out of reach) stops gc.
pub(super) fn damage(
    e: crate::Error,
    what: &'static str,
    path: std::path::PathBuf,
) -> Result<Damaged> {
    if e.is_damage() {
        // The path is said once, by the report's own field.
        let chain = vsnap_error::chain(&e);
        let prefix = format!("{}: ", path.display());
        let reason = chain
            .strip_prefix(&prefix)
            .map_or(chain.clone(), str::to_owned);
        Ok(Damaged { what, path, reason })
    } else {
        Err(e)
    }
}

/// Reads every manifest and every index they name.
pub(super) fn mark(repo: &Repository) -> Result<Marked> {
    let mut m = Marked {
        snapshots: 0,
        chunks: HashSet::new(),
        indexes: HashSet::new(),
        bases: HashSet::new(),
        damaged: Vec::new(),
    };
    for listed in repo.list()? {
        let manifest = match listed.manifest {
            Ok(manifest) => manifest,
            Err(e) => {
                m.damaged.push(damage(
                    e.during("gc: read every manifest"),
                    "manifest",
                    listed.path,
                )?);
                continue;
            }
        };
        m.snapshots += 1;
        m.bases.extend(bases_of(&manifest).map(|b| b.path));
        for disk in &manifest.disks {
            m.indexes.insert(disk.index.clone());
            let index = match repo.read_index(disk) {
                Ok(index) => index,
                Err(e) => {
                    let path = e
                        .path()
                        .map(ToOwned::to_owned)
                        .unwrap_or_else(|| listed.path.clone());
                    let mut d = damage(e.during("gc: read every index"), "index", path)?;
                    d.reason = format!("named by snapshot {}: {}", listed.id, d.reason);
                    m.damaged.push(d);
                    continue;
                }
            };
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
    /// In a bucket: packs the pack indexes named that the bucket no
    /// longer holds (lost, not deleted by gc): their records are dropped,
    /// and verify reports the snapshots the loss hits.
    pub packs_lost: u64,
    /// In a bucket: mostly dead packs whose live chunks this run copied
    /// into new packs, and condemned.
    pub packs_repacked: u64,
    /// In a bucket: packs whose every live chunk another pack that stays
    /// holds too (backups that raced stored the same chunks), condemned
    /// with the dead ones.
    pub packs_duplicate: u64,
    pub chunks_repacked: u64,
    /// Stored bytes those copies wrote.
    pub bytes_repacked: u64,
    pub stale_leases_removed: u64,
    /// Backups running while gc ran, by their leases.
    pub running_backups: u64,
    /// Manifests, indexes and pack indexes gc could not read. With any,
    /// gc deleted no chunk, index, pack or base (what the damaged ones
    /// reference is unknown); `vsnap repo quarantine` moves each aside.
    pub damaged: Vec<Damaged>,
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
