//! What a coordinated backup records, in each VM's manifest, of the
//! freeze that made it: the policy, the guest's timings on its agent's
//! clock and on the coordinator's, and the snapshot step. The
//! coordinator fills it in; `vsnap snapshots` and auditors read it back.
//!
//! Every field has a default, so a manifest written before a field
//! existed still reads (the field is then absent, not zero); unknown
//! fields are ignored, so a newer coordinator's manifest reads too.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FreezeRecord {
    /// `app-consistent-only` or `allow-crash-consistent`.
    pub policy: String,
    /// Why the VM is only crash-consistent, when it is.
    pub degraded: Option<String>,
    pub guest: GuestMetrics,
    /// The latest freeze acknowledgement minus the earliest, over every
    /// guest of the backup.
    pub barrier_skew_us: Option<u64>,
    /// The coordinator's clock: first freeze sent to last thaw
    /// acknowledged, over every guest.
    pub window_us: Option<u64>,
    pub window_limit_ms: u64,
    pub snapshot_us: Option<u64>,
    /// How each disk was snapshotted (`reflink`, `copy`), in disk order.
    pub providers: Vec<String>,
}

/// One guest's figures. Times in µs; `*_at_us` are on the coordinator's
/// monotonic clock from the backup's start, the rest on the agent's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestMetrics {
    /// The agent's address, `qga:PATH`, or `none`.
    pub agent: String,
    /// What identify reported: the guest's writers.
    pub writers: Option<Vec<Writer>>,
    pub frozen: Option<u64>,
    pub expected: Option<u64>,
    /// Last FIFREEZE returned to first FITHAW: the filesystems frozen.
    pub freeze_window_us: Option<u64>,
    /// What the application waited, from the start of quiescing (freeze
    /// hooks, then FIFREEZE) until FITHAW returned.
    pub stall_us: Option<u64>,
    /// The coordinator's view: freeze acknowledged to thaw acknowledged.
    pub host_window_us: Option<u64>,
    pub freeze_sent_at_us: Option<u64>,
    pub freeze_ack_at_us: Option<u64>,
    /// When the coordinator sent this guest's thaw: its snapshots were
    /// all taken then.
    pub thaw_sent_at_us: Option<u64>,
    pub thaw_ack_at_us: Option<u64>,
    pub prepare_hooks_us: Option<u64>,
    /// Prepare's flush (`syncfs`) of the mounts to freeze.
    pub prepare_sync_us: Option<u64>,
    pub freeze_hooks_us: Option<u64>,
    pub fifreeze_us: Option<u64>,
    pub fithaw_us: Option<u64>,
    pub thaw_hooks_us: Option<u64>,
    pub retries: u32,
    pub failure: Option<Failure>,
}

/// One of the guest's writers, as the agent's identify lists them and
/// the manifest records them: the protocol's own type, so the record is
/// what the guest said.
pub use vsnap_protocol::Writer;

/// What went wrong with a guest, and at which step; `class` is the
/// agent protocol's error class (`retryable`, `timeout`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Failure {
    pub step: String,
    pub class: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_record_reads_with_its_missing_fields_absent() {
        // As the coordinator wrote it before the stall and Prepare's flush
        // were measured, and with writers still untyped JSON.
        let old = r#"{"policy":"app-consistent-only","degraded":null,
            "guest":{"agent":"unix:/run/a.sock","writers":[{"kind":"fsfreeze","mounts":1}],
                     "frozen":1,"expected":1,"freeze_window_us":1200,"retries":0,"failure":null},
            "barrier_skew_us":40,"window_us":5000,"window_limit_ms":10000,
            "snapshot_us":900,"providers":["reflink"],"from_a_newer_vsnap":1}"#;
        let r: FreezeRecord = serde_json::from_str(old).unwrap();
        assert_eq!(r.guest.freeze_window_us, Some(1200));
        assert_eq!(r.guest.stall_us, None);
        assert_eq!(r.guest.prepare_sync_us, None);
        assert_eq!(r.providers, ["reflink"]);
        let w = r.guest.writers.as_deref().unwrap();
        assert_eq!((w[0].kind.as_str(), w[0].mounts), ("fsfreeze", Some(1)));
    }

    #[test]
    fn a_field_of_the_wrong_type_is_refused() {
        let e = serde_json::from_str::<FreezeRecord>(r#"{"guest":{"stall_us":"long"}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid type"), "{e}");
    }
}
