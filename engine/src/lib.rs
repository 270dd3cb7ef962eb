//! vsnap's streaming engine: the read engines, the buffer pool, and the
//! pipeline that reads many disk images at once, hashes and compresses in
//! one pass, and hands each chunk to a sink (a copy, or the repository).
//!
//! Synchronous by design (no async runtime): the work is disk and CPU bound,
//! and the coordinator drives it from its own threads. It knows disk images
//! only through `vsnap_formats`, and nothing of repositories. See
//! docs/design.md for how the crates fit together.

pub mod digest;
mod error;
pub mod io;
pub mod pipeline;
pub mod units;

pub use error::{Error, ErrorKind, Result};
