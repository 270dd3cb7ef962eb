//! What each operation answers, as types both sides share: the agent
//! builds these, the coordinator reads them, and the qemu-ga client maps
//! qga's answers into them. Unknown fields are ignored, so a newer agent
//! may say more; a missing required field fails the call with its name
//! (`missing field \`frozen\``), so a renamed field is never read as
//! "absent".

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{AgentState, WireError};

/// `hello`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloReply {
    pub version: u32,
    pub agent: String,
    pub state: AgentState,
}

/// `sync`, and any other step with nothing to say.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Empty {}

/// One of the guest's writers, as identify lists them: `fsfreeze` (with
/// how many mounts), `exec` (with the hook's path), or `qemu-ga`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Writer {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mounts: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<PathBuf>,
}

/// A mounted filesystem the agent freezes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountInfo {
    pub mount_point: PathBuf,
    /// `major:minor`: one superblock, however many places it is mounted.
    #[serde(default)]
    pub device: String,
    #[serde(default)]
    pub fstype: String,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub read_only: bool,
}

/// A mount the agent will not freeze, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub mount: PathBuf,
    pub reason: String,
}

/// `identify`: the guest's writers. Only `agent` and `writers` are
/// required: qemu-ga can say no more.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentifyReply {
    pub agent: String,
    pub writers: Vec<Writer>,
    #[serde(default)]
    pub mounts: Vec<MountInfo>,
    #[serde(default)]
    pub skipped: Vec<Skipped>,
    #[serde(default)]
    pub hooks: Vec<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<AgentState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_limit_ms: Option<u64>,
}

/// `prepare`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareReply {
    pub state: AgentState,
    #[serde(default)]
    pub prepare_hooks_us: Option<u64>,
    /// Prepare's flush (`syncfs`) of the mounts it will freeze.
    #[serde(default)]
    pub prepare_sync_us: Option<u64>,
}

/// `freeze`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FreezeReply {
    /// Filesystems frozen now.
    pub frozen: u64,
    /// How many it meant to freeze; fewer frozen is a partial failure.
    #[serde(default)]
    pub expected: Option<u64>,
    #[serde(default)]
    pub mounts: Vec<PathBuf>,
    #[serde(default)]
    pub skipped: Vec<Skipped>,
    #[serde(default)]
    pub hold_limit_ms: Option<u64>,
    #[serde(default)]
    pub freeze_hooks_us: Option<u64>,
    #[serde(default)]
    pub fifreeze_us: Option<u64>,
}

/// `thaw`, and `abort`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ThawReply {
    pub thawed: u64,
    /// Nothing was frozen: a repeated thaw.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub already: bool,
    #[serde(default)]
    pub freeze_window_us: Option<u64>,
    #[serde(default)]
    pub stall_us: Option<u64>,
    #[serde(default)]
    pub fithaw_us: Option<u64>,
    #[serde(default)]
    pub thaw_hooks_us: Option<u64>,
    #[serde(default)]
    pub abort_hooks_us: Option<u64>,
}

/// `complete`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompleteReply {
    pub state: AgentState,
    #[serde(default)]
    pub complete_hooks_us: Option<u64>,
}

/// Durations of the agent's last cycle, in µs on its monotonic clock.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub prepare_hooks_us: Option<u64>,
    /// Prepare's flush of the mounts it will freeze (`syncfs`), so that
    /// FIFREEZE, which writes back dirty data first, finds little left.
    pub prepare_sync_us: Option<u64>,
    /// What the application saw: from the start of quiescing (freeze
    /// hooks, then FIFREEZE) until FITHAW returned.
    pub stall_us: Option<u64>,
    pub freeze_hooks_us: Option<u64>,
    pub fifreeze_us: Option<u64>,
    /// From the last FIFREEZE's return to the first FITHAW's start: how
    /// long the filesystems were frozen.
    pub freeze_window_us: Option<u64>,
    pub fithaw_us: Option<u64>,
    pub thaw_hooks_us: Option<u64>,
    pub abort_hooks_us: Option<u64>,
    pub complete_hooks_us: Option<u64>,
}

/// `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    pub state: AgentState,
    #[serde(default)]
    pub frozen_mounts: Vec<PathBuf>,
    #[serde(default)]
    pub expected: u64,
    #[serde(default)]
    pub hold_limit_ms: u64,
    #[serde(default)]
    pub timings: Timings,
    #[serde(default)]
    pub failure: Option<WireError>,
    #[serde(default)]
    pub watchdog_fired: bool,
    #[serde(default)]
    pub pid: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_pass_and_a_missing_one_is_named() {
        let r: FreezeReply =
            serde_json::from_str(r#"{"frozen":2,"expected":2,"from_the_future":true}"#).unwrap();
        assert_eq!((r.frozen, r.expected), (2, Some(2)));
        let e = serde_json::from_str::<FreezeReply>(r#"{"froze":2}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `frozen`"), "{e}");
        let e = serde_json::from_str::<HelloReply>(r#"{"version":1,"agent":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `state`"), "{e}");
    }

    #[test]
    fn a_thaw_round_trips() {
        let t = ThawReply {
            thawed: 1,
            stall_us: Some(1500),
            ..ThawReply::default()
        };
        let s = serde_json::to_string(&t).unwrap();
        assert!(!s.contains("already"), "{s}");
        assert_eq!(serde_json::from_str::<ThawReply>(&s).unwrap(), t);
    }
}
