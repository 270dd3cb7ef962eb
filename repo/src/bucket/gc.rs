//! gc of a repository in a bucket, while other hosts back up into it:
//! no lock, only leases, server times and two steps a grace period apart.
//!
//! **The danger.** A backup that meets a chunk a pack index lists reuses
//! it, and only names it in its manifest at the end. A pack that gc finds
//! unreferenced may so still be referenced by a backup running now.
//!
//! **The rule.** A run of gc, at server time `now`:
//! 1. *Marks* every chunk and index the manifests name. A manifest,
//!    index or pack index it cannot read leaves what may be deleted
//!    unknown: gc then deletes nothing but stale leases, and reports the
//!    damage (`vsnap repo quarantine` moves it aside).
//! 2. *Deletes* the packs of every earlier condemnation written at `T`
//!    when `now - T` is at least the grace period and no live lease began
//!    at or before `T + 1 s` (S3 times have whole seconds): every backup
//!    that could have reused them has ended, and its manifest was marked.
//!    A pack that holds the only copy of a chunk the mark found (a backup
//!    reused it before the condemnation) is spared. The pack indexes
//!    that listed the deleted packs are rewritten without them first, so
//!    no index ever names a pack that is gone.
//! 3. *Repacks and condemns.* Duplicates go first: a pack whose every
//!    marked chunk a pack that stays holds too (two backups that raced
//!    stored the same chunks), the newer of two ([`repack::redundant`]).
//!    The indexed packs uploaded at least the
//!    grace period ago whose marked chunks fill less than
//!    `--repack-below` of them have those chunks copied into new packs,
//!    indexed ([`super::repack`]). Then they and the packs with no
//!    chunk marked are condemned: a list under `condemned/` that backups
//!    read when they start, and whose packs they then never reuse.
//! 4. *Removes* packs no pack index lists (a backup that died before
//!    indexing them) and disk indexes no manifest names, when older than
//!    the grace period and older than every live lease's start: a running
//!    backup's own uploads are younger than its lease.
//! 5. *Sweeps* the changed-block-tracking clones of this host's backups
//!    that died before their commit, as a directory's gc does: a running
//!    backup holds its clone locked, and a clone is removed only if,
//!    locked by gc, no manifest read after the lock records it
//!    ([`crate::bases::sweep_bases`]).
//!
//! A lease is live while rewritten within [`super::lease::STALE`].

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use super::lease::{self, Lease};
use super::{Bucket, Record, CONDEMNED, CONDEMNED_LIMIT, PACKS, PACK_INDEXES};
use crate::error::{Error, ErrorKind, Result};
use crate::gc::GcReport;
use crate::Repository;

use super::known::{self, BAD, BAD_LIMIT};
use super::repack::{self, Indexed};

/// S3 times have whole seconds: a lease that began in the same second as
/// a condemnation counts as begun before it.
const CLOCK_GRAIN: Duration = Duration::from_secs(1);

pub(super) fn gc(repo: &Repository, b: &Bucket, opts: &crate::GcOptions) -> Result<GcReport> {
    let grace = opts.grace;
    let store = b.store();
    let own = Lease::take(b.shared_store(), "gc")?;
    let now = own.started;
    let (leases, stale) = lease::read(store, now)?;
    let others: Vec<&lease::Live> = leases.iter().filter(|l| l.key != own.key()).collect();
    let oldest = others.iter().map(|l| l.started).min();
    let mut report = GcReport::default();

    // 1. Mark.
    let marked = crate::gc::mark(repo)?;
    report.snapshots = marked.snapshots;
    let (chunks, indexes, bases) = (marked.chunks, marked.indexes, marked.bases);
    let mut damaged = marked.damaged;

    // What the bucket holds: packs, and which pack index lists each.
    let objects: HashMap<String, (u64, SystemTime)> = store
        .list(PACKS)?
        .into_iter()
        .filter_map(|o| Some((o.key.strip_prefix(PACKS)?.to_owned(), (o.size, o.modified))))
        .collect();
    let mut pack_indexes: Vec<(String, Vec<Indexed>)> = Vec::new();
    let listed = store.list(PACK_INDEXES)?;
    b.check_index_memory(&listed)?;
    for o in listed {
        let Some(hex) = o.key.strip_prefix(PACK_INDEXES) else {
            continue;
        };
        let path = b.display(&o.key);
        // A pack index gc cannot read leaves its packs' fate unknown:
        // they would look unindexed, and be removed.
        match b.read_pack_index(hex, o.size) {
            Ok(records) => {
                // An entry no chunk can fill would keep its pack forever.
                let long = records
                    .iter()
                    .find_map(|(r, entries)| entries.iter().find_map(|e| b.too_long(&r.name, e)));
                match long {
                    Some(reason) => damaged.push(crate::Damaged {
                        what: "pack index",
                        path,
                        reason,
                    }),
                    None => pack_indexes.push((o.key, records)),
                }
            }
            Err(e) => {
                let e = e.in_file(&path).during("gc: read every pack index");
                damaged.push(crate::gc::damage(e, "pack index", path)?);
            }
        }
    }
    if !damaged.is_empty() {
        for key in stale {
            store.delete(&key)?;
            report.stale_leases_removed += 1;
        }
        report.damaged = damaged;
        report.running_backups = others.iter().filter(|l| l.kind == "backup").count() as u64;
        return Ok(report);
    }
    let mut live_packs: HashMap<String, bool> = HashMap::new();
    for (_, records) in &pack_indexes {
        for (r, entries) in records {
            let live = entries.iter().any(|e| chunks.contains(&e.id));
            *live_packs.entry(r.name.to_hex().to_string()).or_default() |= live;
        }
    }
    // Strictly older than `now` by a whole grain too: an object of gc's
    // own second may be a backup's that began after gc read the leases.
    let old_enough = |t: SystemTime| t + grace + CLOCK_GRAIN <= now;
    let before_every_lease = |t: SystemTime| oldest.is_none_or(|o| t + CLOCK_GRAIN < o);

    // 2. Delete what earlier runs condemned, where the rule allows.
    let mut condemned_before: HashSet<String> = HashSet::new();
    let mut doomed: HashSet<String> = HashSet::new();
    let mut done: Vec<String> = Vec::new();
    for l in b.read_listed(CONDEMNED, CONDEMNED_LIMIT, super::parse_condemned)? {
        // An unreadable list condemns nothing: it is removed, and its
        // packs are judged again by this run.
        let Ok(packs) = l.items else {
            done.push(l.key);
            continue;
        };
        let names: Vec<String> = packs.iter().map(|p| p.to_hex().to_string()).collect();
        let settled =
            old_enough(l.modified) && others.iter().all(|o| o.started > l.modified + CLOCK_GRAIN);
        if settled {
            doomed.extend(names);
            done.push(l.key);
        } else {
            report.packs_waiting += names.len() as u64;
            condemned_before.extend(names);
        }
    }

    // Only a pack that is there holds a chunk: a record of a pack gone
    // missing is damage for verify, never a copy to rely on.
    let present = |keep: &dyn Fn(&str) -> bool| -> Vec<(String, Vec<Indexed>)> {
        pack_indexes
            .iter()
            .map(|(key, records)| {
                let kept = records
                    .iter()
                    .filter(|(r, _)| {
                        let n = r.name.to_hex();
                        objects.contains_key(n.as_str()) && keep(n.as_str())
                    })
                    .cloned()
                    .collect();
                (key.clone(), kept)
            })
            .collect()
    };
    // The copies verify recorded as bad, which never count as a chunk's
    // copy elsewhere. An unreadable record is dropped, as an unreadable
    // condemnation is: it only stood for copies to store again.
    let mut bad = repack::BadCopies::new();
    let mut bad_records: Vec<(String, Vec<(blake3::Hash, blake3::Hash)>)> = Vec::new();
    for l in b.read_listed(BAD, BAD_LIMIT, known::parse_bad)? {
        let pairs = l.items.unwrap_or_default();
        bad.extend(pairs.iter().copied());
        bad_records.push((l.key, pairs));
    }
    // A condemned pack that holds the only sound copy of a chunk the mark
    // found (a backup reused it before the condemnation) is spared.
    let mut doomed = repack::deletable(doomed, &present(&|_| true), &chunks, &bad);
    // Packs the indexes name that the bucket lost: listed again now that
    // the indexes are read (a pack goes up before the index that names
    // it, so one missing from this listing is gone, not on its way), and
    // no condemnation's. Their records go with the doomed packs', so a
    // loss is reported once, by verify, as the snapshots it hits.
    let relisted = b.list_packs()?;
    for (_, records) in &pack_indexes {
        for (r, _) in records {
            if relisted.contains_key(&r.name) {
                continue;
            }
            let n = r.name.to_hex().to_string();
            if !condemned_before.contains(&n) && doomed.insert(n) {
                report.packs_lost += 1;
            }
        }
    }

    // The pack indexes that list a doomed pack are rewritten without it,
    // into one new pack index, before any pack goes.
    let mut keep: Vec<Record> = Vec::new();
    let mut rewritten: Vec<String> = Vec::new();
    for (key, records) in &pack_indexes {
        if records
            .iter()
            .any(|(r, _)| doomed.contains(r.name.to_hex().as_str()))
        {
            keep.extend(
                records
                    .iter()
                    .filter(|(r, _)| !doomed.contains(r.name.to_hex().as_str()))
                    .map(|(r, _)| r.clone()),
            );
            rewritten.push(key.clone());
        }
    }
    // Two hosts that stored the same chunks in the same order made the
    // same pack, and each listed it: it is written once.
    let mut seen = HashSet::new();
    keep.retain(|r| seen.insert(r.name));
    let mut indexed: HashSet<String> = pack_indexes
        .iter()
        .filter(|(key, _)| !rewritten.contains(key))
        .filter_map(|(key, _)| Some(key.strip_prefix(PACK_INDEXES)?.to_owned()))
        .collect();
    if !keep.is_empty() {
        let bytes = super::pack_index::encode_pack_index(&keep);
        let hex = blake3::hash(&bytes).to_hex().to_string();
        store.put_new(&format!("{PACK_INDEXES}{hex}"), bytes)?;
        indexed.insert(hex);
    }
    for key in &rewritten {
        store.delete(key)?;
        report.pack_indexes_rewritten += 1;
    }
    // The indexes just rewritten leave this host's cache too.
    b.prune_cache(&indexed);
    for n in &doomed {
        if let Some((size, _)) = objects.get(n) {
            store.delete(&format!("{PACKS}{n}"))?;
            report.packs_removed += 1;
            report.bytes_freed += size;
        }
    }
    for key in &done {
        store.delete(key)?;
    }
    // Records of bad copies whose packs are all gone.
    for (key, pairs) in &bad_records {
        let gone = |p: &blake3::Hash| {
            let n = p.to_hex();
            !objects.contains_key(n.as_str()) || doomed.contains(n.as_str())
        };
        if pairs.iter().all(|(p, _)| gone(p)) {
            store.delete(key)?;
        }
    }

    // 3. Repack the mostly dead, then condemn them with the dead packs
    // not yet condemned.
    let eligible = |n: &str| {
        !doomed.contains(n)
            && !condemned_before.contains(n)
            && objects.get(n).is_some_and(|(_, t)| old_enough(*t))
    };
    // Duplicates first: packs whose every live chunk a pack that stays
    // holds too (two backups raced); then the mostly dead, judged by the
    // packs that outlive this run's deletions and the duplicates'.
    let staying = present(&|n| !doomed.contains(n) && !condemned_before.contains(n));
    let age = |n: &str| objects.get(n).map(|(_, t)| *t);
    let duplicates = repack::redundant(&staying, &chunks, &bad, eligible, age);
    report.packs_duplicate = duplicates.len() as u64;
    let surviving = present(&|n| !doomed.contains(n) && !duplicates.contains(n));
    let repacked = repack::repack(
        b,
        repo.config().chunk_size,
        &surviving,
        &chunks,
        &bad,
        opts.repack_below,
        |n| eligible(n) && !duplicates.contains(n),
    )?;
    report.packs_repacked = repacked.packs.len() as u64;
    report.chunks_repacked = repacked.chunks;
    report.bytes_repacked = repacked.bytes;
    let mut fresh: Vec<String> = live_packs
        .iter()
        .filter(|(n, live)| {
            !**live
                && !doomed.contains(*n)
                && !condemned_before.contains(*n)
                && objects.get(*n).is_some_and(|(_, t)| old_enough(*t))
        })
        .map(|(n, _)| n.clone())
        .chain(repacked.packs)
        .chain(duplicates)
        .collect();
    fresh.sort();
    if !fresh.is_empty() {
        report.packs_condemned = fresh.len() as u64;
        let body = serde_json::to_vec(&super::Condemned { packs: fresh }).map_err(|e| {
            Error::from(ErrorKind::InvalidArgument(format!(
                "condemnation list: {e}"
            )))
        })?;
        let key = format!("{CONDEMNED}{}.json", uuid::Uuid::new_v4().simple());
        store.put_new(&key, body)?;
    }

    // 4. Unindexed packs and unnamed disk indexes, old and older than
    // every running backup.
    for (n, (size, t)) in &objects {
        if live_packs.contains_key(n) {
            continue;
        }
        if old_enough(*t) && before_every_lease(*t) {
            store.delete(&format!("{PACKS}{n}"))?;
            report.packs_removed += 1;
            report.bytes_freed += size;
        } else {
            report.packs_young += 1;
        }
    }
    for o in store.list("indexes/")? {
        let name = o.key.strip_prefix("indexes/").unwrap_or_default();
        if indexes.contains(name) {
            continue;
        }
        if old_enough(o.modified) && before_every_lease(o.modified) {
            store.delete(&o.key)?;
            report.indexes_removed += 1;
            report.bytes_freed += o.size;
        }
    }
    for key in stale {
        store.delete(&key)?;
        report.stale_leases_removed += 1;
    }
    // 5. The clones of this host's backups that died before their commit.
    report.bases_removed =
        crate::bases::sweep_bases(repo, &bases, &|| crate::gc::recorded_bases(repo))?;
    report.chunks_kept = chunks.len() as u64;
    report.running_backups = others.iter().filter(|l| l.kind == "backup").count() as u64;
    drop(own);
    Ok(report)
}
