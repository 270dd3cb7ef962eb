//! Where a chunk's bytes come from: straight from the files behind each
//! layer, at the offsets the allocation map names, through the worker's
//! read engine; zero-filled where no layer holds data.

use std::fs::File;
use std::path::PathBuf;

use super::pool::Buffer;
use crate::error::{ErrorKind, Result, ResultExt};
use crate::io::{open_for_read, Engine, ReadOp};
use vsnap_formats::{AllocationMap, DiskImage, ExtentKind};

/// How many bytes of `[offset, offset + len)` are data, so must be read.
pub(super) fn data_bytes(map: &AllocationMap, offset: u64, len: u64) -> u64 {
    data_pieces(map, offset, offset + len)
        .map(|(from, to)| to - from)
        .sum()
}

/// The ranges of `start..end` that the source holds data in, in order.
pub(super) fn data_pieces(
    map: &AllocationMap,
    start: u64,
    end: u64,
) -> impl Iterator<Item = (u64, u64)> + '_ {
    let extents = map.extents();
    let first = extents.partition_point(|e| e.end() <= start);
    extents[first..]
        .iter()
        .take_while(move |e| e.offset < end)
        .filter(|e| e.kind == ExtentKind::Data)
        .map(move |e| (e.offset.max(start), e.end().min(end)))
}

/// An image's layer files, opened for the read engine: buffered always,
/// and with `O_DIRECT` when asked (used for the reads that are aligned).
pub(super) struct LayerFiles {
    paths: Vec<PathBuf>,
    buffered: Vec<File>,
    direct: Option<Vec<File>>,
}

impl LayerFiles {
    /// `None` when the image is not made of plain files (an in-memory
    /// one): the worker then reads through `DiskImage::read_at`.
    pub(super) fn open(image: &dyn DiskImage, direct: bool) -> Result<Option<LayerFiles>> {
        let paths = image.layer_paths();
        if paths.is_empty() {
            return Ok(None);
        }
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

/// Reads a chunk straight from the layer files the allocation map
/// names, all its reads in one go, zero-filling only the gaps.
pub(super) fn read_chunk(
    map: &AllocationMap,
    files: &LayerFiles,
    offset: u64,
    buf: &mut Buffer,
    engine: &mut Engine,
) -> Result<()> {
    let len = buf.len() as u64;
    let end = offset + len;
    let extents = map.extents();
    let first = extents.partition_point(|e| e.end() <= offset);
    // The reads, and beside them the layer each reads from (for errors).
    let mut ops = Vec::new();
    let mut layers = Vec::new();
    let mut pos = offset;
    let slot = buf.slot();
    let whole = buf.full();
    for e in extents[first..].iter().take_while(|e| e.offset < end) {
        let (from, to) = (e.offset.max(offset), e.end().min(end));
        let (Some(layer), Some(file_offset), ExtentKind::Data) = (e.layer, e.file_offset, e.kind)
        else {
            continue;
        };
        whole[(pos - offset) as usize..(from - offset) as usize].fill(0);
        let file_offset = file_offset + (from - e.offset);
        let (buf_offset, n) = ((from - offset) as usize, (to - from) as usize);
        let aligned = file_offset % DIRECT_ALIGN == 0
            && (buf_offset as u64).is_multiple_of(DIRECT_ALIGN)
            && (n as u64).is_multiple_of(DIRECT_ALIGN);
        let file = match (&files.direct, aligned) {
            (Some(direct), true) => direct.get(layer),
            _ => files.buffered.get(layer),
        };
        let Some(file) = file else {
            return Err(ErrorKind::InvalidArgument(format!("no file for layer {layer}")).into());
        };
        layers.push(layer);
        ops.push(ReadOp {
            file,
            file_offset,
            buf_offset,
            len: n,
        });
        pos = to;
    }
    whole[(pos - offset) as usize..len as usize].fill(0);
    engine.read(&ops, whole, slot).map_err(|(i, e)| {
        let (layer, op) = (layers.get(i).copied().unwrap_or(0), ops.get(i));
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
