//! The run: workers that take chunks of every image from one counter,
//! read, hash and (optionally) compress them, and hand them to a sink;
//! then each image's digest from its leaves.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::compress::Compress;
use super::file_digest::FileParts;
use super::pool::{Buffer, BufferPool};
use super::source::{data_bytes, read_chunk, LayerFiles};
use super::{ChunkKind, Options, Progress, Stored};
use crate::digest::{is_zero, DigestPlan, Folder, Leaf};
use crate::error::Result;
use crate::io::{probe, Engine, IoKind};
use vsnap_formats::{AllocationMap, DiskImage};

/// One chunk of a disk, as the engine saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRecord {
    pub offset: u64,
    pub length: u64,
    pub kind: ChunkKind,
    /// BLAKE3 of the chunk's bytes: its identity in a repository. Only
    /// data chunks have one.
    pub id: Option<blake3::Hash>,
    /// With compression on: the bytes a data chunk would be stored as
    /// (compressed, or raw when zstd cannot make it smaller).
    pub stored: Option<u64>,
    /// The chunk's leaf in the disk's digest: what an index keeps, so a
    /// later backup that does not read the chunk can still fold the digest.
    pub leaf: Leaf,
}

#[derive(Debug, Clone)]
pub struct ImageDigest {
    /// BLAKE3 of the whole virtual disk: `b3sum` of its raw conversion.
    pub digest: blake3::Hash,
    pub virtual_size: u64,
    /// Bytes the source holds as data (read from it).
    pub bytes_read: u64,
    pub data_chunks: u64,
    pub zero_chunks: u64,
    pub unallocated_chunks: u64,
    /// Chunks taken unread from what the caller knew (see [`Known`]).
    pub reused_chunks: u64,
    /// With compression on: the data chunks' stored size, all together.
    pub stored_bytes: u64,
    /// Every chunk in order, when [`Options::keep_chunks`] asked for them.
    pub chunks: Vec<ChunkRecord>,
}

/// Where chunks go once they are read and hashed: nowhere for `hash`, a
/// target image for `copy`, a repository for `backup`.
pub trait Sink: Sync {
    /// Whether data chunks need their identity (BLAKE3 of the bytes), which
    /// costs a second hash: a repository names chunks by it.
    fn wants_ids(&self) -> bool {
        false
    }

    /// Asked before a data chunk is compressed: a sink that holds the
    /// chunk already says no, and the worker neither compresses it nor
    /// hands over a payload.
    fn wants_payload(&self, _image: usize, _record: &ChunkRecord) -> Result<bool> {
        Ok(true)
    }

    /// Called once per chunk, from any worker, in any order. `data` holds
    /// the chunk's bytes unless it was unallocated (and so never read); the
    /// buffer returns to the pool when the sink drops it. `stored` is set
    /// for a data chunk when compression is on and the sink wanted it.
    fn put(
        &self,
        image: usize,
        record: ChunkRecord,
        data: Option<Buffer>,
        stored: Option<Stored<'_>>,
    ) -> Result<()>;

    /// Hashes a chunk's bytes `at..at + len` for the file digest of a copy
    /// (`data` holds them unless the chunk was never read). The worker
    /// calls it slice by slice, in order, each right after it hashed the
    /// slice for the disk's digest, so the bytes are hashed twice while
    /// they are in its cache; a whole 4 MiB chunk is not. Only the copy
    /// sink has a file to hash.
    fn hash_slice(
        &self,
        _image: usize,
        _at: u64,
        _len: u64,
        _data: Option<&[u8]>,
        _parts: &mut FileParts,
    ) {
    }

    /// Called once per image when its last chunk is through (or, in a run
    /// that isolates failures, when it failed), from the worker that
    /// finished it: a repository writes a snapshot as soon as its own
    /// disks are done, not when every disk of the run is.
    fn image_done(
        &self,
        _image: usize,
        _outcome: std::result::Result<&ImageDigest, &crate::Error>,
    ) {
    }

    /// [`Sink::put`], with what [`Sink::hash_slice`] hashed of the chunk.
    fn put_hashed(
        &self,
        image: usize,
        record: ChunkRecord,
        data: Option<Buffer>,
        stored: Option<Stored<'_>>,
        _parts: FileParts,
    ) -> Result<()> {
        self.put(image, record, data, stored)
    }
}

/// How much of a chunk the worker hashes at once for both digests: under
/// the 2 MiB a core's L2 cache holds on the machines measured, so the
/// second pass finds the slice in cache (a copy's user time fell about
/// 6 % against hashing the whole 4 MiB chunk twice).
const HASH_SLICE: usize = 1 << 20;

/// What a run knows of a cell already, so it does not read it: a cell an
/// incremental backup found unchanged since the snapshot before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// All zeros, as the last backup found it.
    Zero,
    /// The stored chunk `id`, whose leaf in this disk's digest is `leaf`.
    Data { id: blake3::Hash, leaf: Leaf },
}

/// The sink of a plain hash run.
pub struct NoSink;

impl Sink for NoSink {
    fn put(
        &self,
        _: usize,
        _: ChunkRecord,
        _: Option<Buffer>,
        _: Option<Stored<'_>>,
    ) -> Result<()> {
        Ok(())
    }
}

struct Job<'a> {
    images: &'a [&'a dyn DiskImage],
    files: Vec<Option<LayerFiles>>,
    io: IoKind,
    sink: &'a dyn Sink,
    plans: Vec<DigestPlan>,
    maps: &'a [AllocationMap],
    /// Per image, per cell, what is known without reading (empty: nothing).
    known: &'a [Vec<Option<Known>>],
    /// `starts[i]` is the global index of image i's first chunk.
    starts: Vec<u64>,
    total: u64,
    opts: &'a Options,
    progress: &'a Progress,
    next: AtomicU64,
    failed: AtomicBool,
    pool: BufferPool,
    results: Vec<Mutex<Option<Accum>>>,
    /// A failure of one image fails that image only (its other chunks are
    /// skipped); otherwise the first failure stops the run.
    isolate: bool,
    /// Chunks of each image not yet through.
    left: Vec<AtomicU64>,
    /// Each image's first failure.
    errors: Vec<Mutex<Option<crate::Error>>>,
    /// Each image's outcome, once it is done.
    done: Vec<Mutex<Option<Result<ImageDigest>>>>,
}

/// What a run learns about one image, filled in by the workers as they
/// go: the digest folded leaf by leaf (a few chaining values, whatever the
/// disk's size) and running totals. Chunk records are kept only when asked
/// for.
struct Accum {
    folder: Folder,
    totals: ImageDigest,
    chunks: Vec<Option<ChunkRecord>>,
}

impl Accum {
    fn new(plan: &DigestPlan, keep_chunks: bool) -> Self {
        let n = plan.leaves() as usize;
        Accum {
            folder: Folder::new(*plan),
            totals: ImageDigest {
                digest: blake3::hash(&[]),
                virtual_size: plan.disk_size,
                bytes_read: 0,
                data_chunks: 0,
                zero_chunks: 0,
                unallocated_chunks: 0,
                reused_chunks: 0,
                stored_bytes: 0,
                chunks: Vec::new(),
            },
            chunks: if keep_chunks {
                vec![None; n]
            } else {
                Vec::new()
            },
        }
    }

    fn add(&mut self, index: u64, leaf: Leaf, record: ChunkRecord, read: u64) -> Result<()> {
        let t = &mut self.totals;
        match record.kind {
            ChunkKind::Data => t.data_chunks += 1,
            ChunkKind::Zero => t.zero_chunks += 1,
            ChunkKind::Unallocated => t.unallocated_chunks += 1,
        }
        t.bytes_read += read;
        t.stored_bytes += record.stored.unwrap_or(0);
        if let Some(slot) = self.chunks.get_mut(index as usize) {
            *slot = Some(record);
        }
        self.folder.add(index, leaf)
    }

    /// The image's digest. A missing leaf (a worker that died) leaves the
    /// fold unfinished, which `finish` refuses.
    fn finish(self) -> Result<ImageDigest> {
        let mut out = self.totals;
        out.digest = self.folder.finish()?;
        out.chunks = self.chunks.into_iter().flatten().collect();
        Ok(out)
    }
}

impl Job<'_> {
    fn work(&self) -> Result<()> {
        let mut engine = Engine::new(self.io, self.opts.queue_depth, self.pool.slots())
            .map_err(|e| crate::Error::io(e).during("start the read engine"))?;
        let mut zstd = match self.opts.compress {
            Some(level) => Some(Compress::new(level, self.opts.chunk_size as usize)?),
            None => None,
        };
        while !self.failed.load(Ordering::Relaxed) {
            // The buffer first, the chunk second: a chunk once claimed
            // always has a buffer, so a sink waiting for it in order
            // cannot wait forever while holding the pool.
            let buf = self.pool.take();
            let global = self.next.fetch_add(1, Ordering::Relaxed);
            if global >= self.total {
                break;
            }
            let image = self.starts.partition_point(|&s| s <= global) - 1;
            let index = global - self.starts[image];
            #[cfg(feature = "failpoints")]
            fail::fail_point!("engine-chunk");
            let outcome = if self.has_failed(image) {
                Ok(())
            } else if self.progress.stop_requested() {
                Err(crate::ErrorKind::Stopped.into())
            } else {
                self.chunk(image, index, buf, zstd.as_mut(), &mut engine)
            };
            if let Err(e) = outcome {
                if !self.isolate {
                    self.failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
                self.fail(image, e);
            }
            if self.left[image].fetch_sub(1, Ordering::AcqRel) == 1 {
                self.finish(image);
            }
        }
        Ok(())
    }

    fn has_failed(&self, image: usize) -> bool {
        self.errors[image].lock().map_or(true, |e| e.is_some())
    }

    fn fail(&self, image: usize, e: crate::Error) {
        if let Ok(mut slot) = self.errors[image].lock() {
            slot.get_or_insert(e);
        }
    }

    /// Folds an image's digest (or takes its failure), tells the sink, and
    /// keeps the outcome for the run's result.
    fn finish(&self, image: usize) {
        let failure = self.errors[image].lock().ok().and_then(|mut e| e.take());
        let accum = self.results[image].lock().ok().and_then(|mut a| a.take());
        let outcome = match (failure, accum) {
            (Some(e), _) => Err(e),
            (None, Some(accum)) => accum.finish(),
            (None, None) => Err(crate::Error::worker_panicked()),
        };
        self.sink.image_done(image, outcome.as_ref());
        if let Ok(mut slot) = self.done[image].lock() {
            *slot = Some(outcome);
        }
    }

    fn chunk(
        &self,
        image: usize,
        index: u64,
        mut buf: Buffer,
        zstd: Option<&mut Compress>,
        engine: &mut Engine,
    ) -> Result<()> {
        let plan = &self.plans[image];
        let (offset, length) = plan.leaf_range(index);
        let held = data_bytes(&self.maps[image], offset, length);
        let read = held > 0;
        buf.truncate(length as usize);
        let mut parts = FileParts::default();
        let zero_leaf = || self.zero_leaf(plan, index);
        let known = self
            .known
            .get(image)
            .and_then(|k| k.get(index as usize).copied())
            .flatten()
            .filter(|_| read);
        if let Some(k) = known {
            return self.known_chunk(image, index, k, buf);
        }
        let (leaf, kind, id) = if read {
            match &self.files[image] {
                Some(files) => read_chunk(&self.maps[image], files, offset, &mut buf, engine)?,
                None => self.images[image].read_at(&mut buf, offset)?,
            }
            Progress::add(&self.progress.read, held);
            let data = &buf[..];
            // Zero detection first: an all-zero chunk is never hashed for
            // the disk's digest.
            if is_zero(data) {
                self.sink
                    .hash_slice(image, offset, length, Some(data), &mut parts);
                (zero_leaf(), ChunkKind::Zero, None)
            } else {
                let mut h = plan.leaf_hasher(offset);
                let mut at = offset;
                for slice in data.chunks(HASH_SLICE) {
                    h.update(slice);
                    let n = slice.len() as u64;
                    self.sink.hash_slice(image, at, n, Some(slice), &mut parts);
                    at += n;
                }
                let leaf = plan.finish_leaf(h);
                let want_id = self.opts.keep_chunks || self.sink.wants_ids();
                let id = want_id.then(|| blake3::hash(data));
                (leaf, ChunkKind::Data, id)
            }
        } else {
            self.sink
                .hash_slice(image, offset, length, None, &mut parts);
            (zero_leaf(), ChunkKind::Unallocated, None)
        };
        let mut record = ChunkRecord {
            offset,
            length,
            kind,
            id,
            stored: None,
            leaf,
        };
        // Zero and unallocated chunks are never compressed: they are
        // never stored. Nor is a chunk the sink holds already.
        let stored = match (zstd, kind) {
            (Some(z), ChunkKind::Data) if self.sink.wants_payload(image, &record)? => {
                Some(z.compress(&buf)?)
            }
            _ => None,
        };
        record.stored = stored.map(|s| match s {
            Stored::Compressed(bytes) => bytes.len() as u64,
            Stored::Raw => length,
        });
        self.sink
            .put_hashed(image, record, read.then_some(buf), stored, parts)?;
        self.account(image, index, record, held, false)
    }

    /// Counts a chunk that went through into its image's totals and digest.
    fn account(
        &self,
        image: usize,
        index: u64,
        record: ChunkRecord,
        read: u64,
        reused: bool,
    ) -> Result<()> {
        Progress::add(&self.progress.done, record.length);
        if let Some(accum) = self.results.get(image) {
            if let Some(a) = accum
                .lock()
                .map_err(|_| crate::Error::worker_panicked())?
                .as_mut()
            {
                a.add(index, record.leaf, record, read)?;
                a.totals.reused_chunks += u64::from(reused);
            }
        }
        Ok(())
    }

    /// The leaf of zero cell `index`, from the cache when there is one.
    fn zero_leaf(&self, plan: &DigestPlan, index: u64) -> Leaf {
        match &self.opts.zero_cache {
            Some(cache) => cache.zero_leaf(plan, index),
            None => {
                let (offset, length) = plan.leaf_range(index);
                plan.zero_leaf(offset, length)
            }
        }
    }
}

impl Job<'_> {
    /// A cell known without reading: its record and leaf come from what
    /// the caller knew, nothing is read, hashed or stored, and the sink
    /// gets no bytes. The buffer goes straight back to the pool.
    fn known_chunk(&self, image: usize, index: u64, known: Known, buf: Buffer) -> Result<()> {
        drop(buf);
        let plan = &self.plans[image];
        let (offset, length) = plan.leaf_range(index);
        let (leaf, kind, id) = match known {
            Known::Data { id, leaf } => (leaf, ChunkKind::Data, Some(id)),
            Known::Zero => (self.zero_leaf(plan, index), ChunkKind::Zero, None),
        };
        let record = ChunkRecord {
            offset,
            length,
            kind,
            id,
            stored: None,
            leaf,
        };
        self.sink
            .put_hashed(image, record, None, None, FileParts::default())?;
        self.account(image, index, record, 0, true)
    }
}

/// Hashes every image, all at once, with [`Options::worker_count`] threads.
/// Unallocated chunks are hashed as zeros without being read.
pub fn hash_images(
    images: &[&dyn DiskImage],
    opts: &Options,
    progress: &Progress,
) -> Result<Vec<ImageDigest>> {
    let maps = images
        .iter()
        .map(|i| i.allocation_map())
        .collect::<vsnap_formats::Result<Vec<_>>>()?;
    run(images, &maps, opts, progress, &NoSink)
}

/// Streams every image through `sink`, given each image's allocation map
/// (computed beforehand, with the rest of the slow set-up). The first
/// failure stops the run.
pub fn run(
    images: &[&dyn DiskImage],
    maps: &[AllocationMap],
    opts: &Options,
    progress: &Progress,
    sink: &dyn Sink,
) -> Result<Vec<ImageDigest>> {
    run_images(images, maps, &[], opts, progress, sink, false)?
        .into_iter()
        .collect()
}

/// Streams every image through `sink` in one run, sharing its workers and
/// its memory budget, where a failure of one image fails that image only:
/// the others go on. Each image's outcome is returned, and handed to
/// [`Sink::image_done`] as soon as the image is through. The outer error
/// is one that stops the whole run (the I/O engine could not start).
/// `known` gives, per image, the cells not to read (see [`Known`]); an
/// image it has no list for is read whole.
pub fn run_each(
    images: &[&dyn DiskImage],
    maps: &[AllocationMap],
    known: &[Vec<Option<Known>>],
    opts: &Options,
    progress: &Progress,
    sink: &dyn Sink,
) -> Result<Vec<Result<ImageDigest>>> {
    run_images(images, maps, known, opts, progress, sink, true)
}

fn run_images(
    images: &[&dyn DiskImage],
    maps: &[AllocationMap],
    known: &[Vec<Option<Known>>],
    opts: &Options,
    progress: &Progress,
    sink: &dyn Sink,
    isolate: bool,
) -> Result<Vec<Result<ImageDigest>>> {
    let plans = images
        .iter()
        .map(|i| DigestPlan::new(i.virtual_size(), opts.chunk_size))
        .collect::<Result<Vec<_>>>()?;
    let mut starts = Vec::with_capacity(images.len());
    let mut total = 0;
    for plan in &plans {
        starts.push(total);
        total += plan.leaves();
    }
    let size: u64 = images.iter().map(|i| i.virtual_size()).sum();
    Progress::add(&progress.total, size);
    let (io, _) = probe(opts.io, opts.queue_depth)
        .map_err(|e| crate::Error::io(e).during("start io_uring (--io uring)"))?;
    let mut errors = Vec::new();
    let mut files = Vec::new();
    for image in images {
        match LayerFiles::open(*image, opts.direct) {
            Ok(f) => {
                files.push(f);
                errors.push(Mutex::new(None));
            }
            Err(e) if isolate => {
                files.push(None);
                errors.push(Mutex::new(Some(e)));
            }
            Err(e) => return Err(e),
        }
    }
    let results = plans
        .iter()
        .map(|p| Mutex::new(Some(Accum::new(p, opts.keep_chunks))))
        .collect();
    let job = Job {
        images,
        files,
        io,
        sink,
        left: plans.iter().map(|p| AtomicU64::new(p.leaves())).collect(),
        done: plans.iter().map(|_| Mutex::new(None)).collect(),
        errors,
        isolate,
        plans,
        maps,
        known,
        starts,
        total,
        opts,
        progress,
        next: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        pool: BufferPool::new(opts.buffer_count(), opts.chunk_size as usize),
        results,
    };
    let workers = opts.worker_count().min(total.max(1) as usize);
    let outcomes: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers).map(|_| s.spawn(|| job.work())).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(crate::Error::worker_panicked())))
            .collect()
    });
    for outcome in outcomes {
        outcome?;
    }
    // Every image is done once every chunk was claimed and went through;
    // one without an outcome lost a worker.
    job.done
        .into_iter()
        .map(|d| {
            d.into_inner()
                .map_err(|_| crate::Error::worker_panicked())
                .map(|o| o.unwrap_or_else(|| Err(crate::Error::worker_panicked())))
        })
        .collect()
}
