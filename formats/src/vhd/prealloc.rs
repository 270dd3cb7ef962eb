//! A dynamic VHD whose blocks are all placed before any data is written.
//!
//! A copy knows from the source's allocation map which blocks will hold
//! data. Placing them up front, in virtual order, gives a deterministic
//! file (the same source always copies to the same bytes), and turns every
//! later write into a plain positional write that any number of threads can
//! issue at once, with no BAT updates and no lock.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::bat::{self, bat_bytes, bitmap_bytes, serialize_bat, UNALLOCATED};
use super::create::MIN_BLOCK_SIZE;
use super::footer::{DiskType, Footer};
use super::header::{DynamicHeader, HEADER_SIZE};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::layered::PlacedFile;
use crate::storage::Storage;

#[derive(Debug)]
pub struct PreallocatedVhd {
    path: PathBuf,
    file: File,
    block_size: u64,
    bitmap_size: u64,
    /// File offset of each block's bitmap, or `None` where unallocated.
    blocks: Vec<Option<u64>>,
    /// The placed blocks, in file order (which is virtual order).
    placed: Vec<u64>,
    /// The file's bytes before the first block: footer copy, header, BAT.
    prefix: Vec<u8>,
    footer: [u8; 512],
}

impl PreallocatedVhd {
    /// Creates `path` (which must not exist) as a dynamic VHD described by
    /// `footer` (made dynamic here), with exactly `allocated` blocks
    /// (indices, any order, duplicates ignored).
    pub fn create(
        path: &Path,
        mut footer: Footer,
        block_size: u32,
        allocated: &[u64],
    ) -> Result<Self> {
        if !block_size.is_power_of_two() || block_size < MIN_BLOCK_SIZE {
            return Err(Error::from(ErrorKind::BadBlockSize(block_size.into())).in_file(path));
        }
        footer.disk_type = DiskType::Dynamic;
        footer.data_offset = 512;
        let size = footer.disk_size();
        let bs32 = block_size;
        let block_size = u64::from(block_size);
        let entries = u32::try_from(size.div_ceil(block_size)).map_err(|_| {
            Error::from(ErrorKind::InvalidArgument(
                "too many blocks for a VHD".into(),
            ))
            .in_file(path)
        })?;
        let table_offset = 512 + HEADER_SIZE as u64;
        let bitmap_size = bitmap_bytes(bs32);
        let span = bitmap_size + block_size;
        let mut bat = vec![UNALLOCATED; entries as usize];
        let mut blocks = vec![None; entries as usize];
        let mut next = table_offset + bat_bytes(entries);
        let mut sorted: Vec<u64> = allocated
            .iter()
            .copied()
            .filter(|&b| b < u64::from(entries))
            .collect();
        sorted.sort_unstable();
        sorted.dedup();
        for &b in &sorted {
            let sector = bat::entry_for(next).ok_or_else(|| {
                Error::from(ErrorKind::InvalidArgument(
                    "the VHD file would grow past the 2 TiB a BAT entry can address".into(),
                ))
                .in_file(path)
            })?;
            bat[b as usize] = sector;
            blocks[b as usize] = Some(next);
            next += span;
        }
        let file = crate::storage::create_new(path).ctx_file(path, "create VHD")?;
        let mut me = Self {
            path: path.to_path_buf(),
            file,
            block_size,
            bitmap_size,
            blocks,
            placed: sorted,
            prefix: Vec::new(),
            footer: footer.to_bytes(),
        };
        let header = DynamicHeader {
            table_offset,
            header_version: 0x0001_0000,
            max_table_entries: entries,
            block_size: bs32,
            parent_unique_id: [0; 16],
            parent_timestamp: 0,
            parent_name: String::new(),
            locators: Vec::new(),
        };
        me.prefix = me.write_layout(&footer, &header, &bat, next)?;
        Ok(me)
    }

    fn write_layout(
        &self,
        footer: &Footer,
        header: &DynamicHeader,
        bat: &[u32],
        end: u64,
    ) -> Result<Vec<u8>> {
        let f = &self.file;
        let footer = footer.to_bytes();
        let ctx = |at: u64, op| {
            move |e: std::io::Error| Error::io(e).in_file(&self.path).at(at).during(op)
        };
        f.write_all_at(&footer, 0)
            .map_err(ctx(0, "write VHD footer copy"))?;
        f.write_all_at(&header.to_bytes(), 512)
            .map_err(ctx(512, "write VHD dynamic header"))?;
        f.write_all_at(&serialize_bat(bat), header.table_offset)
            .map_err(ctx(header.table_offset, "write VHD BAT"))?;
        // Every sector of a placed block is marked present: data not
        // written is a hole in the file and reads as zeros, which is what
        // the source held there.
        let full = vec![0xFFu8; self.bitmap_size as usize];
        for at in self.blocks.iter().flatten() {
            f.write_all_at(&full, *at)
                .map_err(ctx(*at, "write VHD sector bitmap"))?;
        }
        f.write_all_at(&footer, end)
            .map_err(ctx(end, "write VHD footer"))?;
        let mut prefix = footer.to_vec();
        prefix.extend_from_slice(&header.to_bytes());
        prefix.extend_from_slice(&serialize_bat(bat));
        Ok(prefix)
    }

    /// The placed blocks, in the order they sit in the file.
    pub fn placed_blocks(&self) -> &[u64] {
        &self.placed
    }

    /// The file's bytes before the first block: footer copy, header, BAT.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    pub fn footer_bytes(&self) -> &[u8; 512] {
        &self.footer
    }

    pub fn bitmap_size(&self) -> u64 {
        self.bitmap_size
    }

    /// The file, for writing virtual-disk bytes into its placed blocks.
    pub fn placed(&self) -> PlacedFile<'_> {
        PlacedFile {
            file: &self.file,
            path: &self.path,
            blocks: &self.blocks,
            block_size: self.block_size,
            data_skip: self.bitmap_size,
        }
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Queues what was written so far for writeback.
    pub fn start_writeback(&self) {
        crate::storage::start_writeback(&self.file);
    }

    /// Makes everything durable.
    pub fn sync(&self) -> Result<()> {
        self.file.sync().ctx_file(&self.path, "flush VHD")
    }
}
