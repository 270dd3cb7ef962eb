//! `vsnap serve`: one long-running process that runs coordinated backups
//! unattended. Jobs fire on systemd-style calendar events
//! ([`calendar`]).

pub mod alloc;
pub mod api;
pub mod calendar;
pub mod config;
pub mod core;
pub mod daemon;
pub mod error;
pub mod log;
pub mod metrics;
pub mod notify;
pub mod repository;
pub mod runner;
pub mod scheduler;
pub mod state;
mod work;

pub use error::{Error, ErrorKind, Result};
