//! Writing VHDX files: dynamic and fixed images for copies and restores,
//! and differencing layers (`.avhdx`) over a parent.
//!
//! The layout is qemu's: the header section, a 1 MiB log at 1 MiB (empty,
//! with a zero LogGuid, so no reader has anything to replay), the BAT at
//! 2 MiB, the metadata region after it, then the blocks, each 1 MiB
//! aligned. A copy places every block it will fill at creation, in virtual
//! order, like the VHD writer: the file is deterministic, and every later
//! write is a plain positional write any thread may issue, with no BAT
//! update. Differencing layers allocate as they are written, setting
//! sector-bitmap bits, and write their BAT and bitmaps at [`VhdxWriter::finish`].

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::layer::VhdxLayer;
use super::parse::{
    bat_entries, bitmap_bat_index, chunk_ratio, crc_with_field_zeroed, entry_offset,
    payload_bat_index, Guid, BAT_REGION, BITMAP_PRESENT, FILE_PARAMETERS, FULLY_PRESENT,
    HEADER_1_OFFSET, HEADER_2_OFFSET, HEADER_SIZE, LOGICAL_SECTOR_SIZE, METADATA_REGION, MIB,
    PAGE_83_DATA, PARENT_LOCATOR, PARTIALLY_PRESENT, PHYSICAL_SECTOR_SIZE, REGION_TABLE_2_OFFSET,
    REGION_TABLE_OFFSET, REGION_TABLE_SIZE, VIRTUAL_DISK_SIZE,
};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::layered::PlacedFile;
use crate::storage::Storage;

const LOG_AT: u64 = MIB;
const LOG_LEN: u64 = MIB;
const BAT_AT: u64 = 2 * MIB;
/// The largest disk [MS-VHDX] allows.
const MAX_SIZE: u64 = 64 << 40;
/// The parent locator type of a VHDX differencing disk.
const LOCATOR_TYPE: Guid = Guid::parse("B04AEFB7-D19E-4A81-B789-25B8E9445913");

/// Everything needed to recreate a VHDX's container, not only its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhdxIdentity {
    /// Every block allocated up front (File Parameters' LeaveBlockAllocated).
    pub fixed: bool,
    pub block_size: u32,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// The disk's identity as a guest sees it (SCSI page 83).
    pub page83: uuid::Uuid,
    /// Changes whenever the data does; a child's parent_linkage names it.
    pub data_write_guid: uuid::Uuid,
}

impl VhdxIdentity {
    /// A new disk's identity, with qemu's default block size for its size.
    pub fn new(size: u64) -> VhdxIdentity {
        let block_size = match size {
            s if s > 100 << 30 => 32 << 20,
            s if s > 1 << 30 => 16 << 20,
            _ => 8 << 20,
        };
        VhdxIdentity {
            fixed: false,
            block_size,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            page83: uuid::Uuid::new_v4(),
            data_write_guid: uuid::Uuid::new_v4(),
        }
    }

    pub fn of(layer: &VhdxLayer) -> VhdxIdentity {
        let m = layer.metadata();
        VhdxIdentity {
            fixed: m.leave_blocks_allocated,
            block_size: m.block_size,
            logical_sector_size: m.logical_sector_size,
            physical_sector_size: m.physical_sector_size,
            page83: m.page83.unwrap_or_default().to_uuid(),
            data_write_guid: layer.header().data_write_guid.to_uuid(),
        }
    }
}

/// Where a differencing layer's parent is, as its locator records it.
#[derive(Debug, Clone)]
pub struct ParentLink {
    /// The parent's DataWriteGuid.
    pub data_write_guid: uuid::Uuid,
    /// From the child's directory, as written (`/` or `\`).
    pub relative_path: String,
    pub absolute_path: String,
}

impl ParentLink {
    /// Links to an existing VHDX at `parent` from a child at `child`.
    fn to(parent: &Path, child: &Path) -> Result<(ParentLink, VhdxIdentity, u64)> {
        let image = super::VhdxImage::open(parent)?;
        let top = image.top();
        let absolute = std::fs::canonicalize(parent).ctx_file(parent, "resolve parent path")?;
        let child_dir = child.parent().unwrap_or(Path::new(""));
        let child_dir = std::fs::canonicalize(if child_dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            child_dir
        })
        .ctx_file(child, "resolve the child's directory")?;
        let relative = relative_path(&child_dir, &absolute);
        let mut id = VhdxIdentity::of(top);
        id.fixed = false;
        id.data_write_guid = uuid::Uuid::new_v4();
        Ok((
            ParentLink {
                data_write_guid: top.header().data_write_guid.to_uuid(),
                relative_path: relative,
                absolute_path: absolute.to_string_lossy().into_owned(),
            },
            id,
            image.virtual_size(),
        ))
    }
}

/// `to` as a path from `from` (both absolute), with `..` where needed.
fn relative_path(from: &Path, to: &Path) -> String {
    let (a, b): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = vec!["..".into(); a.len() - common];
    parts.extend(
        b[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    parts.join("/")
}

/// A VHDX to create.
#[derive(Debug, Clone)]
pub struct NewVhdx {
    pub size: u64,
    pub identity: VhdxIdentity,
    pub parent: Option<ParentLink>,
    /// The file identifier's creator string.
    pub creator: String,
}

impl NewVhdx {
    pub fn new(size: u64, identity: VhdxIdentity) -> NewVhdx {
        NewVhdx {
            size,
            identity,
            parent: None,
            creator: format!("vsnap {}", env!("CARGO_PKG_VERSION")),
        }
    }

    /// A differencing layer at `child` over the VHDX at `parent`: its size,
    /// block size, sector sizes and page 83 id are the parent's, its
    /// DataWriteGuid new, and its locator links to the parent's
    /// DataWriteGuid with the relative and absolute paths.
    pub fn child_of(parent: &Path, child: &Path) -> Result<NewVhdx> {
        let (link, id, size) = ParentLink::to(parent, child)?;
        let mut new = NewVhdx::new(size, id);
        new.parent = Some(link);
        Ok(new)
    }

    fn check(&self) -> Result<()> {
        let id = &self.identity;
        let bs = u64::from(id.block_size);
        if !id.block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&bs) {
            return Err(ErrorKind::BadBlockSize(bs).into());
        }
        for s in [id.logical_sector_size, id.physical_sector_size] {
            if s != 512 && s != 4096 {
                return Err(ErrorKind::InvalidArgument(format!(
                    "a VHDX sector is 512 or 4096 bytes, not {s}"
                ))
                .into());
            }
        }
        if self.size == 0
            || self.size > MAX_SIZE
            || !self.size.is_multiple_of(u64::from(id.logical_sector_size))
        {
            return Err(ErrorKind::BadSize {
                size: self.size,
                reason: "a VHDX holds a non-zero multiple of its logical sector size, up to 64 TiB",
            }
            .into());
        }
        Ok(())
    }
}

/// Where the structures go, for a disk's size and block size.
#[derive(Debug, Clone, Copy)]
struct Layout {
    blocks: u64,
    ratio: u64,
    entries: u64,
    bat_len: u64,
    metadata_at: u64,
    data_start: u64,
}

impl Layout {
    fn of(new: &NewVhdx) -> Layout {
        let id = &new.identity;
        let bs = u64::from(id.block_size);
        let blocks = new.size.div_ceil(bs);
        let ratio = chunk_ratio(id.logical_sector_size, id.block_size).max(1);
        let entries = bat_entries(
            new.size,
            id.block_size,
            id.logical_sector_size,
            new.parent.is_some(),
        );
        let bat_len = (entries * 8).div_ceil(MIB) * MIB;
        let metadata_at = BAT_AT + bat_len;
        Layout {
            blocks,
            ratio,
            entries,
            bat_len,
            metadata_at,
            data_start: metadata_at + MIB,
        }
    }
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

fn with_crc(mut b: Vec<u8>) -> Vec<u8> {
    let crc = crc_with_field_zeroed(&b, 4);
    put(&mut b, 4, &crc.to_le_bytes());
    b
}

fn header(sequence: u64, id: &VhdxIdentity) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_SIZE];
    let data = Guid::from_uuid(id.data_write_guid);
    put(&mut b, 0, b"head");
    put(&mut b, 8, &sequence.to_le_bytes());
    put(&mut b, 16, &data.0);
    put(&mut b, 32, &data.0);
    put(&mut b, 66, &1u16.to_le_bytes());
    put(&mut b, 68, &(LOG_LEN as u32).to_le_bytes());
    put(&mut b, 72, &LOG_AT.to_le_bytes());
    with_crc(b)
}

fn region_table(l: &Layout) -> Vec<u8> {
    let mut b = vec![0u8; REGION_TABLE_SIZE];
    put(&mut b, 0, b"regi");
    put(&mut b, 8, &2u32.to_le_bytes());
    for (i, (guid, at, len)) in [
        (BAT_REGION, BAT_AT, l.bat_len),
        (METADATA_REGION, l.metadata_at, MIB),
    ]
    .into_iter()
    .enumerate()
    {
        let e = 16 + i * 32;
        put(&mut b, e, &guid.0);
        put(&mut b, e + 16, &at.to_le_bytes());
        put(&mut b, e + 24, &(len as u32).to_le_bytes());
        put(&mut b, e + 28, &1u32.to_le_bytes());
    }
    with_crc(b)
}

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

fn parent_locator(p: &ParentLink) -> Vec<u8> {
    let pairs = [
        ("parent_linkage", format!("{{{}}}", p.data_write_guid)),
        ("relative_path", p.relative_path.clone()),
        ("absolute_win32_path", p.absolute_path.clone()),
    ];
    let mut b = vec![0u8; 20 + pairs.len() * 12];
    put(&mut b, 0, &LOCATOR_TYPE.0);
    put(&mut b, 18, &(pairs.len() as u16).to_le_bytes());
    for (i, (k, v)) in pairs.iter().enumerate() {
        let (k, v) = (utf16(k), utf16(v));
        let e = 20 + i * 12;
        let ko = b.len();
        b.extend_from_slice(&k);
        let vo = b.len();
        b.extend_from_slice(&v);
        put(&mut b, e, &(ko as u32).to_le_bytes());
        put(&mut b, e + 4, &(vo as u32).to_le_bytes());
        put(&mut b, e + 8, &(k.len() as u16).to_le_bytes());
        put(&mut b, e + 10, &(v.len() as u16).to_le_bytes());
    }
    b
}

fn metadata(new: &NewVhdx) -> Vec<u8> {
    let id = &new.identity;
    let flags = u32::from(id.fixed) | (u32::from(new.parent.is_some()) << 1);
    let mut fp = id.block_size.to_le_bytes().to_vec();
    fp.extend_from_slice(&flags.to_le_bytes());
    // Item flags: bit 1 IsVirtualDisk, bit 2 IsRequired.
    let mut items: Vec<(Guid, Vec<u8>, u32)> = vec![
        (FILE_PARAMETERS, fp, 4),
        (VIRTUAL_DISK_SIZE, new.size.to_le_bytes().to_vec(), 6),
        (PAGE_83_DATA, Guid::from_uuid(id.page83).0.to_vec(), 6),
        (
            LOGICAL_SECTOR_SIZE,
            id.logical_sector_size.to_le_bytes().to_vec(),
            6,
        ),
        (
            PHYSICAL_SECTOR_SIZE,
            id.physical_sector_size.to_le_bytes().to_vec(),
            6,
        ),
    ];
    if let Some(p) = &new.parent {
        items.push((PARENT_LOCATOR, parent_locator(p), 4));
    }
    let mut b = vec![0u8; MIB as usize];
    put(&mut b, 0, b"metadata");
    put(&mut b, 10, &(items.len() as u16).to_le_bytes());
    let mut at = 64 << 10;
    for (i, (guid, data, flags)) in items.iter().enumerate() {
        let e = 32 + i * 32;
        put(&mut b, e, &guid.0);
        put(&mut b, e + 16, &(at as u32).to_le_bytes());
        put(&mut b, e + 20, &(data.len() as u32).to_le_bytes());
        put(&mut b, e + 24, &flags.to_le_bytes());
        put(&mut b, at, data);
        at += data.len().div_ceil(8) * 8;
    }
    b
}

/// A VHDX being written.
#[derive(Debug)]
pub struct VhdxWriter {
    path: PathBuf,
    file: File,
    new: NewVhdx,
    layout: Layout,
    /// The whole BAT, payload and sector-bitmap entries interleaved.
    bat: Vec<u64>,
    /// File offset of each payload block, where one was placed.
    blocks: Vec<Option<u64>>,
    /// The placed blocks, in file order.
    placed: Vec<u64>,
    /// Sector bitmaps of a differencing layer, by chunk.
    bitmaps: BTreeMap<u64, Vec<u8>>,
    /// Where the next block goes.
    next: u64,
    /// The file's bytes before the first block.
    prefix: Vec<u8>,
}

impl VhdxWriter {
    /// Creates `path` (which must not exist) with exactly the blocks in
    /// `allocated` placed (every block for a fixed disk), in virtual order.
    pub fn create(path: &Path, new: NewVhdx, allocated: &[u64]) -> Result<VhdxWriter> {
        new.check()
            .map_err(|e| e.in_file(path).during("create VHDX"))?;
        let layout = Layout::of(&new);
        let mut sorted: Vec<u64> = if new.identity.fixed {
            (0..layout.blocks).collect()
        } else {
            allocated
                .iter()
                .copied()
                .filter(|&b| b < layout.blocks)
                .collect()
        };
        sorted.sort_unstable();
        sorted.dedup();
        let file = crate::storage::create_new(path).ctx_file(path, "create VHDX")?;
        let mut me = VhdxWriter {
            path: path.to_path_buf(),
            file,
            bat: vec![0; layout.entries as usize],
            blocks: vec![None; layout.blocks as usize],
            placed: Vec::with_capacity(sorted.len()),
            bitmaps: BTreeMap::new(),
            next: layout.data_start,
            prefix: Vec::new(),
            new,
            layout,
        };
        for b in sorted {
            me.place(b);
        }
        me.prefix = me.render_prefix();
        me.file
            .write_all_at(&me.prefix, 0)
            .ctx(path, 0, "write VHDX structures")?;
        me.file
            .set_len(me.next.max(me.layout.data_start))
            .ctx_file(path, "size VHDX")?;
        Ok(me)
    }

    fn place(&mut self, block: u64) -> u64 {
        let at = self.next;
        self.next += u64::from(self.new.identity.block_size);
        let state = if self.new.parent.is_some() {
            PARTIALLY_PRESENT
        } else {
            FULLY_PRESENT
        };
        self.bat[payload_bat_index(block, self.layout.ratio) as usize] = at | state;
        self.blocks[block as usize] = Some(at);
        self.placed.push(block);
        at
    }

    fn render_prefix(&self) -> Vec<u8> {
        let mut p = vec![0u8; self.layout.data_start as usize];
        put(&mut p, 0, b"vhdxfile");
        let creator = utf16(&self.new.creator);
        put(&mut p, 8, &creator[..creator.len().min(510)]);
        put(
            &mut p,
            HEADER_1_OFFSET as usize,
            &header(1, &self.new.identity),
        );
        put(
            &mut p,
            HEADER_2_OFFSET as usize,
            &header(2, &self.new.identity),
        );
        let table = region_table(&self.layout);
        put(&mut p, REGION_TABLE_OFFSET as usize, &table);
        put(&mut p, REGION_TABLE_2_OFFSET as usize, &table);
        let bat: Vec<u8> = self.bat.iter().flat_map(|e| e.to_le_bytes()).collect();
        put(&mut p, BAT_AT as usize, &bat);
        put(
            &mut p,
            self.layout.metadata_at as usize,
            &metadata(&self.new),
        );
        p
    }

    /// The file, for writing virtual-disk bytes into the blocks placed at
    /// creation.
    pub fn placed(&self) -> PlacedFile<'_> {
        PlacedFile {
            file: &self.file,
            path: &self.path,
            blocks: &self.blocks,
            block_size: self.block_size(),
            data_skip: 0,
        }
    }

    /// Writes whole logical sectors anywhere, placing blocks as needed; in
    /// a differencing layer the written sectors' bitmap bits are set, so
    /// the rest of the block still reads from the parent. The BAT and the
    /// bitmaps reach the file at [`Self::finish`].
    pub fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        let lss = u64::from(self.new.identity.logical_sector_size);
        let end = offset.checked_add(buf.len() as u64);
        if !offset.is_multiple_of(lss)
            || !(buf.len() as u64).is_multiple_of(lss)
            || end.is_none_or(|e| e > self.new.size)
        {
            return Err(Error::from(ErrorKind::InvalidArgument(format!(
                "a write of {} bytes at {offset} is not whole {lss}-byte sectors inside the disk",
                buf.len()
            )))
            .in_file(&self.path));
        }
        let bs = self.block_size();
        let mut pos = offset;
        while pos < offset + buf.len() as u64 {
            let blk = pos / bs;
            let to = ((blk + 1) * bs).min(offset + buf.len() as u64);
            if self.blocks[blk as usize].is_none() {
                self.place(blk);
            }
            if self.new.parent.is_some() {
                self.mark(blk, pos % bs / lss, (to - pos) / lss);
            }
            pos = to;
        }
        self.placed().write_at(buf, offset)
    }

    /// Sets the bitmap bits of `count` sectors from `first` in block `blk`,
    /// placing the chunk's bitmap block when it is the first.
    fn mark(&mut self, blk: u64, first: u64, count: u64) {
        let ratio = self.layout.ratio;
        let chunk = blk / ratio;
        if !self.bitmaps.contains_key(&chunk) {
            let at = self.next;
            self.next += MIB;
            self.bat[bitmap_bat_index(blk, ratio) as usize] = at | BITMAP_PRESENT;
            self.bitmaps.insert(chunk, vec![0u8; MIB as usize]);
        }
        let spb = self.block_size() / u64::from(self.new.identity.logical_sector_size);
        let base = (blk % ratio) * spb + first;
        if let Some(bits) = self.bitmaps.get_mut(&chunk) {
            for i in base..base + count {
                bits[(i / 8) as usize] |= 1 << (i % 8);
            }
        }
    }

    /// Writes the BAT and the sector bitmaps, and sizes the file.
    pub fn finish(&mut self) -> Result<()> {
        self.prefix = self.render_prefix();
        let bat = &self.prefix[BAT_AT as usize..(BAT_AT + self.layout.bat_len) as usize];
        self.file
            .write_all_at(bat, BAT_AT)
            .ctx(&self.path, BAT_AT, "write VHDX BAT")?;
        for (&chunk, bits) in &self.bitmaps {
            let entry =
                self.bat[bitmap_bat_index(chunk * self.layout.ratio, self.layout.ratio) as usize];
            let at = entry_offset(entry);
            self.file
                .write_all_at(bits, at)
                .ctx(&self.path, at, "write VHDX sector bitmap")?;
        }
        self.file
            .set_len(self.next)
            .ctx_file(&self.path, "size VHDX")?;
        self.sync()
    }

    /// The placed blocks, in the order they sit in the file.
    pub fn placed_blocks(&self) -> &[u64] {
        &self.placed
    }

    /// The file's bytes before the first block: everything but data.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    pub fn block_size(&self) -> u64 {
        u64::from(self.new.identity.block_size)
    }

    /// Queues what was written so far for writeback.
    pub fn start_writeback(&self) {
        crate::storage::start_writeback(&self.file);
    }

    /// Makes everything durable.
    pub fn sync(&self) -> Result<()> {
        self.file.sync().ctx_file(&self.path, "flush VHDX")
    }
}
