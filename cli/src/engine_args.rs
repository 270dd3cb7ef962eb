//! The engine's tuning flags, shared by every command that streams images.

use clap::ValueEnum;
use vsnap_engine::io::{probe, IoMode};
use vsnap_engine::pipeline::{Options, Tuning};
use vsnap_engine::ErrorKind;

use crate::units::{human, parse_chunk_size, parse_size};

/// `--chunk-size`, for the commands whose grid is the user's to choose
/// (`hash`, `copy`); a repository's commands use the repository's.
#[derive(Debug, Clone, clap::Args)]
pub struct ChunkArg {
    /// Chunk size: the unit of reading, hashing and compressing, a power
    /// of two from 1K to 64M.
    #[arg(long, value_name = "SIZE", value_parser = parse_chunk_size, default_value = "4M")]
    pub chunk_size: u64,
}

#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Memory for chunk buffers, all images together; memory use does not
    /// grow with the number or size of images. At least two chunks per
    /// worker [default: 256M, or two chunks per worker if that is more].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub memory: Option<u64>,
    /// Read engine: io_uring if the kernel allows it (auto), or forced.
    #[arg(long, value_enum, default_value_t = IoArg::Auto)]
    pub io: IoArg,
    /// Read sources with O_DIRECT (aligned reads bypass the page cache).
    #[arg(long)]
    pub direct: bool,
    /// Reads in flight per worker with io_uring.
    #[arg(long, default_value_t = 32)]
    pub queue_depth: u32,
    /// Do not use the cache of zero-leaf hashes. The cache (in
    /// $VSNAP_CACHE_DIR, else $XDG_CACHE_HOME/vsnap, else ~/.cache/vsnap)
    /// lets sparse disks hash in time proportional to their data; it is
    /// checksummed and spot-checked on load, and discarded if anything is off.
    #[arg(long)]
    pub no_cache: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum IoArg {
    Auto,
    Uring,
    Sync,
}

impl EngineArgs {
    /// The engine's tuning as given, for operations that learn the chunk
    /// size themselves (a coordinated backup, from its repository).
    pub fn tuning(&self) -> Tuning {
        Tuning {
            threads: self.threads,
            memory: self.memory,
            io: match self.io {
                IoArg::Auto => IoMode::Auto,
                IoArg::Uring => IoMode::Uring,
                IoArg::Sync => IoMode::Sync,
            },
            direct: self.direct,
            queue_depth: self.queue_depth,
            cache_dir: (!self.no_cache)
                .then(vsnap_engine::pipeline::cache_dir)
                .flatten(),
        }
    }

    /// The engine's options at `chunk_size` (the user's, or a
    /// repository's). A `--memory` below two chunks per worker is a usage
    /// error that gives the floor.
    pub fn options(&self, keep_chunks: bool, chunk_size: u64) -> anyhow::Result<Options> {
        self.tuning()
            .options(keep_chunks, chunk_size)
            .map_err(|e| memory_usage(e.kind()).unwrap_or_else(|| e.into()))
    }

    /// Keeps what this run learnt for the next; a cache that cannot be
    /// written only costs speed, so it is a warning.
    pub fn save_cache(&self, opts: &Options) {
        if let Some(cache) = &opts.zero_cache {
            if let Err(e) = cache.save() {
                say!("vsnap: warning: {e}");
            }
        }
    }

    /// Says on stderr when `--io auto` had to fall back to sync reads, or
    /// io_uring to unregistered buffers.
    pub fn report_fallback(&self) {
        let t = self.tuning();
        if let Ok((_, Some(reason))) = probe(t.io, t.queue_depth) {
            say!("vsnap: {reason}");
        }
    }
}

/// The engine's refusal of a memory budget, as the usage error of
/// `--memory` (exit 2).
pub fn memory_usage(kind: &ErrorKind) -> Option<anyhow::Error> {
    let ErrorKind::MemoryBelowFloor {
        memory,
        floor,
        chunk_size,
        workers,
    } = kind
    else {
        return None;
    };
    Some(crate::usage::error(format!(
        "--memory {}: below the floor of {} (two {} chunks for each of {workers} workers); give at least that, or fewer --threads",
        human(*memory),
        human(*floor),
        human(*chunk_size),
    )))
}
