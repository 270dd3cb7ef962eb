//! One VHD file, on its own: where its footer is, what its BAT says, and
//! how its own sectors are read. Chains of layers are [`super::VhdImage`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::bat::{self, Reserved, UNALLOCATED};
use super::footer::{DiskType, Footer, FOOTER_SIZE, SECTOR};
use super::header::{DynamicHeader, HEADER_SIZE};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::extent::{AllocationMap, MapBuilder};
use crate::storage::Storage;

pub use crate::layered::Below;
use crate::layered::{pieces, read_struct};

/// The sparse part of a dynamic or differencing layer.
#[derive(Debug, Clone)]
pub struct Sparse {
    pub header: DynamicHeader,
    pub header_offset: u64,
    pub bat: Vec<u32>,
    pub bitmap_size: u64,
}

impl Sparse {
    pub fn block_size(&self) -> u64 {
        u64::from(self.header.block_size)
    }
}

#[derive(Debug)]
pub struct VhdLayer {
    pub(super) path: PathBuf,
    pub(super) storage: Arc<dyn Storage>,
    pub(super) footer: Footer,
    /// Where the trailing footer is, and where the next block will go.
    pub(super) footer_offset: u64,
    pub(super) size: u64,
    pub(super) sparse: Option<Sparse>,
    pub(super) writable: bool,
    /// Things a reader survived but an operator should hear about.
    pub(super) warnings: Vec<String>,
}

fn read(
    storage: &dyn Storage,
    path: &Path,
    buf: &mut [u8],
    at: u64,
    what: &'static str,
) -> Result<()> {
    read_struct(storage, buf, at, what).map_err(|e| e.in_file(path).during("read VHD"))
}

impl VhdLayer {
    /// Opens one VHD file and checks its structure; it does not follow the
    /// parent of a differencing disk.
    pub fn open(storage: Arc<dyn Storage>, path: &Path, writable: bool) -> Result<VhdLayer> {
        let len = storage.len().ctx_file(path, "stat VHD")?;
        let mut warnings = Vec::new();
        let (footer, footer_offset) = locate_footer(&*storage, path, len, &mut warnings)?;
        let size = footer.disk_size();
        let sparse = match footer.disk_type {
            DiskType::Fixed => {
                if footer_offset < size {
                    return Err(Error::from(ErrorKind::Truncated {
                        what: "fixed VHD data",
                        needed: size,
                        at: 0,
                        available: footer_offset,
                    })
                    .in_file(path)
                    .at(footer_offset)
                    .during("open fixed VHD"));
                }
                None
            }
            DiskType::Dynamic | DiskType::Differencing => Some(
                open_sparse(&*storage, path, &footer, footer_offset, len)
                    .map_err(|e| e.in_file(path).during("open dynamic VHD"))?,
            ),
        };
        Ok(VhdLayer {
            path: path.to_path_buf(),
            storage,
            footer,
            footer_offset,
            size,
            sparse,
            writable,
            warnings,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    pub fn sparse(&self) -> Option<&Sparse> {
        self.sparse.as_ref()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn disk_type(&self) -> DiskType {
        self.footer.disk_type
    }

    /// Whether the sector bitmaps decide what this layer holds.
    ///
    /// In a differencing disk they must: a clear bit sends the read to the
    /// parent. In a dynamic disk vsnap reads an allocated block whole, as
    /// qemu does (it never reads those bitmaps). The virtual-disk digest is
    /// promised to equal `b3sum` of `qemu-img convert`, so where a dynamic
    /// disk's bitmap and data disagree, qemu's reading is the one auditors
    /// can check. It also spares the map one random read per block, which
    /// on a cold cache cost seconds for a few thousand blocks.
    pub fn honours_bitmaps(&self) -> bool {
        self.footer.disk_type == DiskType::Differencing
    }

    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    pub fn file_len(&self) -> Result<u64> {
        self.storage.len().ctx_file(&self.path, "stat VHD")
    }

    pub(super) fn read_bitmap(&self, s: &Sparse, block_start: u64) -> Result<Vec<u8>> {
        let mut bitmap = vec![0u8; s.bitmap_size as usize];
        read(
            &*self.storage,
            &self.path,
            &mut bitmap,
            block_start,
            "VHD sector bitmap",
        )?;
        Ok(bitmap)
    }

    /// Reads `buf` at virtual `offset`, taking what this layer does not hold
    /// from `below`. The caller keeps the range inside the disk.
    pub fn read_own(&self, buf: &mut [u8], offset: u64, below: &mut Below<'_>) -> Result<()> {
        let Some(s) = &self.sparse else {
            return read(&*self.storage, &self.path, buf, offset, "fixed VHD data");
        };
        let bs = s.block_size();
        for p in pieces(offset, buf.len(), bs) {
            let (blk, in_blk, pos) = (p.block, p.in_block, offset + p.done as u64);
            let out = &mut buf[p.done..p.done + p.len];
            match s.bat.get(blk as usize).copied().unwrap_or(UNALLOCATED) {
                UNALLOCATED => below(out, pos)?,
                entry if !self.honours_bitmaps() => {
                    let at = u64::from(entry) * SECTOR + s.bitmap_size + in_blk;
                    read(&*self.storage, &self.path, out, at, "VHD block")?;
                }
                entry => self.read_through_bitmap(s, entry, blk * bs, in_blk, out, below)?,
            }
        }
        Ok(())
    }

    /// Reads part of an allocated block of a differencing layer: runs of
    /// set bits from this file, runs of clear bits from below.
    fn read_through_bitmap(
        &self,
        s: &Sparse,
        entry: u32,
        block_offset: u64,
        in_blk: u64,
        out: &mut [u8],
        below: &mut Below<'_>,
    ) -> Result<()> {
        let block_start = u64::from(entry) * SECTOR;
        let data_start = block_start + s.bitmap_size;
        let bitmap = self.read_bitmap(s, block_start)?;
        let end = in_blk + out.len() as u64;
        let mut sec = in_blk / SECTOR;
        let last = end.div_ceil(SECTOR);
        while sec < last {
            let (present, run) = bat::run_at(&bitmap, sec, last);
            let from = (sec * SECTOR).max(in_blk);
            let to = ((sec + run) * SECTOR).min(end);
            let piece = &mut out[(from - in_blk) as usize..(to - in_blk) as usize];
            if present {
                read(
                    &*self.storage,
                    &self.path,
                    piece,
                    data_start + from,
                    "VHD block",
                )?;
            } else {
                below(piece, block_offset + from)?;
            }
            sec += run;
        }
        Ok(())
    }

    /// This layer's own extents: data where it holds sectors, unallocated
    /// where it defers to its parent (or to zeros).
    pub fn own_map(&self) -> Result<AllocationMap> {
        let mut map = MapBuilder::new(0);
        let Some(s) = &self.sparse else {
            // A fixed disk is all data by its format, but its file may be
            // sparse: a hole reads as zeros, so it is streamed (and
            // copied) as unallocated, like a raw image's, not read.
            return crate::plain_file_map(
                &*self.storage,
                &self.path,
                self.size,
                "fixed VHD data area",
            );
        };
        let bs = s.block_size();
        let blocks = self.size.div_ceil(bs);
        for blk in 0..blocks {
            let start = blk * bs;
            let len = bs.min(self.size - start);
            let entry = s.bat.get(blk as usize).copied().unwrap_or(UNALLOCATED);
            if entry == UNALLOCATED {
                map.unallocated(start, len);
                continue;
            }
            let block_start = u64::from(entry) * SECTOR;
            let data_start = block_start + s.bitmap_size;
            if !self.honours_bitmaps() {
                map.data(start, len, 0, data_start);
                continue;
            }
            let bitmap = self.read_bitmap(s, block_start)?;
            let sectors = len.div_ceil(SECTOR);
            let mut sec = 0;
            while sec < sectors {
                let (present, run) = bat::run_at(&bitmap, sec, sectors);
                let from = sec * SECTOR;
                let to = ((sec + run) * SECTOR).min(len);
                if present {
                    map.data(start + from, to - from, 0, data_start + from);
                } else {
                    map.unallocated(start + from, to - from);
                }
                sec += run;
            }
        }
        Ok(map.finish())
    }
}

impl crate::layered::Layer for VhdLayer {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_own(&self, buf: &mut [u8], offset: u64, below: &mut Below<'_>) -> Result<()> {
        VhdLayer::read_own(self, buf, offset, below)
    }

    fn own_map(&self) -> Result<AllocationMap> {
        VhdLayer::own_map(self)
    }
}

/// Finds the footer. The trailing copy is authoritative; when it is missing
/// or damaged, as after a crash while a block was being appended, the copy
/// at offset 0 of a dynamic disk stands in (qemu reads only that copy).
/// Pre-2004 Virtual PC wrote a 511-byte footer, which is accepted too.
fn locate_footer(
    storage: &dyn Storage,
    path: &Path,
    len: u64,
    warnings: &mut Vec<String>,
) -> Result<(Footer, u64)> {
    if len < FOOTER_SIZE as u64 {
        return Err(Error::from(ErrorKind::Truncated {
            what: "VHD footer",
            needed: FOOTER_SIZE as u64,
            at: 0,
            available: len,
        })
        .in_file(path)
        .at(0)
        .during("open VHD"));
    }
    let tail_at = len - FOOTER_SIZE as u64;
    let mut tail = [0u8; FOOTER_SIZE];
    read(storage, path, &mut tail, tail_at, "VHD footer")?;
    let tail_err = match Footer::parse(&tail) {
        Ok(f) => return Ok((f, tail_at)),
        Err(e) => e.rebase(tail_at).in_file(path).during("parse VHD footer"),
    };
    // A 511-byte footer ends at the same place, one byte later.
    let mut short = [0u8; FOOTER_SIZE];
    read(
        storage,
        path,
        &mut short[..FOOTER_SIZE - 1],
        tail_at + 1,
        "VHD footer",
    )?;
    if let Ok(f) = Footer::parse(&short) {
        return Ok((f, tail_at + 1));
    }
    let mut head = [0u8; FOOTER_SIZE];
    read(storage, path, &mut head, 0, "VHD footer copy")?;
    match Footer::parse(&head) {
        Ok(f) if f.disk_type != DiskType::Fixed => {
            warnings.push(format!(
                "the footer at the end of the file is unusable ({tail_err}); using the copy at offset 0"
            ));
            Ok((f, len.div_ceil(SECTOR) * SECTOR))
        }
        _ => Err(tail_err),
    }
}

fn open_sparse(
    storage: &dyn Storage,
    path: &Path,
    footer: &Footer,
    footer_offset: u64,
    len: u64,
) -> Result<Sparse> {
    let header_offset = footer.data_offset;
    let mut raw = [0u8; HEADER_SIZE];
    read(storage, path, &mut raw, header_offset, "VHD dynamic header")?;
    let header = DynamicHeader::parse(&raw).map_err(|e| e.rebase(header_offset))?;
    let block_size = u64::from(header.block_size);
    let needed = footer.disk_size().div_ceil(block_size);
    if u64::from(header.max_table_entries) < needed {
        return Err(Error::from(ErrorKind::TooFewBatEntries {
            entries: header.max_table_entries,
            block_size: header.block_size,
            size: footer.disk_size(),
            needed,
        })
        .at(header_offset + 28));
    }
    // Bounded by the file's length, so a forged entry count cannot make us
    // allocate more than the file holds.
    let table_len = u64::from(header.max_table_entries) * 4;
    if header
        .table_offset
        .checked_add(table_len)
        .is_none_or(|end| end > len)
    {
        return Err(Error::from(ErrorKind::Truncated {
            what: "VHD BAT",
            needed: table_len,
            at: header.table_offset,
            available: len.saturating_sub(header.table_offset),
        })
        .at(header.table_offset));
    }
    let mut table = vec![0u8; table_len as usize];
    read(storage, path, &mut table, header.table_offset, "VHD BAT")?;
    let bat = bat::parse_bat(&table, header.max_table_entries)?;
    let reserved = [
        Reserved {
            what: "footer copy",
            start: 0,
            end: FOOTER_SIZE as u64,
        },
        Reserved {
            what: "dynamic header",
            start: header_offset,
            end: header_offset + HEADER_SIZE as u64,
        },
        Reserved {
            what: "BAT",
            start: header.table_offset,
            end: header.table_offset + table_len,
        },
    ];
    bat::validate_bat(&bat, header.block_size, footer_offset, &reserved)
        .map_err(|e| e.rebase(header.table_offset))?;
    Ok(Sparse {
        bitmap_size: bat::bitmap_bytes(header.block_size),
        header,
        header_offset,
        bat,
    })
}
