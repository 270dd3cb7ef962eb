//! Repacking in a bucket: a pack whose live chunks fill less than a share
//! of it has its live chunks copied into new packs, and is then condemned
//! like a dead one, to go by the same lease rule (see
//! [`super::gc`]). Without it, a pack with one live chunk of
//! sixteen would be kept whole for as long as that chunk lives.
//!
//! The copies are made before the condemnation is written, and indexed
//! (the new pack index uploaded) before it too, so every marked chunk is
//! findable in a pack no one condemned from the moment its old pack is.
//! A chunk is copied only once it has passed a restore's checks (the pack
//! entry's CRC, the blob's own, and the BLAKE3 of its plaintext): damage
//! is never repacked into a pack that looks sound. A pack with a chunk
//! that fails them is left as it is, for verify to report.

use std::collections::{HashMap, HashSet};

use super::{Bucket, Record, PACKS};
use crate::blob::{self, BlobKind};
use crate::error::Result;
use crate::pack::PackEntry;

/// A pack as a pack index lists it: the record, and its entries.
pub(super) type Indexed = (Record, Vec<PackEntry>);

/// What one repack did.
#[derive(Debug, Default)]
pub(super) struct Repacked {
    /// The packs whose live chunks are now elsewhere: to be condemned.
    pub packs: Vec<String>,
    pub chunks: u64,
    /// Stored bytes copied.
    pub bytes: u64,
    /// Packs left alone because a chunk in them failed its checks.
    pub damaged: u64,
}

/// (pack, chunk) copies verify recorded as bad.
pub(super) type BadCopies = HashSet<(blake3::Hash, blake3::Hash)>;

/// For each chunk, the packs (by hex name) that hold a copy of it not
/// recorded as bad: a bad copy never stands in for a sound one.
fn holders(
    pack_indexes: &[(String, Vec<Indexed>)],
    bad: &BadCopies,
) -> HashMap<blake3::Hash, HashSet<String>> {
    let mut h: HashMap<blake3::Hash, HashSet<String>> = HashMap::new();
    for (_, records) in pack_indexes {
        for (r, entries) in records {
            let name = r.name.to_hex().to_string();
            for e in entries.iter().filter(|e| !bad.contains(&(r.name, e.id))) {
                h.entry(e.id).or_default().insert(name.clone());
            }
        }
    }
    h
}

/// Of the packs in `doomed`, those that can go: no marked chunk in them
/// is held soundly only by packs in the set. A pack that still holds the
/// one sound copy of a marked chunk is taken out, and the set checked
/// again; so is one whose copy, even recorded bad, is the only one.
pub(super) fn deletable(
    mut doomed: HashSet<String>,
    pack_indexes: &[(String, Vec<Indexed>)],
    marked: &HashSet<blake3::Hash>,
    bad: &BadCopies,
) -> HashSet<String> {
    let holders = holders(pack_indexes, bad);
    let mut contents: HashMap<String, Vec<blake3::Hash>> = HashMap::new();
    for (_, records) in pack_indexes {
        for (r, entries) in records {
            contents
                .entry(r.name.to_hex().to_string())
                .or_default()
                .extend(
                    entries
                        .iter()
                        .map(|e| e.id)
                        .filter(|id| marked.contains(id)),
                );
        }
    }
    loop {
        let needed: Vec<String> = doomed
            .iter()
            .filter(|p| {
                contents.get(*p).is_some_and(|ids| {
                    ids.iter().any(|id| {
                        holders
                            .get(id)
                            .is_none_or(|hs| hs.iter().all(|h| doomed.contains(h)))
                    })
                })
            })
            .cloned()
            .collect();
        if needed.is_empty() {
            return doomed;
        }
        for p in needed {
            doomed.remove(&p);
        }
    }
}

/// Packs whose every marked chunk has a sound copy in another pack that
/// stays: two backups that raced (each before the other's pack index
/// was up) stored the same chunks in packs of their own, and the mark
/// finds both live. Judged newest first, so the copy kept is the older;
/// each pack taken leaves every one of its chunks a holder outside the
/// set, so no chunk loses its last copy. `pack_indexes` is what stays
/// (no doomed or condemned pack), `eligible` what may be condemned, and
/// `age` orders them. A pack with no marked chunk is dead, not redundant.
pub(super) fn redundant(
    pack_indexes: &[(String, Vec<Indexed>)],
    marked: &HashSet<blake3::Hash>,
    bad: &BadCopies,
    eligible: impl Fn(&str) -> bool,
    age: impl Fn(&str) -> Option<std::time::SystemTime>,
) -> HashSet<String> {
    let holders = holders(pack_indexes, bad);
    let mut contents: HashMap<String, HashSet<blake3::Hash>> = HashMap::new();
    for (_, records) in pack_indexes {
        for (r, entries) in records {
            let name = r.name.to_hex().to_string();
            if eligible(&name) {
                let ids = entries
                    .iter()
                    .map(|e| e.id)
                    .filter(|id| marked.contains(id));
                contents.entry(name).or_default().extend(ids);
            }
        }
    }
    let mut order: Vec<(Option<std::time::SystemTime>, String)> = contents
        .iter()
        .filter(|(_, ids)| !ids.is_empty())
        .map(|(n, _)| (age(n), n.clone()))
        .collect();
    order.sort_by(|a, b| b.cmp(a));
    let mut out: HashSet<String> = HashSet::new();
    for (_, name) in order {
        let Some(ids) = contents.get(&name) else {
            continue;
        };
        let elsewhere = ids.iter().all(|id| {
            holders
                .get(id)
                .is_some_and(|hs| hs.iter().any(|h| *h != name && !out.contains(h)))
        });
        if elsewhere {
            out.insert(name);
        }
    }
    out
}

/// Copies the live chunks of every pack `eligible` allows whose live
/// blobs are less than `below_percent` of its blob bytes (and more than
/// none: a dead pack is condemned as it is) into new packs, and indexes
/// them. Chunks a pack outside the repack holds soundly are not copied.
pub(super) fn repack(
    b: &Bucket,
    chunk_size: u64,
    pack_indexes: &[(String, Vec<Indexed>)],
    marked: &HashSet<blake3::Hash>,
    bad: &BadCopies,
    below_percent: u8,
    eligible: impl Fn(&str) -> bool,
) -> Result<Repacked> {
    let mut out = Repacked::default();
    if below_percent == 0 {
        return Ok(out);
    }
    let mut chosen: HashMap<String, Vec<PackEntry>> = HashMap::new();
    for (_, records) in pack_indexes {
        for (r, entries) in records {
            let name = r.name.to_hex().to_string();
            if chosen.contains_key(&name) || !eligible(&name) {
                continue;
            }
            let total: u64 = entries.iter().map(|e| u64::from(e.length)).sum();
            let live: Vec<PackEntry> = entries
                .iter()
                .filter(|e| marked.contains(&e.id))
                .cloned()
                .collect();
            let live_bytes: u64 = live.iter().map(|e| u64::from(e.length)).sum();
            if !live.is_empty() && live_bytes * 100 < total * u64::from(below_percent) {
                chosen.insert(name, live);
            }
        }
    }
    if chosen.is_empty() {
        return Ok(out);
    }
    let holders = holders(pack_indexes, bad);
    let mut names: Vec<String> = chosen.keys().cloned().collect();
    names.sort();
    let mut copied: HashSet<blake3::Hash> = HashSet::new();
    let mut buf = Vec::new();
    for name in names {
        let Some(live) = chosen.get(&name) else {
            continue;
        };
        // Copies elsewhere, outside the repack, need none here.
        let todo: Vec<&PackEntry> = live
            .iter()
            .filter(|e| {
                !copied.contains(&e.id)
                    && !holders
                        .get(&e.id)
                        .is_some_and(|hs| hs.iter().any(|h| !chosen.contains_key(h)))
            })
            .collect();
        b.plan_reads(todo.iter().map(|e| &e.id))?;
        let mut sound = true;
        for e in &todo {
            match read_checked(b, &e.id, chunk_size, &mut buf) {
                Ok(()) => {
                    out.bytes += b.add_to_pack(&e.id, &[&buf])?;
                    out.chunks += 1;
                    copied.insert(e.id);
                }
                Err(err) if !err.is_damage() => return Err(err),
                Err(_) => {
                    sound = false;
                    break;
                }
            }
        }
        if sound {
            out.packs.push(name);
        } else {
            out.damaged += 1;
        }
    }
    b.flush()?;
    Ok(out)
}

/// A chunk's blob from its pack, with every check a restore makes.
fn read_checked(b: &Bucket, id: &blake3::Hash, chunk_size: u64, buf: &mut Vec<u8>) -> Result<()> {
    b.read_chunk_blob(id, buf)?;
    let path = b.display(&format!("{PACKS}…/{}", id.to_hex()));
    blob::decode(BlobKind::Chunk, buf, chunk_size)
        .and_then(|plain| crate::store::check_digest(id, &plain))
        .map_err(|e| e.in_file(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(n: u8, ids: &[u8]) -> Indexed {
        let entries = ids
            .iter()
            .map(|&i| PackEntry {
                id: blake3::Hash::from_bytes([i; 32]),
                offset: 0,
                length: 1,
                crc: 0,
            })
            .collect();
        let record = Record {
            name: blake3::Hash::from_bytes([n; 32]),
            len: 1,
            trailer: Vec::new(),
        };
        (record, entries)
    }

    fn name(n: u8) -> String {
        blake3::Hash::from_bytes([n; 32]).to_hex().to_string()
    }

    #[test]
    fn of_two_packs_holding_the_same_chunks_the_newer_goes_and_one_copy_stays() {
        // Pack 1 (oldest) holds a b, pack 2 b c, pack 3 (newest) a b c:
        // pack 3 goes; then neither 1 (a is only in 1 now) nor 2 (c).
        let packs = vec![(
            "i".to_owned(),
            vec![pack(1, &[1, 2]), pack(2, &[2, 3]), pack(3, &[1, 2, 3])],
        )];
        let marked: HashSet<blake3::Hash> = [1u8, 2, 3]
            .iter()
            .map(|i| blake3::Hash::from_bytes([*i; 32]))
            .collect();
        let age = |n: &str| {
            (1..=3u8)
                .find(|i| name(*i) == n)
                .map(|i| std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::from(i)))
        };
        let all = |_: &str| true;
        let gone = redundant(&packs, &marked, &BadCopies::new(), all, age);
        assert_eq!(gone, HashSet::from([name(3)]));
        // Where the newest may not go yet (too young), it holds every
        // chunk, and the older two go instead.
        let gone = redundant(
            &packs,
            &marked,
            &BadCopies::new(),
            |n: &str| n != name(3),
            age,
        );
        assert_eq!(gone, HashSet::from([name(1), name(2)]));
        let two = vec![("i".to_owned(), vec![pack(1, &[1, 2]), pack(3, &[1, 2])])];
        let gone = redundant(&two, &marked, &BadCopies::new(), all, age);
        assert_eq!(gone, HashSet::from([name(3)]));
        // A bad copy never stands in: the pack with the sound one stays.
        let one = blake3::Hash::from_bytes([1; 32]);
        let bad: BadCopies = [(one, one)].into();
        let gone = redundant(&two, &marked, &bad, all, age);
        assert_eq!(gone, HashSet::from([name(1)]));
    }

    #[test]
    fn a_pack_goes_only_where_its_marked_chunks_live_on_elsewhere() {
        let indexes = vec![("a".to_owned(), vec![pack(1, &[10, 11]), pack(2, &[10])])];
        let marked: HashSet<blake3::Hash> = [blake3::Hash::from_bytes([10; 32])].into();
        let set = |ns: &[u8]| -> HashSet<String> { ns.iter().map(|&n| name(n)).collect() };
        let none = BadCopies::new();
        // Chunk 10 lives on in pack 2; 11 is dead.
        assert_eq!(deletable(set(&[1]), &indexes, &marked, &none), set(&[1]));
        // Pack 2 holds 10 alone once pack 1 is gone.
        assert_eq!(deletable(set(&[2]), &indexes, &marked, &none), set(&[2]));
        // Both at once would lose 10: both are kept.
        assert_eq!(deletable(set(&[1, 2]), &indexes, &marked, &none), set(&[]));
        // Nothing marked: both go.
        assert_eq!(
            deletable(set(&[1, 2]), &indexes, &HashSet::new(), &none),
            set(&[1, 2])
        );
    }

    #[test]
    fn a_bad_copy_never_stands_in_for_a_sound_one_nor_goes_as_the_last() {
        let indexes = vec![("a".to_owned(), vec![pack(1, &[10, 11]), pack(2, &[10])])];
        let marked: HashSet<blake3::Hash> = [blake3::Hash::from_bytes([10; 32])].into();
        let set = |ns: &[u8]| -> HashSet<String> { ns.iter().map(|&n| name(n)).collect() };
        let id = blake3::Hash::from_bytes([10; 32]);
        // Pack 2's copy of 10 is bad: pack 1 holds the only sound one.
        let bad: BadCopies = [(blake3::Hash::from_bytes([2; 32]), id)].into();
        assert_eq!(deletable(set(&[1]), &indexes, &marked, &bad), set(&[]));
        // Pack 2 may go: 10 is sound in pack 1.
        assert_eq!(deletable(set(&[2]), &indexes, &marked, &bad), set(&[2]));
        // Both copies bad: neither goes, the last one unread is kept.
        let both: BadCopies = [
            (blake3::Hash::from_bytes([1; 32]), id),
            (blake3::Hash::from_bytes([2; 32]), id),
        ]
        .into();
        assert_eq!(deletable(set(&[1, 2]), &indexes, &marked, &both), set(&[]));
    }
}
