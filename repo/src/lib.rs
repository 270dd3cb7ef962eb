//! The backup repository: a directory that stores each distinct chunk
//! once, an index per backed-up disk, and a manifest per snapshot.
//!
//! ```text
//! DIR/vsnap-repository      format and version (JSON); written once
//! DIR/chunks/ab/abcd…       chunk blobs, named by the BLAKE3 of their plaintext
//! DIR/indexes/abcd…         index blobs, named by the BLAKE3 of their plaintext
//! DIR/snapshots/ID.json     manifests; a snapshot exists once its manifest does
//! DIR/tmp/                  files being written; renamed into place when whole
//! DIR/lock                  flock: backups share it, gc's sweep takes it alone
//! ```
//!
//! Every file is written under `tmp/` and renamed into place, so a name
//! always holds a whole file. A backup makes its chunks and indexes durable
//! with one `syncfs` and only then writes its manifest (fsynced, renamed,
//! directory fsynced): a crash at any point leaves at worst orphan chunks
//! and temporary files, which gc removes.

pub mod backup;
mod bases;
pub mod blob;
mod bucket;
mod bucket_gc;
mod bucket_known;
mod bucket_repack;
mod bucket_upload;
pub mod cbt;
mod dir_gc;
mod error;
mod freeze;
mod gc;
pub mod index;
mod lease;
pub mod manifest;
pub mod mem_store;
pub mod objects;
pub mod pack;
mod pack_index;
mod readahead;
pub mod restore;
pub mod retention;
mod store;
mod sync;
mod tree;
pub mod validate;
pub mod verify;

pub use bucket::{parse_pack_index, DEFAULT_PACK_SIZE, PACK_SIZE_RANGE};
pub use objects::{ObjectInfo, ObjectStore};
pub use store::{Listed, Usage};
pub use sync::{sync, SyncFailure, SyncOptions, SyncReport};

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bucket::Bucket;

use tree::Tree;

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

pub use error::{Error, ErrorKind, Result};

use crate::error::ResultExt;

/// Removes what no snapshot uses any more, by the rule of the
/// repository's layout: a directory's under the repository lock alone
/// ([`dir_gc`]: `wait` waits for running backups to end, otherwise it fails
/// at once if one is running), a bucket's beside running backups, by
/// leases and a grace period ([`bucket_gc`]).
pub fn gc(repo: &Repository, opts: &GcOptions) -> Result<GcReport> {
    match &repo.backing {
        Backing::Dir(_) => dir_gc::gc(repo, opts),
        Backing::Bucket(b) => bucket_gc::gc(repo, b, opts),
    }
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
}

/// Where a repository keeps its files.
#[derive(Debug)]
enum Backing {
    /// A local directory: a file per chunk, renamed into place.
    Dir(Tree),
    /// Object storage: chunks in packs.
    Bucket(Box<Bucket>),
}

#[derive(Debug)]
pub struct Repository {
    root: PathBuf,
    backing: Backing,
    config: Config,
    /// Buffers for chunks' stored bytes, reused across reads: a fresh
    /// zeroed buffer of up to a chunk per read cost restore a fifth of its
    /// time in page faults under an allocator that returns freed memory.
    stored: Mutex<Vec<Vec<u8>>>,
}

/// The config file is a few hundred bytes; anything far larger is not one.
const CONFIG_LIMIT: u64 = 64 << 10;

/// A lock on the repository, released on drop (and by the kernel when the
/// process dies, so a killed backup never leaves it held).
#[derive(Debug)]
pub struct Lock {
    _held: Held,
}

#[derive(Debug)]
enum Held {
    File(#[allow(dead_code)] File),
    /// A lease object, kept fresh while held and removed on drop.
    Lease(#[allow(dead_code)] lease::Lease),
}

impl Repository {
    /// Makes a new repository in `dir`, which must be missing or empty.
    pub fn init(dir: &Path, chunk_size: u64) -> Result<Repository> {
        vsnap_engine::digest::DigestPlan::new(0, chunk_size)?;
        std::fs::create_dir_all(dir).ctx_file(dir, "create repository directory")?;
        let mut entries = std::fs::read_dir(dir).ctx_file(dir, "read repository directory")?;
        if entries.next().is_some() {
            return Err(Error::from(ErrorKind::InvalidArgument(
                "the directory is not empty; a repository needs an empty or new one".into(),
            ))
            .in_file(dir));
        }
        for sub in ["chunks", "indexes", "snapshots", "tmp"] {
            let p = dir.join(sub);
            std::fs::create_dir(&p).ctx_file(&p, "create repository directory")?;
        }
        for prefix in 0..=255u8 {
            let p = dir.join("chunks").join(format!("{prefix:02x}"));
            std::fs::create_dir(&p).ctx_file(&p, "create chunk directory")?;
        }
        let lock = dir.join("lock");
        File::create(&lock).ctx_file(&lock, "create lock file")?;
        let config = Config {
            format: FORMAT_NAME.into(),
            version: REPO_VERSION,
            id: uuid::Uuid::new_v4(),
            chunk_size,
            pack_size: None,
        };
        let repo = Repository {
            root: dir.to_path_buf(),
            backing: Backing::Dir(Tree::open(dir).ctx_file(dir, "open repository")?),
            config,
            stored: Mutex::default(),
        };
        let bytes = serde_json::to_vec_pretty(&repo.config).map_err(|e| {
            Error::from(ErrorKind::InvalidArgument(format!("config: {e}"))).in_file(dir)
        })?;
        repo.place(CONFIG, &[&bytes], Durable::Now)?;
        Ok(repo)
    }

    pub fn open(dir: &Path) -> Result<Repository> {
        let path = dir.join(CONFIG);
        let tree = match Tree::open(dir) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::from(ErrorKind::NotARepository { file: CONFIG }).in_file(dir))
            }
            Err(e) => return Err(Error::io(e).in_file(dir).during("open repository")),
        };
        let Some(bytes) = tree.read_small(CONFIG, CONFIG_LIMIT, "open repository")? else {
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
            backing: Backing::Dir(tree),
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
        vsnap_engine::digest::DigestPlan::new(0, chunk_size)?;
        let root = PathBuf::from(store.location());
        check_pack_size(pack_size).map_err(|e| e.in_file(&root))?;
        let config = Config {
            format: FORMAT_NAME.into(),
            version: REPO_VERSION,
            id: uuid::Uuid::new_v4(),
            chunk_size,
            pack_size: Some(pack_size),
        };
        let bytes = serde_json::to_vec_pretty(&config).map_err(|e| {
            Error::from(ErrorKind::InvalidArgument(format!("config: {e}"))).in_file(&root)
        })?;
        store.probe()?;
        if !store.put_new(CONFIG, bytes.clone())? && !already(&*store, CONFIG, &bytes) {
            return Err(Error::from(ErrorKind::InvalidArgument(
                "a repository is there already; a new one needs a prefix of its own".into(),
            ))
            .in_file(&root));
        }
        Ok(Repository::bucket(store, config, cache))
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
            backing: Backing::Bucket(Box::new(Bucket::new(
                store,
                config.pack_size.unwrap_or(DEFAULT_PACK_SIZE),
                cache,
            ))),
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
        let backing = match &self.backing {
            Backing::Dir(tree) => {
                Backing::Dir(tree.try_clone().ctx_file(&self.root, "open repository")?)
            }
            Backing::Bucket(b) => Backing::Bucket(Box::new(b.fresh())),
        };
        Ok(Repository {
            root: self.root.clone(),
            backing,
            config: self.config.clone(),
            stored: Mutex::default(),
        })
    }

    /// Whether this repository is in object storage.
    pub fn is_bucket(&self) -> bool {
        matches!(self.backing, Backing::Bucket(_))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The lock file, opened without following a link.
    fn lock_file(&self, tree: &Tree) -> Result<(File, PathBuf)> {
        let path = self.root.join("lock");
        match tree.open_regular("lock", "open lock file")? {
            Some((file, _)) => Ok((file, path)),
            None => Err(tree.missing("lock", "open lock file")),
        }
    }

    /// Held by every backup for its whole run: a shared flock in a local
    /// repository, a lease object in a bucket.
    pub fn lock_shared(&self) -> Result<Lock> {
        match &self.backing {
            Backing::Dir(tree) => {
                let (file, path) = self.lock_file(tree)?;
                file.lock_shared().ctx_file(&path, "lock repository")?;
                Ok(Lock {
                    _held: Held::File(file),
                })
            }
            Backing::Bucket(b) => Ok(Lock {
                _held: Held::Lease(lease::Lease::take(b.shared_store(), "backup")?),
            }),
        }
    }

    /// Held by a restore or verify in a bucket: gc repacks packs that hold
    /// live chunks, and deletes them only once every lease older than
    /// their condemnation has ended, so a long read that found a chunk in
    /// such a pack can still fetch it. A directory needs none: its gc
    /// removes only what no snapshot names.
    pub fn lease_for_reading(&self, kind: &'static str) -> Result<Option<Lock>> {
        match &self.backing {
            Backing::Dir(_) => Ok(None),
            Backing::Bucket(b) => Ok(Some(Lock {
                _held: Held::Lease(lease::Lease::take(b.shared_store(), kind)?),
            })),
        }
    }

    /// Held by gc while it deletes: no backup runs meanwhile, so none can
    /// be relying on a chunk gc is about to remove. `None` when `wait` is
    /// false and a backup holds the lock.
    pub fn lock_exclusive(&self, wait: bool) -> Result<Option<Lock>> {
        // A bucket has no lock to take: gc there works by leases.
        let tree = self.tree("an exclusive lock")?;
        let (file, path) = self.lock_file(tree)?;
        if wait {
            file.lock().ctx_file(&path, "lock repository")?;
        } else {
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(Error::io(e).in_file(&path).during("lock repository"))
                }
            }
        }
        Ok(Some(Lock {
            _held: Held::File(file),
        }))
    }

    /// A fresh name under `tmp/`, unique across processes.
    fn tmp_rel(&self, what: &str) -> String {
        format!(
            "tmp/{what}.{}.{}.tmp",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        )
    }

    /// Writes `parts`, one after another, to a temporary file and renames
    /// it to `rel` (beneath the root), so that name only ever holds a
    /// whole file; on failure the temporary file is removed. `Now` fsyncs
    /// the file before the rename and the directory after it; `Later` only
    /// starts writeback, leaving durability to the backup's one
    /// [`Repository::sync_all`].
    ///
    /// In a bucket the object is created with a conditional put: one there
    /// already is left alone, which for a name that is a hash is the same
    /// content, and for a manifest (`Now`) is refused.
    fn place(&self, rel: &str, parts: &[&[u8]], durable: Durable) -> Result<()> {
        let tree = match &self.backing {
            Backing::Dir(tree) => tree,
            Backing::Bucket(b) => {
                let bytes = parts.concat();
                let created = b.store().put_new(rel, bytes.clone())?;
                return match durable {
                    Durable::Now if !created && !already(b.store(), rel, &bytes) => {
                        Err(Error::from(ErrorKind::Exists(b.display(rel))).during("create"))
                    }
                    _ => Ok(()),
                };
            }
        };
        let tmp = self.tmp_rel(durable.tag());
        let tmp_path = tree.display(&tmp);
        let mut created = false;
        let outcome = (|| {
            let f = tree.create_new(&tmp, "create")?;
            created = true;
            let mut at = 0u64;
            for part in parts {
                f.write_all_at(part, at).ctx(&tmp_path, at, "write")?;
                at += part.len() as u64;
            }
            match durable {
                Durable::Now => f.sync_all().ctx_file(&tmp_path, "flush")?,
                Durable::Later(_) => vsnap_formats::storage::start_writeback(&f),
            }
            tree.rename(&tmp, rel, "rename into place")?;
            created = false;
            match durable {
                Durable::Now => tree.sync_dir(rel.rsplit_once('/').map_or("", |(d, _)| d)),
                Durable::Later(_) => Ok(()),
            }
        })();
        if created {
            let _ = tree.remove(&tmp, "remove temporary file");
        }
        outcome
    }

    /// Makes everything written so far durable, and in a bucket findable:
    /// chunk data and the renames that named them, or the open pack and
    /// the pack index of every pack uploaded.
    pub fn sync_all(&self) -> Result<()> {
        match &self.backing {
            Backing::Dir(tree) => {
                let f = File::from(
                    tree.root()
                        .try_clone()
                        .ctx_file(&self.root, "open repository")?,
                );
                vsnap_engine::io::sync_filesystem(&f).ctx_file(&self.root, "flush repository")
            }
            Backing::Bucket(b) => b.flush(),
        }
    }
}

/// Whether `key` holds exactly `bytes`: a conditional create refused
/// because an earlier try of the same request took effect and only its
/// answer was lost, and the client's retry met the object it had made.
fn already(store: &dyn ObjectStore, key: &str, bytes: &[u8]) -> bool {
    let limit = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    store
        .get(key, limit)
        .ok()
        .flatten()
        .is_some_and(|b| b == bytes)
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

/// When a file written by [`Repository::place`] must be on disk.
#[derive(Debug, Clone, Copy)]
enum Durable {
    /// Before `place` returns: the config and manifests.
    Now,
    /// By the backup's `syncfs`, before its manifest; the name says what
    /// the temporary file holds.
    Later(&'static str),
}

impl Durable {
    fn tag(self) -> &'static str {
        match self {
            Durable::Now => "file",
            Durable::Later(what) => what,
        }
    }
}

use std::os::unix::fs::FileExt;

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
