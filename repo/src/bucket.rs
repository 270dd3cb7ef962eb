//! A repository in object storage: chunks go into packs
//! ([`super::pack`]), and pack-index objects say which pack holds which
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
//! A pack index is a header, then a record per pack, little-endian:
//!
//! | part | size | field |
//! |---|---|---|
//! | header | 24 | magic `VSNAPPIX` 8, version u16 (1), zero 6, number of records u64 |
//! | record | 48 + T | pack name 32, the pack's length u64, T u64, then the pack's own trailer (T bytes) |
//!
//! The trailer is the pack's, byte for byte, so a pack index is checked by
//! the same parser as a pack, and its records say all a reader needs to
//! fetch a chunk with one ranged GET. Pack indexes are cached on the host
//! (they are immutable and named by their hash, so a cached copy whose hash
//! matches its name is the object).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use super::bucket_known;
pub(super) use super::bucket_known::Known;
use super::bucket_upload::Uploader;
use super::objects::ObjectStore;
use super::pack::{self, PackEntry};
use super::readahead::{window_range, Planned, ReadAhead, Window};
use crate::error::{Error, ErrorKind, Result};

pub(super) const PACKS: &str = "packs/";
pub(super) const PACK_INDEXES: &str = "packindex/";
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

const MAGIC: &[u8; 8] = b"VSNAPPIX";
const VERSION: u16 = 1;
const HEAD_LEN: usize = 24;
const RECORD_HEAD: usize = 48;

/// A pack index larger than this is refused unread: one backup's index
/// holds at most 1,024 packs' trailers, some 100 MiB at the
/// largest packs of the smallest chunks.
const PACK_INDEX_LIMIT: u64 = 1 << 30;
/// How often a blob whose CRC fails is fetched before it is refused.
const READ_ATTEMPTS: u32 = 3;

/// The pack sizes a repository may use. Below a mebibyte a pack saves few
/// requests; above a gibibyte a failed upload costs too much to repeat.
pub const PACK_SIZE_RANGE: std::ops::RangeInclusive<u64> = (1 << 20)..=(1 << 30);
/// The default: inside the 16–64 MiB that restic, rustic and kopia use,
/// 32 PUTs per GiB of new data.
pub const DEFAULT_PACK_SIZE: u64 = 32 << 20;

/// A pack as a pack index records it: its name, length and trailer.
#[derive(Debug, Clone)]
pub(super) struct Record {
    pub name: blake3::Hash,
    pub len: u64,
    pub trailer: Vec<u8>,
}

#[derive(Debug)]
pub(super) struct Bucket {
    store: Arc<dyn ObjectStore>,
    /// This repository's pack-index cache, `None` without a cache directory.
    cache: Option<PathBuf>,
    known: Arc<RwLock<Option<Known>>>,
    packer: Arc<Uploader>,
    readahead: Arc<ReadAhead>,
}

/// One list object under `condemned/` or `bad/`, as read.
pub(super) struct Listed<T> {
    pub key: String,
    pub modified: SystemTime,
    pub items: Result<Vec<T>>,
}

/// Objects that could not be read, and why.
type Unreadable = Vec<(PathBuf, String)>;

pub(super) fn poisoned() -> Error {
    Error::worker_panicked()
}

impl Bucket {
    pub(super) fn new(store: Arc<dyn ObjectStore>, pack_size: u64, cache: Option<PathBuf>) -> Self {
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
            readahead: Arc::default(),
        }
    }

    /// A bucket handle over the same connection and cache that knows
    /// nothing yet: it reads the lists and pack indexes afresh, and has
    /// its own uploads.
    pub(super) fn fresh(&self) -> Bucket {
        Bucket::new(
            self.shared_store(),
            self.packer.pack_size(),
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
        if self.known.read().map_err(|_| poisoned())?.is_some() {
            return Ok(());
        }
        let mut known = Known::default();
        // Condemnations and bad copies first: a chunk two packs hold is
        // then found in the better copy as the pack indexes are added.
        let condemned = self.read_lists(CONDEMNED, CONDEMNED_LIMIT, parse_condemned)?;
        let bad = self.read_lists(
            bucket_known::BAD,
            bucket_known::BAD_LIMIT,
            bucket_known::parse_bad,
        )?;
        known.condemned.extend(condemned.0);
        known.bad.extend(bad.0);
        known.damaged.extend(condemned.1.into_iter().chain(bad.1));
        for obj in self.store.list(PACK_INDEXES)? {
            let Some(hex) = obj.key.strip_prefix(PACK_INDEXES) else {
                continue;
            };
            let path = self.display(&obj.key);
            let parsed = self.read_pack_index(hex, obj.size).and_then(|bytes| {
                parse_pack_index(&bytes).map_err(|e| e.in_file(&path).during("read pack index"))
            });
            match parsed {
                Ok(packs) => {
                    for (name, entries) in packs {
                        known.add(name, &entries)?;
                    }
                }
                // Unreachable or refusing servers stop the command; a
                // damaged object only means less is known.
                Err(e) if matches!(e.kind(), ErrorKind::Remote { .. }) => return Err(e),
                Err(e) => known.damaged.push((path, e.to_string())),
            }
        }
        let mut slot = self.known.write().map_err(|_| poisoned())?;
        if slot.is_none() {
            *slot = Some(known);
        }
        Ok(())
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
        limit: u64,
        parse: fn(&[u8]) -> Result<Vec<T>>,
    ) -> Result<(Vec<T>, Unreadable)> {
        let (mut items, mut damaged) = (Vec::new(), Vec::new());
        for l in self.read_listed(prefix, limit, parse)? {
            match l.items {
                Ok(got) => items.extend(got),
                Err(e) => damaged.push((self.display(&l.key), e.to_string())),
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
        for batch in fresh.chunks(bucket_known::BAD_PER_RECORD) {
            let record = bucket_known::BadCopies {
                copies: batch
                    .iter()
                    .map(|(pack, chunk)| bucket_known::BadCopy {
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
            let key = format!(
                "{}{}.json",
                bucket_known::BAD,
                uuid::Uuid::new_v4().simple()
            );
            self.store.put_new(&key, body)?;
            if let Some(k) = self.known.write().map_err(|_| poisoned())?.as_mut() {
                k.bad.extend(batch.iter().copied());
            }
        }
        Ok(fresh.len() as u64)
    }

    /// A pack index's bytes, checked against its name.
    pub(super) fn read_pack_index(&self, hex: &str, size: u64) -> Result<Vec<u8>> {
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
        if let Some(bytes) = cached.as_ref().and_then(|c| std::fs::read(c).ok()) {
            if blake3::hash(&bytes) == name {
                return Ok(bytes);
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
        if let Some(c) = cached {
            // Only a cache: a host that cannot keep it fetches again.
            let _ = write_cache(&c, &bytes);
        }
        Ok(bytes)
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
    /// once it is full ([`super::bucket_upload`]). Returns the bytes added:
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
                window: super::readahead::key(number, entry.offset),
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
                        window: super::readahead::key(l.pack, l.offset),
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
    pub(super) fn strays(&self) -> Result<Vec<super::store::Stray>> {
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
                || k.starts_with(bucket_known::BAD)
                || k == super::CONFIG
            {
                None
            } else {
                Some("what the repository keeps there")
            };
            if let Some(expected) = expected {
                out.push(super::store::Stray {
                    path: self.display(k),
                    found: "object",
                    expected,
                });
            }
        }
        Ok(out)
    }

    /// The pack indexes that could not be read, and why.
    pub(super) fn damaged(&self) -> Result<Vec<(PathBuf, String)>> {
        self.with_known(|k| k.damaged.clone())
    }

    /// The chunks the pack indexes list, for [`super::Repository::usage`].
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

pub(super) fn write_cache(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().ok_or(std::io::ErrorKind::InvalidInput)?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

pub(super) fn encode_pack_index(packs: &[Record]) -> Vec<u8> {
    let total: usize = packs.iter().map(|p| RECORD_HEAD + p.trailer.len()).sum();
    let mut out = Vec::with_capacity(HEAD_LEN + total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&[0; 6]);
    out.extend_from_slice(&(packs.len() as u64).to_le_bytes());
    for p in packs {
        out.extend_from_slice(p.name.as_bytes());
        out.extend_from_slice(&p.len.to_le_bytes());
        out.extend_from_slice(&(p.trailer.len() as u64).to_le_bytes());
        out.extend_from_slice(&p.trailer);
    }
    out
}

fn corrupt(reason: String) -> Error {
    ErrorKind::Corrupt {
        what: "pack index",
        reason,
    }
    .into()
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// The packs a pack index lists, each with its entries; a pure function
/// that trusts nothing: every record's trailer is parsed as its pack's
/// would be, and must be exactly as long as it says.
pub fn parse_pack_index(bytes: &[u8]) -> Result<Vec<(blake3::Hash, Vec<PackEntry>)>> {
    Ok(pack_index_records(bytes)?
        .into_iter()
        .map(|(r, entries)| (r.name, entries))
        .collect())
}

/// [`parse_pack_index`], keeping each record whole, for gc to write the
/// records it keeps into a new pack index.
pub(super) fn pack_index_records(bytes: &[u8]) -> Result<Vec<(Record, Vec<PackEntry>)>> {
    if bytes.len() < HEAD_LEN {
        return Err(ErrorKind::Truncated {
            what: "pack index header",
            needed: HEAD_LEN as u64,
            at: 0,
            available: bytes.len() as u64,
        }
        .into());
    }
    if &bytes[..8] != MAGIC {
        return Err(ErrorKind::BadMagic {
            what: "pack index",
            expected: "VSNAPPIX",
            found: String::from_utf8_lossy(&bytes[..8]).into_owned(),
        }
        .into());
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != VERSION {
        return Err(ErrorKind::UnsupportedVersion {
            what: "pack index",
            found: u32::from(version),
            expected: u32::from(VERSION),
        }
        .into());
    }
    if bytes[10..16].iter().any(|&b| b != 0) {
        return Err(corrupt("reserved bytes of the header are not zero".into()));
    }
    let count = le64(&bytes[16..]);
    let most = (bytes.len() - HEAD_LEN) / (RECORD_HEAD + pack::TAIL_LEN);
    if count > most as u64 {
        return Err(corrupt(format!(
            "it claims {count} packs; {} bytes hold at most {most}",
            bytes.len()
        )));
    }
    let mut out = Vec::with_capacity(count as usize);
    let mut seen = HashSet::new();
    let mut at = HEAD_LEN;
    for i in 0..count {
        let rest = &bytes[at..];
        if rest.len() < RECORD_HEAD {
            return Err(corrupt(format!("record {i} is cut short at byte {at}")));
        }
        let mut name = [0u8; 32];
        name.copy_from_slice(&rest[..32]);
        let name = blake3::Hash::from_bytes(name);
        let pack_len = le64(&rest[32..]);
        let trailer_len = le64(&rest[40..]);
        let body = &rest[RECORD_HEAD..];
        if trailer_len > body.len() as u64 {
            return Err(corrupt(format!(
                "record {i} claims a trailer of {trailer_len} bytes; {} remain",
                body.len()
            )));
        }
        let trailer = &body[..trailer_len as usize];
        let wanted = pack::trailer_len(trailer, pack_len)
            .map_err(|e| corrupt(format!("record {i}: {e}")))?;
        if wanted != trailer_len {
            return Err(corrupt(format!(
                "record {i} holds {trailer_len} bytes of trailer; its tail says {wanted}"
            )));
        }
        let entries = pack::parse_trailer(trailer, pack_len)
            .map_err(|e| corrupt(format!("record {i}: {e}")))?;
        if !seen.insert(name) {
            return Err(corrupt(format!("record {i} lists pack {name} again")));
        }
        out.push((
            Record {
                name,
                len: pack_len,
                trailer: trailer.to_vec(),
            },
            entries,
        ));
        at += RECORD_HEAD + trailer_len as usize;
    }
    if at != bytes.len() {
        return Err(corrupt(format!(
            "{} bytes follow the last record",
            bytes.len() - at
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::PackBuilder;

    fn pack_of(blobs: &[(u8, usize)]) -> Record {
        let mut b = PackBuilder::new();
        for &(tag, len) in blobs {
            let blob = vec![tag; len];
            b.push(blake3::hash(&blob), &[&blob]).unwrap();
        }
        let (bytes, name, entries) = b.finish();
        let end = entries.last().map_or(0, |e| e.offset + u64::from(e.length)) as usize;
        Record {
            name,
            len: bytes.len() as u64,
            trailer: bytes[end..].to_vec(),
        }
    }

    #[test]
    fn pack_indexes_round_trip_and_refuse_damage() {
        let packs = [pack_of(&[(1, 100), (2, 50)]), pack_of(&[(3, 64)])];
        let bytes = encode_pack_index(&packs);
        let parsed = parse_pack_index(&bytes).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].0, packs[0].name);
        assert_eq!(parsed[0].1.len(), 2);
        assert_eq!(parsed[0].1[1].offset, 100);
        assert_eq!(parsed[1].1[0].length, 64);

        let kind = |b: &[u8]| parse_pack_index(b).unwrap_err().to_string();
        assert!(kind(&bytes[..10]).contains("truncated"));
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(kind(&bad).contains("bad magic"));
        let mut bad = bytes.clone();
        bad[16] = 200;
        assert!(kind(&bad).contains("claims 200 packs"));
        // A flipped entry byte fails the trailer's CRC.
        let mut bad = bytes.clone();
        bad[HEAD_LEN + RECORD_HEAD + 40] ^= 1;
        assert!(kind(&bad).contains("checksum"), "{}", kind(&bad));
        let mut bad = bytes.clone();
        bad.push(0);
        assert!(kind(&bad).contains("1 bytes follow"));
        let twice = encode_pack_index(&[pack_of(&[(1, 100)]), pack_of(&[(1, 100)])]);
        assert!(kind(&twice).contains("again"));
    }

    proptest::proptest! {
        #[test]
        fn pack_index_parser_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = parse_pack_index(&bytes);
        }
    }
}
