//! The engine's tuning flags, shared by every command that streams images.

use clap::ValueEnum;
use vsnap_engine::io::{probe, IoKind, IoMode};
use vsnap_engine::pipeline::Options;

use crate::units::parse_size;

#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Chunk size: a power of two of at least 1K.
    #[arg(long, value_parser = parse_size, default_value = "4M")]
    pub chunk_size: u64,
    /// Worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Memory for chunk buffers, all images together; memory use does not
    /// grow with the number or size of images.
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    pub memory: u64,
    /// Read engine: io_uring if the kernel allows it (auto), or forced.
    #[arg(long, value_enum, default_value_t = IoArg::Auto)]
    pub io: IoArg,
    /// Read sources with O_DIRECT (aligned reads bypass the page cache).
    #[arg(long)]
    pub direct: bool,
    /// Reads in flight per worker with io_uring.
    #[arg(long, default_value_t = 32)]
    pub queue_depth: u32,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum IoArg {
    Auto,
    Uring,
    Sync,
}

impl EngineArgs {
    pub fn options(&self, keep_chunks: bool) -> Options {
        Options {
            chunk_size: self.chunk_size,
            threads: self.threads,
            keep_chunks,
            memory: self.memory,
            compress: None,
            io: match self.io {
                IoArg::Auto => IoMode::Auto,
                IoArg::Uring => IoMode::Uring,
                IoArg::Sync => IoMode::Sync,
            },
            direct: self.direct,
            queue_depth: self.queue_depth,
        }
    }

    /// Says on stderr when `--io auto` had to fall back to sync reads.
    pub fn report_fallback(&self, opts: &Options) {
        if let Ok((IoKind::Sync, Some(reason))) = probe(opts.io, opts.queue_depth) {
            eprintln!("vsnap: {reason}");
        }
    }
}
