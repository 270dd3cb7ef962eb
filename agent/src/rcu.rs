//! Expedited RCU grace periods while FIFREEZE runs.
//!
//! FIFREEZE takes the filesystem's three write-side freeze locks (writes,
//! page faults, internal) one after another, and each is a per-CPU
//! read-write semaphore whose writer must first wait out an RCU grace
//! period. With normal grace periods that is 40–60 ms on an idle 2-vCPU
//! guest (measured: `fsfreeze -f` of an idle ext4, 45–59 ms), and the
//! application is held through the last two of them. Expedited grace
//! periods (`/sys/kernel/rcu_expedited`, the mode every kernel boots in
//! until init starts) take tens of microseconds, so the same freeze costs
//! 1–5 ms. The agent turns them on just before the first FIFREEZE and
//! back off as soon as the last one returns; the cost is an IPI to each
//! of the guest's CPUs per grace period in those milliseconds.
//!
//! The agent touches the knob only if it read 0 at start (an operator who
//! set it keeps it), counts its own freezes in flight (in-process agents
//! share one kernel), and records in the freeze marker that it may have
//! left the knob on, so a restarted agent turns it off.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The kernel's switch between normal (0) and expedited (1) grace periods.
pub const KNOB: &str = "/sys/kernel/rcu_expedited";

/// Freezes in flight in this process that asked for expedited periods.
static IN_FLIGHT: Mutex<usize> = Mutex::new(0);

#[derive(Debug, Clone)]
pub struct Expedite {
    knob: PathBuf,
}

impl Expedite {
    /// The knob at `knob`, when it reads 0 and can be written; otherwise
    /// why not.
    pub fn probe(knob: &Path) -> Result<Expedite, String> {
        let value = std::fs::read_to_string(knob)
            .map_err(|e| format!("cannot read {}: {e}", knob.display()))?;
        if value.trim() != "0" {
            return Err(format!(
                "{} is {} already; left as it is",
                knob.display(),
                value.trim()
            ));
        }
        std::fs::write(knob, "0").map_err(|e| format!("cannot write {}: {e}", knob.display()))?;
        Ok(Expedite {
            knob: knob.to_path_buf(),
        })
    }

    /// Turns expedited grace periods on until the guard is dropped.
    pub fn begin(&self) -> Guard {
        if let Ok(mut n) = IN_FLIGHT.lock() {
            if *n == 0 {
                let _ = std::fs::write(&self.knob, "1");
            }
            *n += 1;
        }
        Guard {
            knob: self.knob.clone(),
        }
    }

    /// After a crash: the knob back to normal grace periods.
    pub fn reset(knob: &Path) -> std::io::Result<()> {
        std::fs::write(knob, "0")
    }
}

/// Expedited grace periods, on while it lives.
#[derive(Debug)]
pub struct Guard {
    knob: PathBuf,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(mut n) = IN_FLIGHT.lock() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                let _ = std::fs::write(&self.knob, "0");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_knob_is_on_while_a_guard_lives_and_a_set_knob_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let knob = dir.path().join("rcu_expedited");
        std::fs::write(&knob, "0\n").unwrap();
        let e = Expedite::probe(&knob).unwrap();
        let a = e.begin();
        let b = e.begin();
        assert_eq!(std::fs::read_to_string(&knob).unwrap(), "1");
        drop(a);
        assert_eq!(
            std::fs::read_to_string(&knob).unwrap(),
            "1",
            "b still freezing"
        );
        drop(b);
        assert_eq!(std::fs::read_to_string(&knob).unwrap(), "0");
        std::fs::write(&knob, "1\n").unwrap();
        let why = Expedite::probe(&knob).unwrap_err();
        assert!(why.contains("is 1 already"), "{why}");
        assert!(Expedite::probe(&dir.path().join("absent")).is_err());
    }
}
