//! Snapshot and thaw, overlapped: the disks are snapshotted one after
//! another, and each guest is thawed as soon as its own disks are done,
//! while the next guest's are taken.
//!
//! This keeps the cut consistent: every snapshot is taken after the
//! barrier closed, while its guest is still frozen, so each disk holds
//! its guest's state at the freeze; a guest thawed early can change only
//! its own disks, whose snapshots are already taken. And a guest's freeze
//! window is its barrier wait plus the snapshots up to and including its
//! own, not all of them: with a clone costing O(extents) each, the median
//! window shrinks by half.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{failure_text, Member};
use crate::guest::Call;
use crate::inventory::Policy;
use crate::provider::{micros, Prepared, Snap};

pub(super) struct Outcome {
    pub members: Vec<Member>,
    /// Every disk's snapshot, in plan order; or why one failed (the
    /// guests not yet thawed are still frozen then, for the abort).
    pub snaps: Result<Vec<Snap>, String>,
    /// From the first snapshot's start to the last one's end.
    pub snapshot_us: u64,
}

/// Thaws one guest; a thaw that fails, or that a watchdog beat, means
/// the snapshot may postdate the thaw: not app-consistent.
pub(super) async fn thaw_member(mut m: Member) -> Member {
    let thawed = !m.quiesce
        || m.guest
            .call(Call::Thaw, Duration::from_secs(30), None)
            .await
            .is_ok();
    if !thawed {
        let why = failure_text(&m.guest.metrics.failure);
        match m.guest.vm.policy {
            Policy::AllowCrashConsistent => m.degraded = Some(why),
            Policy::AppConsistentOnly => m.failed = Some(format!("not app-consistent: {why}")),
        }
    }
    m
}

pub(super) async fn snapshot_and_thaw(members: Vec<Member>, prepared: Arc<Prepared>) -> Outcome {
    let counts: Vec<usize> = members.iter().map(|m| m.guest.vm.disks.len()).collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    let worker = {
        let p = Arc::clone(&prepared);
        tokio::task::spawn_blocking(move || {
            for i in 0..p.len() {
                let r = p.take_one(i);
                let failed = r.is_err();
                if tx.send(r).is_err() || failed {
                    break;
                }
            }
        })
    };
    let mut slots: Vec<Option<Member>> = members.into_iter().map(Some).collect();
    let mut thaws = tokio::task::JoinSet::new();
    let mut snaps = Vec::with_capacity(prepared.len());
    let mut error = None;
    let mut vm = 0;
    let mut done_in_vm = 0;
    let mut snapshot_us = 0;
    while let Some(r) = rx.recv().await {
        match r {
            Ok(s) => {
                snaps.push(s);
                done_in_vm += 1;
                while vm < counts.len() && done_in_vm >= counts[vm] {
                    done_in_vm -= counts[vm];
                    snapshot_us = micros(started.elapsed());
                    if let Some(m) = slots[vm].take() {
                        let i = vm;
                        thaws.spawn(async move { (i, thaw_member(m).await) });
                    }
                    vm += 1;
                }
            }
            Err(e) => {
                error = Some(format!("snapshot failed: {e}"));
                break;
            }
        }
    }
    if worker.await.is_err() && error.is_none() {
        error = Some("the snapshot thread stopped unexpectedly".into());
    }
    if error.is_none() && snaps.len() < prepared.len() {
        error = Some("not every disk was snapshotted".into());
    }
    while let Some(done) = thaws.join_next().await {
        if let Ok((i, m)) = done {
            slots[i] = Some(m);
        }
    }
    Outcome {
        members: slots.into_iter().flatten().collect(),
        snaps: error.map_or(Ok(snaps), Err),
        snapshot_us,
    }
}
