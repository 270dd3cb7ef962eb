//! The coordinator: vsnap's VSS requestor, and the agent it talks to.
//!
//! - [`protocol`]: the messages, their framing and the transports.
//! - [`agent`]: the guest side (`vsnap agent`): fsfreeze and exec-hook
//!   writers, the watchdog and the crash marker.
//! - [`client`] and [`qga`]: the coordinator's end of a vsnap agent, and
//!   of the stock QEMU guest agent; [`guest`] puts both behind one face
//!   with the retry rule.
//! - [`inventory`]: the VMs, their disks, agents and policies.
//! - [`provider`]: point-in-time snapshots of the disks (reflink, copy).
//! - [`session`]: the coordinated backup itself.

pub mod agent;
pub mod client;
pub mod error;
pub mod guest;
pub mod inventory;
pub mod protocol;
pub mod provider;
pub mod qga;
pub mod session;

pub use error::{Error, ErrorKind, Result};

/// A duration in whole µs, the unit of every timing the protocol and the
/// reports carry (saturating: no duration here comes near 584,000 years).
pub fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
