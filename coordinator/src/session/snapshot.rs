//! Snapshot and thaw, overlapped: the disks are snapshotted by a few
//! threads, and each guest is thawed as soon as its own disks are done,
//! while the others' are taken.
//!
//! This keeps the cut consistent: every snapshot is taken after the
//! barrier closed, while its guest is still frozen, so each disk holds
//! its guest's state at the freeze; a guest thawed early can change only
//! its own disks, whose snapshots are already taken. And a guest's freeze
//! window is its barrier wait plus the snapshots up to and including its
//! own, not all of them: with a clone costing O(extents) each, the median
//! window shrinks by half.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{failure_text, Member};
use crate::error::{Error, ErrorKind};
use crate::guest::Call;
use crate::inventory::Policy;
use crate::micros;
use crate::provider::{Prepared, Snap};

pub(super) struct Outcome {
    pub members: Vec<Member>,
    /// Every disk's snapshot, in plan order; or why one failed (the
    /// guests not yet thawed are still frozen then, for the abort).
    pub snaps: Result<Vec<Snap>, String>,
    /// From the first snapshot's start to the last one's end.
    pub snapshot_us: u64,
}

/// Thaws one guest; a thaw that fails, or that a watchdog beat, means
/// the snapshot may postdate the thaw: not app-consistent. So does a thaw
/// the coordinator sent because the window passed (`late`, why) before
/// the guest's snapshots were all taken.
pub(super) async fn thaw_member(mut m: Member, late: Option<String>) -> Member {
    if m.quiesce {
        m.guest.metrics.thaw_sent_at_us = Some(m.guest.now_us());
    }
    let thawed = !m.quiesce
        || m.guest
            .call(Call::Thaw, Duration::from_secs(30), None)
            .await
            .is_ok();
    if thawed {
        super::disarm(&mut m);
    }
    let why = match (thawed, late) {
        (_, Some(late)) if m.quiesce => Some(late),
        (false, _) => Some(failure_text(&m.guest.metrics.failure)),
        _ => None,
    };
    if let Some(why) = why {
        match m.guest.vm.policy {
            Policy::AllowCrashConsistent => m.degraded = Some(why),
            Policy::AppConsistentOnly => m.failed = Some(format!("not app-consistent: {why}")),
        }
    }
    m
}

/// How many snapshots run at once: XFS serialises clones inside one
/// allocation group, but disks in different directories (so different
/// groups) clone in parallel.
fn workers(disks: usize) -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 4)
        .min(disks.max(1))
}

/// Takes every disk's snapshot, thawing each guest as soon as its own
/// are taken. At `deadline` (the window's end) every guest still frozen
/// is thawed at once, whatever its agent: qemu-ga has no watchdog, so the
/// coordinator is the one to keep the window. Its snapshots are still
/// taken, but they postdate the thaw: its policy decides between failing
/// it and labelling it crash-consistent.
pub(super) async fn snapshot_and_thaw(
    members: Vec<Member>,
    prepared: Arc<Prepared>,
    cancel: Option<Arc<AtomicBool>>,
    deadline: Instant,
    window_ms: u64,
) -> Outcome {
    // Which guest each disk (in plan order) belongs to, and how many of
    // each guest's are still to take.
    let mut owner = Vec::with_capacity(prepared.len());
    let mut left: Vec<usize> = Vec::with_capacity(members.len());
    for (vm, m) in members.iter().enumerate() {
        owner.extend(std::iter::repeat_n(vm, m.guest.vm.disks.len()));
        left.push(m.guest.vm.disks.len());
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let mut pool = Vec::new();
    for _ in 0..workers(prepared.len()) {
        let (p, tx, next, failed, cancel) = (
            Arc::clone(&prepared),
            tx.clone(),
            Arc::clone(&next),
            Arc::clone(&failed),
            cancel.clone(),
        );
        pool.push(tokio::task::spawn_blocking(move || loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= p.len() || failed.load(Ordering::Relaxed) {
                return;
            }
            let r = if cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
                Err(Error::from(ErrorKind::Interrupted))
            } else {
                p.take_one(i)
            };
            if r.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            if tx.send((i, r)).is_err() {
                return;
            }
        }));
    }
    drop(tx);
    let mut slots: Vec<Option<Member>> = members.into_iter().map(Some).collect();
    let mut thaws = tokio::task::JoinSet::new();
    let mut snaps: Vec<Option<Snap>> = (0..prepared.len()).map(|_| None).collect();
    let mut error = None;
    let mut snapshot_us = 0;
    let window_end = tokio::time::sleep_until(deadline.into());
    tokio::pin!(window_end);
    let mut window_kept = false;
    loop {
        let next = tokio::select! {
            next = rx.recv() => next,
            () = &mut window_end, if !window_kept => {
                window_kept = true;
                for (vm, slot) in slots.iter_mut().enumerate() {
                    if let Some(m) = slot.take() {
                        let late = format!(
                            "the {window_ms} ms window passed before its snapshots were taken; the coordinator thawed it, and its snapshots postdate the thaw"
                        );
                        thaws.spawn(async move { (vm, thaw_member(m, Some(late)).await) });
                    }
                }
                continue;
            }
        };
        let Some((i, r)) = next else { break };
        match r {
            Ok(s) => {
                snaps[i] = Some(s);
                let vm = owner[i];
                left[vm] -= 1;
                if left[vm] == 0 {
                    snapshot_us = micros(started.elapsed());
                    if let Some(m) = slots[vm].take() {
                        thaws.spawn(async move { (vm, thaw_member(m, None).await) });
                    }
                }
            }
            Err(e) if matches!(e.kind, ErrorKind::Interrupted) => {
                error.get_or_insert(super::INTERRUPTED.to_string());
            }
            Err(e) => {
                error.get_or_insert(format!("snapshot failed: {e}"));
            }
        }
    }
    for w in pool {
        if w.await.is_err() && error.is_none() {
            error = Some("a snapshot thread stopped unexpectedly".into());
        }
    }
    while let Some(done) = thaws.join_next().await {
        if let Ok((i, m)) = done {
            slots[i] = Some(m);
        }
    }
    let snaps: Option<Vec<Snap>> = snaps.into_iter().collect();
    let snaps = match (error, snaps) {
        (Some(e), _) => Err(e),
        (None, None) => Err("not every disk was snapshotted".into()),
        (None, Some(s)) => Ok(s),
    };
    Outcome {
        members: slots.into_iter().flatten().collect(),
        snaps,
        snapshot_us,
    }
}
