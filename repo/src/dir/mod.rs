//! A repository in a local directory: a file per chunk, each written
//! under `tmp/` and renamed into place, so a name always holds a whole
//! file.
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
//! A backup makes its chunks and indexes durable with one `syncfs` and
//! only then writes its manifest (fsynced, renamed, directory fsynced): a
//! crash at any point leaves at worst orphan chunks and temporary files,
//! which gc ([`gc`]) removes under the lock alone.

mod gc;
mod tree;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::backend::{Backend, Durable, HeadCheck, Held, Named};
use crate::blob::HEADER_LEN;
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::gc::{GcOptions, GcReport};
use crate::{Repository, Stray, Usage};
use tree::{Kind, Tree};

/// The directories a new repository starts with.
const DIRS: [&str; 4] = ["chunks", "indexes", "snapshots", "tmp"];

#[derive(Debug)]
pub(crate) struct Dir {
    tree: Tree,
}

fn chunk_rel(id: &blake3::Hash) -> String {
    let hex = id.to_hex();
    format!("chunks/{}/{}", &hex[..2], hex.as_str())
}

impl Dir {
    /// Lays out a new repository in `dir`, which must be missing or empty.
    pub(crate) fn create(dir: &Path) -> Result<Dir> {
        std::fs::create_dir_all(dir).ctx_file(dir, "create repository directory")?;
        let mut entries = std::fs::read_dir(dir).ctx_file(dir, "read repository directory")?;
        if entries.next().is_some() {
            return Err(Error::from(ErrorKind::InvalidArgument(
                "the directory is not empty; a repository needs an empty or new one".into(),
            ))
            .in_file(dir));
        }
        for sub in DIRS {
            let p = dir.join(sub);
            std::fs::create_dir(&p).ctx_file(&p, "create repository directory")?;
        }
        for prefix in 0..=255u8 {
            let p = dir.join("chunks").join(format!("{prefix:02x}"));
            std::fs::create_dir(&p).ctx_file(&p, "create chunk directory")?;
        }
        let lock = dir.join("lock");
        File::create(&lock).ctx_file(&lock, "create lock file")?;
        Ok(Dir {
            tree: Tree::open(dir).ctx_file(dir, "open repository")?,
        })
    }

    /// Opens the directory of a repository; `None` where there is none.
    pub(crate) fn open(dir: &Path) -> Result<Option<Dir>> {
        match Tree::open(dir) {
            Ok(tree) => Ok(Some(Dir { tree })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(e).in_file(dir).during("open repository")),
        }
    }

    /// The lock file, opened without following a link.
    fn lock_file(&self) -> Result<(File, PathBuf)> {
        let path = self.tree.display("lock");
        match self.tree.open_regular("lock", "open lock file")? {
            Some((file, _)) => Ok((file, path)),
            None => Err(self.tree.missing("lock", "open lock file")),
        }
    }

    /// Held by gc while it deletes: no backup runs meanwhile, so none can
    /// be relying on a chunk gc is about to remove. `None` when `wait` is
    /// false and a backup holds the lock.
    fn lock_exclusive(&self, wait: bool) -> Result<Option<File>> {
        let (file, path) = self.lock_file()?;
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
        Ok(Some(file))
    }

    /// The chunk file `id`, opened; `None` where it is missing, or a link
    /// or special file stands in its place.
    fn open_chunk(&self, id: &blake3::Hash) -> Result<Option<(File, u64)>> {
        match self.tree.open_regular(&chunk_rel(id), "look up chunk") {
            Ok(found) => Ok(found),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::LinkInRepository | ErrorKind::NotRegular { .. }
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Counts the regular files in `rel`, and their bytes.
    fn count(&self, rel: &str, files: &mut u64, bytes: &mut u64) -> Result<()> {
        let op = "measure the repository";
        for e in self.tree.list(rel, op)? {
            if e.kind == Kind::File {
                *files += 1;
                *bytes += self.tree.file_size(&format!("{rel}/{}", e.name), op)?;
            }
        }
        Ok(())
    }
}

impl Backend for Dir {
    fn kind(&self) -> &'static str {
        "directory"
    }

    fn display(&self, rel: &str) -> PathBuf {
        self.tree.display(rel)
    }

    fn chunk_path(&self, id: &blake3::Hash) -> PathBuf {
        self.tree.display(&chunk_rel(id))
    }

    fn session(&self) -> Result<Box<dyn Backend>> {
        let tree = self
            .tree
            .try_clone()
            .ctx_file(&self.tree.display(""), "open repository")?;
        Ok(Box::new(Dir { tree }))
    }

    /// Writes to a temporary file and renames it into place; on failure
    /// the temporary file is removed. `Now` fsyncs the file before the
    /// rename and the directory after it; `Later` only starts writeback.
    fn put(&self, rel: &str, parts: &[&[u8]], durable: Durable) -> Result<()> {
        let tag = match durable {
            Durable::Now => "file",
            Durable::Later(what) => what,
        };
        let tmp = format!(
            "tmp/{tag}.{}.{}.tmp",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        );
        let tree = &self.tree;
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

    fn has_cheaply(&self, rel: &str) -> Result<bool> {
        Ok(matches!(
            self.tree.kind(rel, "look up")?,
            Some((Kind::File, _))
        ))
    }

    fn get_small(&self, rel: &str, limit: u64, op: &'static str) -> Result<Option<Vec<u8>>> {
        self.tree.read_small(rel, limit, op)
    }

    /// Reads the header first, and the rest only once `check` has passed
    /// it and the file's length.
    fn get_blob(
        &self,
        rel: &str,
        limit: u64,
        check: HeadCheck<'_>,
        op: &'static str,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        let tree = &self.tree;
        let path = tree.display(rel);
        let Some((file, len)) = tree.open_regular(rel, op)? else {
            return Err(tree.missing(rel, op));
        };
        let mut head = [0u8; HEADER_LEN];
        file.read_exact_at(&mut head, 0).map_err(|_| {
            Error::from(ErrorKind::Truncated {
                what: "blob header",
                needed: HEADER_LEN as u64,
                at: 0,
                available: len,
            })
            .in_file(&path)
            .during(op)
        })?;
        check(&head, len).map_err(|e| e.in_file(&path).during(op))?;
        tree.read_bounded_into(rel, &file, len, limit, "blob", op, buf)
    }

    fn remove(&self, rel: &str) -> Result<()> {
        self.tree.remove(rel, "remove").map(|_| ())
    }

    fn sync_removals(&self, dir: &str) -> Result<()> {
        self.tree.sync_dir(dir)
    }

    fn quarantine(&self, rel: &str, to: &str) -> Result<Option<PathBuf>> {
        let tree = &self.tree;
        if tree.kind(rel, "quarantine")?.is_none() {
            return Ok(None);
        }
        tree.ensure_dir(crate::QUARANTINE, "quarantine")?;
        // Never over an earlier one of the same name.
        let mut dest = format!("{}/{to}", crate::QUARANTINE);
        let mut n = 1;
        while tree.kind(&dest, "quarantine")?.is_some() {
            dest = format!("{}/{to}.{n}", crate::QUARANTINE);
            n += 1;
        }
        tree.rename(rel, &dest, "quarantine")?;
        tree.sync_dir(crate::QUARANTINE)?;
        if let Some((dir, _)) = rel.rsplit_once('/') {
            tree.sync_dir(dir)?;
        }
        Ok(Some(tree.display(&dest)))
    }

    fn list_snapshots(&self) -> Result<Vec<Named>> {
        Ok(self
            .tree
            .list("snapshots", "list snapshots")?
            .into_iter()
            .map(|e| Named {
                name: e.name,
                not_file: (e.kind != Kind::File).then(|| e.kind.name()),
            })
            .collect())
    }

    /// A whole chunk: its header must parse and its length match the
    /// file's. A damaged or truncated file, or a link or special file
    /// where the chunk should be, counts as absent, so the next backup
    /// writes the chunk again (its rename replaces the name, and never
    /// follows it).
    fn has_chunk(&self, id: &blake3::Hash) -> Result<bool> {
        let Some((file, len)) = self.open_chunk(id)? else {
            return Ok(false);
        };
        let mut head = [0u8; HEADER_LEN];
        if file.read_exact_at(&mut head, 0).is_err() {
            return Ok(false);
        }
        Ok(
            crate::blob::parse_header(crate::blob::BlobKind::Chunk, &head)
                .is_ok_and(|h| h.blob_len() == len),
        )
    }

    /// A regular file at least a header long, without reading it: reading
    /// each one's header cold cost most of an unchanged backup's time.
    fn chunk_in_place(&self, id: &blake3::Hash) -> Result<bool> {
        Ok(self
            .open_chunk(id)?
            .is_some_and(|(_, len)| len >= HEADER_LEN as u64))
    }

    /// Not fsynced here: the backup's one `syncfs` does it before the
    /// manifest.
    fn put_chunk(&self, id: &blake3::Hash, parts: &[&[u8]]) -> Result<u64> {
        self.put(&chunk_rel(id), parts, Durable::Later("chunk"))?;
        Ok(parts.iter().map(|p| p.len() as u64).sum())
    }

    fn with_chunk(
        &self,
        id: &blake3::Hash,
        limit: u64,
        check: HeadCheck<'_>,
        scratch: &mut Vec<u8>,
        f: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        self.get_blob(&chunk_rel(id), limit, check, "read chunk", scratch)?;
        f(scratch)
    }

    /// The chunk's inode number: reading in inode order reads a
    /// filesystem's files in about the order they were written.
    fn chunk_order(&self, id: &blake3::Hash) -> u64 {
        match self.tree.kind(&chunk_rel(id), "look up chunk") {
            Ok(Some((_, ino))) => ino,
            _ => 0,
        }
    }

    fn plan_reads(&self, _ids: &mut dyn Iterator<Item = &blake3::Hash>) -> Result<()> {
        Ok(())
    }

    /// Renames each to `*.bad`; gc removes it later.
    fn set_aside(&self, ids: &[blake3::Hash]) -> Result<u64> {
        let mut moved = 0;
        for id in ids {
            let rel = chunk_rel(id);
            if self.tree.kind(&rel, "move chunk aside")?.is_none() {
                continue;
            }
            self.tree
                .rename(&rel, &format!("{rel}.bad"), "move chunk aside")?;
            moved += 1;
        }
        Ok(moved)
    }

    /// Walks the tree; it costs a stat per file.
    fn usage(&self) -> Result<Usage> {
        let mut u = Usage::default();
        for prefix in self.tree.list("chunks", "measure the repository")? {
            if prefix.kind == Kind::Dir {
                let dir = format!("chunks/{}", prefix.name);
                self.count(&dir, &mut u.chunks, &mut u.chunk_bytes)?;
            }
        }
        self.count("indexes", &mut u.indexes, &mut u.index_bytes)?;
        Ok(u)
    }

    /// Links, special files, files where directories belong and the
    /// reverse. None of them is ever followed.
    fn strays(&self) -> Result<Vec<Stray>> {
        let tree = &self.tree;
        let mut out = Vec::new();
        let mut expect = |rel: &str, kind: Kind, expected: Kind, what: &'static str| {
            if kind != expected {
                out.push(Stray {
                    path: tree.display(rel),
                    found: kind.name(),
                    expected: what,
                });
                false
            } else {
                true
            }
        };
        let mut dirs = Vec::new();
        for e in tree.list("", "check repository")? {
            let expected = if DIRS.contains(&e.name.as_str()) || e.name == crate::QUARANTINE {
                Kind::Dir
            } else {
                Kind::File
            };
            if expect(&e.name, e.kind, expected, "what the repository keeps there")
                && expected == Kind::Dir
            {
                dirs.push(e.name);
            }
        }
        let mut leaves = Vec::new();
        for d in dirs {
            for e in tree.list(&d, "check repository")? {
                let rel = format!("{d}/{}", e.name);
                if d == "chunks" {
                    if expect(&rel, e.kind, Kind::Dir, "a chunk directory") {
                        leaves.push(rel);
                    }
                } else {
                    expect(&rel, e.kind, Kind::File, "a regular file");
                }
            }
        }
        for d in leaves {
            for e in tree.list(&d, "check repository")? {
                let rel = format!("{d}/{}", e.name);
                expect(&rel, e.kind, Kind::File, "a chunk file");
            }
        }
        Ok(out)
    }

    fn damaged(&self) -> Result<Vec<crate::Damaged>> {
        Ok(Vec::new())
    }

    /// A shared flock, released by the kernel when the process dies, so a
    /// killed backup never leaves it held.
    fn lock_shared(&self) -> Result<Held> {
        let (file, path) = self.lock_file()?;
        file.lock_shared().ctx_file(&path, "lock repository")?;
        Ok(Box::new(file))
    }

    /// None: gc here removes only what no snapshot names.
    fn lease_for_reading(&self, _kind: &'static str) -> Result<Option<Held>> {
        Ok(None)
    }

    /// One `syncfs`: chunk data and the renames that named them.
    fn sync_all(&self) -> Result<()> {
        let root = self.tree.display("");
        let f = File::from(
            self.tree
                .root()
                .try_clone()
                .ctx_file(&root, "open repository")?,
        );
        vsnap_engine::io::sync_filesystem(&f).ctx_file(&root, "flush repository")
    }

    fn gc(&self, repo: &Repository, opts: &GcOptions) -> Result<GcReport> {
        gc::gc(self, repo, opts)
    }
}
