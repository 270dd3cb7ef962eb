//! The coordinator: vsnap's VSS requestor, and the agent it talks to.
//!
//! - [`protocol`]: the messages, their framing and the transports.
//! - [`agent`]: the guest side (`vsnap agent`): fsfreeze and exec-hook
//!   writers, the watchdog and the crash marker.
//! - [`client`]: the coordinator's end of one agent connection.

pub mod agent;
pub mod client;
pub mod error;
pub mod protocol;

pub use error::{Error, ErrorKind, Result};
