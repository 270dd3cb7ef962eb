//! The VHDX log, replayed in memory.
//!
//! A VHDX whose current header carries a non-zero LogGuid was left with
//! metadata updates (BAT and metadata sectors) in its log that may not
//! have reached their places: its BAT cannot be trusted until the log is
//! replayed. vsnap opens images read-only and must never change a file it
//! backs up (it may be a live snapshot), so it replays into an overlay:
//! [`replay`] turns the log region's bytes into the writes it stands for,
//! and [`Replayed`] lays them over the file for every later read.
//!
//! Only entries of the header's log count: leftovers of earlier logs carry
//! other GUIDs and are skipped, as are torn entries (bad CRC). An entry of
//! this log whose CRC is good but whose content is not refuses the open:
//! replaying around it would give a disk no writer ever produced.

use std::io;
use std::sync::Arc;

use super::parse::{check_crc, guid_at, magic, u32_at, u64_at, Guid};
use crate::error::{ErrorKind, Result};
use crate::storage::Storage;

/// Log entries, descriptors and the sectors they carry are in 4 KiB units.
pub const LOG_SECTOR: usize = 4096;
const ENTRY_HEADER: usize = 64;
const DESCRIPTOR: usize = 32;

/// One write the log stands for, at a file offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogWrite {
    /// One whole 4 KiB sector.
    Data { offset: u64, bytes: Box<[u8]> },
    /// A zero-filled range, a multiple of 4 KiB.
    Zero { offset: u64, length: u64 },
}

impl LogWrite {
    fn range(&self) -> (u64, u64) {
        match self {
            LogWrite::Data { offset, bytes } => (*offset, *offset + bytes.len() as u64),
            LogWrite::Zero { offset, length } => (*offset, offset.saturating_add(*length)),
        }
    }
}

/// A parsed log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub length: u32,
    /// Log offset of the oldest entry still needed: where replay starts.
    pub tail: u32,
    pub sequence: u64,
    /// The file must be at least this long, or it lost flushed data.
    pub flushed_file_offset: u64,
    /// The file's length once the entry is replayed.
    pub last_file_offset: u64,
    pub writes: Vec<LogWrite>,
}

/// What the log's active sequence says to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// Entries replayed, oldest first; 0 when the log holds none.
    pub entries: usize,
    pub head_sequence: u64,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
    /// In replay order: a later write wins where two overlap.
    pub writes: Vec<LogWrite>,
}

fn bad(reason: String) -> crate::error::Error {
    ErrorKind::LogReplay { reason }.into()
}

/// The entry's length from its header, if the bytes can be one at all.
fn entry_length(header: &[u8], log_len: usize) -> Option<usize> {
    if header.len() < ENTRY_HEADER || &header[..4] != b"loge" {
        return None;
    }
    let len = u32_at(header, 8) as usize;
    (len >= LOG_SECTOR && len.is_multiple_of(LOG_SECTOR) && len <= log_len).then_some(len)
}

/// One log entry (its `length` bytes), for the log `guid`.
///
/// Errors say why the entry is not one this log can replay; the caller
/// tells a stranger (another log's, or torn) from a damaged one of ours.
pub fn parse_entry(bytes: &[u8], guid: Guid) -> Result<LogEntry> {
    const WHAT: &str = "VHDX log entry";
    super::parse::need(bytes, 0, ENTRY_HEADER, WHAT)?;
    magic(bytes, "loge", WHAT)?;
    let length = u32_at(bytes, 8);
    let len = length as usize;
    if len < LOG_SECTOR || !len.is_multiple_of(LOG_SECTOR) {
        return Err(bad(format!(
            "entry length {length} is not a multiple of 4 KiB"
        )));
    }
    super::parse::need(bytes, 0, len, WHAT)?;
    let b = &bytes[..len];
    check_crc(b, 4, WHAT)?;
    let entry_guid = guid_at(b, 32);
    if entry_guid != guid {
        return Err(bad(format!(
            "the entry belongs to log {entry_guid}, not {guid}"
        )));
    }
    parse_ours(b)
}

/// The rest of [`parse_entry`], for an entry of the right length whose
/// CRC and log GUID were checked already.
fn parse_ours(b: &[u8]) -> Result<LogEntry> {
    let (length, len) = (u32_at(b, 8), b.len());
    let sequence = u64_at(b, 16);
    if sequence == 0 {
        return Err(bad("sequence number 0".into()));
    }
    let count = u32_at(b, 24) as usize;
    let desc_sectors = (ENTRY_HEADER + count * DESCRIPTOR).div_ceil(LOG_SECTOR);
    if desc_sectors * LOG_SECTOR > len {
        return Err(bad(format!(
            "{count} descriptors do not fit in an entry of {length} bytes"
        )));
    }
    let mut writes = Vec::with_capacity(count);
    let mut data_sector = desc_sectors;
    for i in 0..count {
        let d = &b[ENTRY_HEADER + i * DESCRIPTOR..ENTRY_HEADER + (i + 1) * DESCRIPTOR];
        let file_offset = u64_at(d, 16);
        if u64_at(d, 24) != sequence {
            return Err(bad(format!(
                "descriptor {i} has sequence {}, its entry {sequence}",
                u64_at(d, 24)
            )));
        }
        if !file_offset.is_multiple_of(LOG_SECTOR as u64) {
            return Err(bad(format!(
                "descriptor {i} writes at {file_offset}, not 4 KiB-aligned"
            )));
        }
        match &d[..4] {
            b"zero" => {
                let length = u64_at(d, 8);
                if !length.is_multiple_of(LOG_SECTOR as u64) {
                    return Err(bad(format!(
                        "zero descriptor {i} covers {length} bytes, not a multiple of 4 KiB"
                    )));
                }
                writes.push(LogWrite::Zero {
                    offset: file_offset,
                    length,
                });
            }
            b"desc" => {
                let at = data_sector * LOG_SECTOR;
                if at + LOG_SECTOR > len {
                    return Err(bad(format!(
                        "data descriptor {i} has no data sector inside the entry"
                    )));
                }
                let s = &b[at..at + LOG_SECTOR];
                if &s[..4] != b"data" {
                    return Err(bad(format!(
                        "data sector {data_sector} lacks its \"data\" signature"
                    )));
                }
                let seq = (u64::from(u32_at(s, 4)) << 32) | u64::from(u32_at(s, 4092));
                if seq != sequence {
                    return Err(bad(format!(
                        "data sector {data_sector} has sequence {seq}, its entry {sequence}"
                    )));
                }
                // The sector's first 8 and last 4 bytes travel in the
                // descriptor, as the data sector's own header and trailer
                // take their place.
                let mut sector = vec![0u8; LOG_SECTOR].into_boxed_slice();
                sector[..8].copy_from_slice(&d[8..16]);
                sector[8..4092].copy_from_slice(&s[8..4092]);
                sector[4092..].copy_from_slice(&d[4..8]);
                writes.push(LogWrite::Data {
                    offset: file_offset,
                    bytes: sector,
                });
                data_sector += 1;
            }
            other => {
                return Err(bad(format!(
                    "descriptor {i} has the unknown signature {:?}",
                    String::from_utf8_lossy(other)
                )))
            }
        }
    }
    if data_sector * LOG_SECTOR != len {
        return Err(bad(format!(
            "the entry is {length} bytes, but its descriptors account for {}",
            data_sector * LOG_SECTOR
        )));
    }
    Ok(LogEntry {
        length,
        tail: u32_at(b, 12),
        sequence,
        flushed_file_offset: u64_at(b, 48),
        last_file_offset: u64_at(b, 56),
        writes,
    })
}

/// `len` bytes of the circular log from `at`, wrapping at its end.
fn wrapped(log: &[u8], at: usize, len: usize) -> std::borrow::Cow<'_, [u8]> {
    if at + len <= log.len() {
        std::borrow::Cow::Borrowed(&log[at..at + len])
    } else {
        let mut v = log[at..].to_vec();
        v.extend_from_slice(&log[..len - (log.len() - at)]);
        std::borrow::Cow::Owned(v)
    }
}

/// Finds the log's active sequence and returns what replaying it writes.
///
/// The log is circular. Every entry of this log is found; from each, the
/// run of entries that follow it with consecutive sequence numbers is a
/// candidate, valid when its head's tail points into it. The valid one with
/// the highest head sequence is the active sequence, replayed from the
/// tail to the head. No entry at all means nothing to replay.
pub fn replay(log: &[u8], guid: Guid) -> Result<Replay> {
    let n = log.len();
    if n == 0 || !n.is_multiple_of(LOG_SECTOR) {
        return Err(bad(format!(
            "the log is {n} bytes, not a multiple of 4 KiB"
        )));
    }
    let slots = n / LOG_SECTOR;
    let mut entries: Vec<Option<LogEntry>> = vec![None; slots];
    for (slot, found) in entries.iter_mut().enumerate() {
        let at = slot * LOG_SECTOR;
        let Some(len) = entry_length(&wrapped(log, at, ENTRY_HEADER), n) else {
            continue;
        };
        let bytes = wrapped(log, at, len);
        // Torn entries and other logs' leftovers are not ours to replay.
        if check_crc(&bytes, 4, "VHDX log entry").is_err() || guid_at(&bytes, 32) != guid {
            continue;
        }
        *found = Some(
            parse_ours(&bytes)
                .map_err(|e| bad(format!("the entry at log offset {at} is damaged: {e}")))?,
        );
    }
    let mut best: Option<Vec<usize>> = None;
    let head_of = |chain: &[usize]| {
        chain
            .last()
            .and_then(|&s| entries[s].as_ref())
            .map_or(0, |e| e.sequence)
    };
    // A walk from inside a run already walked follows the same entries to
    // the same head, so it is skipped: each entry is walked about once,
    // not once per earlier entry of its run.
    let mut walked = vec![false; slots];
    for start in 0..slots {
        let Some(first) = &entries[start] else {
            continue;
        };
        if walked[start] {
            continue;
        }
        let mut chain = vec![start];
        let (mut slot, mut entry) = (start, first);
        while chain.len() < slots {
            let next = (slot + entry.length as usize / LOG_SECTOR) % slots;
            match &entries[next] {
                Some(e) if e.sequence == entry.sequence + 1 => {
                    chain.push(next);
                    (slot, entry) = (next, e);
                }
                _ => break,
            }
        }
        for &s in &chain {
            walked[s] = true;
        }
        let tail = entry.tail as usize;
        if !tail.is_multiple_of(LOG_SECTOR) {
            continue;
        }
        let Some(from) = chain.iter().position(|&s| s * LOG_SECTOR == tail) else {
            continue;
        };
        let candidate = chain.split_off(from);
        if best
            .as_ref()
            .is_none_or(|b| head_of(&candidate) > head_of(b))
        {
            best = Some(candidate);
        }
    }
    let Some(active) = best else {
        return Ok(Replay::default());
    };
    let mut out = Replay {
        entries: active.len(),
        ..Replay::default()
    };
    for slot in active {
        if let Some(e) = entries[slot].take() {
            out.head_sequence = e.sequence;
            out.flushed_file_offset = e.flushed_file_offset;
            out.last_file_offset = e.last_file_offset;
            out.writes.extend(e.writes);
        }
    }
    Ok(out)
}

/// A file with a replayed log laid over it, read-only. The file grows (in
/// memory, with zeros) to the log's last file offset, as replay would.
#[derive(Debug)]
pub struct Replayed {
    inner: Arc<dyn Storage>,
    writes: Vec<LogWrite>,
    len: u64,
}

impl Replayed {
    pub fn new(inner: Arc<dyn Storage>, replay: Replay) -> io::Result<Replayed> {
        let len = inner.len()?.max(replay.last_file_offset);
        Ok(Replayed {
            inner,
            writes: replay.writes,
            len,
        })
    }
}

impl Storage for Replayed {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let in_file = self
            .inner
            .len()?
            .saturating_sub(offset)
            .min(buf.len() as u64) as usize;
        self.inner.read_exact_at(&mut buf[..in_file], offset)?;
        buf[in_file..].fill(0);
        for w in &self.writes {
            let (start, stop) = w.range();
            let (from, to) = (start.max(offset), stop.min(end));
            if from >= to {
                continue;
            }
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match w {
                LogWrite::Data { bytes, .. } => {
                    dst.copy_from_slice(&bytes[(from - start) as usize..(to - start) as usize]);
                }
                LogWrite::Zero { .. } => dst.fill(0),
            }
        }
        Ok(())
    }

    fn write_all_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "a VHDX with a replayed log is open read-only",
        ))
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }

    fn set_len(&self, _: u64) -> io::Result<()> {
        self.write_all_at(&[], 0)
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::vhdx::parse::crc_with_field_zeroed;

    const GUID: Guid = Guid([7; 16]);

    /// Builds one entry: data writes of whole sectors and zero writes.
    pub(crate) fn entry(seq: u64, tail: u32, guid: Guid, writes: &[LogWrite]) -> Vec<u8> {
        let count = writes.len();
        let desc_sectors = (ENTRY_HEADER + count * DESCRIPTOR).div_ceil(LOG_SECTOR);
        let data: Vec<&LogWrite> = writes
            .iter()
            .filter(|w| matches!(w, LogWrite::Data { .. }))
            .collect();
        let len = (desc_sectors + data.len()) * LOG_SECTOR;
        let mut b = vec![0u8; len];
        b[..4].copy_from_slice(b"loge");
        b[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        b[12..16].copy_from_slice(&tail.to_le_bytes());
        b[16..24].copy_from_slice(&seq.to_le_bytes());
        b[24..28].copy_from_slice(&(count as u32).to_le_bytes());
        b[32..48].copy_from_slice(&guid.0);
        let mut sector = desc_sectors;
        for (i, w) in writes.iter().enumerate() {
            let d = ENTRY_HEADER + i * DESCRIPTOR;
            b[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes());
            match w {
                LogWrite::Zero { offset, length } => {
                    b[d..d + 4].copy_from_slice(b"zero");
                    b[d + 8..d + 16].copy_from_slice(&length.to_le_bytes());
                    b[d + 16..d + 24].copy_from_slice(&offset.to_le_bytes());
                }
                LogWrite::Data { offset, bytes } => {
                    b[d..d + 4].copy_from_slice(b"desc");
                    b[d + 4..d + 8].copy_from_slice(&bytes[4092..]);
                    b[d + 8..d + 16].copy_from_slice(&bytes[..8]);
                    b[d + 16..d + 24].copy_from_slice(&offset.to_le_bytes());
                    let s = sector * LOG_SECTOR;
                    b[s..s + 4].copy_from_slice(b"data");
                    b[s + 4..s + 8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
                    b[s + 8..s + 4092].copy_from_slice(&bytes[8..4092]);
                    b[s + 4092..s + 4096].copy_from_slice(&(seq as u32).to_le_bytes());
                    sector += 1;
                }
            }
        }
        let crc = crc_with_field_zeroed(&b, 4);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn sector(byte: u8, offset: u64) -> LogWrite {
        let mut bytes = vec![byte; LOG_SECTOR].into_boxed_slice();
        bytes[0] = 0xA0;
        bytes[4095] = 0x0B;
        LogWrite::Data { offset, bytes }
    }

    fn log_with(entries: &[(usize, Vec<u8>)], len: usize) -> Vec<u8> {
        let mut log = vec![0u8; len];
        for (at, e) in entries {
            for (i, b) in e.iter().enumerate() {
                log[(at + i) % len] = *b;
            }
        }
        log
    }

    #[test]
    fn an_entry_round_trips_with_its_leading_and_trailing_bytes() {
        let w = vec![
            sector(0x11, 8192),
            LogWrite::Zero {
                offset: 1 << 20,
                length: 1 << 20,
            },
        ];
        let e = parse_entry(&entry(5, 0, GUID, &w), GUID).unwrap();
        assert_eq!(e.sequence, 5);
        assert_eq!(e.writes, w);
    }

    #[test]
    fn the_active_sequence_is_replayed_from_its_tail_in_order() {
        let a = entry(10, 0, GUID, &[sector(1, 0)]);
        let b = entry(11, 0, GUID, &[sector(2, 0), sector(3, 4096)]);
        let log = log_with(&[(0, a.clone()), (a.len(), b)], 64 << 10);
        let r = replay(&log, GUID).unwrap();
        assert_eq!((r.entries, r.head_sequence), (2, 11));
        assert_eq!(r.writes[0], sector(1, 0));
        assert_eq!(r.writes[1], sector(2, 0));
    }

    #[test]
    fn stale_torn_and_other_logs_entries_are_ignored() {
        let other = Guid([9; 16]);
        let old = entry(50, 0, other, &[sector(1, 0)]);
        let mut torn = entry(3, 8192, GUID, &[sector(2, 0)]);
        torn[5000] ^= 1;
        let good = entry(2, 16384, GUID, &[sector(3, 0)]);
        let log = log_with(&[(0, old), (8192, torn), (16384, good)], 64 << 10);
        let r = replay(&log, GUID).unwrap();
        assert_eq!((r.entries, r.head_sequence), (1, 2));
        assert_eq!(r.writes, vec![sector(3, 0)]);
        // Nothing of this log at all: nothing to replay.
        assert_eq!(replay(&log, Guid([1; 16])).unwrap(), Replay::default());
    }

    #[test]
    fn an_entry_wrapping_past_the_end_of_the_log_is_read_across_it() {
        let len = 32 << 10;
        let e = entry(
            7,
            (len - 4096) as u32,
            GUID,
            &[sector(4, 0), sector(5, 4096)],
        );
        let log = log_with(&[(len - 4096, e)], len);
        let r = replay(&log, GUID).unwrap();
        assert_eq!(r.writes, vec![sector(4, 0), sector(5, 4096)]);
    }

    #[test]
    fn a_sequence_whose_tail_is_missing_is_not_replayed() {
        // The head says replay starts at 8192, where nothing of it is.
        let e = entry(4, 8192, GUID, &[sector(1, 0)]);
        let log = log_with(&[(0, e)], 32 << 10);
        assert_eq!(replay(&log, GUID).unwrap().entries, 0);
    }

    #[test]
    fn a_damaged_entry_of_this_log_refuses_replay() {
        let mut e = entry(4, 0, GUID, &[sector(1, 0)]);
        // A data sector whose sequence disagrees, with the CRC made good.
        e[4096 + 4] ^= 1;
        let crc = crc_with_field_zeroed(&e, 4);
        e[4..8].copy_from_slice(&crc.to_le_bytes());
        let log = log_with(&[(0, e)], 32 << 10);
        let err = replay(&log, GUID).unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::LogReplay { reason } if reason.contains("sequence")),
            "{err}"
        );
    }

    #[test]
    fn the_overlay_applies_writes_in_order_and_extends_the_file() {
        let base: Arc<dyn Storage> = Arc::new(crate::storage::MemStorage::new(vec![0xEE; 8192]));
        let replay = Replay {
            entries: 1,
            head_sequence: 1,
            flushed_file_offset: 8192,
            last_file_offset: 16384,
            writes: vec![
                sector(1, 4096),
                LogWrite::Zero {
                    offset: 4096,
                    length: 4096,
                },
                sector(2, 12288),
            ],
        };
        let r = Replayed::new(base, replay).unwrap();
        assert_eq!(r.len().unwrap(), 16384);
        let mut buf = vec![0u8; 16384];
        r.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0xEE));
        assert!(buf[4096..12288].iter().all(|&b| b == 0));
        assert_eq!(buf[12289], 2);
        assert!(r.read_exact_at(&mut [0u8; 2], 16383).is_err());
        assert!(r.write_all_at(&[1], 0).is_err());
    }
}
