//! What an operation reports, as the CLI's `--json` and the service print
//! it: the shapes scripts rely on, built once from the manifests.

use std::path::PathBuf;

use serde::Serialize;

use crate::backup::BackupOutcome;
use crate::manifest::{Manifest, Tracking};
use crate::store::Listed;
use crate::GuestMetrics;

/// One disk of a backup just taken.
#[derive(Debug, Clone, Serialize)]
pub struct BackedUpDisk {
    pub name: String,
    pub source: PathBuf,
    pub digest: String,
    pub virtual_size: u64,
    pub bytes_read: u64,
    pub data_chunks: u64,
    pub new_chunks: u64,
    pub new_bytes: u64,
    /// Changed-block tracking: the snapshot the unchanged cells came from
    /// and how many, or why the disk was read whole; and the base kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracking: Option<Tracking>,
}

/// A backup just taken: its snapshot, each disk, and the run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    pub snapshot: String,
    pub vm: String,
    pub host: String,
    pub time: String,
    pub consistency: &'static str,
    pub disks: Vec<BackedUpDisk>,
    pub bytes_read: u64,
    pub new_bytes: u64,
    /// Data chunks referenced per chunk newly stored; null when every
    /// chunk was known already.
    pub dedup_ratio: Option<f64>,
    pub duration_s: f64,
    pub throughput_bytes_per_s: f64,
    /// Objects of the repository the backup found it could not use, each
    /// "what at path: why"; what they held was stored again.
    pub damage_met: Vec<String>,
}

impl BackupReport {
    pub fn new(outcome: &BackupOutcome) -> BackupReport {
        let m = &outcome.manifest;
        let totals = m.totals();
        let secs = outcome.duration.as_secs_f64().max(1e-9);
        BackupReport {
            snapshot: m.id.clone(),
            vm: m.vm.clone(),
            host: m.host.clone(),
            time: m.time.clone(),
            consistency: m.consistency.name(),
            disks: m
                .disks
                .iter()
                .map(|d| BackedUpDisk {
                    name: d.name.clone(),
                    source: d.source.clone(),
                    digest: d.digest.clone(),
                    virtual_size: d.virtual_size,
                    bytes_read: d.stats.bytes_read,
                    data_chunks: d.stats.data_chunks,
                    new_chunks: d.stats.new_chunks,
                    new_bytes: d.stats.new_bytes,
                    tracking: d.tracking.clone(),
                })
                .collect(),
            bytes_read: totals.bytes_read,
            new_bytes: totals.new_bytes,
            dedup_ratio: (totals.new_chunks > 0)
                .then(|| totals.data_chunks as f64 / totals.new_chunks as f64),
            duration_s: secs,
            throughput_bytes_per_s: totals.virtual_bytes as f64 / secs,
            damage_met: outcome.damage_met.iter().map(ToString::to_string).collect(),
        }
    }
}

impl Manifest {
    /// What the guest's agent measured of the freeze, for a snapshot
    /// taken with one.
    pub fn guest(&self) -> Option<&GuestMetrics> {
        self.freeze.as_ref().map(|f| &f.guest)
    }
}

/// A snapshot as a listing shows it: the manifest whole, with the
/// guest's freeze window and stall beside it; or why it cannot be read.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum SnapshotEntry {
    Ok {
        #[serde(flatten)]
        manifest: Box<Manifest>,
        /// The guest's freeze window, from the coordinator's metrics;
        /// null for a snapshot taken without one.
        freeze_window_us: Option<u64>,
        /// What the guest's application waited (quiescing's start to
        /// FITHAW's return); null without an agent that says.
        stall_us: Option<u64>,
    },
    Bad {
        id: String,
        error: String,
    },
}

impl From<Listed> for SnapshotEntry {
    fn from(l: Listed) -> SnapshotEntry {
        match l.manifest {
            Ok(m) => SnapshotEntry::Ok {
                freeze_window_us: m.guest().and_then(|g| g.freeze_window_us),
                stall_us: m.guest().and_then(|g| g.stall_us),
                manifest: Box::new(m),
            },
            Err(e) => SnapshotEntry::Bad {
                id: l.id,
                error: e.to_string(),
            },
        }
    }
}
