//! The coordinator: vsnap's VSS requestor, the host side. It speaks the
//! agent protocol (`vsnap-protocol`) to guests, and never links the guest
//! agent (`vsnap-agent`).
//!
//! - [`client`] and [`qga`]: the coordinator's end of a vsnap agent, and
//!   of the stock QEMU guest agent; [`guest`] puts both behind one face
//!   with the retry rule.
//! - [`inventory`]: the VMs, their disks, agents and policies.
//! - [`provider`]: point-in-time snapshots of the disks (reflink, copy).
//! - [`session`]: the requestor's sequence over every guest.
//! - [`backup`]: the whole coordinated backup as one call, the session
//!   plus the repository and the engine.

pub mod backup;
pub mod client;
pub mod error;
pub mod failpoint;
pub mod guest;
pub mod inventory;
mod jsonlines;
pub mod provider;
pub mod qga;
pub mod qga_guard;
pub mod qmp;
pub mod session;

pub use error::{Error, ErrorKind, Result};

pub use vsnap_protocol::{micros, transport};
