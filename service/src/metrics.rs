//! `/metrics` in Prometheus' text format (0.0.4): per VM, the last
//! success, the last freeze window and application stall, bytes read and
//! new, the dedup ratio, the run's duration, failures, and a histogram of
//! freeze windows; per repository, its size and chunk count. The one
//! figure no peer exports is the freeze's cost to each guest.

use std::fmt::Write;

use vsnap_repo::Usage;

use crate::state::{VmStats, FREEZE_BUCKETS};

/// A label value, escaped as the format wants.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A sample value; infinities as the format spells them.
fn number(x: f64) -> String {
    if x == f64::INFINITY {
        "+Inf".into()
    } else {
        x.to_string()
    }
}

fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

/// Writes one metric family: its help, its type, and a sample per VM
/// that has a value.
fn family(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    vms: &[VmStats],
    value: impl Fn(&VmStats) -> Option<f64>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for v in vms {
        if let Some(x) = value(v) {
            let _ = writeln!(out, "{name}{{vm=\"{}\"}} {}", label(&v.vm), number(x));
        }
    }
}

/// The whole exposition. `usage` is the repository's, when known;
/// `active` the runs going now.
pub fn render(vms: &[VmStats], usage: Option<&Usage>, active: usize) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "vsnap_vm_last_success_timestamp_seconds",
        "gauge",
        "When the VM's last snapshot was taken (run end, Unix seconds).",
        vms,
        |v| v.last_success.map(|t| t.timestamp_millis() as f64 / 1e3),
    );
    family(
        &mut out,
        "vsnap_vm_last_freeze_window_seconds",
        "gauge",
        "How long the VM's guest was frozen in its latest run.",
        vms,
        |v| v.last_freeze_window_us.map(secs),
    );
    family(
        &mut out,
        "vsnap_vm_last_stall_seconds",
        "gauge",
        "How long the VM's application waited in its latest run (quiescing's start to the thaw).",
        vms,
        |v| v.last_stall_us.map(secs),
    );
    family(
        &mut out,
        "vsnap_vm_read_bytes_total",
        "counter",
        "Bytes read from the VM's disks, over all runs.",
        vms,
        |v| Some(v.bytes_read_total as f64),
    );
    family(
        &mut out,
        "vsnap_vm_new_bytes_total",
        "counter",
        "Bytes the repository stored new for the VM, over all runs.",
        vms,
        |v| Some(v.new_bytes_total as f64),
    );
    family(
        &mut out,
        "vsnap_vm_dedup_ratio",
        "gauge",
        "Bytes read per byte stored new, in the VM's latest run; absent when it read nothing or stored nothing new (no ratio, rather than +Inf).",
        vms,
        |v| match (v.last_bytes_read, v.last_new_bytes) {
            (0, _) | (_, 0) => None,
            (r, n) => Some(r as f64 / n as f64),
        },
    );
    family(
        &mut out,
        "vsnap_vm_last_run_duration_seconds",
        "gauge",
        "How long the VM's latest run took, freeze to manifest.",
        vms,
        |v| v.last_run_ms.map(|ms| ms as f64 / 1e3),
    );
    family(
        &mut out,
        "vsnap_vm_failures_total",
        "counter",
        "The VM's runs that gave it no snapshot.",
        vms,
        |v| Some(v.failures as f64),
    );
    let h = "vsnap_vm_freeze_window_seconds";
    let _ = writeln!(
        out,
        "# HELP {h} How long each run froze the VM's guest.\n# TYPE {h} histogram"
    );
    for v in vms {
        let vm = label(&v.vm);
        for (b, n) in FREEZE_BUCKETS.iter().zip(&v.window_buckets) {
            let _ = writeln!(out, "{h}_bucket{{vm=\"{vm}\",le=\"{b}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "{h}_bucket{{vm=\"{vm}\",le=\"+Inf\"}} {}",
            v.window_count
        );
        let _ = writeln!(out, "{h}_sum{{vm=\"{vm}\"}} {}", secs(v.window_sum_us));
        let _ = writeln!(out, "{h}_count{{vm=\"{vm}\"}} {}", v.window_count);
    }
    if let Some(u) = usage {
        let _ = writeln!(out, "# HELP vsnap_repository_size_bytes Bytes of chunks and indexes in the repository.\n# TYPE vsnap_repository_size_bytes gauge\nvsnap_repository_size_bytes {}", u.chunk_bytes + u.index_bytes);
        let _ = writeln!(out, "# HELP vsnap_repository_chunks Chunks in the repository.\n# TYPE vsnap_repository_chunks gauge\nvsnap_repository_chunks {}", u.chunks);
    }
    let _ = writeln!(out, "# HELP vsnap_runs_active Runs going now.\n# TYPE vsnap_runs_active gauge\nvsnap_runs_active {active}");
    out
}
