//! One VHDX file on its own: its current header, its log replayed if it
//! needs one, its regions, metadata and BAT, and how its own sectors read.
//! Chains of layers are [`super::VhdxImage`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::log::{replay, Replayed};
use super::parse::{
    bat_entries, bitmap_bat_index, choose_header, chunk_ratio, entry_offset, entry_state,
    parse_header, parse_identifier, parse_metadata, parse_payload_entry, parse_region_table,
    payload_bat_index, Header, Metadata, Regions, BITMAP_PRESENT, FULLY_PRESENT, HEADER_1_OFFSET,
    HEADER_2_OFFSET, HEADER_SIZE, MIB, NOT_PRESENT, PARTIALLY_PRESENT, REGION_TABLE_2_OFFSET,
    REGION_TABLE_OFFSET, REGION_TABLE_SIZE, ZERO,
};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::extent::{AllocationMap, Extent, ExtentKind, MapBuilder};
use crate::layered::{pieces, read_struct, Below, Layer};
use crate::storage::Storage;

/// The largest log vsnap reads into memory to replay. Hyper-V and qemu
/// make 1 MiB logs; a larger one is refused with this reason, not read.
const MAX_LOG: u64 = 256 * MIB;

#[derive(Debug)]
pub struct VhdxLayer {
    path: PathBuf,
    /// The file, with its log laid over it when one was replayed.
    storage: Arc<dyn Storage>,
    creator: String,
    header: Header,
    regions: Regions,
    meta: Metadata,
    /// One raw entry per payload block (the sector-bitmap entries that
    /// interleave with them are in `bitmaps`).
    bat: Vec<u64>,
    /// Each chunk's sector-bitmap block in the file (differencing only).
    bitmaps: Vec<Option<u64>>,
    ratio: u64,
    /// Log entries replayed in memory at open; 0 for a clean file.
    replayed: usize,
    warnings: Vec<String>,
}

/// Reads a structure of `len` bytes at `at`, which must lie below `limit`:
/// the file's own length, checked before allocating, so a forged length
/// cannot make us allocate more than the file holds. (A replayed log may
/// grow the file in memory, but only with zeros: no structure is there.)
fn read_vec(
    storage: &dyn Storage,
    at: u64,
    len: u64,
    what: &'static str,
    limit: u64,
) -> Result<Vec<u8>> {
    let available = limit.saturating_sub(at);
    if len > available {
        return Err(Error::from(ErrorKind::Truncated {
            what,
            needed: len,
            at,
            available,
        })
        .at(at));
    }
    let mut buf = vec![0u8; len as usize];
    read_struct(storage, &mut buf, at, what)?;
    Ok(buf)
}

fn corrupt(reason: String) -> Error {
    ErrorKind::Corrupt {
        what: "VHDX BAT",
        reason,
    }
    .into()
}

impl VhdxLayer {
    /// Opens one VHDX file read-only and checks its structure; it does not
    /// follow a differencing disk's parent. A log that needs replaying is
    /// replayed in memory; the file is never written.
    pub fn open(storage: Arc<dyn Storage>, path: &Path) -> Result<VhdxLayer> {
        Self::open_inner(storage)
            .map_err(|e| e.in_file(path).during("open VHDX"))
            .map(|mut l| {
                l.path = path.to_path_buf();
                l
            })
    }

    fn open_inner(storage: Arc<dyn Storage>) -> Result<VhdxLayer> {
        let mut warnings = Vec::new();
        let len = storage.len()?;
        if len < MIB {
            return Err(Error::from(ErrorKind::Truncated {
                what: "VHDX header section",
                needed: MIB,
                at: 0,
                available: len,
            })
            .at(0));
        }
        let creator = parse_identifier(&read_vec(&*storage, 0, 520, "VHDX file identifier", len)?)?;
        let header_at = |at: u64, what: &'static str| {
            read_vec(&*storage, at, HEADER_SIZE as u64, what, len)
                .and_then(|b| parse_header(&b, what).map_err(|e| e.rebase(at)))
        };
        let (h1, h2) = (
            header_at(HEADER_1_OFFSET, "VHDX header 1"),
            header_at(HEADER_2_OFFSET, "VHDX header 2"),
        );
        let damaged = match (&h1, &h2) {
            (Err(e), Ok(_)) => Some((1, e.to_string())),
            (Ok(_), Err(e)) => Some((2, e.to_string())),
            _ => None,
        };
        let (_, header) = choose_header(h1, h2)?;
        if let Some((n, why)) = damaged {
            warnings.push(format!(
                "header {n} is damaged ({why}); the other is current"
            ));
        }
        let (storage, replayed) = replay_log(storage, &header, len, &mut warnings)?;
        // Structures must lie in the file itself; blocks may lie where a
        // replayed log grew it.
        let (file_len, len) = (len, storage.len()?);
        let table_at = |at: u64| {
            read_vec(
                &*storage,
                at,
                REGION_TABLE_SIZE as u64,
                "VHDX region table",
                file_len,
            )
            .and_then(|b| parse_region_table(&b).map_err(|e| e.rebase(at)))
        };
        let regions = match table_at(REGION_TABLE_OFFSET) {
            Ok(r) => r,
            Err(first) => match table_at(REGION_TABLE_2_OFFSET) {
                Ok(r) => {
                    warnings.push(format!(
                        "the region table is damaged ({first}); its copy is used"
                    ));
                    r
                }
                Err(_) => return Err(first),
            },
        };
        let md = regions.metadata;
        let meta = parse_metadata(&read_vec(
            &*storage,
            md.offset,
            u64::from(md.length),
            "VHDX metadata region",
            file_len,
        )?)
        .map_err(|e| e.rebase(md.offset))?;
        let mut layer = VhdxLayer {
            path: PathBuf::new(),
            storage,
            creator,
            // Never 0: parse_metadata bounds the block and sector sizes.
            ratio: chunk_ratio(meta.logical_sector_size, meta.block_size).max(1),
            header,
            regions,
            meta,
            bat: Vec::new(),
            bitmaps: Vec::new(),
            replayed,
            warnings,
        };
        layer.load_bat(file_len, len)?;
        Ok(layer)
    }

    /// Reads the BAT and checks every block it places: inside the file,
    /// clear of the header section, the log, the BAT and the metadata,
    /// and clear of each other.
    fn load_bat(&mut self, file_len: u64, len: u64) -> Result<()> {
        let m = &self.meta;
        let bs = u64::from(m.block_size);
        let blocks = m.virtual_size.div_ceil(bs);
        let ratio = self.ratio;
        let chunks = blocks.div_ceil(ratio);
        let entries = bat_entries(
            m.virtual_size,
            m.block_size,
            m.logical_sector_size,
            m.has_parent,
        );
        let bat = self.regions.bat;
        let needed = entries.saturating_mul(8);
        if needed > u64::from(bat.length) {
            return Err(corrupt(format!(
                "the BAT region holds {} entries; a disk of {} bytes in {bs}-byte blocks needs {entries}",
                bat.length / 8,
                self.meta.virtual_size
            ))
            .at(bat.offset));
        }
        let table = read_vec(&*self.storage, bat.offset, needed, "VHDX BAT", file_len)?;
        let raw = |i: u64| crate::bytes::le64(&table, (i * 8) as usize);
        let log_end = self.header.log_offset + u64::from(self.header.log_length);
        let reserved = [
            ("header section", 0, MIB),
            ("log", self.header.log_offset, log_end),
            ("BAT", bat.offset, bat.offset + u64::from(bat.length)),
            (
                "metadata region",
                self.regions.metadata.offset,
                self.regions.metadata.offset + u64::from(self.regions.metadata.length),
            ),
        ];
        // (start, end, BAT index) of every block the file holds.
        let mut spans: Vec<(u64, u64, u64)> = Vec::new();
        let mut place = |index: u64, start: u64, used: u64| -> Result<()> {
            let at = bat.offset + index * 8;
            let idx = u32::try_from(index).unwrap_or(u32::MAX);
            let end = start.saturating_add(used);
            if end > len {
                return Err(Error::from(ErrorKind::BatEntryPastEnd {
                    index: idx,
                    start,
                    end,
                    limit: len,
                })
                .at(at));
            }
            if let Some((what, ..)) = reserved
                .iter()
                .find(|(_, s, e)| start < *e && *s < end && s < e)
            {
                return Err(Error::from(ErrorKind::BlockOverlapsMetadata {
                    index: idx,
                    offset: start,
                    what,
                })
                .at(at));
            }
            spans.push((start, end, index));
            Ok(())
        };
        self.bat = Vec::with_capacity(blocks as usize);
        for b in 0..blocks {
            let index = payload_bat_index(b, ratio);
            let entry = raw(index);
            parse_payload_entry(entry, index).map_err(|e| e.at(bat.offset + index * 8))?;
            match entry_state(entry) {
                PARTIALLY_PRESENT if !self.meta.has_parent => {
                    return Err(corrupt(format!(
                        "block {b} is PARTIALLY_PRESENT, which only a differencing disk may use"
                    ))
                    .at(bat.offset + index * 8))
                }
                FULLY_PRESENT | PARTIALLY_PRESENT => {
                    // The last block may run past the disk's end; only its
                    // part inside the disk must be in the file.
                    let used = bs.min(self.meta.virtual_size - b * bs);
                    place(index, entry_offset(entry), used)?;
                }
                _ => {}
            }
            self.bat.push(entry);
        }
        if self.meta.has_parent {
            for c in 0..chunks {
                let index = bitmap_bat_index(c * ratio, ratio);
                let entry = raw(index);
                self.bitmaps.push(match entry_state(entry) {
                    NOT_PRESENT => None,
                    BITMAP_PRESENT => {
                        let start = entry_offset(entry);
                        place(index, start, MIB)?;
                        Some(start)
                    }
                    s => {
                        return Err(corrupt(format!(
                            "the sector-bitmap entry of chunk {c} has the state {s}"
                        ))
                        .at(bat.offset + index * 8))
                    }
                });
            }
        }
        spans.sort_unstable();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(Error::from(ErrorKind::OverlappingBlocks {
                    first: u32::try_from(w[0].2).unwrap_or(u32::MAX),
                    second: u32::try_from(w[1].2).unwrap_or(u32::MAX),
                    offset: w[1].0,
                })
                .at(bat.offset + w[1].2 * 8));
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn creator(&self) -> &str {
        &self.creator
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    pub fn regions(&self) -> &Regions {
        &self.regions
    }

    pub fn is_differencing(&self) -> bool {
        self.meta.has_parent
    }

    /// Log entries replayed in memory at open; 0 for a clean file.
    pub fn replayed_entries(&self) -> usize {
        self.replayed
    }

    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    pub fn file_len(&self) -> Result<u64> {
        self.storage.len().ctx_file(&self.path, "stat VHDX")
    }

    /// The raw payload BAT entries, one per block.
    pub fn bat(&self) -> &[u64] {
        &self.bat
    }

    fn block_size(&self) -> u64 {
        u64::from(self.meta.block_size)
    }

    /// Sectors `[first, last)` of block `blk`'s bitmap bits, LSB-first,
    /// with the bit of sector `first` at bit `first % 8` of byte 0.
    fn bitmap_bits(&self, blk: u64, first: u64, last: u64) -> Result<Vec<u8>> {
        let chunk = (blk / self.ratio) as usize;
        let Some(Some(at)) = self.bitmaps.get(chunk) else {
            return Err(corrupt(format!(
                "block {blk} is PARTIALLY_PRESENT but its chunk has no sector bitmap"
            ))
            .in_file(&self.path));
        };
        let spb = self.block_size() / u64::from(self.meta.logical_sector_size);
        let base = (blk % self.ratio) * spb;
        let (from, to) = ((base + first) / 8, (base + last).div_ceil(8));
        let mut bits = vec![0u8; (to - from) as usize];
        read_struct(&*self.storage, &mut bits, at + from, "VHDX sector bitmap")
            .map_err(|e| e.in_file(&self.path).during("read VHDX sector bitmap"))?;
        Ok(bits)
    }

    /// Reads part of a PARTIALLY_PRESENT block: runs of set bits from
    /// this file, runs of clear bits from below.
    fn read_partial(
        &self,
        blk: u64,
        file_offset: u64,
        in_blk: u64,
        out: &mut [u8],
        below: &mut Below<'_>,
    ) -> Result<()> {
        let lss = u64::from(self.meta.logical_sector_size);
        let end = in_blk + out.len() as u64;
        let (first, last) = (in_blk / lss, end.div_ceil(lss));
        let bits = self.bitmap_bits(blk, first, last)?;
        let mut sec = first;
        while sec < last {
            let (present, run) = run_at(&bits, first % 8, sec - first, last - first);
            let from = (sec * lss).max(in_blk);
            let to = ((sec + run) * lss).min(end);
            let piece = &mut out[(from - in_blk) as usize..(to - in_blk) as usize];
            if present {
                self.read_data(piece, file_offset + from)?;
            } else {
                below(piece, blk * self.block_size() + from)?;
            }
            sec += run;
        }
        Ok(())
    }

    fn read_data(&self, out: &mut [u8], at: u64) -> Result<()> {
        read_struct(&*self.storage, out, at, "VHDX block")
            .map_err(|e| e.in_file(&self.path).during("read VHDX block"))
    }
}

/// The run of equal bits starting at bit `pos` (counted from `skew`, the
/// bit offset of the first sector in byte 0), up to `last`: whether they
/// are set, and how many there are.
fn run_at(bits: &[u8], skew: u64, pos: u64, last: u64) -> (bool, u64) {
    let bit = |i: u64| {
        let i = i + skew;
        bits.get((i / 8) as usize)
            .is_some_and(|b| b >> (i % 8) & 1 == 1)
    };
    let set = bit(pos);
    let mut end = pos + 1;
    while end < last && bit(end) == set {
        end += 1;
    }
    (set, end - pos)
}

impl Layer for VhdxLayer {
    fn size(&self) -> u64 {
        self.meta.virtual_size
    }

    fn read_own(&self, buf: &mut [u8], offset: u64, below: &mut Below<'_>) -> Result<()> {
        for p in pieces(offset, buf.len(), self.block_size()) {
            let (blk, in_blk, pos) = (p.block, p.in_block, offset + p.done as u64);
            let out = &mut buf[p.done..p.done + p.len];
            let entry = self.bat.get(blk as usize).copied().unwrap_or(NOT_PRESENT);
            let file_offset = entry_offset(entry);
            match entry_state(entry) {
                NOT_PRESENT => below(out, pos)?,
                FULLY_PRESENT => self.read_data(out, file_offset + in_blk)?,
                PARTIALLY_PRESENT => self.read_partial(blk, file_offset, in_blk, out, below)?,
                // UNDEFINED, ZERO and UNMAPPED read as zeros, even over a
                // parent: the block was discarded in this layer.
                _ => out.fill(0),
            }
        }
        Ok(())
    }

    fn own_map(&self) -> Result<AllocationMap> {
        let bs = self.block_size();
        let size = self.meta.virtual_size;
        let lss = u64::from(self.meta.logical_sector_size);
        // The file's holes read as zeros even inside a present block (a
        // fixed VHDX's unwritten blocks are holes), so they are mapped as
        // zeros and never read. Zeros, not unallocated: in a differencing
        // layer, unallocated would show the parent through.
        let file_len = self.storage.len().ctx_file(&self.path, "stat VHDX")?;
        let held = self
            .storage
            .data_ranges(0..file_len)
            .ctx_file(&self.path, "find holes")?;
        let mut map = MapBuilder::new(0);
        let data = |map: &mut MapBuilder, start: u64, len: u64, at: u64| {
            let Some(held) = &held else {
                map.data(start, len, 0, at);
                return;
            };
            let mut pos = at;
            let end = at + len;
            let first = held.partition_point(|&(_, e)| e <= at);
            for &(s, e) in held[first..].iter().take_while(|&&(s, _)| s < end) {
                let (s, e) = (s.max(pos), e.min(end));
                if s > pos {
                    zero(map, start + (pos - at), s - pos);
                }
                map.data(start + (s - at), e - s, 0, s);
                pos = e;
            }
            if pos < end {
                zero(map, start + (pos - at), end - pos);
            }
        };
        for (blk, &entry) in self.bat.iter().enumerate() {
            let blk = blk as u64;
            let start = blk * bs;
            let len = bs.min(size - start);
            let file_offset = entry_offset(entry);
            match entry_state(entry) {
                NOT_PRESENT => map.unallocated(start, len),
                FULLY_PRESENT => data(&mut map, start, len, file_offset),
                ZERO => zero(&mut map, start, len),
                PARTIALLY_PRESENT => {
                    let sectors = len.div_ceil(lss);
                    let bits = self.bitmap_bits(blk, 0, sectors)?;
                    let mut sec = 0;
                    while sec < sectors {
                        let (present, run) = run_at(&bits, 0, sec, sectors);
                        let from = sec * lss;
                        let to = ((sec + run) * lss).min(len);
                        if present {
                            data(&mut map, start + from, to - from, file_offset + from);
                        } else {
                            map.unallocated(start + from, to - from);
                        }
                        sec += run;
                    }
                }
                // UNDEFINED and UNMAPPED: zeros over a parent, and in a
                // disk with none simply nothing stored.
                _ if self.meta.has_parent => zero(&mut map, start, len),
                _ => map.unallocated(start, len),
            }
        }
        Ok(map.finish())
    }
}

fn zero(map: &mut MapBuilder, offset: u64, length: u64) {
    map.push(Extent {
        offset,
        length,
        kind: ExtentKind::Zero,
        layer: None,
        file_offset: None,
    });
}

/// Replays the log when the header says it must be, and returns the
/// storage every later read goes through.
fn replay_log(
    storage: Arc<dyn Storage>,
    header: &Header,
    len: u64,
    warnings: &mut Vec<String>,
) -> Result<(Arc<dyn Storage>, usize)> {
    if header.log_guid.is_zero() {
        return Ok((storage, 0));
    }
    let (at, size) = (header.log_offset, u64::from(header.log_length));
    if size > MAX_LOG {
        return Err(Error::from(ErrorKind::LogReplay {
            reason: format!("the log is {size} bytes, more than the {MAX_LOG} vsnap replays"),
        })
        .at(at));
    }
    if at < MIB {
        return Err(Error::from(ErrorKind::LogReplay {
            reason: format!("the log at {at} lies inside the header section"),
        })
        .at(at));
    }
    let log = read_vec(&*storage, at, size, "VHDX log", len)?;
    let r = replay(&log, header.log_guid).map_err(|e| e.at(at).during("replay VHDX log"))?;
    if r.entries == 0 {
        warnings.push(format!(
            "the header names log {}, but the log holds none of its entries: nothing to replay",
            header.log_guid
        ));
        return Ok((storage, 0));
    }
    if len < r.flushed_file_offset {
        return Err(Error::from(ErrorKind::LogReplay {
            reason: format!(
                "the file is {len} bytes, shorter than the {} the log says were flushed, so it lost data",
                r.flushed_file_offset
            ),
        })
        .at(at));
    }
    let entries = r.entries;
    warnings.push(format!(
        "the log held {entries} entries to replay (to sequence {}); they were replayed in memory, and the file is unchanged",
        r.head_sequence
    ));
    let replayed = Replayed::new(storage, r).map_err(|e| Error::io(e).during("replay VHDX log"))?;
    Ok((Arc::new(replayed), entries))
}
