//! Hashing many images in parallel: the virtual-disk digest of each, and
//! optionally every chunk's identity.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std::fs::File;
use std::path::PathBuf;

use super::pool::{Buffer, BufferPool};
use super::{ChunkKind, Options, Progress};
use crate::digest::{is_zero, DigestPlan, Leaf};
use crate::error::Result;
use crate::error::{ErrorKind, ResultExt};
use crate::format::{AllocationMap, DiskImage, ExtentKind};
use crate::io::{open_for_read, probe, Engine, IoKind, ReadOp};

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
    /// With compression on: the data chunks' stored size, all together.
    pub stored_bytes: u64,
    /// Every chunk in order, when [`Options::keep_chunks`] asked for them.
    pub chunks: Vec<ChunkRecord>,
}

/// A worker's zstd context and output buffer, reused for every chunk.
struct Compress {
    ctx: zstd::bulk::Compressor<'static>,
    out: Vec<u8>,
}

impl Compress {
    fn new(level: i32, chunk: usize) -> Result<Self> {
        let ctx = zstd::bulk::Compressor::new(level).map_err(crate::Error::from)?;
        Ok(Self {
            ctx,
            out: Vec::with_capacity(zstd::zstd_safe::compress_bound(chunk)),
        })
    }

    /// Compresses a chunk; what it would be stored as: the compressed
    /// bytes, or the raw ones when compression does not shrink it.
    fn stored_len(&mut self, data: &[u8]) -> Result<u64> {
        self.out.clear();
        let n = self
            .ctx
            .compress_to_buffer(data, &mut self.out)
            .map_err(crate::Error::from)?;
        Ok(n.min(data.len()) as u64)
    }
}

/// How many bytes of `[offset, offset + len)` are data, so must be read.
fn data_bytes(map: &AllocationMap, offset: u64, len: u64) -> u64 {
    let extents = map.extents();
    let first = extents.partition_point(|e| e.end() <= offset);
    extents[first..]
        .iter()
        .take_while(|e| e.offset < offset + len)
        .filter(|e| e.kind == ExtentKind::Data)
        .map(|e| e.end().min(offset + len) - e.offset.max(offset))
        .sum()
}

/// Where chunks go once they are read and hashed: nowhere for `hash`, a
/// target image for `copy`, a repository for `backup`.
pub trait Sink: Sync {
    /// Called once per chunk, from any worker, in any order. `data` holds
    /// the chunk's bytes unless it was unallocated (and so never read); the
    /// buffer returns to the pool when the sink drops it.
    fn put(&self, image: usize, record: ChunkRecord, data: Option<Buffer>) -> Result<()>;
}

/// The sink of a plain hash run.
pub struct NoSink;

impl Sink for NoSink {
    fn put(&self, _: usize, _: ChunkRecord, _: Option<Buffer>) -> Result<()> {
        Ok(())
    }
}

/// An image's layer files, opened for the read engine: buffered always,
/// and with `O_DIRECT` when asked (used for the reads that are aligned).
struct LayerFiles {
    paths: Vec<PathBuf>,
    buffered: Vec<File>,
    direct: Option<Vec<File>>,
}

impl LayerFiles {
    /// `None` when the image is not made of plain files (an in-memory
    /// one): the worker then reads through `DiskImage::read_at`.
    fn open(image: &dyn DiskImage, direct: bool) -> Result<Option<LayerFiles>> {
        let paths = image.layer_paths();
        let mut buffered = Vec::new();
        for p in &paths {
            match open_for_read(p, false) {
                Ok(f) => buffered.push(f),
                Err(_) => return Ok(None),
            }
        }
        let direct = if direct {
            let files = paths
                .iter()
                .map(|p| open_for_read(p, true).ctx_file(p, "open with O_DIRECT (--direct)"))
                .collect::<Result<Vec<_>>>()?;
            Some(files)
        } else {
            None
        };
        Ok(Some(LayerFiles {
            paths,
            buffered,
            direct,
        }))
    }
}

/// The smallest alignment `O_DIRECT` accepts on the devices seen here; a
/// read that is not aligned to it goes through the page cache instead.
const DIRECT_ALIGN: u64 = 512;

struct Job<'a> {
    images: &'a [&'a dyn DiskImage],
    files: Vec<Option<LayerFiles>>,
    io: IoKind,
    sink: &'a dyn Sink,
    plans: Vec<DigestPlan>,
    maps: &'a [AllocationMap],
    /// `starts[i]` is the global index of image i's first chunk.
    starts: Vec<u64>,
    total: u64,
    opts: &'a Options,
    progress: &'a Progress,
    next: AtomicU64,
    failed: AtomicBool,
    pool: BufferPool,
}

struct Done {
    image: usize,
    index: u64,
    leaf: Leaf,
    record: ChunkRecord,
    read: u64,
}

impl Job<'_> {
    fn work(&self) -> Result<Vec<Done>> {
        let mut out = Vec::new();
        let mut engine = Engine::new(self.io, self.opts.queue_depth)
            .map_err(|e| crate::Error::io(e).during("start the read engine"))?;
        let mut zstd = match self.opts.compress {
            Some(level) => Some(Compress::new(level, self.opts.chunk_size as usize)?),
            None => None,
        };
        while !self.failed.load(Ordering::Relaxed) {
            // The buffer first, the chunk second: a chunk once claimed
            // always has a buffer, so a writer waiting for it in order
            // cannot wait forever while holding the pool.
            let Some(buf) = self.pool.take() else { break };
            let global = self.next.fetch_add(1, Ordering::Relaxed);
            if global >= self.total {
                break;
            }
            let image = self.starts.partition_point(|&s| s <= global) - 1;
            let index = global - self.starts[image];
            match self.chunk(image, index, buf, zstd.as_mut(), &mut engine) {
                Ok(done) => out.push(done),
                Err(e) => {
                    self.failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Reads a chunk straight from the layer files the allocation map
    /// names, all its reads in one go, zero-filling only the gaps.
    fn read_direct(
        &self,
        image: usize,
        files: &LayerFiles,
        offset: u64,
        buf: &mut Buffer,
        engine: &mut Engine,
    ) -> Result<()> {
        let len = buf.len() as u64;
        let end = offset + len;
        let extents = self.maps[image].extents();
        let first = extents.partition_point(|e| e.end() <= offset);
        let mut ops = Vec::new();
        let mut pos = offset;
        let whole = buf.full();
        for e in extents[first..].iter().take_while(|e| e.offset < end) {
            let (from, to) = (e.offset.max(offset), e.end().min(end));
            let (Some(layer), Some(file_offset), ExtentKind::Data) =
                (e.layer, e.file_offset, e.kind)
            else {
                continue;
            };
            whole[(pos - offset) as usize..(from - offset) as usize].fill(0);
            let file_offset = file_offset + (from - e.offset);
            let (buf_offset, n) = ((from - offset) as usize, (to - from) as usize);
            let aligned = file_offset % DIRECT_ALIGN == 0
                && buf_offset as u64 % DIRECT_ALIGN == 0
                && n as u64 % DIRECT_ALIGN == 0;
            let file = match (&files.direct, aligned) {
                (Some(direct), true) => direct.get(layer),
                _ => files.buffered.get(layer),
            };
            let Some(file) = file else {
                return Err(
                    ErrorKind::InvalidArgument(format!("no file for layer {layer}")).into(),
                );
            };
            ops.push((
                layer,
                ReadOp {
                    file,
                    file_offset,
                    buf_offset,
                    len: n,
                },
            ));
            pos = to;
        }
        whole[(pos - offset) as usize..len as usize].fill(0);
        let reads: Vec<ReadOp<'_>> = ops.iter().map(|(_, op)| *op).collect();
        engine.read(&reads, whole).map_err(|(i, e)| {
            let (layer, op) = ops.get(i).map_or((0, None), |(l, op)| (*l, Some(op)));
            let path = files.paths.get(layer).cloned().unwrap_or_default();
            let kind = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                ErrorKind::Truncated {
                    what: "image data",
                    needed: op.map_or(0, |o| o.len as u64),
                    at: op.map_or(0, |o| o.file_offset),
                    available: 0,
                }
            } else {
                ErrorKind::Io(e)
            };
            crate::Error::from(kind)
                .in_file(&path)
                .at(op.map_or(0, |o| o.file_offset))
                .during("read image")
        })
    }

    fn chunk(
        &self,
        image: usize,
        index: u64,
        mut buf: Buffer,
        zstd: Option<&mut Compress>,
        engine: &mut Engine,
    ) -> Result<Done> {
        let plan = &self.plans[image];
        let (offset, length) = plan.leaf_range(index);
        let held = data_bytes(&self.maps[image], offset, length);
        let read = held > 0;
        buf.truncate(length as usize);
        let zero_leaf = || match &self.opts.zero_cache {
            Some(cache) => cache.zero_leaf(plan, index),
            None => plan.zero_leaf(offset, length),
        };
        let (leaf, kind, id) = if read {
            match &self.files[image] {
                Some(files) => self.read_direct(image, files, offset, &mut buf, engine)?,
                None => self.images[image].read_at(&mut buf, offset)?,
            }
            Progress::add(&self.progress.read, held);
            let data = &buf[..];
            // Zero detection first: an all-zero chunk is never hashed.
            if is_zero(data) {
                (zero_leaf(), ChunkKind::Zero, None)
            } else {
                let leaf = plan.leaf(offset, data);
                let id = self.opts.keep_chunks.then(|| blake3::hash(data));
                (leaf, ChunkKind::Data, id)
            }
        } else {
            (zero_leaf(), ChunkKind::Unallocated, None)
        };
        // Zero and unallocated chunks are never compressed: they are
        // never stored.
        let stored = match (zstd, kind) {
            (Some(z), ChunkKind::Data) => Some(z.stored_len(&buf)?),
            _ => None,
        };
        let record = ChunkRecord {
            offset,
            length,
            kind,
            id,
            stored,
        };
        self.sink.put(image, record, read.then_some(buf))?;
        Progress::add(&self.progress.done, length);
        Ok(Done {
            image,
            index,
            leaf,
            record,
            read: held,
        })
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
        .collect::<Result<Vec<_>>>()?;
    run(images, &maps, opts, progress, &NoSink)
}

/// Streams every image through `sink`, given each image's allocation map
/// (computed beforehand, with the rest of the slow set-up).
pub fn run(
    images: &[&dyn DiskImage],
    maps: &[AllocationMap],
    opts: &Options,
    progress: &Progress,
    sink: &dyn Sink,
) -> Result<Vec<ImageDigest>> {
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
    let files = images
        .iter()
        .map(|i| LayerFiles::open(*i, opts.direct))
        .collect::<Result<Vec<_>>>()?;
    let job = Job {
        images,
        files,
        io,
        sink,
        plans,
        maps,
        starts,
        total,
        opts,
        progress,
        next: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        pool: BufferPool::new(opts.buffer_count(), opts.chunk_size as usize),
    };
    let workers = opts.worker_count().min(total.max(1) as usize);
    let results: Vec<Result<Vec<Done>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers).map(|_| s.spawn(|| job.work())).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Ok(Vec::new())))
            .collect()
    });
    let mut leaves: Vec<Vec<Option<(Leaf, ChunkRecord, u64)>>> = job
        .plans
        .iter()
        .map(|p| vec![None; p.leaves() as usize])
        .collect();
    for result in results {
        for d in result? {
            leaves[d.image][d.index as usize] = Some((d.leaf, d.record, d.read));
        }
    }
    leaves
        .into_iter()
        .zip(&job.plans)
        .map(|(slots, plan)| finish(plan, slots, opts.keep_chunks))
        .collect()
}

fn finish(
    plan: &DigestPlan,
    slots: Vec<Option<(Leaf, ChunkRecord, u64)>>,
    keep_chunks: bool,
) -> Result<ImageDigest> {
    let mut out = ImageDigest {
        digest: blake3::hash(&[]),
        virtual_size: plan.disk_size,
        bytes_read: 0,
        data_chunks: 0,
        zero_chunks: 0,
        unallocated_chunks: 0,
        stored_bytes: 0,
        chunks: Vec::new(),
    };
    let mut leaves = Vec::with_capacity(slots.len());
    for slot in slots {
        // A worker that panicked left holes; the leaf count check in
        // `root` then refuses to produce a digest.
        let Some((leaf, record, read)) = slot else {
            continue;
        };
        leaves.push(leaf);
        match record.kind {
            ChunkKind::Data => out.data_chunks += 1,
            ChunkKind::Zero => out.zero_chunks += 1,
            ChunkKind::Unallocated => out.unallocated_chunks += 1,
        }
        out.bytes_read += read;
        out.stored_bytes += record.stored.unwrap_or(0);
        if keep_chunks {
            out.chunks.push(record);
        }
    }
    out.digest = plan.root(&leaves)?;
    Ok(out)
}
