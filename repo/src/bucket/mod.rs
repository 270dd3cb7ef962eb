//! A repository in object storage: chunks go into packs
//! ([`crate::pack`]), and pack-index objects say which pack holds which
//! chunk, so a chunk costs no request of its own.
//!
//! ```text
//! PREFIX/vsnap-repository     the config (JSON), created once
//! PREFIX/packs/HEX            packs, named by the BLAKE3 of their bytes
//! PREFIX/packindex/HEX        pack indexes, named by the BLAKE3 of their bytes
//! PREFIX/indexes/HEX          disk indexes, as in a local repository
//! PREFIX/snapshots/ID.json    manifests; a snapshot exists once its manifest does
//! PREFIX/leases/NAME.json     one per running backup (gc reads them)
//! PREFIX/condemned/ID.json    packs gc condemned, deleted by a later run
//! PREFIX/bad/ID.json          copies of chunks verify found bad
//! ```
//!
//! Every object but a lease is created with a conditional put and never
//! replaced, so hosts share a bucket with no lock service. A backup's packs
//! are uploaded as they fill; its pack index goes up once they all have,
//! and its manifest once that has: a backup that dies leaves packs no index
//! lists, which no reader uses and gc removes, and never a snapshot that
//! names what was not stored.
//!
//! The pack indexes' format is [`super::pack_index`]'s.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

mod backend;
mod gc;
mod known;
mod lease;
mod pack_index;
mod readahead;
mod repack;
mod upload;

pub(crate) use backend::already;
use gc::gc;
use known::Known;
pub(crate) use pack_index::PACK_INDEXES;
pub use pack_index::{pack_index_of, parse_pack_index};
use pack_index::{pack_index_records, write_cache, Record, PACKS};

use crate::error::{Error, ErrorKind, Result};
use crate::objects::ObjectStore;
use crate::Damaged;
use readahead::{window_range, Planned, ReadAhead, Window};
use upload::Uploader;

pub(super) const LEASES: &str = "leases/";
pub(super) const CONDEMNED: &str = "condemned/";
/// A condemnation list is a JSON list of pack names: 64 MiB is a million
/// packs, far past any one gc's.
pub(super) const CONDEMNED_LIMIT: u64 = 64 << 20;

/// A condemnation: the packs gc found dead, which no backup that begins
/// after it is written may reuse, and which a later gc deletes once every
/// backup that began before it has ended.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct Condemned {
    pub packs: Vec<String>,
}

/// A condemnation's packs, each name checked.
pub(super) fn parse_condemned(bytes: &[u8]) -> Result<Vec<blake3::Hash>> {
    let c: Condemned = serde_json::from_slice(bytes).map_err(|e| {
        Error::from(ErrorKind::Corrupt {
            what: "condemnation list",
            reason: e.to_string(),
        })
    })?;
    c.packs
        .iter()
        .map(|p| {
            blake3::Hash::from_hex(p).map_err(|_| {
                Error::from(ErrorKind::Corrupt {
                    what: "condemnation list",
                    reason: format!("{p:?} is not a pack name"),
                })
            })
        })
        .collect()
}

/// A pack index larger than this is refused unread: one backup's index
/// holds at most 1,024 packs' trailers, some 100 MiB at the
/// largest packs of the smallest chunks.
pub(crate) const PACK_INDEX_LIMIT: u64 = 1 << 30;

/// Bytes of memory each byte of a pack index takes once read, at most:
/// an entry is 48 bytes there, and up to 144 held (its chunk's id and
/// place, 56 bytes a slot in a hash map kept at most 7/8 full, and up to
/// twice that just after it grows; its pack's layout, 16).
pub(crate) const INDEX_MEMORY_PER_BYTE: u64 = 3;
/// Pack indexes larger than this are asked for their header first.
const HEAD_FIRST_ABOVE: u64 = 1 << 20;
/// How often a blob whose CRC fails is fetched before it is refused.
const READ_ATTEMPTS: u32 = 3;

/// The pack sizes a repository may use. Below a mebibyte a pack saves few
/// requests; above a gibibyte a failed upload costs too much to repeat.
pub const PACK_SIZE_RANGE: std::ops::RangeInclusive<u64> = (1 << 20)..=(1 << 30);
/// The default: inside the 16–64 MiB that restic, rustic and kopia use,
/// 32 PUTs per GiB of new data.
pub const DEFAULT_PACK_SIZE: u64 = 32 << 20;

#[derive(Debug)]
pub(super) struct Bucket {
    store: Arc<dyn ObjectStore>,
    /// This repository's pack-index cache, `None` without a cache directory.
    cache: Option<PathBuf>,
    known: Arc<RwLock<Option<Known>>>,
    /// Held while the pack indexes load: the pipeline's threads all ask at
    /// once, and each would otherwise fetch and hold every index itself.
    loading: Arc<Mutex<()>>,
    packer: Arc<Uploader>,
    readahead: Arc<ReadAhead>,
    /// The repository's chunk size: what bounds a pack entry.
    chunk_size: u64,
    /// The most memory the pack indexes may take ([`crate::Config::index_memory`]).
    index_memory: u64,
}

/// One list object under `condemned/` or `bad/`, as read.
pub(super) struct Listed<T> {
    pub key: String,
    pub modified: SystemTime,
    pub items: Result<Vec<T>>,
}

/// Whether the server refuses a second conditional create of one object,
/// tried on a probe object of a name of its own, removed after. A server
/// that ignores `If-None-Match: *` (some S3-compatible servers and older
/// gateways) lets both creates succeed.
pub(crate) fn conditional_writes_hold(store: &dyn ObjectStore) -> Result<bool> {
    let key = format!("probe-{}", uuid::Uuid::new_v4().simple());
    let first = store.put_new(&key, b"first".to_vec())?;
    let second = store.put_new(&key, b"second".to_vec());
    // Whatever came of the second try, the probe goes.
    let removed = store.delete(&key);
    let held = first && !second?;
    removed?;
    Ok(held)
}

pub(super) fn poisoned() -> Error {
    Error::worker_panicked()
}

impl Bucket {
    pub(super) fn new(
        store: Arc<dyn ObjectStore>,
        pack_size: u64,
        chunk_size: u64,
        index_memory: u64,
        cache: Option<PathBuf>,
    ) -> Self {
        let known = Arc::default();
        Bucket {
            packer: Arc::new(Uploader::new(
                Arc::clone(&store),
                pack_size,
                cache.clone(),
                Arc::clone(&known),
            )),
            store,
            cache,
            known,
            loading: Arc::default(),
            readahead: Arc::default(),
            chunk_size,
            index_memory,
        }
    }

    /// A bucket handle over the same connection and cache that knows
    /// nothing yet: it reads the lists and pack indexes afresh, and has
    /// its own uploads.
    pub(super) fn fresh(&self) -> Bucket {
        Bucket::new(
            self.shared_store(),
            self.packer.pack_size(),
            self.chunk_size,
            self.index_memory,
            self.cache.clone(),
        )
    }

    pub(super) fn store(&self) -> &dyn ObjectStore {
        &*self.store
    }

    pub(super) fn shared_store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.store)
    }

    /// A key's address, for messages.
    pub(super) fn display(&self, key: &str) -> PathBuf {
        PathBuf::from(format!("{}/{key}", self.store.location()))
    }

    /// Reads every pack index once, from the cache where it has them.
    fn ensure_loaded(&self) -> Result<()> {
        let loaded = || Ok::<_, Error>(self.known.read().map_err(|_| poisoned())?.is_some());
        if loaded()? {
            return Ok(());
        }
        let _one = self.loading.lock().map_err(|_| poisoned())?;
        if loaded()? {
            return Ok(());
        }
        let mut known = Known::default();
        // Condemnations and bad copies first: a chunk two packs hold is
        // then found in the better copy as the pack indexes are added.
        let condemned = self.read_lists(
            CONDEMNED,
            "condemnation list",
            CONDEMNED_LIMIT,
            parse_condemned,
        )?;
        let bad = self.read_lists(
            known::BAD,
            "bad-copies record",
            known::BAD_LIMIT,
            known::parse_bad,
        )?;
        known.condemned.extend(condemned.0);
        known.bad.extend(bad.0);
        known.damaged.extend(condemned.1.into_iter().chain(bad.1));
        // A backup never trusts a pack index alone: a pack it names that
        // the bucket does not hold, or holds at another length, is
        // unusable, and its chunks count as absent (a backup stores them
        // again; a snapshot never names them as if they were there). The
        // packs are listed before the indexes are read, and the few an
        // index names that the listing lacks (a backup's, uploaded
        // meanwhile: a pack goes up before the index that names it) once
        // more after: what that listing lacks too is gone.
        let before = self.list_packs()?;
        let mut aside = Vec::new();
        let indexes = self.store.list(PACK_INDEXES)?;
        let names: HashSet<String> = indexes
            .iter()
            .filter_map(|o| Some(o.key.strip_prefix(PACK_INDEXES)?.to_owned()))
            .collect();
        self.prune_cache(&names);
        self.check_index_memory(&indexes)?;
        for obj in indexes {
            let Some(hex) = obj.key.strip_prefix(PACK_INDEXES) else {
                continue;
            };
            let path = self.display(&obj.key);
            let packs = match self.read_pack_index(hex, obj.size) {
                Ok(packs) => packs,
                // Unreachable or refusing servers stop the command; a
                // damaged object only means less is known.
                Err(e) => {
                    known
                        .damaged
                        .push(crate::gc::damage(e, "pack index", path)?);
                    continue;
                }
            };
            for (r, entries) in packs {
                if before.contains_key(&r.name) {
                    self.admit(&mut known, &obj.key, &before, r, entries)?;
                } else {
                    aside.push((obj.key.clone(), r, entries));
                }
            }
        }
        if !aside.is_empty() {
            let after = self.list_packs()?;
            for (key, r, entries) in aside {
                self.admit(&mut known, &key, &after, r, entries)?;
            }
        }
        let mut slot = self.known.write().map_err(|_| poisoned())?;
        if slot.is_none() {
            *slot = Some(known);
        }
        Ok(())
    }

    /// Refuses pack indexes that would take more memory than the
    /// repository allows, from their listed sizes, before one is fetched.
    /// Held, each byte of a pack index costs up to [`INDEX_MEMORY_PER_BYTE`].
    pub(super) fn check_index_memory(&self, indexes: &[crate::ObjectInfo]) -> Result<()> {
        let bytes: u64 = indexes.iter().map(|o| o.size).sum();
        let need = bytes.saturating_mul(INDEX_MEMORY_PER_BYTE);
        if need <= self.index_memory {
            return Ok(());
        }
        Err(Error::from(ErrorKind::IndexMemory {
            count: indexes.len(),
            bytes,
            need,
            limit: self.index_memory,
        })
        .in_file(&self.display(PACK_INDEXES)))
    }

    /// Every pack in the bucket, with its size.
    pub(super) fn list_packs(&self) -> Result<HashMap<blake3::Hash, u64>> {
        Ok(self
            .store
            .list(PACKS)?
            .into_iter()
            .filter_map(|o| {
                let name = blake3::Hash::from_hex(o.key.strip_prefix(PACKS)?).ok()?;
                Some((name, o.size))
            })
            .collect())
    }

    /// Adds what pack index `key` says of pack `r` to `known`, if `listed`
    /// holds the pack at the length the index gives; else the pack is
    /// unusable and, unless gc condemned it (and so may have deleted it),
    /// damage. An entry longer than a chunk of this repository can make
    /// is damage too, and never fetched: no index can make a reader
    /// allocate more than a chunk's blob.
    fn admit(
        &self,
        known: &mut Known,
        key: &str,
        listed: &HashMap<blake3::Hash, u64>,
        r: Record,
        mut entries: Vec<crate::pack::PackEntry>,
    ) -> Result<()> {
        let pack = self.display(&format!("{PACKS}{}", r.name.to_hex()));
        let why = match listed.get(&r.name) {
            Some(&size) if size == r.len => None,
            None if known.condemned.contains(&r.name) => {
                known.unusable.insert(r.name);
                return Ok(());
            }
            None => Some(format!(
                "the pack index {key} names it, but the bucket does not hold it"
            )),
            Some(&size) => Some(format!(
                "it is {size} bytes; the pack index {key} says {}",
                r.len
            )),
        };
        if let Some(reason) = why {
            known.unusable.insert(r.name);
            known.damaged.push(Damaged {
                what: "pack",
                path: pack,
                reason,
            });
            return Ok(());
        }
        entries.retain(|e| match self.too_long(&r.name, e) {
            Some(reason) => {
                known.damaged.push(Damaged {
                    what: "pack index",
                    path: self.display(key),
                    reason,
                });
                false
            }
            None => true,
        });
        known.add(r.name, &entries)
    }

    /// Why a pack index's entry `e` for `pack` cannot be a chunk of this
    /// repository: longer than a chunk's blob can be, so it is never
    /// fetched (a reader would allocate and request all of it).
    pub(super) fn too_long(
        &self,
        pack: &blake3::Hash,
        e: &crate::pack::PackEntry,
    ) -> Option<String> {
        let most = crate::blob::HEADER_LEN as u64 + self.chunk_size;
        (u64::from(e.length) > most).then(|| {
            format!(
                "its entry for chunk {} in pack {} is {} bytes; a chunk's blob in this repository is at most {most}",
                e.id.to_hex(),
                pack.to_hex(),
                e.length
            )
        })
    }

    /// Every JSON list object under `prefix`, each with its key, its
    /// server time and what it parsed to (an error names the object).
    /// One read serves every process's start and gc, which also needs to
    /// know which object said what, to delete the ones it has settled.
    pub(super) fn read_listed<T>(
        &self,
        prefix: &str,
        limit: u64,
        parse: fn(&[u8]) -> Result<Vec<T>>,
    ) -> Result<Vec<Listed<T>>> {
        let mut listed = Vec::new();
        for obj in self.store.list(prefix)? {
            // Gone since the listing: another host's gc settled it.
            let Some(bytes) = self.store.get(&obj.key, limit)? else {
                continue;
            };
            let path = self.display(&obj.key);
            listed.push(Listed {
                items: parse(&bytes).map_err(|e| e.in_file(&path)),
                key: obj.key,
                modified: obj.modified,
            });
        }
        Ok(listed)
    }

    /// Every item of the JSON lists under `prefix`, and the lists that
    /// could not be read, with why: a damaged list only means less is
    /// known, and verify reports it.
    fn read_lists<T>(
        &self,
        prefix: &str,
        what: &'static str,
        limit: u64,
        parse: fn(&[u8]) -> Result<Vec<T>>,
    ) -> Result<(Vec<T>, Vec<Damaged>)> {
        let (mut items, mut damaged) = (Vec::new(), Vec::new());
        for l in self.read_listed(prefix, limit, parse)? {
            match l.items {
                Ok(got) => items.extend(got),
                Err(e) => damaged.push(Damaged {
                    what,
                    path: self.display(&l.key),
                    reason: e.to_string(),
                }),
            }
        }
        Ok((items, damaged))
    }

    /// Records the copies of `ids` in use as bad, so that no backup
    /// reuses them and the next one to meet the chunks stores them again.
    /// One verify run's finds go in one object (or a few, for very many),
    /// which every process reads when it starts. Returns how many copies
    /// were recorded: none for a chunk no pack index lists, or one
    /// recorded already.
    pub(super) fn set_aside(&self, ids: &[blake3::Hash]) -> Result<u64> {
        let mut fresh: Vec<(blake3::Hash, blake3::Hash)> = Vec::new();
        self.with_known(|k| {
            for id in ids {
                if let Some(pack) = k.pack_of(id) {
                    if !k.bad.contains(&(pack, *id)) {
                        fresh.push((pack, *id));
                    }
                }
            }
        })?;
        let mut seen = HashSet::new();
        fresh.retain(|c| seen.insert(*c));
        for batch in fresh.chunks(known::BAD_PER_RECORD) {
            let record = known::BadCopies {
                copies: batch
                    .iter()
                    .map(|(pack, chunk)| known::BadCopy {
                        pack: pack.to_hex().to_string(),
                        chunk: chunk.to_hex().to_string(),
                    })
                    .collect(),
            };
            let body = serde_json::to_vec(&record).map_err(|e| {
                Error::from(ErrorKind::InvalidArgument(format!(
                    "bad-copies record: {e}"
                )))
            })?;
            let key = format!("{}{}.json", known::BAD, uuid::Uuid::new_v4().simple());
            self.store.put_new(&key, body)?;
            if let Some(k) = self.known.write().map_err(|_| poisoned())?.as_mut() {
                k.bad.extend(batch.iter().copied());
            }
        }
        Ok(fresh.len() as u64)
    }

    /// A pack index's records, its bytes checked against its name; from
    /// the cache where it has them. Only an index that parses enters the
    /// cache: one that does not is fetched (and refused) again.
    pub(super) fn read_pack_index(
        &self,
        hex: &str,
        size: u64,
    ) -> Result<Vec<(Record, Vec<crate::pack::PackEntry>)>> {
        let key = format!("{PACK_INDEXES}{hex}");
        let path = self.display(&key);
        let Ok(name) = blake3::Hash::from_hex(hex) else {
            return Err(Error::from(ErrorKind::Corrupt {
                what: "pack index",
                reason: "its name is not a BLAKE3 digest".into(),
            })
            .in_file(&path));
        };
        let cached = self.cache.as_ref().map(|c| c.join(hex));
        let parse = |bytes: &[u8]| {
            pack_index_records(bytes).map_err(|e| e.in_file(&path).during("read pack index"))
        };
        if let Some(bytes) = cached.as_ref().and_then(|c| std::fs::read(c).ok()) {
            if blake3::hash(&bytes) == name {
                if let Ok(records) = parse(&bytes) {
                    return Ok(records);
                }
            }
        }
        if size > PACK_INDEX_LIMIT {
            return Err(Error::from(ErrorKind::TooLarge {
                what: "pack index",
                claimed: size,
                limit: PACK_INDEX_LIMIT,
            })
            .in_file(&path));
        }
        // A large object is asked for its header first: one that is no
        // pack index, or claims more packs than its size holds, is refused
        // without fetching the rest (small ones cost one GET either way).
        if size > HEAD_FIRST_ABOVE {
            let head = self.store.get_range(&key, 0..pack_index::HEAD_LEN as u64)?;
            pack_index::parse_head(&head, size)
                .map_err(|e| e.in_file(&path).during("read pack index"))?;
        }
        let Some(bytes) = self.store.get(&key, PACK_INDEX_LIMIT)? else {
            return Err(missing(&path, "read pack index"));
        };
        let computed = blake3::hash(&bytes);
        if computed != name {
            return Err(Error::from(ErrorKind::DigestMismatch {
                what: "pack index",
                expected: hex.into(),
                found: computed.to_hex().to_string().into(),
            })
            .in_file(&path));
        }
        let records = parse(&bytes)?;
        if let Some(c) = cached {
            // Only a cache: a host that cannot keep it fetches again.
            let _ = write_cache(&c, &bytes);
        }
        Ok(records)
    }

    /// Removes from the cache every index the bucket no longer lists
    /// (gc rewrote or deleted it), and files that are no index's: the
    /// cache holds only what a reader may still need. `listed` are the
    /// names the bucket lists under `packindex/`. Only a cache: what
    /// cannot be removed now is removed by a later run.
    pub(super) fn prune_cache(&self, listed: &HashSet<String>) {
        let Some(Ok(entries)) = self.cache.as_ref().map(std::fs::read_dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let keep = name.to_str().is_some_and(|n| listed.contains(n));
            // A temporary file of a writer running now is left alone.
            let temporary = name.to_str().is_some_and(|n| n.starts_with('.'));
            if !keep && !temporary {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Whether the chunk is stored, or on its way in this process.
    pub(super) fn has_chunk(&self, id: &blake3::Hash) -> Result<bool> {
        // A chunk in a condemned pack is stored again rather than reused
        // (gc may delete the pack once the backups older than it end), and
        // so is one whose only copy verify found bad.
        let in_index = self.with_known(|k| k.reusable(id))?;
        Ok(in_index || self.packer.pending(id)?)
    }

    /// A number that orders chunks as they lie in the bucket, pack by pack.
    pub(super) fn chunk_order(&self, id: &blake3::Hash) -> u64 {
        self.known
            .read()
            .ok()
            .and_then(|k| {
                k.as_ref()?
                    .chunks
                    .get(id)
                    .map(|l| (u64::from(l.pack) << 32) | (l.offset >> 8))
            })
            .unwrap_or(0)
    }

    /// Adds a chunk's blob to the open pack, and starts the pack's upload
    /// once it is full ([`super::upload`]). Returns the bytes added:
    /// none for a chunk stored already.
    pub(super) fn write_chunk(&self, id: &blake3::Hash, parts: &[&[u8]]) -> Result<u64> {
        if self.has_chunk(id)? {
            return Ok(0);
        }
        self.add_to_pack(id, parts)
    }

    /// Adds a chunk's blob to the open pack whatever the pack indexes
    /// say: for gc, which copies the live chunks of a mostly-dead pack
    /// into new packs before it condemns the old one.
    pub(super) fn add_to_pack(&self, id: &blake3::Hash, parts: &[&[u8]]) -> Result<u64> {
        self.packer.add(id, parts)
    }

    /// Uploads the open pack, waits for every upload and then uploads the
    /// pack index of every pack this process uploaded since the last:
    /// after it, every chunk written is in the bucket and findable, and a
    /// manifest may name it.
    pub(super) fn flush(&self) -> Result<()> {
        self.packer.flush()
    }

    /// A chunk's blob, checked against its pack entry's length and CRC,
    /// copied into `buf`.
    pub(super) fn read_chunk_blob(&self, id: &blake3::Hash, buf: &mut Vec<u8>) -> Result<()> {
        self.with_chunk_blob(id, &mut |blob| {
            buf.clear();
            buf.extend_from_slice(blob);
            Ok(())
        })
    }

    /// Runs `f` on a chunk's blob, checked against its pack entry's length
    /// and CRC, where it lies: in the window fetched with its neighbours,
    /// without a copy, else in a fetch of its own.
    pub(super) fn with_chunk_blob(
        &self,
        id: &blake3::Hash,
        f: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let found = self.with_known(|k| {
            let l = k.chunks.get(id)?;
            let window = k
                .layouts
                .get(l.pack as usize)
                .and_then(|blobs| window_range(blobs, l.offset));
            Some((*k.packs.get(l.pack as usize)?, l.pack, l.entry(*id), window))
        })?;
        let Some((pack, number, entry, window)) = found else {
            return Err(missing(
                &self.display(&format!("{PACKS}…/{}", id.to_hex())),
                "read chunk",
            ));
        };
        let key = format!("{PACKS}{}", pack.to_hex());
        // With its neighbours first; on its own where that fails.
        // The reader's own fetch and the ones ahead of it are the same GET,
        // into a buffer a window that went before gave back.
        let store = Arc::clone(&self.store);
        let buffers = self.readahead.buffers();
        let ahead = move |w: &Planned| {
            let mut bytes = buffers.take();
            store
                .get_range_into(&w.object, w.range.clone(), &mut bytes)
                .ok()?;
            Some(Window::pooled(w.range.start, bytes, Arc::clone(&buffers)))
        };
        let fetch = || {
            ahead(&Planned {
                window: readahead::key(number, entry.offset),
                object: key.clone(),
                range: window?,
            })
        };
        let from_window =
            self.readahead
                .blob(number, entry.offset, entry.length, fetch, &ahead, |blob| {
                    entry.check(blob).is_ok().then(|| f(blob))
                });
        if let Some(Some(done)) = from_window {
            return done;
        }
        // A blob that fails its CRC may have been damaged on the way: it
        // is fetched again, and refused only if it fails every time.
        let mut attempt = 0;
        loop {
            let bytes = self.store.get_range(&key, entry.range())?;
            match entry.check(&bytes) {
                Ok(()) => return f(&bytes),
                Err(e) if attempt + 1 >= READ_ATTEMPTS => {
                    return Err(e
                        .in_file(&self.display(&key))
                        .at(entry.offset)
                        .during("read chunk"))
                }
                Err(_) => attempt += 1,
            }
        }
    }

    /// Says which chunks will be read, in order, so that the windows
    /// holding them are fetched ahead of the reads.
    pub(super) fn plan_reads<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a blake3::Hash>,
    ) -> Result<()> {
        let windows = self.with_known(|k| {
            ids.into_iter()
                .filter_map(|id| {
                    let l = k.chunks.get(id)?;
                    let pack = k.packs.get(l.pack as usize)?;
                    let range = window_range(k.layouts.get(l.pack as usize)?, l.offset)?;
                    Some(Planned {
                        window: readahead::key(l.pack, l.offset),
                        object: format!("{PACKS}{}", pack.to_hex()),
                        range,
                    })
                })
                .collect::<Vec<_>>()
        })?;
        self.readahead.plan(windows);
        Ok(())
    }

    /// Objects under the prefix whose names the repository does not make:
    /// verify reports them as damage, and nothing reads them.
    pub(super) fn strays(&self) -> Result<Vec<crate::Stray>> {
        let hex = |s: &str| blake3::Hash::from_hex(s).is_ok();
        let mut out = Vec::new();
        for o in self.store.list("")? {
            let k = o.key.as_str();
            let expected = if let Some(rest) = k.strip_prefix(PACKS) {
                (!hex(rest)).then_some("a pack named by its BLAKE3")
            } else if let Some(rest) = k.strip_prefix(PACK_INDEXES) {
                (!hex(rest)).then_some("a pack index named by its BLAKE3")
            } else if let Some(rest) = k.strip_prefix("indexes/") {
                (!hex(rest)).then_some("an index named by its BLAKE3")
            } else if let Some(rest) = k.strip_prefix("snapshots/") {
                (!rest.ends_with(".json") || rest.contains('/')).then_some("a manifest, ID.json")
            } else if k.starts_with(LEASES)
                || k.starts_with(CONDEMNED)
                || k.starts_with("quarantine/")
                || k.starts_with(known::BAD)
                || k == crate::CONFIG
            {
                None
            } else {
                Some("what the repository keeps there")
            };
            if let Some(expected) = expected {
                out.push(crate::Stray {
                    path: self.display(k),
                    found: "object",
                    expected,
                });
            }
        }
        Ok(out)
    }

    /// The pack indexes that could not be read, and why.
    pub(super) fn damaged(&self) -> Result<Vec<Damaged>> {
        self.with_known(|k| k.damaged.clone())
    }

    /// The chunks the pack indexes list, for [`crate::Repository::usage`].
    pub(super) fn chunk_count(&self) -> Result<u64> {
        self.with_known(|k| k.chunks.len() as u64)
    }

    /// `f` of what the pack indexes say, read first if they are not yet.
    fn with_known<T>(&self, f: impl FnOnce(&Known) -> T) -> Result<T> {
        self.ensure_loaded()?;
        let known = self.known.read().map_err(|_| poisoned())?;
        Ok(match known.as_ref() {
            Some(k) => f(k),
            None => f(&Known::default()),
        })
    }
}

pub(super) fn missing(path: &std::path::Path, op: &'static str) -> Error {
    Error::io(std::io::Error::from(std::io::ErrorKind::NotFound))
        .in_file(path)
        .during(op)
}
