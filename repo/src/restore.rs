//! Restoring a backed-up disk: the repository's disk is presented to the
//! copy engine as one more [`DiskImage`], so a restore gets everything a
//! copy has: every chunk in parallel, holes kept sparse, the container
//! recreated with the source's identity, temporary names, and a digest of
//! what was written that must equal the one the backup recorded.

use std::path::{Path, PathBuf};

use crate::error::{ErrorKind, Result};
use crate::{Disk, Entry, Index, Manifest, Repository};
use vsnap_engine::pipeline::{copy_images, CopyResult, CopySpec, Options, Progress, TargetFormat};
use vsnap_formats::extent::MapBuilder;
use vsnap_formats::{AllocationMap, DiskImage, Extent, ExtentKind, ImageFormat, ImageInfo};

/// A disk as a snapshot holds it.
#[derive(Debug)]
pub struct RepoImage<'a> {
    repo: &'a Repository,
    disk: Disk,
    index: Index,
    footer: Option<vsnap_formats::vhd::Footer>,
}

impl<'a> RepoImage<'a> {
    pub fn open(repo: &'a Repository, disk: &Disk) -> Result<RepoImage<'a>> {
        let index = repo.read_index(disk)?;
        // A restore reads a disk's cells in order.
        repo.plan_reads(index.entries.iter().filter_map(|e| match e {
            Entry::Data(id) => Some(id),
            _ => None,
        }))?;
        Ok(RepoImage {
            repo,
            footer: disk.identity.footer()?,
            disk: disk.clone(),
            index,
        })
    }

    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// A chunk's bytes must be zero exactly where the piece map says: a
    /// copy writes only the pieces marked as data, so a non-zero piece
    /// marked clear would be left out of the restored file while the
    /// digest, computed from what was read, still matched.
    fn check_pieces(&self, start: u64, data: &[u8]) -> Result<()> {
        let Some(p) = &self.index.pieces else {
            return Ok(());
        };
        match p.check(start, data) {
            None => Ok(()),
            Some(piece) => Err(ErrorKind::Corrupt {
                what: "index",
                reason: format!(
                    "{}: the piece map marks piece {piece} (at {}) {}, but its chunk holds {}",
                    self.disk.index,
                    piece * p.size,
                    if p.get(piece) { "as data" } else { "as zeros" },
                    if p.get(piece) { "zeros" } else { "data" },
                ),
            }
            .into()),
        }
    }
}

impl DiskImage for RepoImage<'_> {
    fn format(&self) -> ImageFormat {
        self.disk.format
    }

    fn virtual_size(&self) -> u64 {
        self.disk.virtual_size
    }

    /// Data where the disk held non-zero bytes: by piece where the index
    /// has a piece map, so a dynamic target allocates only the blocks that
    /// hold data; by chunk in indexes written before the map.
    fn allocation_map(&self) -> vsnap_formats::Result<AllocationMap> {
        let mut b = MapBuilder::new(0);
        let mut push = |offset, length, kind| {
            b.push(Extent {
                offset,
                length,
                kind,
                layer: None,
                file_offset: None,
            })
        };
        for (i, e) in self.index.entries.iter().enumerate() {
            let (offset, length) = self.index.range(i);
            match (e, &self.index.pieces) {
                (Entry::Data(_), Some(p)) => {
                    let mut at = offset;
                    while at < offset + length {
                        let len = p.size.min(offset + length - at);
                        let kind = if p.get(at / p.size) {
                            ExtentKind::Data
                        } else {
                            ExtentKind::Zero
                        };
                        push(at, len, kind);
                        at += len;
                    }
                }
                (Entry::Data(_), None) => push(offset, length, ExtentKind::Data),
                (Entry::Zero, _) => push(offset, length, ExtentKind::Zero),
                (Entry::Unallocated, _) => push(offset, length, ExtentKind::Unallocated),
            }
        }
        Ok(b.finish())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> vsnap_formats::Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.disk.virtual_size {
            return Err(vsnap_formats::ErrorKind::OutOfRange {
                offset,
                len: buf.len() as u64,
                size: self.disk.virtual_size,
            }
            .into());
        }
        let cs = self.index.chunk_size;
        let mut pos = offset;
        let mut scratch = Vec::new();
        while pos < end {
            let cell = (pos / cs) as usize;
            let (start, len) = self.index.range(cell);
            let to = (start + len).min(end);
            let dst = &mut buf[(pos - offset) as usize..(to - offset) as usize];
            match self.index.entries.get(cell) {
                Some(Entry::Data(id)) if pos == start && to == start + len => {
                    self.repo.read_chunk(id, dst)?;
                    self.check_pieces(start, dst)?;
                }
                Some(Entry::Data(id)) => {
                    scratch.resize(len as usize, 0);
                    self.repo.read_chunk(id, &mut scratch)?;
                    self.check_pieces(start, &scratch)?;
                    dst.copy_from_slice(&scratch[(pos - start) as usize..(to - start) as usize]);
                }
                _ => dst.fill(0),
            }
            pos = to;
        }
        Ok(())
    }

    fn info(&self) -> vsnap_formats::Result<ImageInfo> {
        let id = &self.disk.identity;
        Ok(ImageInfo {
            path: self.disk.source.clone(),
            format: self.disk.format,
            disk_type: id.disk_type.unwrap_or(vsnap_formats::vhd::DiskType::Fixed),
            virtual_size: self.disk.virtual_size,
            file_size: 0,
            allocated_bytes: self.allocation_map()?.data_bytes(),
            geometry: id.geometry,
            creator: id.creator.clone(),
            block_size: id.block_size,
            unique_id: id.unique_id,
            timestamp: self.footer.as_ref().map(|f| u64::from(f.timestamp)),
            saved_state: self.footer.as_ref().map(|f| f.saved_state != 0),
            parents: Vec::new(),
            warnings: Vec::new(),
            vhdx: None,
        })
    }

    fn vhd_footer(&self) -> Option<vsnap_formats::vhd::Footer> {
        self.footer.clone()
    }

    fn block_size(&self) -> Option<u32> {
        self.disk.identity.block_size
    }

    fn vhdx_identity(&self) -> Option<vsnap_formats::vhdx::VhdxIdentity> {
        self.disk.identity.vhdx.clone()
    }

    fn layer_paths(&self) -> Vec<PathBuf> {
        Vec::new()
    }
}

/// Picks a snapshot's disk by name, or by its position counted from 1
/// (`SNAP:1` is the first disk; `SNAP:0` names none, and says so).
pub fn find_disk<'m>(manifest: &'m Manifest, name: &str) -> Result<&'m Disk> {
    let by_position = name
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_sub(1))
        .and_then(|i| manifest.disks.get(i));
    manifest
        .disks
        .iter()
        .find(|d| d.name == name)
        .or(by_position)
        .ok_or_else(|| {
            ErrorKind::NoSuchDisk {
                snapshot: manifest.id.clone().into(),
                disk: name.into(),
                have: manifest
                    .disks
                    .iter()
                    .enumerate()
                    .map(|(i, d)| format!("{} {}", i + 1, d.name))
                    .collect::<Vec<_>>()
                    .join(", ")
                    .into(),
            }
            .into()
        })
}

/// One disk to restore, and where.
#[derive(Debug, Clone)]
pub struct RestoreSpec {
    pub disk: Disk,
    pub target: PathBuf,
    /// `None`: the source's own format.
    pub format: Option<TargetFormat>,
    /// Replace a file that exists (only once the new one is whole).
    pub force: bool,
}

/// What `SNAPSHOT[:DISK]` to `to` means: one disk to a file, or to its
/// own name inside `to` when `to` is a directory; a whole snapshot into a
/// directory, each disk under its own name (a one-disk snapshot to a file
/// as well). A name inside a directory takes the extension of `format`,
/// as `vsnap copy` names its copies (a manifest's disk names are plain
/// file names: it is refused otherwise).
pub fn plan(
    repo: &Repository,
    target: &str,
    to: &Path,
    format: Option<TargetFormat>,
    force: bool,
) -> Result<Plan> {
    let (snap, disk) = match target.split_once(':') {
        Some((snap, disk)) => (snap, Some(disk)),
        None => (target, None),
    };
    let manifest = repo.find(snap)?;
    let in_dir = to.is_dir();
    let spec = |disk: &Disk| -> Result<RestoreSpec> {
        let target = if in_dir {
            to.join(match format {
                Some(f) => f.file_name(Path::new(&disk.name), false)?,
                None => disk.name.clone(),
            })
        } else {
            to.to_path_buf()
        };
        Ok(RestoreSpec {
            disk: disk.clone(),
            target,
            format,
            force,
        })
    };
    let specs = match disk {
        Some(name) => vec![spec(find_disk(&manifest, name)?)?],
        None if in_dir || manifest.disks.len() == 1 => {
            manifest.disks.iter().map(spec).collect::<Result<_>>()?
        }
        None => return Err(ErrorKind::InvalidArgument(format!(
            "{}: snapshot {} has {} disks, so restoring it whole needs a directory (or name one disk: {}:DISK or {}:N, N from 1)",
            to.display(),
            manifest.id,
            manifest.disks.len(),
            manifest.id,
            manifest.id
        ))
        .into()),
    };
    Ok(Plan {
        snapshot: manifest.id,
        specs,
    })
}

/// A restore to run: the snapshot's disks, each to its target.
#[derive(Debug, Clone)]
pub struct Plan {
    pub snapshot: String,
    pub specs: Vec<RestoreSpec>,
}

/// Restores disks in parallel. Each restored disk's digest, computed as
/// it is written, must equal the one its backup recorded.
pub fn restore(
    repo: &Repository,
    specs: &[RestoreSpec],
    opts: &Options,
    progress: &Progress,
) -> Result<Vec<CopyResult>> {
    let _lease = repo.lease_for_reading("restore")?;
    let images = specs
        .iter()
        .map(|s| RepoImage::open(repo, &s.disk))
        .collect::<Result<Vec<_>>>()?;
    // The copy engine refuses a target that exists unless told to replace
    // it, writes under a temporary name of its own, and renames only a
    // whole copy whose digest is the backup's, so with --force the old
    // file stays until its replacement is complete and checked.
    let mut copies = Vec::new();
    for (spec, image) in specs.iter().zip(&images) {
        let expect = blake3::Hash::from_hex(&spec.disk.digest).map_err(|_| ErrorKind::Corrupt {
            what: "manifest",
            reason: format!("disk digest {:?} is not BLAKE3 hex", spec.disk.digest),
        })?;
        copies.push(CopySpec {
            target: spec.target.clone(),
            format: spec.format.unwrap_or_else(|| TargetFormat::same_as(image)),
            replace: spec.force,
            expect: Some(expect),
            durable: true,
        });
    }
    let refs: Vec<&dyn DiskImage> = images.iter().map(|i| i as &dyn DiskImage).collect();
    Ok(copy_images(&refs, &copies, opts, progress)?)
}
