//! Packs: many chunks in one object, for object storage, where a request
//! costs more than a byte. At 2 MiB a chunk, 10 TiB of new data is five
//! million objects one chunk each, and as many PUTs; in 32 MiB packs it is
//! 330 thousand. (PBS's S3 datastore stores one object per chunk, and its
//! users met the providers' request-rate limits and request bills.)
//!
//! A pack is its chunks' blobs (the envelope of [`super::blob`], each
//! with its own CRC) back to back from byte 0, then a trailer that lists
//! them, so that a reader holding only the object's length can fetch the
//! trailer with one ranged GET from the end, and then any chunk with one
//! more (neighbours coalesced, [`coalesce`]). Layout, little-endian:
//!
//! | part | size | field |
//! |---|---|---|
//! | blobs | Σ lengths | the blobs, in entry order, with no gap |
//! | entry × N | 48 each | chunk id (BLAKE3 of its plaintext) 32, offset u64, length u32, CRC32C of the blob's bytes u32 |
//! | tail | 32 | magic `VSNAPPAK` 8, version u16 (1), zero 6, N u64, CRC32C of the entries then of tail bytes 0..24 u32, zero 4 |
//!
//! A pack's name is the BLAKE3 of its bytes, so a pack is never
//! overwritten by another: the same name is the same content.
//!
//! The parser is a pure function over bytes and trusts nothing: a bucket's
//! objects are as hostile as a directory's files. Every length is checked
//! against the object's before anything is allocated from it.

use std::collections::HashSet;
use std::ops::Range;

use super::blob::HEADER_LEN;
use crate::error::{ErrorKind, Result};
use vsnap_formats::bytes::{le32, le64};

pub const MAGIC: &[u8; 8] = b"VSNAPPAK";
pub const VERSION: u16 = 1;
pub const TAIL_LEN: usize = 32;
pub const ENTRY_LEN: usize = 48;

/// The most entries a pack may list: far above what the largest pack of
/// the smallest chunks holds (64 MiB of 1 KiB chunks is 65,536), so a
/// trailer that claims more is damage, refused before it is fetched.
pub const MAX_ENTRIES: u64 = 1 << 20;

/// One chunk in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub id: blake3::Hash,
    /// Where its blob starts in the pack.
    pub offset: u64,
    /// The blob's length, header included.
    pub length: u32,
    /// CRC32C of the blob's bytes, so a ranged read is checked against the
    /// trailer before the blob's own header is believed.
    pub crc: u32,
}

impl PackEntry {
    pub fn range(&self) -> Range<u64> {
        self.offset..self.offset + u64::from(self.length)
    }

    /// Whether `blob` is the blob this entry lists: its length and CRC.
    /// The blob's own header and the chunk's id are checked as for a
    /// chunk file, when it is decoded.
    pub fn check(&self, blob: &[u8]) -> Result<()> {
        if blob.len() as u64 != u64::from(self.length) {
            return Err(ErrorKind::Truncated {
                what: "packed blob",
                needed: u64::from(self.length),
                at: self.offset,
                available: blob.len() as u64,
            }
            .into());
        }
        let computed = crc32c::crc32c(blob);
        if computed != self.crc {
            return Err(ErrorKind::BadChecksum {
                what: "packed blob",
                stored: self.crc,
                computed,
            }
            .into());
        }
        Ok(())
    }
}

fn corrupt(reason: String) -> crate::Error {
    ErrorKind::Corrupt {
        what: "pack trailer",
        reason,
    }
    .into()
}

/// The whole trailer's length (entries and tail), from the last bytes of
/// a pack of `object_len` bytes: `end` must hold at least its last
/// [`TAIL_LEN`]. A reader that fetched fewer than this many bytes from the
/// end fetches the rest, then calls [`parse_trailer`].
pub fn trailer_len(end: &[u8], object_len: u64) -> Result<u64> {
    if end.len() < TAIL_LEN || (object_len as usize) < TAIL_LEN {
        return Err(ErrorKind::Truncated {
            what: "pack tail",
            needed: TAIL_LEN as u64,
            at: object_len.saturating_sub(TAIL_LEN as u64),
            available: (end.len() as u64).min(object_len),
        }
        .into());
    }
    let tail = &end[end.len() - TAIL_LEN..];
    crate::blob::magic_and_version(tail, MAGIC, "pack tail", "pack", VERSION)?;
    if tail[10..16].iter().chain(&tail[28..32]).any(|&b| b != 0) {
        return Err(corrupt("reserved bytes of the tail are not zero".into()));
    }
    let count = le64(tail, 16);
    if count > MAX_ENTRIES {
        return Err(ErrorKind::TooLarge {
            what: "pack trailer",
            claimed: count,
            limit: MAX_ENTRIES,
        }
        .into());
    }
    let len = count * ENTRY_LEN as u64 + TAIL_LEN as u64;
    if len > object_len {
        return Err(corrupt(format!(
            "it lists {count} entries, {len} bytes, in a pack of {object_len}"
        )));
    }
    Ok(len)
}

/// The entries of a pack of `object_len` bytes, from its last bytes `end`
/// (at least its [`trailer_len`]). The blobs must fill the pack before the
/// trailer exactly, in order, each at least a blob header long, and no
/// chunk may be listed twice.
pub fn parse_trailer(end: &[u8], object_len: u64) -> Result<Vec<PackEntry>> {
    let len = trailer_len(end, object_len)?;
    if (end.len() as u64) < len {
        return Err(ErrorKind::Truncated {
            what: "pack trailer",
            needed: len,
            at: object_len - len,
            available: end.len() as u64,
        }
        .into());
    }
    let trailer = &end[end.len() - len as usize..];
    let (entries, tail) = trailer.split_at(trailer.len() - TAIL_LEN);
    let computed = crc32c::crc32c_append(crc32c::crc32c(entries), &tail[..24]);
    let stored = le32(tail, 24);
    if computed != stored {
        return Err(ErrorKind::BadChecksum {
            what: "pack trailer",
            stored,
            computed,
        }
        .into());
    }
    let data_end = object_len - len;
    let mut out = Vec::with_capacity(entries.len() / ENTRY_LEN);
    let mut seen = HashSet::with_capacity(entries.len() / ENTRY_LEN);
    let mut at = 0u64;
    for (i, e) in entries.chunks_exact(ENTRY_LEN).enumerate() {
        let mut id = [0u8; 32];
        id.copy_from_slice(&e[..32]);
        let entry = PackEntry {
            id: blake3::Hash::from_bytes(id),
            offset: le64(e, 32),
            length: le32(e, 40),
            crc: le32(e, 44),
        };
        if entry.offset != at {
            return Err(corrupt(format!(
                "entry {i} starts at byte {}, where the blob before it ends at {at}",
                entry.offset
            )));
        }
        if (entry.length as usize) < HEADER_LEN {
            return Err(corrupt(format!(
                "entry {i} is {} bytes, shorter than a blob's header",
                entry.length
            )));
        }
        at += u64::from(entry.length);
        if at > data_end {
            return Err(corrupt(format!(
                "entry {i} ends at byte {at}, past the blobs' end at {data_end}"
            )));
        }
        if !seen.insert(entry.id) {
            return Err(corrupt(format!("entry {i} lists chunk {} again", entry.id)));
        }
        out.push(entry);
    }
    if at != data_end {
        return Err(corrupt(format!(
            "the blobs end at byte {at}, but the trailer starts at {data_end}"
        )));
    }
    Ok(out)
}

/// A pack being filled.
#[derive(Debug, Default)]
pub struct PackBuilder {
    bytes: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl PackBuilder {
    pub fn new() -> PackBuilder {
        PackBuilder::default()
    }

    /// Appends chunk `id`'s blob (its whole envelope, as
    /// [`super::blob::encode_header`] and the payload make it).
    /// `parts` are the blob's pieces (header, payload), back to back.
    pub fn push(&mut self, id: blake3::Hash, parts: &[&[u8]]) -> Result<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let length = u32::try_from(total)
            .ok()
            .filter(|&l| l as usize >= HEADER_LEN)
            .ok_or_else(|| {
                ErrorKind::InvalidArgument(format!(
                    "a packed blob is {total} bytes; it must hold a header and fit in 4 GiB"
                ))
            })?;
        if self.entries.len() as u64 >= MAX_ENTRIES {
            return Err(ErrorKind::InvalidArgument("the pack is full".into()).into());
        }
        self.entries.push(PackEntry {
            id,
            offset: self.bytes.len() as u64,
            length,
            crc: parts.iter().fold(0, |crc, p| crc32c::crc32c_append(crc, p)),
        });
        for p in parts {
            self.bytes.extend_from_slice(p);
        }
        Ok(())
    }

    /// Makes room for `bytes` more without moving what is there: a pack
    /// grown blob by blob would be copied at each doubling, and its new
    /// pages faulted in each time.
    pub fn reserve(&mut self, bytes: usize) {
        self.bytes.reserve(bytes);
    }

    /// The blobs' bytes so far: what decides when a pack is full.
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The chunks added so far, in order.
    pub fn ids(&self) -> impl Iterator<Item = blake3::Hash> + '_ {
        self.entries.iter().map(|e| e.id)
    }

    /// The finished pack's bytes, its name (their BLAKE3) and its entries.
    pub fn finish(mut self) -> (Vec<u8>, blake3::Hash, Vec<PackEntry>) {
        let start = self.bytes.len();
        for e in &self.entries {
            self.bytes.extend_from_slice(e.id.as_bytes());
            self.bytes.extend_from_slice(&e.offset.to_le_bytes());
            self.bytes.extend_from_slice(&e.length.to_le_bytes());
            self.bytes.extend_from_slice(&e.crc.to_le_bytes());
        }
        let mut tail = [0u8; TAIL_LEN];
        tail[..8].copy_from_slice(MAGIC);
        tail[8..10].copy_from_slice(&VERSION.to_le_bytes());
        tail[16..24].copy_from_slice(&(self.entries.len() as u64).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&self.bytes[start..]), &tail[..24]);
        tail[24..28].copy_from_slice(&crc.to_le_bytes());
        self.bytes.extend_from_slice(&tail);
        let name = blake3::hash(&self.bytes);
        (self.bytes, name, self.entries)
    }
}

/// The ranged reads that fetch `wanted` (byte ranges of one pack, any
/// order): neighbours closer than `max_gap` bytes are read in one request
/// (a request costs more than the bytes between them), as long as a
/// request that joins ranges across a gap stays within `max_len` bytes
/// (ranges that touch or overlap are always one request). Sorted, apart,
/// and every wanted byte is in exactly one.
pub fn coalesce(wanted: &[Range<u64>], max_gap: u64, max_len: u64) -> Vec<Range<u64>> {
    let mut sorted: Vec<Range<u64>> = wanted.iter().filter(|r| r.start < r.end).cloned().collect();
    sorted.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in sorted {
        match out.last_mut() {
            Some(last)
                if r.start <= last.end
                    || (r.start <= last.end.saturating_add(max_gap)
                        && r.end.max(last.end) - last.start <= max_len) =>
            {
                last.end = last.end.max(r.end);
            }
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
// A list of one range is what `coalesce` returns, not a mistake.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::blob::{encode_header, BlobKind, Encoding};
    use proptest::prelude::*;

    fn blob(fill: u8, len: usize) -> (blake3::Hash, Vec<u8>) {
        let payload = vec![fill; len];
        let mut b = encode_header(BlobKind::Chunk, Encoding::Raw, &payload, len as u64).to_vec();
        b.extend_from_slice(&payload);
        (blake3::hash(&payload), b)
    }

    fn pack(sizes: &[usize]) -> (Vec<u8>, Vec<PackEntry>, Vec<Vec<u8>>) {
        let mut p = PackBuilder::new();
        let mut blobs = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let (id, b) = blob(i as u8, n);
            p.push(id, &[&b]).unwrap();
            blobs.push(b);
        }
        let (bytes, name, entries) = p.finish();
        assert_eq!(name, blake3::hash(&bytes));
        (bytes, entries, blobs)
    }

    #[test]
    fn a_pack_lists_its_blobs_and_each_is_found_by_a_ranged_read() {
        let (bytes, entries, blobs) = pack(&[100, 0, 5000]);
        let len = bytes.len() as u64;
        // The tail alone says how much more to fetch.
        let need = trailer_len(&bytes[bytes.len() - TAIL_LEN..], len).unwrap();
        assert_eq!(need, 3 * ENTRY_LEN as u64 + TAIL_LEN as u64);
        let parsed = parse_trailer(&bytes[bytes.len() - need as usize..], len).unwrap();
        assert_eq!(parsed, entries);
        for (e, b) in parsed.iter().zip(&blobs) {
            let got = &bytes[e.offset as usize..e.range().end as usize];
            assert_eq!(got, &b[..]);
            e.check(got).unwrap();
        }
        // An empty pack is a trailer alone.
        let (empty, _, none) = PackBuilder::new().finish();
        assert!(none.is_empty());
        assert_eq!(parse_trailer(&empty, empty.len() as u64).unwrap(), []);
    }

    #[test]
    fn a_damaged_trailer_or_blob_is_refused_saying_what() {
        let (bytes, entries, _) = pack(&[64, 64]);
        let len = bytes.len() as u64;
        let err = |b: &[u8]| parse_trailer(b, b.len() as u64).unwrap_err().to_string();
        let mut b = bytes.clone();
        b[bytes.len() - TAIL_LEN] = b'X';
        assert!(err(&b).contains("bad magic in pack tail"), "{}", err(&b));
        let mut b = bytes.clone();
        b[bytes.len() - TAIL_LEN - 1] ^= 1; // the last entry's CRC field
        assert!(err(&b).contains("bad pack trailer checksum"), "{}", err(&b));
        // A count beyond any pack is refused before anything is fetched.
        let mut b = bytes.clone();
        let at = bytes.len() - TAIL_LEN + 16;
        b[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(
            err(&b).contains("claims 18446744073709551615 bytes, more than the 1048576"),
            "{}",
            err(&b)
        );
        // A count the object is too short for.
        b[at..at + 8].copy_from_slice(&1000u64.to_le_bytes());
        assert!(err(&b).contains("lists 1000 entries"), "{}", err(&b));
        // Fewer bytes than the trailer: asked for again, not guessed.
        let e = parse_trailer(&bytes[bytes.len() - TAIL_LEN..], len).unwrap_err();
        assert!(
            e.to_string()
                .contains("truncated: pack trailer needs 128 bytes"),
            "{e}"
        );
        // A blob that is not the one listed.
        let mut blob =
            bytes[..entries[1].range().end as usize][entries[1].offset as usize..].to_vec();
        blob[50] ^= 4;
        let e = entries[1].check(&blob).unwrap_err().to_string();
        assert!(e.contains("bad packed blob checksum"), "{e}");
        let e = entries[1].check(&blob[..10]).unwrap_err().to_string();
        assert!(e.contains("truncated: packed blob needs 104 bytes"), "{e}");
    }

    /// A trailer rewritten with a valid CRC around bad entries: the layout
    /// rules, not the checksum, must catch them.
    fn forged(bytes: &[u8], count: usize, edit: impl Fn(&mut [u8])) -> String {
        let mut b = bytes.to_vec();
        let tail_at = b.len() - TAIL_LEN;
        let t = tail_at - count * ENTRY_LEN;
        edit(&mut b[t..tail_at]);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[t..tail_at]), &b[tail_at..tail_at + 24]);
        b[tail_at + 24..tail_at + 28].copy_from_slice(&crc.to_le_bytes());
        parse_trailer(&b, b.len() as u64).unwrap_err().to_string()
    }

    #[test]
    fn entries_must_tile_the_blobs_once_each() {
        let (bytes, _, _) = pack(&[64, 64, 64]);
        let gap = forged(&bytes, 3, |e| e[ENTRY_LEN + 32] += 1);
        assert!(
            gap.contains("entry 1 starts at byte 105, where the blob before it ends at 104"),
            "{gap}"
        );
        let short = forged(&bytes, 3, |e| {
            e[40..44].copy_from_slice(&8u32.to_le_bytes())
        });
        assert!(
            short.contains("entry 0 is 8 bytes, shorter than a blob's header"),
            "{short}"
        );
        let past = forged(&bytes, 3, |e| {
            let at = 2 * ENTRY_LEN + 40;
            e[at..at + 4].copy_from_slice(&1000u32.to_le_bytes());
        });
        assert!(
            past.contains("entry 2 ends at byte 1208, past the blobs' end at 312"),
            "{past}"
        );
        let twice = forged(&bytes, 3, |e| {
            let first: Vec<u8> = e[..32].to_vec();
            e[ENTRY_LEN..ENTRY_LEN + 32].copy_from_slice(&first);
        });
        assert!(twice.contains("entry 1 lists chunk"), "{twice}");
        let under = forged(&bytes, 3, |e| {
            let at = 2 * ENTRY_LEN + 40;
            e[at..at + 4].copy_from_slice(&60u32.to_le_bytes());
        });
        assert!(
            under.contains("the blobs end at byte 268, but the trailer starts at 312"),
            "{under}"
        );
    }

    #[test]
    fn neighbours_are_read_together_within_bounds() {
        let r = coalesce(&[20..30, 0..10, 100..110, 12..15], 5, 1000);
        assert_eq!(r, [0..30, 100..110]);
        // A join across a gap is bounded; touching ranges are not.
        assert_eq!(coalesce(&[0..10, 12..20], 5, 15), [0..10, 12..20]);
        assert_eq!(coalesce(&[0..10, 10..20, 5..30], 0, 15), [0..30]);
        assert_eq!(coalesce(&[5..5], 0, 10), Vec::<Range<u64>>::new());
    }

    proptest! {
        #[test]
        fn any_pack_round_trips(sizes in proptest::collection::vec(0usize..3000, 0..40)) {
            let (bytes, entries, blobs) = pack(&sizes);
            let parsed = parse_trailer(&bytes, bytes.len() as u64).unwrap();
            prop_assert_eq!(&parsed, &entries);
            for (e, b) in parsed.iter().zip(&blobs) {
                prop_assert_eq!(&bytes[e.offset as usize..e.range().end as usize], &b[..]);
            }
        }

        #[test]
        fn no_bytes_make_the_parser_panic(
            junk in proptest::collection::vec(any::<u8>(), 0..600),
            len in 0u64..1 << 40,
        ) {
            let _ = parse_trailer(&junk, len);
            let _ = trailer_len(&junk, len);
        }

        #[test]
        fn coalesced_reads_cover_every_wanted_byte_once(
            wanted in proptest::collection::vec((0u64..10_000, 0u64..500), 0..30),
            gap in 0u64..200,
            max in 1u64..2000,
        ) {
            let wanted: Vec<Range<u64>> = wanted.iter().map(|&(s, l)| s..s + l).collect();
            let reads = coalesce(&wanted, gap, max);
            for w in reads.windows(2) {
                prop_assert!(w[0].end < w[1].start);
            }
            for r in wanted.iter().filter(|r| r.start < r.end) {
                prop_assert_eq!(reads.iter().filter(|q| q.start <= r.start && r.end <= q.end).count(), 1);
            }
        }
    }
}
