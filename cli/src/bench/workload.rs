//! The guests' applications for `vsnap bench freeze`: a writer in each
//! guest's filesystem that records when every write started and how long
//! it took (write plus fdatasync, or the write alone for `buffered`), so a
//! freeze shows as a stall.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Result;

use crate::background::Background;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// 4 KiB at random offsets of a file (64 MiB, or a quarter of a
    /// smaller disk), each followed by fdatasync
    /// (a database's commit pattern).
    #[value(name = "random-4k-fsync")]
    #[serde(rename = "random-4k-fsync")]
    Random4kFsync,
    /// 256 KiB writes going round the same file, each followed by fdatasync
    /// (a log or a backup of its own).
    Sequential,
    /// 256 KiB writes going round the same file, never synced, one a
    /// millisecond: the page cache holds the file's dirty data, which a
    /// freeze must write back before it can freeze (a busy file server).
    Buffered,
    None,
}

/// One write: when it started (µs on the bench's clock) and how long it
/// took (µs).
pub type Sample = (u64, u32);

/// A guest's writer, running until finished.
pub type Workload = Background<Vec<Sample>>;

/// Starts the writer of `kind` (none for [`Kind::None`]) in
/// `dir/workload.dat`, a file of `file_size` bytes (whole MiB).
pub fn start(
    kind: Kind,
    dir: &Path,
    file_size: u64,
    epoch: Instant,
    seed: u64,
) -> Result<Option<Workload>> {
    if kind == Kind::None {
        return Ok(None);
    }
    let path = dir.join("workload.dat");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    // Allocated up front, so the writes measure the freeze, not
    // block allocation.
    let block = vec![0x5au8; 1 << 20];
    let file_size = (file_size >> 20).max(1) << 20;
    for at in (0..file_size).step_by(block.len()) {
        file.write_all_at(&block, at)?;
    }
    file.sync_all()?;
    Ok(Some(Background::spawn("a workload thread", move |stop| {
        write_loop(&file, file_size, kind, stop, epoch, seed)
    })))
}

fn write_loop(
    file: &File,
    file_size: u64,
    kind: Kind,
    stop: &AtomicBool,
    epoch: Instant,
    seed: u64,
) -> Result<Vec<Sample>> {
    let (size, random) = match kind {
        Kind::Random4kFsync => (4096usize, true),
        _ => (256 << 10, false),
    };
    let data = vec![0xa5u8; size];
    let slots = (file_size / size as u64).max(1);
    let mut x = seed | 1;
    let mut next = 0u64;
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let slot = if random {
            // xorshift64: cheap, and every guest gets its own sequence.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % slots
        } else {
            next = (next + 1) % slots;
            next
        };
        let t = Instant::now();
        file.write_all_at(&data, slot * size as u64)?;
        if kind != Kind::Buffered {
            file.sync_data()?;
        }
        let took = t.elapsed();
        let at = t.duration_since(epoch);
        samples.push((
            vsnap_coordinator::micros(at),
            u32::try_from(took.as_micros()).unwrap_or(u32::MAX),
        ));
        if kind == Kind::Buffered {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    Ok(samples)
}
