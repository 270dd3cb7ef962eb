//! Writing into a VHD at any offset: allocating blocks, keeping the sector
//! bitmaps exact, and moving the footer to the new end.
//!
//! Block allocation follows qemu's order (bitmap, then footer at the new
//! end, then the BAT entry), so a crash at any point leaves a file that
//! opens: at worst a block whose space is leaked, never a BAT entry that
//! points past the end.

use super::bat::{self, UNALLOCATED};
use super::footer::SECTOR;
use super::layer::{Below, VhdLayer};
use super::{read_chain, VhdImage};
use crate::error::{Error, ErrorKind, Result, ResultExt};

impl VhdImage {
    /// Writes virtual-disk bytes into the top layer. Sectors a partial
    /// write leaves untouched keep what the chain showed before.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len())?;
        let Some((top, parents)) = self.layers.split_first_mut() else {
            return Ok(());
        };
        if !top.writable {
            return Err(Error::from(ErrorKind::ReadOnly)
                .in_file(top.path())
                .during("write VHD"));
        }
        let mut below = |out: &mut [u8], at: u64| read_chain(parents, out, at);
        top.write_own(buf, offset, &mut below)
    }
}

impl VhdLayer {
    fn write_own(&mut self, buf: &[u8], offset: u64, below: &mut Below<'_>) -> Result<()> {
        let Some(bs) = self.sparse.as_ref().map(|s| s.block_size()) else {
            return self.storage.write_all_at(buf, offset).ctx(
                &self.path,
                offset,
                "write fixed VHD",
            );
        };
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (blk, in_blk) = (pos / bs, pos % bs);
            let n = (bs - in_blk).min((buf.len() - done) as u64) as usize;
            self.write_in_block(blk, in_blk, &buf[done..done + n], below)?;
            done += n;
        }
        Ok(())
    }

    fn write_in_block(
        &mut self,
        blk: u64,
        in_blk: u64,
        data: &[u8],
        below: &mut Below<'_>,
    ) -> Result<()> {
        let (entry, fresh) = match self.bat_entry(blk) {
            UNALLOCATED => (self.allocate_block(blk)?, true),
            entry => (entry, false),
        };
        let Some(s) = self.sparse.as_ref() else {
            return Ok(());
        };
        let bs = s.block_size();
        let block_start = u64::from(entry) * SECTOR;
        let data_start = block_start + s.bitmap_size;
        let mut bitmap = if fresh {
            vec![0u8; s.bitmap_size as usize]
        } else {
            self.read_bitmap(s, block_start)?
        };
        let end = in_blk + data.len() as u64;
        let first = in_blk / SECTOR;
        let last = end.div_ceil(SECTOR);
        let aligned = in_blk.is_multiple_of(SECTOR) && end.is_multiple_of(SECTOR);
        if aligned {
            self.storage.write_all_at(data, data_start + in_blk).ctx(
                &self.path,
                data_start + in_blk,
                "write VHD block",
            )?;
        } else {
            // Complete the partial edge sectors with what they held: from
            // this file where it holds them, else from below.
            let span_start = first * SECTOR;
            let mut tmp = vec![0u8; ((last - first) * SECTOR) as usize];
            for sec in [first, last - 1] {
                let at = ((sec - first) * SECTOR) as usize;
                let out = &mut tmp[at..at + SECTOR as usize];
                if !self.honours_bitmaps() || bat::bit(&bitmap, sec) {
                    self.storage
                        .read_exact_at(out, data_start + sec * SECTOR)
                        .ctx(&self.path, data_start + sec * SECTOR, "read VHD block")?;
                } else {
                    below(out, blk * bs + sec * SECTOR)?;
                }
            }
            let at = (in_blk - span_start) as usize;
            tmp[at..at + data.len()].copy_from_slice(data);
            self.storage
                .write_all_at(&tmp, data_start + span_start)
                .ctx(&self.path, data_start + span_start, "write VHD block")?;
        }
        if bat::set_bits(&mut bitmap, first..last) {
            self.storage.write_all_at(&bitmap, block_start).ctx(
                &self.path,
                block_start,
                "write VHD sector bitmap",
            )?;
        }
        Ok(())
    }

    fn bat_entry(&self, blk: u64) -> u32 {
        self.sparse
            .as_ref()
            .and_then(|s| s.bat.get(blk as usize).copied())
            .unwrap_or(UNALLOCATED)
    }

    /// Appends a block where the footer is, with an empty bitmap, moves the
    /// footer past it, and only then points the BAT at it.
    fn allocate_block(&mut self, blk: u64) -> Result<u32> {
        let Some(s) = self.sparse.as_ref() else {
            return Ok(UNALLOCATED);
        };
        let start = self.footer_offset.div_ceil(SECTOR) * SECTOR;
        let entry = bat::entry_for(start).ok_or_else(|| {
            Error::from(ErrorKind::InvalidArgument(
                "the VHD file would grow past the 2 TiB a BAT entry can address".into(),
            ))
            .in_file(&self.path)
            .during("allocate VHD block")
        })?;
        let new_footer_at = start + s.bitmap_size + s.block_size();
        let table_entry_at = s.header.table_offset + blk * 4;
        let bitmap = vec![0u8; s.bitmap_size as usize];
        let footer = self.footer.to_bytes();
        let path = self.path.clone();
        self.storage
            .write_all_at(&bitmap, start)
            .ctx(&path, start, "write VHD sector bitmap")?;
        self.storage.write_all_at(&footer, new_footer_at).ctx(
            &path,
            new_footer_at,
            "write VHD footer",
        )?;
        self.storage
            .write_all_at(&entry.to_be_bytes(), table_entry_at)
            .ctx(&path, table_entry_at, "write VHD BAT")?;
        self.footer_offset = new_footer_at;
        if let Some(slot) = self
            .sparse
            .as_mut()
            .and_then(|s| s.bat.get_mut(blk as usize))
        {
            *slot = entry;
        }
        Ok(entry)
    }
}
