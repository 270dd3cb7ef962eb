//! What a bucket's pack indexes say: which pack holds each chunk, where,
//! and which copy to use where two packs hold one. Built once per process
//! from every pack index, the condemnations gc wrote and the bad copies
//! verify recorded, and grown as this process uploads packs.
//!
//! A bad copy is recorded under `bad/` as a JSON list of (pack, chunk)
//! pairs, by verify, in place of a directory's `*.bad` rename: objects
//! are never rewritten. A backup then stores the chunk again rather than
//! reuse the bad copy, and once it has, every reader uses the new copy,
//! so the snapshots that named the chunk restore again.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, ErrorKind, Result};
use crate::pack::PackEntry;
use crate::Damaged;

pub(super) const BAD: &str = "bad/";
/// A bad-copies record is one verify run's finds: 64 MiB is far past any.
pub(super) const BAD_LIMIT: u64 = 64 << 20;
/// Copies per record: a copy takes 150 bytes of JSON, so a record of this
/// many stays under a tenth of [`BAD_LIMIT`].
pub(super) const BAD_PER_RECORD: usize = 40_000;

/// One bad copy, as `bad/ID.json` lists it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct BadCopy {
    pub pack: String,
    pub chunk: String,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct BadCopies {
    pub copies: Vec<BadCopy>,
}

/// A bad-copies record's (pack, chunk) pairs, each name checked.
pub(super) fn parse_bad(bytes: &[u8]) -> Result<Vec<(blake3::Hash, blake3::Hash)>> {
    let corrupt = |reason: String| {
        Error::from(ErrorKind::Corrupt {
            what: "bad-copies record",
            reason,
        })
    };
    let r: BadCopies = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    r.copies
        .iter()
        .map(|c| {
            let hash = |s: &str| {
                blake3::Hash::from_hex(s)
                    .map_err(|_| corrupt(format!("{s:?} is not a BLAKE3 name")))
            };
            Ok((hash(&c.pack)?, hash(&c.chunk)?))
        })
        .collect()
}

/// Where a chunk is: its pack (a number into [`Known::packs`]) and entry.
#[derive(Debug, Clone, Copy)]
pub(super) struct Loc {
    pub pack: u32,
    pub offset: u64,
    pub length: u32,
    pub crc: u32,
}

impl Loc {
    pub(super) fn entry(&self, id: blake3::Hash) -> PackEntry {
        PackEntry {
            id,
            offset: self.offset,
            length: self.length,
            crc: self.crc,
        }
    }
}

/// Every chunk the pack indexes list.
#[derive(Debug, Default)]
pub(super) struct Known {
    pub packs: Vec<blake3::Hash>,
    pack_numbers: HashMap<blake3::Hash, u32>,
    /// Each pack's blobs, (offset, length) in order, by pack number: what
    /// a coalesced read fetches with a chunk.
    pub layouts: Vec<Vec<(u64, u32)>>,
    pub chunks: HashMap<blake3::Hash, Loc>,
    /// Packs a gc condemned: read from, never reused.
    pub condemned: HashSet<blake3::Hash>,
    /// Copies verify found bad, as (pack, chunk): read only where no
    /// other copy is, never reused.
    pub bad: HashSet<(blake3::Hash, blake3::Hash)>,
    /// Packs the pack indexes name that the bucket does not hold as they
    /// say (gone, or of another length): their entries are left out, so
    /// their chunks count as absent, and a pack of the same name is never
    /// taken for one this process uploads.
    pub unusable: HashSet<blake3::Hash>,
    /// Objects that could not be used, and why: their chunks count as
    /// absent (a backup stores them again); verify reports them.
    pub damaged: Vec<Damaged>,
}

impl Known {
    pub(super) fn add(&mut self, pack: blake3::Hash, entries: &[PackEntry]) -> Result<()> {
        let n = match self.pack_numbers.get(&pack) {
            Some(&n) => n,
            None => {
                let n = u32::try_from(self.packs.len()).map_err(|_| {
                    Error::from(ErrorKind::InvalidArgument(
                        "more than 2^32 packs in one repository".into(),
                    ))
                })?;
                self.packs.push(pack);
                self.pack_numbers.insert(pack, n);
                self.layouts
                    .push(entries.iter().map(|e| (e.offset, e.length)).collect());
                n
            }
        };
        for e in entries {
            let loc = Loc {
                pack: n,
                offset: e.offset,
                length: e.length,
                crc: e.crc,
            };
            // A chunk two packs hold (two hosts stored it at once, gc
            // repacked it, or a backup stored again a copy verify found
            // bad): either copy is the chunk, but the best one is used,
            // and only a sound copy in a pack not condemned is reused.
            let better = match self.chunks.get(&e.id) {
                None => true,
                Some(was) => self
                    .packs
                    .get(was.pack as usize)
                    .is_some_and(|p| self.rank(pack, e.id) < self.rank(*p, e.id)),
            };
            if better {
                self.chunks.insert(e.id, loc);
            }
        }
        Ok(())
    }

    /// How good a copy is, lower better: sound before bad, then a pack
    /// not condemned before a condemned one.
    fn rank(&self, pack: blake3::Hash, id: blake3::Hash) -> u8 {
        u8::from(self.bad.contains(&(pack, id))) * 2 + u8::from(self.condemned.contains(&pack))
    }

    /// The copy of `id` in use, if a pack index lists one, and whether a
    /// backup may reuse it.
    pub(super) fn reusable(&self, id: &blake3::Hash) -> bool {
        self.chunks.get(id).is_some_and(|l| {
            self.packs
                .get(l.pack as usize)
                .is_some_and(|p| self.rank(*p, *id) == 0)
        })
    }

    /// The pack of the copy of `id` in use.
    pub(super) fn pack_of(&self, id: &blake3::Hash) -> Option<blake3::Hash> {
        let l = self.chunks.get(id)?;
        self.packs.get(l.pack as usize).copied()
    }
}
