//! vsnap's storage engine.
//!
//! Synchronous by design (no async runtime): the work is disk and CPU bound,
//! and the coordinator drives it from its own threads. See docs/design.md
//! for how the parts fit together.

pub mod cbt;
pub mod digest;
mod error;
pub mod format;
pub mod io;
pub mod pipeline;
pub mod repo;
pub mod restore;
pub mod verify;

pub use error::{Error, ErrorKind, Result};
