//! What a run does: a backup (the coordinated backup, its retention, gc)
//! or a verify (every chunk of the snapshots it covers re-read and
//! checked, skipping those verified recently enough).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use vsnap_coordinator::backup::{self, Plan};
use vsnap_repo::retention;

use crate::config::Job;
use crate::core::{Active, Ended, Service};
use crate::error::{ErrorKind, Result};
use crate::state::{RunState, VmResult};

/// One backup run: the coordinated backup, then per VM its retention,
/// then gc.
pub(crate) async fn backup(svc: Arc<Service>, job: Job, a: Active) -> Result<Ended> {
    #[cfg(feature = "failpoints")]
    fail::fail_point!("serve-job-panic");
    let cfg = &svc.config;
    let vms = job
        .vms
        .iter()
        .filter_map(|n| cfg.vms.iter().find(|v| &v.name == n).cloned())
        .collect();
    let mut plan = Plan::new(vms);
    plan.provider = job.provider;
    plan.window = job.window;
    plan.guard = svc.guard.clone();
    // The zero-leaf cache the CLI uses: a sparse disk then costs time in
    // proportion to its data here too.
    plan.tuning.cache_dir = vsnap_engine::pipeline::cache_dir();
    let repo = tokio::task::block_in_place(|| svc.repo.session())
        .map_err(|e| crate::Error::from(ErrorKind::Engine(Box::new(e))))?;
    let report = backup::run(&plan, &repo, &a.progress, Arc::clone(&a.cancel)).await;
    // Whatever the outcome, snapshots may have been committed.
    svc.repo.changed();
    // The test suite's build: a pause once the snapshots are committed,
    // before retention and gc, for a cancel to arrive in.
    #[cfg(feature = "failpoints")]
    tokio::task::block_in_place(|| fail::fail_point!("serve-after-commit"));
    let report = report.map_err(|e| crate::Error::from(ErrorKind::Backup(Box::new(e))))?;
    let vms: Vec<VmResult> = report
        .session
        .vms
        .iter()
        .map(|v| {
            let mut r = VmResult {
                vm: v.vm.clone(),
                snapshot: v.snapshot.clone(),
                consistency: v.consistency.map(str::to_string),
                error: v.error.clone(),
                freeze_window_us: v.metrics.freeze_window_us,
                stall_us: v.metrics.stall_us,
                host_window_us: v.metrics.host_window_us,
                ..VmResult::default()
            };
            if let Some(t) = report.totals.get(&v.vm) {
                r.virtual_bytes = t.virtual_bytes;
                r.bytes_read = t.bytes_read;
                r.new_bytes = t.new_bytes;
            }
            r
        })
        .collect();
    if let Some(why) = report.failure() {
        let state = if a.cancel.load(Ordering::Relaxed) {
            RunState::Cancelled
        } else {
            RunState::Failed
        };
        return Ok(Ended {
            state,
            error: Some(why),
            note: None,
            vms,
        });
    }
    let mut notes = Vec::new();
    // A cancel that came once every snapshot was committed: the backup
    // stands; what follows it (retention, gc) is its next safe point.
    if a.cancel.load(Ordering::Relaxed) {
        if job.keep.is_some() || job.gc {
            return Ok(Ended {
                state: RunState::Cancelled,
                error: None,
                note: Some(
                    "cancelled after every snapshot was committed (they stand); retention and gc did not run"
                        .into(),
                ),
                vms,
            });
        }
        notes.push(
            "the cancel came too late: every snapshot was committed before it took effect".into(),
        );
    }
    if let Some(keep) = &job.keep {
        let work = || -> vsnap_repo::Result<usize> {
            let planned = retention::forget_by_policy(&repo, keep, &job.vms, false)?;
            Ok(planned.iter().filter(|p| !p.keep).count())
        };
        let removed = tokio::task::block_in_place(work);
        svc.repo.changed();
        match removed {
            Ok(n) => notes.push(format!("retention removed {n} snapshot(s)")),
            Err(e) => {
                return Ok(Ended::failed(
                    format!("the backup succeeded, its retention failed: {e}"),
                    vms,
                ))
            }
        }
    }
    if job.gc {
        let gc = tokio::task::block_in_place(|| {
            vsnap_repo::gc(&repo, &vsnap_repo::GcOptions::default())
        });
        let failed = match gc {
            Err(e) => Some(format!("gc failed: {e}")),
            // Damage keeps gc from deleting: the operator must see it.
            Ok(r) if !r.damaged.is_empty() => Some(format!(
                "gc deleted nothing: {} could not be read (vsnap verify, then vsnap repo quarantine)",
                r.damaged
                    .iter()
                    .map(|d| format!("{} {}", d.what, d.path.display()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Ok(_) => None,
        };
        if let Some(why) = failed {
            return Ok(Ended::failed(format!("the backup succeeded, {why}"), vms));
        }
    }
    if let Some(w) = &report.session.release_error {
        notes.push(format!("warning: {w}"));
    }
    Ok(Ended {
        state: RunState::Succeeded,
        error: None,
        note: (!notes.is_empty()).then(|| notes.join("; ")),
        vms,
    })
}

/// One verify run over `vms`' snapshots (or `only` those), leaving out
/// the ones verified successfully within `outdated_after`.
pub(crate) async fn verify(
    svc: Arc<Service>,
    vms: Vec<String>,
    outdated_after: Option<Duration>,
    only: Option<Vec<String>>,
    a: Active,
) -> Result<Ended> {
    let engine = |e: vsnap_repo::Error| crate::Error::from(ErrorKind::Engine(Box::new(e)));
    tokio::task::block_in_place(|| {
        let repo = svc.repo.session().map_err(engine)?;
        let listed = repo.list().map_err(engine)?;
        let mut ids: Vec<String> = match only.filter(|o| !o.is_empty()) {
            Some(ids) => {
                if let Some(missing) = ids.iter().find(|id| !listed.iter().any(|l| &l.id == *id)) {
                    return Err(ErrorKind::NotFound(format!("no snapshot {missing:?}")).into());
                }
                ids
            }
            None => listed
                .iter()
                .filter(|l| l.manifest.as_ref().is_ok_and(|m| vms.contains(&m.vm)))
                .map(|l| l.id.clone())
                .collect(),
        };
        if let Some(age) = outdated_after {
            let since =
                Utc::now() - chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
            let recent = svc.state.verified_since(since)?;
            ids.retain(|id| !recent.contains(id));
        }
        if ids.is_empty() {
            return Ok(Ended {
                state: RunState::Succeeded,
                error: None,
                note: Some(
                    "nothing to verify: every snapshot it covers was verified recently enough"
                        .into(),
                ),
                vms: Vec::new(),
            });
        }
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let report =
            vsnap_repo::verify::verify(&repo, &ids, threads, None, &a.progress).map_err(engine)?;
        svc.state.set_verified(&ids, report.ok())?;
        let what = format!(
            "verified {} snapshot(s), {} disk(s), {} chunk(s), {} bytes",
            report.snapshots, report.disks, report.chunks, report.bytes
        );
        if report.ok() {
            return Ok(Ended {
                state: RunState::Succeeded,
                error: None,
                note: Some(what),
                vms: Vec::new(),
            });
        }
        let problems: Vec<String> = report
            .problems
            .iter()
            .take(5)
            .map(|p| format!("{} {}: {}", p.what, p.name, p.error))
            .collect();
        Ok(Ended::failed(
            format!(
                "{} problem(s) ({what}): {}",
                report.problems.len(),
                problems.join("; ")
            ),
            Vec::new(),
        ))
    })
}
