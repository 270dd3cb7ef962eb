//! What every layered format shares: a chain of files, child first, where
//! each layer holds some of the disk and defers the rest to the one below.
//!
//! VHD and VHDX differ in how a layer records what it holds (sector
//! bitmaps of different shapes, BAT states) and how it names its parent,
//! but reading through a chain, merging the layers' maps and finding a
//! parent on this host are the same, so they live here once.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::extent::AllocationMap;
use crate::error::{Error, ErrorKind, Result, ResultExt};

/// Where the sectors a layer does not hold come from: the parent for a
/// differencing disk, zeros otherwise.
pub type Below<'a> = dyn FnMut(&mut [u8], u64) -> Result<()> + 'a;

/// One file of a chain.
pub trait Layer {
    fn size(&self) -> u64;
    /// Reads `buf` at virtual `offset`, taking what this layer does not
    /// hold from `below`. The caller keeps the range inside the layer.
    fn read_own(&self, buf: &mut [u8], offset: u64, below: &mut Below<'_>) -> Result<()>;
    /// Data where this layer holds sectors, unallocated where it defers.
    fn own_map(&self) -> Result<AllocationMap>;
}

/// Reads virtual bytes through a chain, `layers[0]` first.
///
/// Iterative rather than recursive, so the depth of a chain is bounded by
/// open files, not by stack: each layer fills what it holds and hands back
/// the ranges it does not, and the next layer down is asked for those.
/// Ranges past a (smaller) parent's end, or below the bottom of the
/// chain, read as zeros.
pub fn read_chain<L: Layer>(layers: &[L], buf: &mut [u8], offset: u64) -> Result<()> {
    let mut pending: Vec<(usize, usize)> = vec![(0, buf.len())];
    for layer in layers {
        if pending.is_empty() {
            break;
        }
        let mut deferred = Vec::new();
        for (start, len) in pending {
            let at = offset + start as u64;
            let inside = layer.size().saturating_sub(at).min(len as u64) as usize;
            buf[start + inside..start + len].fill(0);
            if inside == 0 {
                continue;
            }
            let mut defer = |out: &mut [u8], virt: u64| {
                deferred.push(((virt - offset) as usize, out.len()));
                Ok(())
            };
            layer.read_own(&mut buf[start..start + inside], at, &mut defer)?;
        }
        pending = deferred;
    }
    for (start, len) in pending {
        buf[start..start + len].fill(0);
    }
    Ok(())
}

/// The merged map of a chain, naming the layer of each extent.
pub fn chain_map<L: Layer>(layers: &[L]) -> Result<AllocationMap> {
    let mut from_bottom = layers.iter().rev();
    let Some(bottom) = from_bottom.next() else {
        return Ok(AllocationMap::default());
    };
    let mut map = bottom.own_map()?;
    for layer in from_bottom {
        map = layer.own_map()?.overlay(&map, 1);
    }
    Ok(map)
}

/// Identifies a file across names (hard links, `..` detours).
pub type FileId = (u64, u64);

pub fn file_id(file: &File, path: &Path) -> Result<FileId> {
    let meta = file.metadata().ctx_file(path, "stat image")?;
    Ok((meta.dev(), meta.ino()))
}

/// Drops `.` components, so `dir/./base.vhd` reads as `dir/base.vhd`.
pub fn without_dots(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

/// How a format recognises and checks a parent.
pub struct ParentRules<'a, L> {
    /// The format's name, for errors.
    pub format: &'static str,
    pub looks_like: &'a dyn Fn(&File) -> bool,
    pub open: &'a dyn Fn(File, &Path) -> Result<L>,
    /// The parent's identity as the child records it, and as the parent
    /// itself holds it.
    pub expected: uuid::Uuid,
    pub identity: &'a dyn Fn(&L) -> uuid::Uuid,
}

/// Opens the first candidate that is a parent of the right format with
/// the identity the child expects, refusing loops. A missing candidate is
/// skipped; when none is found the error names every path tried, or the
/// first real reason a candidate was refused.
pub fn open_parent<L>(
    child: &Path,
    candidates: Vec<PathBuf>,
    chain: &mut HashSet<FileId>,
    rules: &ParentRules<'_, L>,
) -> Result<L> {
    let mut tried = Vec::new();
    let mut first_error: Option<Error> = None;
    for candidate in candidates {
        let file = match File::open(&candidate) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tried.push(candidate);
                continue;
            }
            Err(e) => {
                first_error.get_or_insert(Error::io(e).in_file(&candidate).during("open parent"));
                continue;
            }
        };
        let id = file_id(&file, &candidate)?;
        if chain.contains(&id) {
            return Err(Error::from(ErrorKind::ParentLoop { path: candidate })
                .in_file(child)
                .during("resolve parent"));
        }
        if !(rules.looks_like)(&file) {
            first_error.get_or_insert(
                Error::from(ErrorKind::ParentWrongFormat {
                    path: candidate.clone(),
                    expected: rules.format,
                })
                .in_file(child)
                .during("resolve parent"),
            );
            continue;
        }
        let layer = (rules.open)(file, &candidate)?;
        let found = (rules.identity)(&layer);
        if found != rules.expected {
            first_error.get_or_insert(
                Error::from(ErrorKind::ParentIdMismatch {
                    parent: candidate.clone(),
                    expected: rules.expected,
                    found,
                })
                .in_file(child)
                .during("resolve parent"),
            );
            continue;
        }
        chain.insert(id);
        return Ok(layer);
    }
    Err(first_error.unwrap_or_else(|| {
        Error::from(ErrorKind::MissingParent { tried })
            .in_file(child)
            .during("resolve parent")
    }))
}

/// One block's part of a range: `len` bytes at `in_block` of block
/// `block`, which are bytes `done..done + len` of the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub block: u64,
    pub in_block: u64,
    pub done: usize,
    pub len: usize,
}

/// Cuts `len` bytes at `offset` at the boundaries of `block_size` blocks:
/// how every block-structured reader and writer walks a range.
pub fn pieces(offset: u64, len: usize, block_size: u64) -> impl Iterator<Item = Piece> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let pos = offset + done as u64;
        let (block, in_block) = (pos / block_size, pos % block_size);
        let n = (block_size - in_block).min((len - done) as u64) as usize;
        let piece = Piece {
            block,
            in_block,
            done,
            len: n,
        };
        done += n;
        Some(piece)
    })
}

/// A file whose blocks were all placed when it was created (a copy
/// target knows from its source's map which blocks will hold data):
/// `blocks[i]` is the file offset of block i, its data starting
/// `data_skip` bytes in (after a VHD's sector bitmap). Writes into it are
/// plain positional writes that any number of threads can issue at once.
#[derive(Debug, Clone, Copy)]
pub struct PlacedFile<'a> {
    pub file: &'a File,
    pub path: &'a Path,
    pub blocks: &'a [Option<u64>],
    pub block_size: u64,
    pub data_skip: u64,
}

impl PlacedFile<'_> {
    /// Where each piece of a virtual range lands in the file. A block with
    /// no place is an error naming the file, for a writer handed a range
    /// the source's map did not announce.
    fn locate(&self, offset: u64, len: usize) -> impl Iterator<Item = Result<(u64, Piece)>> + '_ {
        pieces(offset, len, self.block_size).map(move |p| match self.blocks.get(p.block as usize) {
            Some(Some(start)) => Ok((start + self.data_skip + p.in_block, p)),
            _ => Err(Error::from(ErrorKind::InvalidArgument(format!(
                "block {} was not placed when the copy target was created",
                p.block
            )))
            .in_file(self.path)
            .at(offset + p.done as u64)),
        })
    }

    /// Writes virtual-disk bytes.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        for placed in self.locate(offset, buf.len()) {
            let (at, p) = placed?;
            self.file
                .write_all_at(&buf[p.done..p.done + p.len], at)
                .ctx(self.path, at, "write block")?;
        }
        Ok(())
    }

    /// Reserves the space of a range about to be written, in one call:
    /// placed blocks follow each other in virtual order, so a range spans
    /// one stretch of the file (with only block headers, written already,
    /// between its pieces). See [`crate::storage::preallocate`] for why.
    pub fn reserve(&self, offset: u64, len: u64) -> Result<()> {
        let len = usize::try_from(len).map_err(|_| {
            Error::from(ErrorKind::InvalidArgument("range too large".into())).in_file(self.path)
        })?;
        let mut span: Option<(u64, u64)> = None;
        for placed in self.locate(offset, len) {
            let (at, p) = placed?;
            let end = at + p.len as u64;
            span = Some(span.map_or((at, end), |(a, b)| (a.min(at), b.max(end))));
        }
        match span {
            Some((from, to)) => crate::storage::preallocate(self.file, from, to - from).ctx(
                self.path,
                from,
                "reserve space for the copy",
            ),
            None => Ok(()),
        }
    }
}

/// Reads a structure at `at`, turning a short file into `Truncated` with
/// what was being read, so a cut-off image says what it lost.
pub fn read_struct(
    storage: &dyn crate::storage::Storage,
    buf: &mut [u8],
    at: u64,
    what: &'static str,
) -> Result<()> {
    storage.read_exact_at(buf, at).map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ErrorKind::Truncated {
                what,
                needed: buf.len() as u64,
                at,
                available: storage.len().unwrap_or(0).saturating_sub(at),
            }
        } else {
            ErrorKind::Io(e)
        };
        Error::from(kind).at(at)
    })
}
