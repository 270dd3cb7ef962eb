//! Copying images in parallel into a directory, with the digest computed in
//! the same pass and `B3SUMS` written for stock-tool checks.
//!
//! Targets are written under temporary names and renamed only when all of
//! them are complete and durable, so the directory never holds a partial
//! image under a real name; on failure the temporary files are removed.

use std::fs::File;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use crossbeam_channel::{bounded, Receiver, Sender};

use super::file_digest::{FileParts, Layout, Shape};
use super::pool::Buffer;
use super::run::{run, ChunkRecord, ImageDigest, Sink};
use super::{ChunkKind, Options, Progress, Stored};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::format::vhd::create::{plan_footer, CreateOptions, DEFAULT_BLOCK_SIZE};
use crate::format::vhd::{DiskType, PreallocatedVhd};
use crate::format::vhdx::{NewVhdx, VhdxIdentity, VhdxWriter};
use crate::format::{AllocationMap, DiskImage, ExtentKind, ImageFormat};
use crate::io::Storage;

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
            Writer::Dynamic(v) => v.placed().write_at(buf, offset),
            Writer::Vhdx(v) => v.placed().write_at(buf, offset),
        }
    }

    /// Reserves the file's space for a data range before it is written.
    fn reserve(&self, tmp: &Path, offset: u64, len: u64) -> Result<()> {
        match self {
            Writer::Flat(f) => crate::io::preallocate(f, offset, len).ctx(
                tmp,
                offset,
                "reserve space for the copy",
            ),
            Writer::Dynamic(v) => v.placed().reserve(offset, len),
            Writer::Vhdx(v) => v.placed().reserve(offset, len),
        }
    }

    fn start_writeback(&self) {
        match self {
            Writer::Flat(f) => crate::io::start_writeback(f),
            Writer::Dynamic(v) => v.start_writeback(),
            Writer::Vhdx(v) => v.start_writeback(),
        }
    }

    fn sync(&self, tmp: &Path) -> Result<()> {
        match self {
            Writer::Flat(f) => f.sync().ctx_file(tmp, "flush copy"),
            Writer::Dynamic(v) => v.sync(),
            Writer::Vhdx(v) => v.sync(),
        }
    }
}

struct Target {
    tmp: PathBuf,
    durable: bool,
    writer: Writer,
    /// For a fixed VHD: the footer that follows the data.
    footer: Option<[u8; 512]>,
}

/// A chunk for a writer: its bytes, and the file digest's parts of it.
type Message = (ChunkRecord, Option<Buffer>, FileParts);

/// Hashes each chunk at its place in the target file, on the worker that
/// read it, and hands it to its target's writer thread.
struct CopySink<'a> {
    writers: Vec<Sender<Message>>,
    layouts: &'a [Layout<'a>],
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
        let sent = self
            .writers
            .get(image)
            .is_some_and(|w| w.send((record, data, parts)).is_ok());
        if sent {
            Ok(())
        } else {
            // The writer stopped on an error of its own, which is reported
            // instead of this one.
            Err(ErrorKind::InvalidArgument("the copy's writer stopped".into()).into())
        }
    }
}

/// One target's writer: it takes chunks in any order, writes them in
/// order and folds their file-digest parts. One writer per file keeps
/// workers from contending for the file's lock.
struct TargetWriter<'a> {
    target: &'a Target,
    layout: &'a Layout<'a>,
    size: u64,
    map: &'a AllocationMap,
    chunk_size: u64,
    chunks: u64,
    written: u64,
    /// `written` when writeback was last started.
    kicked: u64,
}

/// How much a writer writes between writeback kicks: enough to make each
/// kick worth a syscall, little enough that the disk starts early.
const WRITEBACK_EVERY: u64 = 64 << 20;

/// Chunks queued for each writer: enough to keep it busy. The pool's
/// budget still caps everything in flight, but short queues keep the same
/// few buffers circling, warm in cache, where long ones would touch the
/// whole budget.
const QUEUED: usize = 2;

impl TargetWriter<'_> {
    /// Returns the bytes written, and whether every chunk arrived (when the
    /// run fails it stops sending; its error is the one reported).
    /// Returns the bytes written and, when every chunk arrived, the
    /// file's digest, `None` for a raw copy, whose file is the disk (when
    /// the run fails it stops sending; its error is the one reported).
    fn run(mut self, rx: Receiver<Message>) -> Result<(u64, bool, Option<blake3::Hash>)> {
        let mut pending: BTreeMap<u64, Message> = BTreeMap::new();
        let mut next = 0u64;
        let mut tree = self.layout.start();
        for (record, data, parts) in rx {
            pending.insert(record.offset / self.chunk_size, (record, data, parts));
            while let Some((record, data, parts)) = pending.remove(&next) {
                self.write(&record, data.as_deref())?;
                // The buffer goes back to the pool now; only the parts'
                // chaining values wait for the fold.
                drop(data);
                if let Some(tree) = &mut tree {
                    self.layout
                        .add(tree, &parts)
                        .map_err(|e| e.in_file(&self.target.tmp).during("hash copy"))?;
                }
                next += 1;
            }
        }
        let (Some(tree), true) = (tree, next >= self.chunks) else {
            return Ok((self.written, next >= self.chunks, None));
        };
        let digest = self
            .layout
            .finish(tree, self.size)
            .map_err(|e| e.in_file(&self.target.tmp).during("hash copy"))?;
        Ok((self.written, true, Some(digest)))
    }

    fn write(&mut self, record: &ChunkRecord, data: Option<&[u8]>) -> Result<()> {
        let (start, end) = (record.offset, record.offset + record.length);
        let (Some(data), ChunkKind::Data) = (data, record.kind) else {
            return Ok(());
        };
        // Only the parts the source holds: unallocated stays unallocated.
        let extents = self.map.extents();
        let first = extents.partition_point(|e| e.end() <= start);
        for e in extents[first..].iter().take_while(|e| e.offset < end) {
            if e.kind != ExtentKind::Data {
                continue;
            }
            let (from, to) = (e.offset.max(start), e.end().min(end));
            let piece = &data[(from - start) as usize..(to - start) as usize];
            let (w, tmp) = (&self.target.writer, &self.target.tmp);
            w.reserve(tmp, from, to - from)?;
            w.write_at(tmp, piece, from)?;
            self.written += to - from;
        }
        if self.target.durable && self.written - self.kicked >= WRITEBACK_EVERY {
            self.kicked = self.written;
            self.target.writer.start_writeback();
        }
        Ok(())
    }
}

fn tmp_name(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.vsnap-tmp"))
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
        let f = crate::io::create_new(tmp).ctx_file(tmp, "create copy")?;
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
                .filter(|&b| b >= crate::format::vhd::create::MIN_BLOCK_SIZE)
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
        if spec.target.exists() && !spec.replace {
            return Err(Error::from(ErrorKind::InvalidArgument(
                "the target exists already; vsnap does not overwrite".into(),
            ))
            .in_file(&spec.target)
            .during("copy"));
        }
    }
    let maps = images
        .iter()
        .map(|i| i.allocation_map())
        .collect::<Result<Vec<_>>>()?;
    let mut targets: Vec<Target> = Vec::new();
    let outcome = (|| {
        for ((image, map), spec) in images.iter().zip(&maps).zip(specs) {
            let tmp = tmp_name(&spec.target);
            let (writer, footer) = match open_target(*image, map, spec, &tmp) {
                Ok(w) => w,
                Err(e) => {
                    if tmp.exists() {
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
            });
        }
        let layouts: Vec<Layout<'_>> = targets
            .iter()
            .map(|t| t.writer.layout(t.footer.as_ref()))
            .collect();
        let (digests, files) = std::thread::scope(|s| {
            let mut senders = Vec::new();
            let mut handles = Vec::new();
            for (((target, layout), map), image) in
                targets.iter().zip(&layouts).zip(&maps).zip(images)
            {
                let (tx, rx) = bounded(QUEUED);
                senders.push(tx);
                let size = image.virtual_size();
                let writer = TargetWriter {
                    target,
                    layout,
                    size,
                    map,
                    chunk_size: opts.chunk_size,
                    chunks: size.div_ceil(opts.chunk_size).max(1),
                    written: 0,
                    kicked: 0,
                };
                handles.push(s.spawn(move || writer.run(rx)));
            }
            let sink = CopySink {
                writers: senders,
                layouts: &layouts,
            };
            let run_result = run(images, &maps, opts, progress, &sink);
            drop(sink);
            let mut files = Vec::new();
            for writer in handles {
                // A writer's own error (a full disk, say) says more than
                // the run's "writer stopped".
                let panicked = || ErrorKind::InvalidArgument("a copy thread panicked".into());
                let (written, complete, digest) =
                    writer.join().unwrap_or_else(|_| Err(panicked().into()))?;
                files.push((complete.then_some(digest).flatten(), written));
            }
            Ok::<_, Error>((run_result?, files))
        })?;
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
    for (t, spec) in targets.iter().zip(specs) {
        std::fs::rename(&t.tmp, &spec.target).ctx_file(&spec.target, "rename copy into place")?;
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
