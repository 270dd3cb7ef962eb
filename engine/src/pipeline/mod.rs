//! Streaming many disk images at once: read, hash, and (with the copy and
//! repository sinks) compress and store.
//!
//! Work is cut into chunks aligned to virtual-disk offsets. Every worker
//! takes the next chunk of any image from one shared counter, so both cores
//! stay busy whether there is one large image or many small ones. Each
//! worker runs its chunk through every stage itself (no hand-off between
//! threads, so the chunk stays in its core's cache), and takes the chunk's
//! buffer from a pool capped at the memory budget: a worker that finds
//! the pool empty waits, which is the back-pressure, and memory is set by
//! the budget, never by the size or number of images.

mod b3sums;
mod compress;
mod copy;
mod file_digest;
mod pool;
pub mod report;
mod run;
mod source;

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use std::sync::Arc;

use crate::digest::ZeroCache;
use crate::io::IoMode;

pub use b3sums::{update_b3sums, B3SUMS};
pub use copy::{copy_images, verify_copies, CopyResult, CopySpec, TargetFormat};
pub use file_digest::FileParts;
pub use pool::{Buffer, BufferPool};
pub use run::{hash_images, run, run_each, ChunkRecord, ImageDigest, Known, NoSink, Sink};

/// How a data chunk is stored, as the worker's zstd left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored<'a> {
    /// zstd made it smaller: these bytes (a zstd frame).
    Compressed(&'a [u8]),
    /// zstd could not shrink it: the chunk's own bytes, as they are.
    Raw,
}

/// The default chunk: large enough to amortise per-chunk overhead, small
/// enough that dedup finds repeats and memory stays small per worker.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;

#[derive(Debug, Clone)]
pub struct Options {
    /// A power of two of at least 1 KiB (the digest tree needs it).
    pub chunk_size: u64,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// Keep a record of every chunk (offset, kind, identity).
    pub keep_chunks: bool,
    /// Bytes of chunk buffers in flight, all images together.
    pub memory: u64,
    /// Compress data chunks with zstd at this level, in the same pass.
    pub compress: Option<i32>,
    /// Which read engine.
    pub io: IoMode,
    /// Read sources with `O_DIRECT`, bypassing the page cache.
    pub direct: bool,
    /// Reads in flight per worker with io_uring.
    pub queue_depth: u32,
    /// Chaining values of zero leaves, shared by every worker and kept
    /// across runs by the caller; its leaf size must be `chunk_size`.
    pub zero_cache: Option<Arc<ZeroCache>>,
}

/// The default buffer budget.
pub const DEFAULT_MEMORY: u64 = 256 << 20;

impl Default for Options {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            threads: 0,
            keep_chunks: false,
            memory: DEFAULT_MEMORY,
            compress: None,
            io: IoMode::Auto,
            direct: false,
            queue_depth: 32,
            zero_cache: None,
        }
    }
}

impl Options {
    /// Buffers in the pool: the budget divided into chunks, but never fewer
    /// than two per worker, so reading and writing overlap.
    pub fn buffer_count(&self) -> usize {
        let by_budget = (self.memory / self.chunk_size.max(1)) as usize;
        by_budget.max(2 * self.worker_count())
    }

    pub fn worker_count(&self) -> usize {
        if self.threads > 0 {
            return self.threads;
        }
        std::thread::available_parallelism().map_or(2, |n| n.get())
    }
}

/// The engine's tuning as a user gives it, before the chunk size is known:
/// a repository's commands learn that from the repository, so the memory
/// floor and the zero-leaf cache are settled only then, by [`Tuning::options`].
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// The buffer budget; `None` is [`DEFAULT_MEMORY`], raised to the
    /// floor on a host with many cores.
    pub memory: Option<u64>,
    pub io: IoMode,
    pub direct: bool,
    pub queue_depth: u32,
    /// Where the zero-leaf cache lives; `None` runs without it.
    pub cache_dir: Option<std::path::PathBuf>,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            threads: 0,
            memory: None,
            io: IoMode::Auto,
            direct: false,
            queue_depth: 32,
            cache_dir: None,
        }
    }
}

/// Where this host keeps what vsnap learns between runs (the zero-leaf
/// cache, a bucket's pack indexes): `$VSNAP_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/vsnap`, else `~/.cache/vsnap`; an empty variable counts
/// as unset, as the XDG rules say. `None` without a home. One function for
/// every caller, so the CLI and the service share one cache.
pub fn cache_dir() -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = var("VSNAP_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("vsnap"));
    }
    var("HOME").map(|h| PathBuf::from(h).join(".cache").join("vsnap"))
}

impl Tuning {
    /// The engine's options at `chunk_size`. A given memory budget below
    /// two chunks per worker is refused with the floor, rather than raised
    /// in silence.
    pub fn options(&self, keep_chunks: bool, chunk_size: u64) -> crate::Result<Options> {
        let mut opts = Options {
            chunk_size,
            threads: self.threads,
            keep_chunks,
            memory: DEFAULT_MEMORY,
            compress: None,
            io: self.io,
            direct: self.direct,
            queue_depth: self.queue_depth,
            zero_cache: None,
        };
        let workers = opts.worker_count();
        let floor = 2 * workers as u64 * chunk_size;
        opts.memory = match self.memory {
            Some(m) if m < floor => {
                return Err(crate::ErrorKind::MemoryBelowFloor {
                    memory: m,
                    floor,
                    chunk_size,
                    workers,
                }
                .into())
            }
            Some(m) => m,
            None => DEFAULT_MEMORY.max(floor),
        };
        opts.zero_cache = self
            .cache_dir
            .as_deref()
            .map(|dir| Arc::new(ZeroCache::load(dir, chunk_size)));
        Ok(opts)
    }
}

/// What a chunk turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkKind {
    /// Holds data: stored, and identified by its BLAKE3.
    Data,
    /// Allocated but all zeros: never stored.
    Zero,
    /// Not allocated in any layer: never read, never stored.
    Unallocated,
}

/// Counters a progress display polls from another thread.
#[derive(Debug, Default)]
pub struct Progress {
    /// Virtual bytes to process, set before the work starts.
    pub total: AtomicU64,
    /// Virtual bytes processed, read or not.
    pub done: AtomicU64,
    /// Bytes actually read from sources.
    pub read: AtomicU64,
    /// Set by whoever runs the work to stop it (a cancelled run): every
    /// worker stops before its next chunk, and each image not finished
    /// fails with [`crate::ErrorKind::Stopped`], so nothing unfinished is
    /// committed.
    pub stop: std::sync::atomic::AtomicBool,
}

impl Progress {
    /// Asks the work to stop before its next chunk.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
