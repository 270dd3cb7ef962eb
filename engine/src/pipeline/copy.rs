//! Copying images in parallel into a directory, with the digest computed in
//! the same pass and `B3SUMS` written for stock-tool checks.
//!
//! Targets are written under temporary names and renamed only when all of
//! them are complete and durable, so the directory never holds a partial
//! image under a real name; on failure the temporary files are removed.

use std::fs::File;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

use super::file_digest::{FileParts, Layout, Shape};
use super::pool::Buffer;
use super::run::{run, ChunkRecord, ImageDigest, Sink};
use super::source::data_pieces;
use super::{ChunkKind, Options, Progress, Stored};
use crate::digest::FileTree;
use crate::error::{Error, ErrorKind, Result, ResultExt};
use vsnap_formats::storage::Storage;
use vsnap_formats::vhd::create::{plan_footer, CreateOptions, DEFAULT_BLOCK_SIZE};
use vsnap_formats::vhd::{DiskType, PreallocatedVhd};
use vsnap_formats::vhdx::{NewVhdx, VhdxIdentity, VhdxWriter};
use vsnap_formats::{AllocationMap, DiskImage, ExtentKind, ImageFormat};

/// What a target is written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetFormat {
    Raw,
    FixedVhd,
    DynamicVhd,
    FixedVhdx,
    DynamicVhdx,
}

impl TargetFormat {
    /// `same` for a source: raw stays raw, fixed stays fixed, dynamic and
    /// differencing become dynamic (a differencing chain is flattened),
    /// VHD stays VHD and VHDX stays VHDX.
    pub fn same_as(image: &dyn DiskImage) -> TargetFormat {
        match (image.format(), image.vhd_footer().map(|f| f.disk_type)) {
            (ImageFormat::Raw, _) => TargetFormat::Raw,
            (ImageFormat::Vhdx, _) => match image.vhdx_identity() {
                Some(id) if id.fixed => TargetFormat::FixedVhdx,
                _ => TargetFormat::DynamicVhdx,
            },
            (_, Some(DiskType::Fixed)) => TargetFormat::FixedVhd,
            _ => TargetFormat::DynamicVhd,
        }
    }

    pub fn is_vhdx(self) -> bool {
        matches!(self, TargetFormat::FixedVhdx | TargetFormat::DynamicVhdx)
    }

    /// As `--out-format` and the reports name it.
    pub fn name(self) -> &'static str {
        match self {
            TargetFormat::Raw => "raw",
            TargetFormat::FixedVhd => "fixed",
            TargetFormat::DynamicVhd => "dynamic",
            TargetFormat::FixedVhdx => "vhdx-fixed",
            TargetFormat::DynamicVhdx => "vhdx",
        }
    }

    /// A copy's file name: `source`'s, with this format's extension
    /// unless `same` (the source decided the format, so its name fits).
    pub fn file_name(self, source: &Path, same: bool) -> Result<String> {
        let name = source.file_name().ok_or_else(|| {
            Error::from(ErrorKind::InvalidArgument(format!(
                "{}: not a file name",
                source.display()
            )))
        })?;
        if same {
            return Ok(name.to_string_lossy().into_owned());
        }
        let stem = Path::new(name)
            .file_stem()
            .map_or_else(|| name.to_string_lossy(), |s| s.to_string_lossy());
        Ok(match self {
            TargetFormat::Raw => format!("{stem}.raw"),
            TargetFormat::FixedVhdx | TargetFormat::DynamicVhdx => format!("{stem}.vhdx"),
            _ => format!("{stem}.vhd"),
        })
    }
}

/// Re-opens every copy and checks its virtual-disk digest against its
/// source's: what `copy --verify` promises, read back from the target.
pub fn verify_copies(results: &[CopyResult], opts: &Options) -> Result<()> {
    let copies = results
        .iter()
        .map(|r| vsnap_formats::open(&r.target, None))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let refs: Vec<&dyn DiskImage> = copies.iter().map(|b| &**b).collect();
    let digests = super::hash_images(&refs, opts, &Progress::default())?;
    for (r, d) in results.iter().zip(digests) {
        if d.digest != r.source.digest {
            return Err(Error::from(ErrorKind::DigestMismatch {
                what: "the copy's virtual-disk",
                expected: r.source.digest.to_hex().to_string().into(),
                found: d.digest.to_hex().to_string().into(),
            })
            .in_file(&r.target)
            .during("verify the copy"));
        }
    }
    Ok(())
}

/// One copy to make.
#[derive(Debug, Clone)]
pub struct CopySpec {
    pub target: PathBuf,
    pub format: TargetFormat,
    /// Replace a file that exists, once the copy is whole and checked.
    pub replace: bool,
    /// The virtual-disk digest the source must have (a restore knows it
    /// from the backup); a copy that does not match is never renamed into
    /// place.
    pub expect: Option<blake3::Hash>,
    /// Flush the copy (and the directory's new name) to disk before it
    /// counts as done. Without it a crash soon after can leave a copy
    /// whose name is there and whose data is not, as after `cp` or
    /// `qemu-img convert`, neither of which flushes.
    pub durable: bool,
}

#[derive(Debug, Clone)]
pub struct CopyResult {
    pub source: ImageDigest,
    pub target: PathBuf,
    pub format: TargetFormat,
    pub bytes_written: u64,
    /// BLAKE3 of the target file's bytes: what `b3sum` prints for it.
    pub file_digest: blake3::Hash,
}

enum Writer {
    /// Raw and fixed VHD: the disk's bytes sit at their own offsets.
    Flat(File),
    Dynamic(Box<PreallocatedVhd>),
    Vhdx(Box<VhdxWriter>),
}

impl Writer {
    /// The target file around the disk's bytes, for its digest.
    fn layout<'a>(&'a self, footer: Option<&'a [u8; 512]>) -> Layout<'a> {
        match (self, footer) {
            (Writer::Flat(_), None) => Layout::Raw,
            (Writer::Flat(_), Some(f)) => Layout::Fixed(f),
            (Writer::Dynamic(v), _) => Layout::Blocks(Shape {
                prefix: v.prefix(),
                placed: v.placed_blocks(),
                per_block: vec![0xFF; v.bitmap_size() as usize],
                suffix: v.footer_bytes(),
                file: v.placed(),
            }),
            (Writer::Vhdx(v), _) => Layout::Blocks(Shape {
                prefix: v.prefix(),
                placed: v.placed_blocks(),
                per_block: Vec::new(),
                suffix: &[],
                file: v.placed(),
            }),
        }
    }

    fn write_at(&self, tmp: &Path, buf: &[u8], offset: u64) -> Result<()> {
        match self {
            Writer::Flat(f) => f.write_all_at(buf, offset).ctx(tmp, offset, "write copy"),
            Writer::Dynamic(v) => Ok(v.placed().write_at(buf, offset)?),
            Writer::Vhdx(v) => Ok(v.placed().write_at(buf, offset)?),
        }
    }

    /// Reserves the file's space for a data range before it is written.
    fn reserve(&self, tmp: &Path, offset: u64, len: u64) -> Result<()> {
        match self {
            Writer::Flat(f) => vsnap_formats::storage::preallocate(f, offset, len).ctx(
                tmp,
                offset,
                "reserve space for the copy",
            ),
            Writer::Dynamic(v) => Ok(v.placed().reserve(offset, len)?),
            Writer::Vhdx(v) => Ok(v.placed().reserve(offset, len)?),
        }
    }

    fn start_writeback(&self) {
        match self {
            Writer::Flat(f) => vsnap_formats::storage::start_writeback(f),
            Writer::Dynamic(v) => v.start_writeback(),
            Writer::Vhdx(v) => v.start_writeback(),
        }
    }

    fn sync(&self, tmp: &Path) -> Result<()> {
        match self {
            Writer::Flat(f) => f.sync().ctx_file(tmp, "flush copy"),
            Writer::Dynamic(v) => Ok(v.sync()?),
            Writer::Vhdx(v) => Ok(v.sync()?),
        }
    }
}

struct Target {
    tmp: PathBuf,
    durable: bool,
    writer: Writer,
    /// For a fixed VHD: the footer that follows the data.
    footer: Option<[u8; 512]>,
    /// Bytes of the disk written so far.
    written: AtomicU64,
    /// Data chunks hashed and waiting to be written.
    queued: Mutex<Vec<(u64, Buffer)>>,
    /// Held by the worker writing to the file.
    writing: Mutex<()>,
    /// The temporary file's lock, held until it is renamed or removed.
    _lock: File,
}

/// Hashes each chunk at its place in the target file, slice by slice on
/// the worker that read it (each slice right after the disk digest's pass
/// over it, while it is in the core's cache), writes it there from the
/// same worker, and folds the chunk's part of the file digest.
///
/// The worker writes, rather than a writer thread per target: the buffer
/// is written while it is still in the core's cache, goes back to the
/// pool at once (so only a few buffers circle, warm), and no thread waits
/// on another for chunks in order. Whole chunks are written, not slices: a
/// VHDX copy (aligned, unlike a VHD's blocks) written in 1 MiB pieces took
/// about 80 % more system time than in 2 or 4 MiB ones, likely because
/// ext4 caches large aligned writes in large folios.
struct CopySink<'a> {
    targets: &'a [Target],
    layouts: &'a [Layout<'a>],
    maps: &'a [AllocationMap],
    folds: Vec<Mutex<Fold>>,
    chunk_size: u64,
}

/// One target's file digest, folded in file order from parts that arrive
/// in any order. The parts are a few chaining values a chunk, so the ones
/// waiting for a slow chunk cost next to nothing.
struct Fold {
    pending: BTreeMap<u64, FileParts>,
    next: u64,
    /// `None` for a raw copy, whose file is the disk.
    tree: Option<FileTree>,
}

/// Chunks a target's queue holds before a worker waits to write its own.
const MAX_QUEUED: usize = 2;

/// How much a target gets written between writeback kicks: enough to
/// make each kick worth a syscall, little enough that the disk starts
/// early.
const WRITEBACK_EVERY: u64 = 64 << 20;

impl CopySink<'_> {
    /// Writes the parts of a data chunk that the source holds, so that
    /// unallocated stays unallocated, each into space reserved just before
    /// (see [`vsnap_formats::storage::preallocate`]: ext4 then skips its per-page
    /// delayed allocation).
    fn write(&self, image: usize, start: u64, data: &[u8]) -> Result<()> {
        let (Some(target), Some(map)) = (self.targets.get(image), self.maps.get(image)) else {
            return Ok(());
        };
        let (w, tmp) = (&target.writer, &target.tmp);
        let mut written = 0;
        for (from, to) in data_pieces(map, start, start + data.len() as u64) {
            w.reserve(tmp, from, to - from)?;
            w.write_at(
                tmp,
                &data[(from - start) as usize..(to - start) as usize],
                from,
            )?;
            written += to - from;
        }
        let before = target.written.fetch_add(written, Ordering::Relaxed);
        if target.durable && before / WRITEBACK_EVERY != (before + written) / WRITEBACK_EVERY {
            w.start_writeback();
        }
        Ok(())
    }

    /// Writes a chunk, or leaves it to the worker writing to the file
    /// already. The kernel writes to one file one call at a time, so a
    /// worker that found the file busy would wait (spinning, as the
    /// kernel's lock does while its owner runs); instead it queues its
    /// chunk and goes on to read and hash the next, and the worker that
    /// holds the file writes what is queued before it lets go. When the
    /// writes stall (the kernel throttles a writer with too much dirty
    /// data), a queue past [`MAX_QUEUED`] makes the worker wait its turn,
    /// so the chunks in flight stay few and their buffers warm.
    fn queue_write(&self, image: usize, offset: u64, data: Buffer) -> Result<()> {
        let Some(target) = self.targets.get(image) else {
            return Ok(());
        };
        let mut wait = {
            let mut queued = lock(&target.queued)?;
            queued.push((offset, data));
            queued.len() > MAX_QUEUED
        };
        loop {
            let _writing = if std::mem::take(&mut wait) {
                lock(&target.writing)?
            } else {
                match target.writing.try_lock() {
                    Ok(guard) => guard,
                    Err(TryLockError::WouldBlock) => return Ok(()),
                    Err(TryLockError::Poisoned(_)) => return Err(Error::worker_panicked()),
                }
            };
            loop {
                let batch = std::mem::take(&mut *lock(&target.queued)?);
                if batch.is_empty() {
                    break;
                }
                for (offset, data) in batch {
                    self.write(image, offset, &data)?;
                }
            }
            drop(_writing);
            // A chunk queued after the last look, while the file was still
            // held, is this worker's to write.
            if lock(&target.queued)?.is_empty() {
                return Ok(());
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock().map_err(|_| Error::worker_panicked())
}

impl Sink for CopySink<'_> {
    /// A chunk not hashed slice by slice: its parts are hashed here.
    fn put(
        &self,
        image: usize,
        record: ChunkRecord,
        data: Option<Buffer>,
        stored: Option<Stored<'_>>,
    ) -> Result<()> {
        let mut parts = FileParts::default();
        self.hash_slice(
            image,
            record.offset,
            record.length,
            data.as_deref(),
            &mut parts,
        );
        self.put_hashed(image, record, data, stored, parts)
    }

    fn hash_slice(
        &self,
        image: usize,
        at: u64,
        len: u64,
        data: Option<&[u8]>,
        parts: &mut FileParts,
    ) {
        if let Some(layout) = self.layouts.get(image) {
            layout.hash(at, len, data, parts);
        }
    }

    fn put_hashed(
        &self,
        image: usize,
        record: ChunkRecord,
        data: Option<Buffer>,
        _: Option<Stored<'_>>,
        parts: FileParts,
    ) -> Result<()> {
        // Zeros are never written: the target reads them as zeros.
        if let (Some(data), ChunkKind::Data) = (data, record.kind) {
            self.queue_write(image, record.offset, data)?;
        }
        let (Some(fold), Some(layout), Some(target)) = (
            self.folds.get(image),
            self.layouts.get(image),
            self.targets.get(image),
        ) else {
            return Ok(());
        };
        let mut fold = lock(fold)?;
        let Fold {
            pending,
            next,
            tree,
        } = &mut *fold;
        let Some(tree) = tree else {
            *next += 1;
            return Ok(());
        };
        pending.insert(record.offset / self.chunk_size, parts);
        while let Some(parts) = pending.remove(next) {
            layout
                .add(tree, &parts)
                .map_err(|e| e.in_file(&target.tmp).during("hash copy"))?;
            *next += 1;
        }
        Ok(())
    }
}

/// The suffix of every temporary copy; `.NAME.PID.RANDOM.vsnap-tmp`.
const TMP_SUFFIX: &str = ".vsnap-tmp";

/// A temporary name beside `target`, unique to this run, so that two runs
/// writing one target never share (or remove) each other's file.
fn tmp_name(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(
        ".{name}.{}.{}{TMP_SUFFIX}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ))
}

/// How old an unlocked temporary file must be before it counts as a dead
/// run's. A live run locks its file right after creating it, so only a
/// file created in the instant before that could be unlocked and alive;
/// the age keeps even that one safe.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Holds a temporary file's lock while its run lives: the kernel drops it
/// when the run ends however it ends, which is how a later run tells a
/// dead run's leftovers from a live one's work.
fn lock_tmp(tmp: &Path) -> Result<File> {
    let f = File::open(tmp).ctx_file(tmp, "lock temporary copy")?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::from(ErrorKind::InvalidArgument(
            "another run holds this temporary file".into(),
        ))
        .in_file(tmp)),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(Error::io(e).in_file(tmp).during("lock temporary copy"))
        }
    }
}

/// Removes the temporary files that dead runs left beside `target`: those
/// whose lock nobody holds and that are older than [`STALE_AFTER`]. Only
/// regular files are touched, and never through a link.
fn remove_stale_tmps(target: &Path) {
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!(".{}.", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let n = entry.file_name().to_string_lossy().into_owned();
        if !(n.starts_with(&prefix) && n.ends_with(TMP_SUFFIX)) {
            continue;
        }
        let path = entry.path();
        let Ok(f) = crate::io::open_regular_nofollow(&path) else {
            continue;
        };
        let old = f
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= STALE_AFTER);
        if old && f.try_lock().is_ok() {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Renames a finished copy into place. Without `replace`, a name that
/// appeared meanwhile (another run's copy, or a link) is not replaced: the
/// rename fails instead, atomically.
fn rename_into_place(tmp: &Path, target: &Path, replace: bool) -> Result<()> {
    let outcome = if replace {
        std::fs::rename(tmp, target)
    } else {
        crate::io::rename_noreplace(tmp, target)
    };
    outcome.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::from(ErrorKind::Exists(target.to_path_buf())).during("rename copy into place")
        } else {
            Error::io(e)
                .in_file(target)
                .during("rename copy into place")
        }
    })
}

/// Blocks of `block_size` that the source holds data in.
fn data_blocks(map: &AllocationMap, block_size: u64) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for e in map.extents().iter().filter(|e| e.kind == ExtentKind::Data) {
        let first = e.offset / block_size;
        let last = (e.end() - 1) / block_size;
        for b in first..=last {
            if out.last() != Some(&b) {
                out.push(b);
            }
        }
    }
    out
}

fn open_target(
    image: &dyn DiskImage,
    map: &AllocationMap,
    spec: &CopySpec,
    tmp: &Path,
) -> Result<(Writer, Option<[u8; 512]>)> {
    let size = image.virtual_size();
    let source_footer = image.vhd_footer();
    let create_flat = |len: u64| -> Result<File> {
        let f = vsnap_formats::storage::create_new(tmp).ctx_file(tmp, "create copy")?;
        f.set_len(len).ctx_file(tmp, "size copy")?;
        Ok(f)
    };
    match spec.format {
        TargetFormat::Raw => Ok((Writer::Flat(create_flat(size)?), None)),
        TargetFormat::FixedVhd => {
            // A fixed source keeps its footer byte for byte, so the copy of
            // a fixed VHD is identical to it; other sources get a new one.
            let footer = match source_footer.filter(|f| f.disk_type == DiskType::Fixed) {
                Some(f) => f,
                None => plan_footer(&CreateOptions::new(DiskType::Fixed, size))
                    .map_err(|e| e.in_file(tmp))?,
            };
            let f = create_flat(size + 512)?;
            let bytes = footer.to_bytes();
            f.write_all_at(&bytes, size)
                .ctx(tmp, size, "write VHD footer")?;
            Ok((Writer::Flat(f), Some(bytes)))
        }
        TargetFormat::DynamicVhd => {
            let block_size = image
                .block_size()
                .filter(|&b| b >= vsnap_formats::vhd::create::MIN_BLOCK_SIZE)
                .unwrap_or(DEFAULT_BLOCK_SIZE);
            // Keep the source's identity (unique id, geometry, creator,
            // timestamp) when it is a VHD; a raw source gets a new one.
            let footer = match source_footer {
                Some(mut f) => {
                    f.disk_type = DiskType::Dynamic;
                    f
                }
                None => plan_footer(&CreateOptions::new(DiskType::Dynamic, size))
                    .map_err(|e| e.in_file(tmp))?,
            };
            let blocks = data_blocks(map, u64::from(block_size));
            Ok((
                Writer::Dynamic(Box::new(PreallocatedVhd::create(
                    tmp, footer, block_size, &blocks,
                )?)),
                None,
            ))
        }
        TargetFormat::FixedVhdx | TargetFormat::DynamicVhdx => {
            let mut id = vhdx_identity_for(image);
            id.fixed = spec.format == TargetFormat::FixedVhdx;
            let blocks = data_blocks(map, u64::from(id.block_size));
            let new = NewVhdx::new(size, id);
            Ok((
                Writer::Vhdx(Box::new(VhdxWriter::create(tmp, new, &blocks)?)),
                None,
            ))
        }
    }
}

/// A VHDX target's identity: a VHDX source's own; otherwise a new one,
/// keeping a VHD's unique id as the disk's page 83 identity and its block
/// size where VHDX allows it.
fn vhdx_identity_for(image: &dyn DiskImage) -> VhdxIdentity {
    if let Some(id) = image.vhdx_identity() {
        return id;
    }
    let mut id = VhdxIdentity::new(image.virtual_size());
    if let Some(f) = image.vhd_footer() {
        id.page83 = uuid::Uuid::from_bytes(f.unique_id);
    }
    if let Some(bs) = image
        .block_size()
        .filter(|b| b.is_power_of_two() && (1 << 20..=256 << 20).contains(b))
    {
        id.block_size = bs;
    }
    id
}

/// Copies `images[i]` to `specs[i].target`, all in parallel. Targets must
/// not exist. Returns each source's digest and what was written.
pub fn copy_images(
    images: &[&dyn DiskImage],
    specs: &[CopySpec],
    opts: &Options,
    progress: &Progress,
) -> Result<Vec<CopyResult>> {
    if images.len() != specs.len() {
        return Err(ErrorKind::InvalidArgument("one target per source".into()).into());
    }
    for spec in specs {
        // A link at the target counts as a file there: it is never
        // written through, and replaced only with `replace`.
        if spec.target.symlink_metadata().is_ok() && !spec.replace {
            return Err(Error::from(ErrorKind::Exists(spec.target.clone())).during("copy"));
        }
    }
    let maps = images
        .iter()
        .map(|i| i.allocation_map())
        .collect::<vsnap_formats::Result<Vec<_>>>()?;
    let mut targets: Vec<Target> = Vec::new();
    let outcome = (|| {
        for ((image, map), spec) in images.iter().zip(&maps).zip(specs) {
            remove_stale_tmps(&spec.target);
            let tmp = tmp_name(&spec.target);
            // The name is this run's alone (exclusive create), so removing
            // it on failure removes nothing another run made.
            let opened =
                open_target(*image, map, spec, &tmp).and_then(|(w, f)| Ok((w, f, lock_tmp(&tmp)?)));
            let (writer, footer, lock) = match opened {
                Ok(w) => w,
                Err(e) => {
                    if !matches!(e.kind(), ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::AlreadyExists)
                    {
                        let _ = std::fs::remove_file(&tmp);
                    }
                    return Err(e);
                }
            };
            targets.push(Target {
                tmp,
                durable: spec.durable,
                writer,
                footer,
                written: AtomicU64::new(0),
                queued: Mutex::new(Vec::new()),
                writing: Mutex::new(()),
                _lock: lock,
            });
        }
        let layouts: Vec<Layout<'_>> = targets
            .iter()
            .map(|t| t.writer.layout(t.footer.as_ref()))
            .collect();
        let sink = CopySink {
            targets: &targets,
            layouts: &layouts,
            maps: &maps,
            folds: layouts
                .iter()
                .map(|layout| {
                    Mutex::new(Fold {
                        pending: BTreeMap::new(),
                        next: 0,
                        tree: layout.start(),
                    })
                })
                .collect(),
            chunk_size: opts.chunk_size,
        };
        let digests = run(images, &maps, opts, progress, &sink)?;
        let mut files = Vec::new();
        for ((fold, layout), (t, image)) in sink
            .folds
            .into_iter()
            .zip(&layouts)
            .zip(targets.iter().zip(images))
        {
            let fold = fold.into_inner().map_err(|_| Error::worker_panicked())?;
            // Every queued chunk is written by the worker that queued it or
            // by the one holding the file; one left over would be a hole
            // in the copy that its digest does not show.
            let left = lock(&t.queued)?.len();
            if left > 0 {
                return Err(Error::from(ErrorKind::InvalidArgument(format!(
                    "{left} chunks were left unwritten"
                )))
                .in_file(&t.tmp));
            }
            let size = image.virtual_size();
            let chunks = size.div_ceil(opts.chunk_size).max(1);
            let digest = match fold.tree {
                Some(tree) if fold.next >= chunks => Some(
                    layout
                        .finish(tree, size)
                        .map_err(|e| e.in_file(&t.tmp).during("hash copy"))?,
                ),
                Some(_) => {
                    return Err(Error::from(ErrorKind::InvalidArgument(format!(
                        "{} of {chunks} chunks folded into the copy's digest",
                        fold.next
                    )))
                    .in_file(&t.tmp))
                }
                None => None,
            };
            files.push((digest, t.written.load(Ordering::Relaxed)));
        }
        for (d, spec) in digests.iter().zip(specs) {
            match spec.expect {
                Some(want) if want != d.digest => {
                    return Err(Error::from(ErrorKind::DigestMismatch {
                        what: "copied disk",
                        expected: want.to_hex().to_string().into(),
                        found: d.digest.to_hex().to_string().into(),
                    })
                    .in_file(&spec.target));
                }
                _ => {}
            }
        }
        for t in targets.iter().filter(|t| t.durable) {
            t.writer.sync(&t.tmp)?;
        }
        Ok((digests, files))
    })();
    let (digests, files) = match outcome {
        Ok(d) => d,
        Err(e) => {
            for t in &targets {
                let _ = std::fs::remove_file(&t.tmp);
            }
            return Err(e);
        }
    };
    let mut dirs: Vec<PathBuf> = Vec::new();
    for (i, (t, spec)) in targets.iter().zip(specs).enumerate() {
        if let Err(e) = rename_into_place(&t.tmp, &spec.target, spec.replace) {
            for t in &targets[i..] {
                let _ = std::fs::remove_file(&t.tmp);
            }
            return Err(e);
        }
        if let Some(dir) = spec.target.parent().filter(|_| spec.durable) {
            if !dirs.iter().any(|d| d == dir) {
                dirs.push(dir.to_path_buf());
            }
        }
    }
    for dir in dirs {
        let d = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            &dir
        };
        File::open(d)
            .and_then(|f| f.sync_all())
            .ctx_file(d, "flush directory")?;
    }
    Ok(digests
        .into_iter()
        .zip(files)
        .zip(specs)
        .map(|((source, (file_digest, written)), spec)| CopyResult {
            // A raw target's file is the disk: its digest is the disk's.
            file_digest: file_digest.unwrap_or(source.digest),
            source,
            target: spec.target.clone(),
            format: spec.format,
            bytes_written: written,
        })
        .collect())
}
