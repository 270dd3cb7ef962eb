//! The coordinated backup, end to end, as one call: open the repository,
//! learn each VM's known chunks, then the session (identify, prepare,
//! freeze, snapshot, thaw), then every VM's snapshots streamed in one
//! engine run, each VM's manifest written as soon as its own disks are
//! done, then the snapshots released and every guest told how it went.
//!
//! The CLI, `vsnap demo`, `vsnap bench freeze` and the service all run
//! backups through [`run`]; what they print is theirs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use vsnap_engine::pipeline::{Progress, Tuning};
use vsnap_repo::cbt::Tracked;
use vsnap_repo::{
    backup_all, disk_names, BackupOptions, Manifest, Repository, SnapshotPlan, Totals,
};

use crate::error::{Error, ErrorKind, Result};
use crate::inventory::Vm;
use crate::provider::{Choice, Kind};
use crate::session::{self, VmSnapshot};

/// What to back up, where, and how.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The VMs, in the order the report lists them.
    pub vms: Vec<Vm>,
    /// The chunk size the caller expects; a repository with another is
    /// refused ([`ErrorKind::ChunkSize`]). `None` takes the repository's.
    pub chunk_size: Option<u64>,
    /// First freeze to last thaw; also every agent's hold limit.
    pub window: Duration,
    pub provider: Choice,
    /// zstd level for new chunks.
    pub level: i32,
    pub tuning: Tuning,
    /// The clock every `*_at_us` metric counts from; the run's start when
    /// `None`. A benchmark passes its own, to line freezes up with what
    /// its workloads saw.
    pub epoch: Option<Instant>,
    /// The program that guards qemu-ga guests' freezes (the `vsnap`
    /// binary, which runs [`crate::qga_guard::serve`]); `None` freezes
    /// them unguarded.
    pub guard: Option<PathBuf>,
    /// Changed-block tracking: each reflink snapshot is kept as its disk's
    /// base for the next backup, which reads only the cells that changed
    /// since (see [`vsnap_repo::cbt`]). Other providers' snapshots share
    /// no blocks with the disk to compare, and are read whole.
    pub track: bool,
}

impl Plan {
    /// A plan with the defaults of `vsnap backup --inventory`.
    pub fn new(vms: Vec<Vm>) -> Plan {
        Plan {
            vms,
            chunk_size: None,
            window: Duration::from_secs(10),
            provider: Choice::Auto,
            level: 1,
            tuning: Tuning::default(),
            epoch: None,
            guard: None,
            track: true,
        }
    }
}

/// What the engine did for the VMs it streamed.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Streamed {
    /// Chunks known before the freeze, from each VM's last snapshot.
    pub preloaded_chunks: u64,
    pub virtual_bytes: u64,
    pub bytes_read: u64,
    /// Chunks changed-block tracking found unchanged, taken unread.
    pub reused_chunks: u64,
    pub new_bytes: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub session: session::Report,
    pub streamed: Streamed,
    /// Each VM's committed snapshot's totals, by VM name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub totals: BTreeMap<String, Totals>,
    /// What did not stop the backup but should be said (a zero-leaf cache
    /// that could not be saved).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl Report {
    /// Why the backup failed, if it did: aborted (every guest thawed,
    /// nothing written), or some VMs without a snapshot.
    pub fn failure(&self) -> Option<String> {
        if let Some(why) = &self.session.aborted {
            return Some(format!(
                "backup aborted before any snapshot was used, nothing written, every guest this run froze thawed: {why}"
            ));
        }
        let failed: Vec<String> = self
            .session
            .vms
            .iter()
            .filter_map(|v| v.error.as_ref().map(|e| format!("vm {}: {e}", v.vm)))
            .collect();
        (!failed.is_empty()).then(|| failed.join("; "))
    }
}

/// Runs one coordinated backup. `progress` counts the streaming;
/// `cancel`, once set (by a SIGINT handler, say), stops the backup by
/// the abort rules: every guest thawed at once, no manifest. An `Err`
/// means nothing was frozen; an abort after the guests were touched is a
/// [`Report`] whose session says why. Needs a multi-threaded tokio
/// runtime: the engine's work runs in `block_in_place`.
pub async fn run(
    plan: &Plan,
    repo: &Repository,
    progress: &Progress,
    cancel: Arc<AtomicBool>,
) -> Result<Report> {
    // Slow work first: the repository is open, and each VM's last
    // snapshot's chunks are known, before any guest freezes.
    let have = repo.config().chunk_size;
    if let Some(want) = plan.chunk_size.filter(|&w| w != have) {
        return Err(ErrorKind::ChunkSize {
            repo: repo.root().to_path_buf(),
            have,
            want,
        }
        .into());
    }
    let names: Vec<&str> = plan.vms.iter().map(|v| v.name.as_str()).collect();
    let preloaded = repo.preload(&names)?;
    let opts = plan
        .tuning
        .options(false, have)
        .map_err(vsnap_repo::Error::from)?;
    let host = vsnap_repo::host_name();
    let mut totals = BTreeMap::new();
    let mut streamed = Streamed {
        preloaded_chunks: preloaded.known.values().map(|k| k.len() as u64).sum(),
        ..Streamed::default()
    };
    // Every disk of every VM streams in one engine run: a VM does not wait
    // for the one before it, and each VM's manifest is written as soon as
    // its own disks are done.
    let stream = |items: &[VmSnapshot]| {
        let t = Instant::now();
        let mut results: Vec<Option<std::result::Result<String, String>>> = vec![None; items.len()];
        let mut opened: Vec<Vec<Tracked>> = Vec::new();
        let mut which = Vec::new();
        for (k, it) in items.iter().enumerate() {
            if cancel.load(Ordering::Relaxed) {
                results[k] = Some(Err("interrupted before its backup".to_string()));
                continue;
            }
            // Each VM's snapshots as the preload listed them, before the
            // freeze.
            let history = preloaded.history.get(&it.vm).map_or(&[][..], Vec::as_slice);
            match open_disks(repo, history, it, plan.track) {
                Ok(disks) => {
                    opened.push(disks);
                    which.push(k);
                }
                Err(e) => results[k] = Some(Err(e.to_string())),
            }
        }
        let plans: Vec<SnapshotPlan<'_>> = which
            .iter()
            .zip(&opened)
            .map(|(&k, disks)| {
                let it = &items[k];
                SnapshotPlan {
                    images: disks.iter().map(|d| &*d.image).collect(),
                    sources: it.sources.clone(),
                    options: BackupOptions {
                        known: preloaded.known.get(&it.vm).cloned().unwrap_or_default(),
                        vm: it.vm.clone(),
                        host: host.clone(),
                        consistency: it.consistency,
                        freeze: Some(it.freeze.clone()),
                        level: plan.level,
                    },
                    // Without tracking the manifest says nothing of it,
                    // as for `vsnap backup --no-track`.
                    tracking: if plan.track {
                        disks.iter().map(|d| d.tracking.clone()).collect()
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect();
        let mut committed = vec![false; opened.len()];
        if !plans.is_empty() {
            match backup_all(repo, &plans, &opts, progress, &|_, _| {}) {
                Ok(outcomes) => {
                    for ((&k, outcome), done) in which.iter().zip(outcomes).zip(&mut committed) {
                        *done = outcome.is_ok();
                        results[k] = Some(match outcome {
                            Ok(o) => {
                                let t = o.manifest.totals();
                                streamed.virtual_bytes += t.virtual_bytes;
                                streamed.bytes_read += t.bytes_read;
                                streamed.new_bytes += t.new_bytes;
                                streamed.reused_chunks += t.reused_chunks;
                                totals.insert(o.manifest.vm.clone(), t);
                                Ok(o.manifest.id)
                            }
                            Err(e) => Err(e.to_string()),
                        });
                    }
                }
                Err(e) => {
                    for &k in &which {
                        results[k] = Some(Err(e.to_string()));
                    }
                }
            }
        }
        drop(plans);
        for (disks, ok) in opened.into_iter().zip(committed) {
            for d in disks {
                // On success the base before goes (the new snapshot is the
                // base now), on failure the new clone. A file that could
                // not be removed is only space: an old base goes when its
                // snapshot is forgotten, a failed backup's clone with gc.
                let _ = d.finish(ok);
            }
        }
        streamed.seconds = t.elapsed().as_secs_f64();
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err("not streamed".to_string())))
            .collect::<Vec<_>>()
    };
    let sopts = session::Options {
        window: plan.window,
        provider: plan.provider,
        backup_type: "full".into(),
        epoch: plan.epoch,
        cancel: Some(Arc::clone(&cancel)),
        guard: plan.guard.clone(),
    };
    let session = session::run(plan.vms.clone(), &sopts, stream).await?;
    let mut warnings = Vec::new();
    if let Some(cache) = &opts.zero_cache {
        if let Err(e) = cache.save() {
            warnings.push(e.to_string());
        }
    }
    Ok(Report {
        session,
        streamed,
        totals,
        warnings,
    })
}

/// A VM's snapshots opened for its backup, given its snapshots before
/// (`history`, oldest first): with tracking, each reflink snapshot is adopted as the disk's next base and compared with the one
/// before; any other is read whole, saying why.
fn open_disks(
    repo: &Repository,
    history: &[Manifest],
    it: &VmSnapshot,
    track: bool,
) -> vsnap_repo::Result<Vec<Tracked>> {
    let names = disk_names(&it.sources);
    let mut out: Vec<Tracked> = Vec::new();
    for (k, snapshot) in it.snapshots.iter().enumerate() {
        let kind = it.kinds.get(k).copied();
        let disk = match (track, kind, it.sources.get(k), names.get(k)) {
            (true, Some(Kind::Reflink), Some(source), Some(name)) => {
                vsnap_repo::cbt::adopt(repo, history, name, source, snapshot, None)
            }
            (true, kind, _, _) => vsnap_formats::open(snapshot, None).map_err(Into::into).map(|image| {
                let why = match kind {
                    Some(Kind::Qmp) => "the qmp provider's snapshot is the disk under an overlay, which keeps no base",
                    _ => "the copy provider's snapshot shares no blocks with the disk to compare",
                };
                Tracked::untracked(image, format!("{why}; the disk is read whole"))
            }),
            (false, ..) => vsnap_formats::open(snapshot, None)
                .map_err(Into::into)
                .map(|image| Tracked::untracked(image, "tracking is off".into())),
        };
        match disk {
            Ok(d) => out.push(d),
            Err(e) => {
                for d in out {
                    let _ = d.finish(false);
                }
                return Err(e);
            }
        }
    }
    Ok(out)
}

impl From<vsnap_repo::Error> for Error {
    fn from(e: vsnap_repo::Error) -> Self {
        Error::new(ErrorKind::Engine(Box::new(e)))
    }
}
