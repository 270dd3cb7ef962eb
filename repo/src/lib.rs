//! The backup repository: each distinct chunk stored once, an index per
//! backed-up disk, and a manifest per snapshot, in a local directory
//! (`dir/`) or in object storage (`bucket/`), each behind the
//! `Backend` trait (`backend.rs`) that the format's code is written against.
//!
//! Every name is written whole or not at all. A backup makes its chunks
//! and indexes durable (and in a bucket findable) before it writes its
//! manifest: a crash at any point leaves at worst orphan chunks, which gc
//! removes, and never a snapshot that names what was not stored.

pub mod against;
mod backend;
pub mod backup;
mod bases;
pub mod blob;
mod bucket;
pub mod cbt;
pub mod crypto;
mod dir;
mod error;
mod freeze;
mod gc;
pub mod index;
pub mod manifest;
pub mod mem_store;
pub mod objects;
pub mod pack;
mod quarantine;
pub mod report;
pub mod restore;
pub mod retention;
mod store;
mod sync;
pub mod validate;
pub mod verify;

pub use bucket::{pack_index_of, parse_pack_index, DEFAULT_PACK_SIZE, PACK_SIZE_RANGE};
pub use objects::{ObjectInfo, ObjectStore};
pub use store::{Listed, Usage};
pub use sync::{sync, SyncFailure, SyncOptions, SyncReport};

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use backend::{Backend, Durable};
use bucket::Bucket;
use dir::Dir;

use serde::{Deserialize, Serialize};

pub use backup::{
    backup, backup_all, disk_names, BackupOptions, BackupOutcome, OnSnapshot, Preloaded,
    SnapshotPlan,
};
pub use freeze::{Failure, FreezeRecord, GuestMetrics, Writer};
pub use gc::{forget, GcOptions, GcReport, DEFAULT_GRACE, DEFAULT_REPACK_BELOW};
pub use index::{Entry, Index};
pub use manifest::{
    BaseRecord, Consistency, Disk, DiskStats, Identity, Manifest, Totals, Tracking,
};
pub use quarantine::{quarantine, Quarantined, QUARANTINE};

pub use error::{Error, ErrorKind, Result};

/// Removes what no snapshot uses any more, by the rule of the
/// repository's layout: a directory's under the repository lock alone
/// (`dir/gc.rs`: `wait` waits for running backups to end, otherwise it
/// fails at once if one is running), a bucket's beside running backups,
/// by leases and a grace period (`bucket/gc.rs`). Each layout's
/// `Backend::gc` is its own.
pub fn gc(repo: &Repository, opts: &GcOptions) -> Result<GcReport> {
    repo.backend.gc(repo, opts)
}

/// A name in the repository (a file, or an object in a bucket) that is
/// not what the repository puts there: what verify reports, whichever
/// layout found it.
#[derive(Debug, Clone)]
pub struct Stray {
    pub path: PathBuf,
    pub found: &'static str,
    pub expected: &'static str,
}

/// An object of a layout's own (a bucket's pack index, list or pack) that
/// could not be used: what it is, where, and why. Its chunks count as
/// absent, so a backup stores them again; verify reports it.
#[derive(Debug, Clone, Serialize)]
pub struct Damaged {
    pub what: &'static str,
    pub path: PathBuf,
    pub reason: String,
}

impl std::fmt::Display for Damaged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.what, self.path.display(), self.reason)
    }
}

const CONFIG: &str = "vsnap-repository";
const FORMAT_NAME: &str = "vsnap repository";
pub const REPO_VERSION: u32 = 1;

/// The chunk grid of a new repository unless its maker chooses another:
/// the block of a dynamic VHD, the unit in which a guest's writes allocate.
/// An incremental backup reads every chunk a change touched, whole, so a
/// chunk twice a block's size reads a neighbouring block for nothing: with
/// 1% of a disk's blocks rewritten, 4 MiB chunks read 2% of it, 2 MiB ones
/// 1%. A full backup, restore or verify of a 2 GiB disk took the same time
/// at 1, 2 and 4 MiB (docs/benchmarks.md); smaller than a block would only
/// multiply chunk files.
pub const DEFAULT_CHUNK_SIZE: u64 = 2 << 20;

/// The repository's format-version file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub format: String,
    pub version: u32,
    pub id: uuid::Uuid,
    /// Every index of this repository uses this grid, so identical
    /// content in different disks and snapshots has identical chunks.
    pub chunk_size: u64,
    /// The size at which a pack is closed and uploaded, in a repository in
    /// object storage; absent in a local one, which keeps a file a chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack_size: Option<u64>,
    /// False where `repo init` found that the server ignores conditional
    /// writes (`If-None-Match: *`) and the operator accepted it: two hosts
    /// writing at once may then overwrite each other's objects. Every
    /// process that opens the repository is told ([`Repository::caveats`]).
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub conditional_writes: bool,
    /// In object storage: the most memory a process may give the pack
    /// indexes it holds (every backup, verify, restore and gc reads them
    /// all); absent, [`DEFAULT_INDEX_MEMORY`]. A bucket whose pack
    /// indexes would need more is refused before one is fetched, so no
    /// object can make a reader allocate past it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_memory: Option<u64>,
}

/// The memory for pack indexes a repository in a bucket allows unless
/// its config says otherwise: about 30 million chunks, 57 TiB of unique
/// data in 2 MiB chunks (docs/repository.md has the arithmetic).
pub const DEFAULT_INDEX_MEMORY: u64 = 4 << 30;

fn yes() -> bool {
    true
}

fn is_yes(b: &bool) -> bool {
    *b
}

#[derive(Debug)]
pub struct Repository {
    root: PathBuf,
    backend: Box<dyn Backend>,
    config: Config,
    /// Buffers for chunks' stored bytes, reused across reads: a fresh
    /// zeroed buffer of up to a chunk per read cost restore a fifth of its
    /// time in page faults under an allocator that returns freed memory.
    stored: Mutex<Vec<Vec<u8>>>,
}

/// The config file is a few hundred bytes; anything far larger is not one.
const CONFIG_LIMIT: u64 = 64 << 10;

/// A lock on the repository, released on drop (and, for a local one, by
/// the kernel when the process dies, so a killed backup never leaves it
/// held).
#[derive(Debug)]
pub struct Lock {
    _held: backend::Held,
}

impl Repository {
    /// Makes a new repository in `dir`, which must be missing or empty.
    pub fn init(dir: &Path, chunk_size: u64) -> Result<Repository> {
        vsnap_engine::digest::DigestPlan::new(0, chunk_size)?;
        let dir_backend = Dir::create(dir)?;
        let config = Config {
            format: FORMAT_NAME.into(),
            version: REPO_VERSION,
            id: uuid::Uuid::new_v4(),
            chunk_size,
            pack_size: None,
            conditional_writes: true,
            index_memory: None,
        };
        let repo = Repository {
            root: dir.to_path_buf(),
            backend: Box::new(dir_backend),
            config,
            stored: Mutex::default(),
        };
        let bytes = serde_json::to_vec_pretty(&repo.config).map_err(|e| {
            Error::from(ErrorKind::InvalidArgument(format!("config: {e}"))).in_file(dir)
        })?;
        repo.backend.put(CONFIG, &[&bytes], Durable::Now)?;
        Ok(repo)
    }

    pub fn open(dir: &Path) -> Result<Repository> {
        let path = dir.join(CONFIG);
        let Some(backend) = Dir::open(dir)? else {
            return Err(Error::from(ErrorKind::NotARepository { file: CONFIG }).in_file(dir));
        };
        let Some(bytes) = backend.get_small(CONFIG, CONFIG_LIMIT, "open repository")? else {
            return Err(Error::from(ErrorKind::NotARepository { file: CONFIG }).in_file(dir));
        };
        let config = parse_config(&bytes, dir, &path)?;
        if config.pack_size.is_some() {
            return Err(Error::from(ErrorKind::Corrupt {
                what: "repository config",
                reason: "it sets a pack size, which only a repository in object storage has".into(),
            })
            .in_file(&path));
        }
        Ok(Repository {
            root: dir.to_path_buf(),
            backend: Box::new(backend),
            config,
            stored: Mutex::default(),
        })
    }

    /// Makes a new repository in object storage, under a prefix that must
    /// hold no repository yet. `cache` is the host's cache directory for
    /// pack indexes (`None`: none is kept).
    pub fn init_bucket(
        store: Arc<dyn ObjectStore>,
        chunk_size: u64,
        pack_size: u64,
        cache: Option<&Path>,
    ) -> Result<Repository> {
        Repository::init_bucket_with(store, chunk_size, pack_size, cache, false, None)
    }

    /// [`Repository::init_bucket`]; with `accept_unconditional`, on a
    /// server that ignores conditional writes too, which the config then
    /// records; with `index_memory`, that ceiling on memory for pack
    /// indexes rather than [`DEFAULT_INDEX_MEMORY`].
    ///
    /// Everything a bucket's hosts share rests on conditional creates: no
    /// manifest, pack or config is ever replaced. So init looks before it
    /// writes (an existing repository is refused whatever the server
    /// does with the condition), and then tries the condition itself: a
    /// second create of one probe object must be refused.
    pub fn init_bucket_with(
        store: Arc<dyn ObjectStore>,
        chunk_size: u64,
        pack_size: u64,
        cache: Option<&Path>,
        accept_unconditional: bool,
        index_memory: Option<u64>,
    ) -> Result<Repository> {
        vsnap_engine::digest::DigestPlan::new(0, chunk_size)?;
        let root = PathBuf::from(store.location());
        check_pack_size(pack_size).map_err(|e| e.in_file(&root))?;
        let there = || {
            Error::from(ErrorKind::InvalidArgument(
                "a repository is there already; a new one needs a prefix of its own".into(),
            ))
            .in_file(&root)
        };
        store.probe()?;
        if store.get(CONFIG, CONFIG_LIMIT)?.is_some() {
            return Err(there());
        }
        let conditional = bucket::conditional_writes_hold(&*store)?;
        if !conditional && !accept_unconditional {
            return Err(Error::from(ErrorKind::InvalidArgument(
                "the server ignores conditional writes (If-None-Match: *): a second create of one probe object succeeded. Hosts sharing this repository could overwrite each other's manifests and packs unseen. Use a server that honours them (AWS S3 does), or pass --accept-unconditional-writes for the weaker guarantee: the config records it, and every command warns".into(),
            ))
            .in_file(&root));
        }
        let config = Config {
            format: FORMAT_NAME.into(),
            version: REPO_VERSION,
            id: uuid::Uuid::new_v4(),
            chunk_size,
            pack_size: Some(pack_size),
            conditional_writes: conditional,
            index_memory,
        };
        let bytes = serde_json::to_vec_pretty(&config).map_err(|e| {
            Error::from(ErrorKind::InvalidArgument(format!("config: {e}"))).in_file(&root)
        })?;
        if !store.put_new(CONFIG, bytes.clone())? && !bucket::already(&*store, CONFIG, &bytes) {
            return Err(there());
        }
        Ok(Repository::bucket(store, config, cache))
    }

    /// What an operator must know of this repository before writing to
    /// it, each a sentence: none for most.
    pub fn caveats(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.config.conditional_writes {
            out.push(format!(
                "the server of {} ignores conditional writes (accepted at repo init): hosts writing to it at once may overwrite each other's objects; run one writer at a time",
                self.root.display()
            ));
        }
        out
    }

    /// Opens a repository in object storage.
    pub fn open_bucket(store: Arc<dyn ObjectStore>, cache: Option<&Path>) -> Result<Repository> {
        let root = PathBuf::from(store.location());
        let path = root.join(CONFIG);
        let Some(bytes) = store.get(CONFIG, CONFIG_LIMIT)? else {
            store.probe()?;
            return Err(Error::from(ErrorKind::NotARepository { file: CONFIG }).in_file(&root));
        };
        let config = parse_config(&bytes, &root, &path)?;
        let Some(pack_size) = config.pack_size else {
            return Err(Error::from(ErrorKind::Corrupt {
                what: "repository config",
                reason: "it sets no pack size, which a repository in object storage needs".into(),
            })
            .in_file(&path));
        };
        check_pack_size(pack_size).map_err(|e| e.in_file(&path))?;
        Ok(Repository::bucket(store, config, cache))
    }

    fn bucket(store: Arc<dyn ObjectStore>, config: Config, cache: Option<&Path>) -> Repository {
        let cache = cache.map(|c| c.join(config.id.to_string()).join("packindex"));
        Repository {
            root: PathBuf::from(store.location()),
            backend: Box::new(Bucket::new(
                store,
                config.pack_size.unwrap_or(DEFAULT_PACK_SIZE),
                config.chunk_size,
                config.index_memory.unwrap_or(DEFAULT_INDEX_MEMORY),
                cache,
            )),
            config,
            stored: Mutex::default(),
        }
    }

    /// A handle of its own for one run (a backup, a verify), over this
    /// handle's connection and configuration.
    ///
    /// A process that keeps one handle open (the service) takes one per
    /// run. In a bucket, what a handle knows (condemnations, bad copies,
    /// pack indexes) is read once, under its first operation's lease, and
    /// bucket gc relies on every backup knowing every condemnation older
    /// than its lease; a failed pack upload also fails every later write
    /// of its handle. A session reads all of that afresh, and fails alone.
    /// It costs no new client: the connection is shared.
    pub fn session(&self) -> Result<Repository> {
        Ok(Repository {
            root: self.root.clone(),
            backend: self.backend.session()?,
            config: self.config.clone(),
            stored: Mutex::default(),
        })
    }

    /// Whether this repository is in object storage.
    pub fn is_bucket(&self) -> bool {
        self.backend.kind() == "bucket"
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Held by every backup for its whole run: a shared flock in a local
    /// repository, a lease object in a bucket.
    pub fn lock_shared(&self) -> Result<Lock> {
        Ok(Lock {
            _held: self.backend.lock_shared()?,
        })
    }

    /// Held by a restore or verify, where the layout's gc must know of
    /// long reads: in a bucket, gc repacks packs that hold live chunks,
    /// and deletes them only once every lease older than their
    /// condemnation has ended, so a read that found a chunk in such a
    /// pack can still fetch it. A directory needs none: its gc removes
    /// only what no snapshot names.
    pub fn lease_for_reading(&self, kind: &'static str) -> Result<Option<Lock>> {
        Ok(self
            .backend
            .lease_for_reading(kind)?
            .map(|held| Lock { _held: held }))
    }

    /// Makes everything written so far durable, and in a bucket findable:
    /// chunk data and the renames that named them, or the open pack and
    /// the pack index of every pack uploaded.
    pub fn sync_all(&self) -> Result<()> {
        self.backend.sync_all()
    }
}

/// The config's bytes, checked: its format, version and chunk size.
fn parse_config(bytes: &[u8], root: &Path, path: &Path) -> Result<Config> {
    let config: Config = serde_json::from_slice(bytes).map_err(|e| {
        Error::from(ErrorKind::Corrupt {
            what: "repository config",
            reason: e.to_string(),
        })
        .in_file(path)
    })?;
    if config.format != FORMAT_NAME {
        return Err(Error::from(ErrorKind::NotARepository { file: CONFIG }).in_file(root));
    }
    if config.version != REPO_VERSION {
        return Err(Error::from(ErrorKind::UnsupportedVersion {
            what: "repository",
            found: config.version,
            expected: REPO_VERSION,
        })
        .in_file(path));
    }
    vsnap_engine::digest::DigestPlan::new(0, config.chunk_size).map_err(|e| e.in_file(path))?;
    Ok(config)
}

fn check_pack_size(size: u64) -> Result<()> {
    if PACK_SIZE_RANGE.contains(&size) {
        return Ok(());
    }
    Err(ErrorKind::InvalidArgument(format!(
        "a pack size of {size} bytes is outside {}..={} (1 MiB to 1 GiB)",
        PACK_SIZE_RANGE.start(),
        PACK_SIZE_RANGE.end()
    ))
    .into())
}

/// This host's name, as a manifest records who took the snapshot:
/// `$VSNAP_HOST` where set (a container's host name is its own, not the
/// hypervisor's), else the kernel's.
pub fn host_name() -> String {
    if let Ok(h) = std::env::var("VSNAP_HOST") {
        let h = h.trim();
        if !h.is_empty() && h.len() <= 253 && !h.chars().any(char::is_control) {
            return h.to_owned();
        }
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}
