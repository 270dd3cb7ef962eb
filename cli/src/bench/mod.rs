//! `vsnap bench`: what this host can do (`engine`), and what a freeze
//! costs the guests (`freeze`).

pub mod engine;
pub mod freeze;

use std::io::Write;
use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Measure the freeze window, the write stalls it causes and the
    /// snapshot time, per provider, on throw-away guests (root) or on an
    /// inventory's guests.
    Freeze(freeze::Args),
    /// Measure this host's MB/s for BLAKE3, zstd, chunk verify and reads
    /// with each I/O engine, before any backup.
    Engine(engine::Args),
}

pub fn run(cmd: &BenchCommand, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Freeze(a) => freeze::run(a, out),
        BenchCommand::Engine(a) => engine::run(a, out),
    }
}
