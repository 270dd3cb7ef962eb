//! The coordinated backup, VSS's requestor sequence over every guest:
//! Identify → Prepare → Freeze (a barrier, all guests in parallel) →
//! Snapshot → Thaw (each guest as soon as its own disks are taken) →
//! stream the snapshots → Complete.
//!
//! Everything slow happens before the first freeze: images are parsed,
//! providers probed and stale snapshots removed, agents connected and
//! prepared. The window from the first freeze to the last thaw is bounded
//! twice: the coordinator stops waiting at its deadline, and every agent's
//! watchdog is armed with the same limit, so a dead coordinator cannot
//! leave a guest frozen.

mod snapshot;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use vsnap_repo::{Consistency, Failure, FreezeRecord};

use crate::error::{Error, ErrorKind, Result};
use crate::guest::{Answer, Call, Guest, Metrics};
use crate::inventory::{AgentSpec, Policy, Vm};
use crate::micros;
use crate::provider::{self, Choice, Kind, Snap};
use crate::qga_guard::Guard;
use vsnap_protocol::ErrorClass;

#[derive(Debug, Clone)]
pub struct Options {
    /// First freeze to last thaw; also every agent's hold limit.
    pub window: Duration,
    pub provider: Choice,
    pub backup_type: String,
    /// The clock every `*_at_us` metric counts from; the session's start
    /// when `None`. A benchmark passes its own, to line freezes up with
    /// what its workloads saw.
    pub epoch: Option<Instant>,
    /// Set (by a SIGINT handler, say) to stop: checked after Prepare,
    /// after the freeze barrier and between snapshots, each time leading
    /// to the abort rules (every guest thawed at once, no manifest).
    pub cancel: Option<Arc<AtomicBool>>,
    /// The program that guards qemu-ga guests' freezes ([`crate::qga_guard`]:
    /// the `vsnap` binary). Without one, a qemu-ga guest is frozen
    /// unguarded: a coordinator that dies leaves it frozen.
    pub guard: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            window: Duration::from_secs(10),
            provider: Choice::Auto,
            backup_type: "full".into(),
            epoch: None,
            cancel: None,
            guard: None,
        }
    }
}

/// What the engine streams for one VM, after the thaw.
#[derive(Debug, Clone)]
pub struct VmSnapshot {
    pub vm: String,
    /// The disks as the inventory names them: what the manifest records.
    pub sources: Vec<PathBuf>,
    /// The point-in-time copies to read.
    pub snapshots: Vec<PathBuf>,
    /// The provider that made each of them.
    pub kinds: Vec<Kind>,
    pub consistency: Consistency,
    /// The reference's metrics, for the manifest.
    pub freeze: FreezeRecord,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmReport {
    pub vm: String,
    pub policy: Policy,
    pub consistency: Option<&'static str>,
    /// Why it is not app-consistent, when it is not.
    pub degraded: Option<String>,
    pub snapshot: Option<String>,
    pub error: Option<String>,
    pub providers: Vec<Kind>,
    pub metrics: Metrics,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Set when the backup was aborted before the snapshot was used: every
    /// guest thawed, snapshots released, no manifest written.
    pub aborted: Option<String>,
    pub window_limit_ms: u64,
    /// Host-observed: the first freeze sent to the last thaw acknowledged.
    pub window_us: Option<u64>,
    /// The latest freeze acknowledgement minus the earliest.
    pub barrier_skew_us: Option<u64>,
    pub snapshot_us: Option<u64>,
    pub stream_us: Option<u64>,
    pub stale_snapshots_removed: usize,
    /// Overlays (and their commit jobs) that dead runs left on QMP VMs,
    /// merged back before this run's freeze.
    pub overlays_recovered: usize,
    /// Merging this run's overlays back, after the stream (`qmp`).
    pub commit_us: Option<u64>,
    /// The snapshots could not all be removed, or overlays not all merged
    /// back; the next run does it.
    pub release_error: Option<String>,
    pub snapshots: Vec<Snap>,
    pub vms: Vec<VmReport>,
}

const INTERRUPTED: &str = "interrupted";

pub(super) struct Member {
    guest: Guest,
    /// Still held to the barrier (has an agent, and has not dropped out).
    quiesce: bool,
    /// Why it is only crash-consistent.
    degraded: Option<String>,
    /// Why it has no snapshot.
    failed: Option<String>,
    backed_up: bool,
    /// A qemu-ga guest's guard, armed before its freeze.
    guard: Option<Guard>,
}

/// Runs `f` on every member at once, each in its own task; returns them
/// in their order.
async fn par<F, Fut>(members: Vec<Member>, f: F) -> Vec<Member>
where
    F: Fn(Member) -> Fut,
    Fut: Future<Output = Member> + Send + 'static,
{
    let n = members.len();
    let mut set = tokio::task::JoinSet::new();
    for (i, m) in members.into_iter().enumerate() {
        let fut = f(m);
        set.spawn(async move { (i, fut.await) });
    }
    let mut out: Vec<Option<Member>> = (0..n).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        if let Ok((i, m)) = r {
            out[i] = Some(m);
        }
    }
    out.into_iter().flatten().collect()
}

/// The guest is thawed: its guard, if it has one, stands down.
pub(super) fn disarm(m: &mut Member) {
    if let Some(g) = m.guard.take() {
        tokio::task::block_in_place(|| g.disarm());
    }
}

pub(super) fn failure_text(f: &Option<Failure>) -> String {
    f.as_ref()
        .map(|f| format!("{} failed ({}): {}", f.step, f.class, f.message))
        .unwrap_or_else(|| "failed".into())
}

/// After a step: guests that failed it drop out (allow-crash-consistent)
/// or abort the whole backup (app-consistent-only). Returns the reason
/// to abort, if any.
fn apply_policy(members: &mut [Member]) -> Option<String> {
    let mut abort = None;
    for m in members.iter_mut() {
        if !m.quiesce || m.guest.metrics.failure.is_none() {
            continue;
        }
        let why = failure_text(&m.guest.metrics.failure);
        match m.guest.vm.policy {
            Policy::AllowCrashConsistent => {
                m.quiesce = false;
                m.degraded = Some(why);
            }
            Policy::AppConsistentOnly => {
                abort.get_or_insert(format!("vm {}: {why}", m.guest.vm.name));
            }
        }
    }
    abort
}

/// Abort: every guest still connected gets `abort` (thawing what it
/// froze, running its abort hooks).
async fn abort_all(members: Vec<Member>, reason: &str) -> Vec<Member> {
    let reason = reason.to_string();
    par(members, move |mut m| {
        let reason = reason.clone();
        async move {
            if m.guest.connected() && (m.quiesce || m.guest.reported_frozen()) {
                let done = m
                    .guest
                    .call(Call::Abort(reason), Duration::from_secs(30), None)
                    .await;
                if done.is_ok() {
                    disarm(&mut m);
                }
            }
            m
        }
    })
    .await
}

/// Thaws, at once, the guests that dropped out of the barrier while
/// frozen.
async fn release_dropped(members: Vec<Member>) -> Vec<Member> {
    par(members, |mut m| async move {
        if !m.quiesce && m.guest.reported_frozen() && m.guest.metrics.thaw_ack_at_us.is_none() {
            let done = m
                .guest
                .call(
                    Call::Abort("dropped from the barrier".into()),
                    Duration::from_secs(30),
                    None,
                )
                .await;
            if done.is_ok() {
                disarm(&mut m);
            }
        }
        m
    })
    .await
}

/// The abort rules, for whatever stopped the backup before a snapshot
/// was used: every guest still connected gets `abort`, the report says
/// why, and no VM has a snapshot.
async fn aborted(
    members: Vec<Member>,
    reason: String,
    mut report: Report,
    kinds: &[Vec<Kind>],
) -> Report {
    let members = abort_all(members, &reason).await;
    report.aborted = Some(reason);
    report.vms = report_of(&members, kinds, &vec![None; members.len()]);
    report
}

/// Items kept one per disk, in inventory order, cut into each VM's share.
fn per_vm<T>(all: &[T], disks: impl IntoIterator<Item = usize>) -> Vec<&[T]> {
    let mut at = 0;
    disks
        .into_iter()
        .map(|n| {
            let share = &all[at.min(all.len())..(at + n).min(all.len())];
            at += n;
            share
        })
        .collect()
}

fn report_of(members: &[Member], kinds: &[Vec<Kind>], ids: &[Option<String>]) -> Vec<VmReport> {
    members
        .iter()
        .zip(kinds)
        .zip(ids)
        .map(|((m, k), id)| VmReport {
            vm: m.guest.vm.name.clone(),
            policy: m.guest.vm.policy,
            consistency: if m.failed.is_some() || id.is_none() {
                None
            } else if m.degraded.is_some() {
                Some(Consistency::CrashConsistent.name())
            } else {
                Some(Consistency::AppConsistent.name())
            },
            degraded: m.degraded.clone(),
            snapshot: id.clone(),
            error: m.failed.clone(),
            providers: k.clone(),
            metrics: m.guest.metrics.clone(),
        })
        .collect()
}

/// Parses every disk before anything is frozen: a bad image fails the
/// backup while the guests are still untouched.
fn check_images(vms: &[Vm]) -> Result<()> {
    for vm in vms {
        for d in &vm.disks {
            vsnap_formats::open(d, None).map_err(|e| {
                Error::from(ErrorKind::Config(e.to_string()))
                    .at(format!("vm {}", vm.name))
                    .during("open disk")
            })?;
        }
    }
    Ok(())
}

/// Merges the overlays back (`qmp`), saying in the report how long it
/// took and what stays for the next run.
async fn merged(prepared: &provider::Prepared, report: &mut Report) {
    let m = prepared.merge().await;
    report.commit_us = m.commit_us;
    if !m.errors.is_empty() {
        report.release_error = Some(m.errors.join("; "));
    }
}

/// Runs one coordinated backup of `vms`. `stream` gets every VM whose
/// snapshot is usable, after the thaw, and returns each one's snapshot id
/// (or why it failed). An `Err` means nothing was frozen; an abort after
/// the guests were touched is a [`Report`] with `aborted` set.
pub async fn run<F>(vms: Vec<Vm>, opts: &Options, stream: F) -> Result<Report>
where
    F: FnOnce(&[VmSnapshot]) -> Vec<std::result::Result<String, String>>,
{
    let epoch = opts.epoch.unwrap_or_else(Instant::now);
    let window_ms = u64::try_from(opts.window.as_millis()).unwrap_or(u64::MAX);
    tokio::task::block_in_place(|| check_images(&vms))?;
    let run_id = format!(
        "{}-{}",
        std::process::id(),
        micros(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
        )
    );
    let prepared = Arc::new(provider::prepare(&vms, opts.provider, &run_id).await?);
    let all_kinds = prepared.kinds();
    let kinds: Vec<Vec<Kind>> = per_vm(&all_kinds, vms.iter().map(|v| v.disks.len()))
        .into_iter()
        .map(<[Kind]>::to_vec)
        .collect();
    let mut members = Vec::new();
    for vm in vms {
        let guest = Guest::new(vm, epoch)?;
        members.push(Member {
            quiesce: guest.has_agent(),
            degraded: (!guest.has_agent()).then(|| "no agent: nothing was quiesced".to_string()),
            failed: None,
            backed_up: false,
            guard: None,
            guest,
        });
    }
    let mut report = Report {
        aborted: None,
        window_limit_ms: window_ms,
        window_us: None,
        barrier_skew_us: None,
        snapshot_us: None,
        stream_us: None,
        stale_snapshots_removed: prepared.stale_removed,
        overlays_recovered: prepared.overlays_recovered,
        commit_us: None,
        release_error: None,
        snapshots: Vec::new(),
        vms: Vec::new(),
    };

    // Identify and Prepare, everyone at once.
    let backup_type = opts.backup_type.clone();
    let mut members = par(members, move |mut m| {
        let bt = backup_type.clone();
        async move {
            if m.quiesce && m.guest.connect().await.is_ok() && m.guest.identify().await.is_ok() {
                let _ = m
                    .guest
                    .call(Call::Prepare(bt), Duration::from_secs(60), None)
                    .await;
            }
            m
        }
    })
    .await;
    let cancelled = || {
        opts.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    };
    let mut abort = apply_policy(&mut members);
    if abort.is_none() && cancelled() {
        abort = Some(INTERRUPTED.into());
    }
    if let Some(reason) = abort {
        return Ok(aborted(members, reason, report, &kinds).await);
    }

    // Guards for qemu-ga guests, which have no watchdog of their own.
    for m in members.iter_mut().filter(|m| m.quiesce) {
        let AgentSpec::Qga(socket) = &m.guest.vm.agent else {
            continue;
        };
        let Some(program) = &opts.guard else {
            continue;
        };
        match Guard::arm(program, socket, opts.window) {
            Ok(g) => m.guard = Some(g),
            Err(e) => {
                m.guest.metrics.failure = Some(Failure {
                    step: "guard".into(),
                    class: ErrorClass::NonRetryable.to_string(),
                    message: e.to_string(),
                });
            }
        }
    }
    if let Some(reason) = apply_policy(&mut members) {
        return Ok(aborted(members, reason, report, &kinds).await);
    }

    // Freeze: the barrier.
    let t_freeze = Instant::now();
    let deadline = t_freeze + opts.window;
    let mut members = par(members, move |mut m| async move {
        if m.quiesce {
            m.guest.metrics.freeze_sent_at_us = Some(m.guest.now_us());
            let call = Call::Freeze {
                hold_limit_ms: window_ms,
            };
            if let Ok(Answer::Freeze(r)) = m
                .guest
                .call(call, Duration::from_secs(60), Some(deadline))
                .await
            {
                if let Some(expected) = r.expected.filter(|&e| r.frozen < e) {
                    m.guest.metrics.failure = Some(Failure {
                        step: "freeze".into(),
                        class: ErrorClass::PartialFailure.to_string(),
                        message: format!("froze {} of {expected} mounts", r.frozen),
                    });
                }
            }
        }
        m
    })
    .await;
    let mut abort = apply_policy(&mut members);
    if abort.is_none() && cancelled() {
        abort = Some(INTERRUPTED.into());
    }
    if abort.is_none() && Instant::now() >= deadline {
        abort = Some(format!(
            "the freeze barrier did not close within the {} ms window",
            window_ms
        ));
    }
    let acks: Vec<u64> = members
        .iter()
        .filter(|m| m.quiesce)
        .filter_map(|m| m.guest.metrics.freeze_ack_at_us)
        .collect();
    if let (Some(lo), Some(hi)) = (acks.iter().min(), acks.iter().max()) {
        report.barrier_skew_us = Some(hi - lo);
    }
    if let Some(reason) = abort {
        return Ok(aborted(members, reason, report, &kinds).await);
    }
    let members = release_dropped(members).await;

    // Snapshot, inside the freeze; each guest thawed once its disks are.
    let step = snapshot::snapshot_and_thaw(
        members,
        Arc::clone(&prepared),
        opts.cancel.clone(),
        deadline,
        window_ms,
    )
    .await;
    report.snapshot_us = Some(step.snapshot_us);
    let mut members = step.members;
    let snaps = match step.snaps {
        Ok(s) => s,
        Err(reason) => {
            merged(&prepared, &mut report).await;
            return Ok(aborted(members, reason, report, &kinds).await);
        }
    };
    let first = members
        .iter()
        .filter_map(|m| m.guest.metrics.freeze_sent_at_us)
        .min();
    let last = members
        .iter()
        .filter_map(|m| m.guest.metrics.thaw_ack_at_us)
        .max();
    if let (Some(a), Some(b)) = (first, last) {
        report.window_us = Some(b.saturating_sub(a));
    }

    // Stream the snapshots of every VM that has a usable one.
    let mut items = Vec::new();
    let mut owners = Vec::new();
    let shares = per_vm(&snaps, members.iter().map(|m| m.guest.vm.disks.len()));
    for (i, (m, mine)) in members.iter().zip(shares).enumerate() {
        if m.failed.is_some() {
            continue;
        }
        let consistency = if m.degraded.is_some() {
            Consistency::CrashConsistent
        } else {
            Consistency::AppConsistent
        };
        items.push(VmSnapshot {
            vm: m.guest.vm.name.clone(),
            sources: m.guest.vm.disks.clone(),
            snapshots: mine.iter().map(|s| s.path.clone()).collect(),
            kinds: mine.iter().map(|s| s.provider).collect(),
            consistency,
            freeze: FreezeRecord {
                policy: m.guest.vm.policy.name().into(),
                degraded: m.degraded.clone(),
                guest: m.guest.metrics.clone(),
                barrier_skew_us: report.barrier_skew_us,
                window_us: report.window_us,
                window_limit_ms: window_ms,
                snapshot_us: report.snapshot_us,
                providers: mine.iter().map(|s| s.provider.name().into()).collect(),
            },
        });
        owners.push(i);
    }
    let t = Instant::now();
    let results = tokio::task::block_in_place(|| stream(&items));
    report.stream_us = Some(micros(t.elapsed()));
    let mut ids: Vec<Option<String>> = vec![None; members.len()];
    for (k, i) in owners.iter().enumerate() {
        match results.get(k) {
            Some(Ok(id)) => ids[*i] = Some(id.clone()),
            Some(Err(e)) => members[*i].failed = Some(format!("backup failed: {e}")),
            None => members[*i].failed = Some("the engine returned no result".into()),
        }
    }

    // Complete: each guest learns whether its backup succeeded.
    for (m, id) in members.iter_mut().zip(&ids) {
        m.backed_up = id.is_some();
    }
    let members = par(members, |mut m| async move {
        if m.guest.has_agent() && m.guest.metrics.freeze_ack_at_us.is_some() {
            let _ = m
                .guest
                .call(Call::Complete(m.backed_up), Duration::from_secs(30), None)
                .await;
        }
        m
    })
    .await;
    report.snapshots = snaps;
    merged(&prepared, &mut report).await;
    let released = match Arc::try_unwrap(prepared) {
        Ok(p) => tokio::task::block_in_place(|| p.release()),
        // Unreachable once the snapshot thread has ended; the snapshots
        // then go when the last holder drops them.
        Err(_) => Ok(()),
    };
    if let Err(e) = released {
        let e = e.to_string();
        report.release_error = Some(match report.release_error.take() {
            Some(before) => format!("{before}; {e}"),
            None => e,
        });
    }
    report.vms = report_of(&members, &kinds, &ids);
    Ok(report)
}
