//! The guests' applications: a writer in each guest's filesystem that
//! records when every write started and how long it took (write plus
//! fdatasync, or the write alone for `buffered`), so a freeze shows as a
//! stall. They run on [`Background`] threads.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::{io, Error, Result};

/// A thread that runs until told to stop.
pub struct Background<T> {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<T>>>,
    what: &'static str,
}

impl<T: Send + 'static> Background<T> {
    /// Runs `work`, which checks the flag it is given and returns once it
    /// is set. `what` names it if it dies.
    pub fn spawn(
        what: &'static str,
        work: impl FnOnce(&AtomicBool) -> Result<T> + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        Background {
            stop,
            handle: Some(std::thread::spawn(move || work(&flag))),
            what,
        }
    }

    /// Stops it and waits for its result.
    pub fn finish(mut self) -> Result<T> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            _ => Err(Error::Stopped(self.what)),
        }
    }
}

impl<T> Drop for Background<T> {
    /// Only tells it to stop: a writer held by a frozen filesystem ends
    /// after the thaw, which whoever froze it guarantees.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// 4 KiB at random offsets of a file (64 MiB, or a quarter of a
    /// smaller disk), each followed by fdatasync
    /// (a database's commit pattern).
    #[cfg_attr(feature = "clap", value(name = "random-4k-fsync"))]
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

impl Kind {
    /// The name it is given on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Random4kFsync => "random-4k-fsync",
            Kind::Sequential => "sequential",
            Kind::Buffered => "buffered",
            Kind::None => "none",
        }
    }
}

/// One write: when it started (µs on the caller's clock) and how long it
/// took (µs).
pub type Sample = (u64, u32);

/// A guest's writer, running until finished.
pub type Workload = Background<Vec<Sample>>;

/// Starts the writer of `kind` (none for [`Kind::None`]) in
/// `dir/workload.dat`, a file of `file_size` bytes (whole MiB, at least
/// one), allocated before the first timed write.
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
        .open(&path)
        .map_err(io("create", &path))?;
    // Allocated up front, so the writes measure the freeze, not block
    // allocation.
    let block = vec![0x5au8; 1 << 20];
    let file_size = (file_size >> 20).max(1) << 20;
    for at in (0..file_size).step_by(block.len()) {
        file.write_all_at(&block, at).map_err(io("write", &path))?;
    }
    file.sync_all().map_err(io("sync", &path))?;
    Ok(Some(Background::spawn("a workload thread", move |stop| {
        write_loop(&file, file_size, kind, stop, epoch, seed).map_err(io("write", path))
    })))
}

fn write_loop(
    file: &File,
    file_size: u64,
    kind: Kind,
    stop: &AtomicBool,
    epoch: Instant,
    seed: u64,
) -> std::io::Result<Vec<Sample>> {
    let (size, random) = match kind {
        Kind::Random4kFsync => (4096usize, true),
        _ => (256 << 10, false),
    };
    let data = vec![0xa5u8; size];
    let slots = (file_size / size as u64).max(1);
    let mut rng = crate::Rng::new(seed | 1);
    let mut next = 0u64;
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let slot = if random {
            // Every guest gets its own sequence.
            rng.below(slots)
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
        samples.push((
            vsnap_protocol::micros(t.duration_since(epoch)),
            u32::try_from(took.as_micros()).unwrap_or(u32::MAX),
        ));
        if kind == Kind::Buffered {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    Ok(samples)
}
