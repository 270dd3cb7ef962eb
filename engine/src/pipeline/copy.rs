//! Copying images in parallel into a directory, with the digest computed in
//! the same pass and `B3SUMS` written for stock-tool checks.
//!
//! Targets are written under temporary names and renamed only when all of
//! them are complete and durable, so the directory never holds a partial
//! image under a real name; on failure the temporary files are removed.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use super::hash::{run, ChunkRecord, ImageDigest, Sink};
use super::{ChunkKind, Options, Progress};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::format::vhd::create::{plan_footer, CreateOptions, DEFAULT_BLOCK_SIZE};
use crate::format::vhd::{DiskType, PreallocatedVhd};
use crate::format::{AllocationMap, DiskImage, ExtentKind, ImageFormat};
use crate::io::Storage;

/// What a target is written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetFormat {
    Raw,
    FixedVhd,
    DynamicVhd,
}

impl TargetFormat {
    /// `same` for a source: raw stays raw, fixed stays fixed, dynamic and
    /// differencing become dynamic (a differencing chain is flattened).
    pub fn same_as(image: &dyn DiskImage) -> TargetFormat {
        match (image.format(), image.vhd_footer().map(|f| f.disk_type)) {
            (ImageFormat::Raw, _) => TargetFormat::Raw,
            (_, Some(DiskType::Fixed)) => TargetFormat::FixedVhd,
            _ => TargetFormat::DynamicVhd,
        }
    }
}

/// One copy to make.
#[derive(Debug, Clone)]
pub struct CopySpec {
    pub target: PathBuf,
    pub format: TargetFormat,
}

#[derive(Debug, Clone)]
pub struct CopyResult {
    pub source: ImageDigest,
    pub target: PathBuf,
    pub format: TargetFormat,
    pub bytes_written: u64,
}

enum Writer {
    /// Raw and fixed VHD: the disk's bytes sit at their own offsets.
    Flat(File),
    Dynamic(PreallocatedVhd),
}

struct Target {
    tmp: PathBuf,
    writer: Writer,
    written: std::sync::atomic::AtomicU64,
}

struct CopySink<'a> {
    targets: &'a [Target],
    maps: &'a [AllocationMap],
}

impl Sink for CopySink<'_> {
    fn put(&self, image: usize, record: &ChunkRecord, data: Option<&[u8]>) -> Result<()> {
        // Zero and unallocated chunks are not written: holes in a flat
        // target, unwritten (zero) space or no block in a dynamic one.
        let (Some(data), ChunkKind::Data) = (data, record.kind) else {
            return Ok(());
        };
        let target = &self.targets[image];
        let (start, end) = (record.offset, record.offset + record.length);
        // Only the parts the source holds: unallocated stays unallocated.
        let extents = self.maps[image].extents();
        let first = extents.partition_point(|e| e.end() <= start);
        for e in extents[first..].iter().take_while(|e| e.offset < end) {
            if e.kind != ExtentKind::Data {
                continue;
            }
            let (from, to) = (e.offset.max(start), e.end().min(end));
            let piece = &data[(from - start) as usize..(to - start) as usize];
            match &target.writer {
                Writer::Flat(f) => {
                    f.write_all_at(piece, from)
                        .ctx(&target.tmp, from, "write copy")?
                }
                Writer::Dynamic(v) => v.write_at(piece, from)?,
            }
            target
                .written
                .fetch_add(to - from, std::sync::atomic::Ordering::Relaxed);
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
) -> Result<Writer> {
    let size = image.virtual_size();
    let source_footer = image.vhd_footer();
    let create_flat = |len: u64| -> Result<File> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(tmp)
            .ctx_file(tmp, "create copy")?;
        f.set_len(len).ctx_file(tmp, "size copy")?;
        Ok(f)
    };
    match spec.format {
        TargetFormat::Raw => Ok(Writer::Flat(create_flat(size)?)),
        TargetFormat::FixedVhd => {
            // A fixed source keeps its footer byte for byte, so the copy of
            // a fixed VHD is identical to it; other sources get a new one.
            let footer = match source_footer.filter(|f| f.disk_type == DiskType::Fixed) {
                Some(f) => f,
                None => plan_footer(&CreateOptions::new(DiskType::Fixed, size))
                    .map_err(|e| e.in_file(tmp))?,
            };
            let f = create_flat(size + 512)?;
            f.write_all_at(&footer.to_bytes(), size)
                .ctx(tmp, size, "write VHD footer")?;
            Ok(Writer::Flat(f))
        }
        TargetFormat::DynamicVhd => {
            let block_size = image
                .info()?
                .block_size
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
            Ok(Writer::Dynamic(PreallocatedVhd::create(
                tmp, footer, block_size, &blocks,
            )?))
        }
    }
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
        if spec.target.exists() {
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
            let writer = open_target(*image, map, spec, &tmp);
            // Registered before the `?`, so a failure still cleans it up.
            let writer = match writer {
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
                writer,
                written: 0.into(),
            });
        }
        let sink = CopySink {
            targets: &targets,
            maps: &maps,
        };
        let digests = run(images, maps.clone(), opts, progress, &sink)?;
        for t in &targets {
            match &t.writer {
                Writer::Flat(f) => f.sync().ctx_file(&t.tmp, "flush copy")?,
                Writer::Dynamic(v) => v.sync()?,
            }
        }
        Ok(digests)
    })();
    let digests = match outcome {
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
        if let Some(dir) = spec.target.parent() {
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
        .zip(targets)
        .zip(specs)
        .map(|((source, t), spec)| CopyResult {
            source,
            target: spec.target.clone(),
            format: spec.format,
            bytes_written: t.written.into_inner(),
        })
        .collect())
}
