//! The repository's own directory tree, opened so that nothing in it can
//! lead vsnap outside it.
//!
//! A repository is input like any other: it may live on shared storage, be
//! restored from an old copy, or be written by a hostile host. So every
//! path below the root is opened relative to the root's descriptor with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: a symbolic link
//! anywhere on the way (`tmp/`, `chunks/ab/`, a chunk itself) fails the open
//! instead of being followed, and so does any `..`. Renames and deletions
//! go through directory descriptors opened the same way, so they act on
//! the name inside the repository, never on what a link points at.
//!
//! Files are opened non-blocking and must be regular files: a FIFO or a
//! device put where a chunk belongs is refused without a read, so it can
//! neither hang vsnap nor feed it endless bytes.
//!
//! The root itself is the operator's choice (`--repo`), and is opened
//! like any path they give.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags};
use rustix::io::Errno;

use crate::error::{Error, ErrorKind, Result};

/// Set once the kernel has said it has no `openat2` (before Linux 5.6, or
/// under a seccomp filter that hides it); paths are then walked one
/// component at a time with `O_NOFOLLOW`, which refuses the same links.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// What a name in the tree is, without following it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Link,
    Other,
}

impl Kind {
    fn of(t: FileType) -> Kind {
        match t {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Link,
            _ => Kind::Other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::File => "regular file",
            Kind::Dir => "directory",
            Kind::Link => "symbolic link",
            Kind::Other => "special file (FIFO, socket or device)",
        }
    }
}

/// An entry of a listed directory.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub kind: Kind,
}

#[derive(Debug)]
pub(super) struct Tree {
    root: OwnedFd,
    path: PathBuf,
}

impl Tree {
    pub(super) fn open(path: &Path) -> std::io::Result<Tree> {
        let root = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Tree {
            root,
            path: path.to_path_buf(),
        })
    }

    /// The path of `rel`, for messages.
    /// The same directory, through a descriptor of its own.
    pub(super) fn try_clone(&self) -> std::io::Result<Tree> {
        Ok(Tree {
            root: self.root.try_clone()?,
            path: self.path.clone(),
        })
    }

    pub(super) fn display(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.path.clone()
        } else {
            self.path.join(rel)
        }
    }

    /// The error for a name that is not there, as the kernel says it.
    pub(super) fn missing(&self, rel: &str, op: &'static str) -> Error {
        self.fail(rel, op, Errno::NOENT)
    }

    fn fail(&self, rel: &str, op: &'static str, e: Errno) -> Error {
        let kind = match e {
            // ELOOP: a link on the way; EXDEV: a path that would leave the
            // root (RESOLVE_BENEATH).
            Errno::LOOP | Errno::XDEV => ErrorKind::LinkInRepository,
            e => ErrorKind::Io(e.into()),
        };
        Error::from(kind).in_file(&self.display(rel)).during(op)
    }

    /// Opens `rel` (components separated by `/`, none of them `.` or `..`)
    /// beneath the root, following no link.
    fn resolve(&self, rel: &str, flags: OFlags, mode: Mode) -> rustix::io::Result<OwnedFd> {
        let flags = flags | OFlags::CLOEXEC | OFlags::NOFOLLOW;
        if rel.is_empty() {
            return rustix::fs::openat(&self.root, ".", flags, mode);
        }
        if rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(Errno::XDEV);
        }
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            let how =
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
            match rustix::fs::openat2(&self.root, rel, flags, mode, how) {
                Err(Errno::NOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
                // EAGAIN: a rename raced the lookup; the walk has no such case.
                Err(Errno::AGAIN) => {}
                other => return other,
            }
        }
        let mut parts = rel.split('/').peekable();
        let mut dir: Option<OwnedFd> = None;
        while let Some(part) = parts.next() {
            let at = dir.as_ref().map_or(self.root.as_fd(), |d| d.as_fd());
            if parts.peek().is_none() {
                return rustix::fs::openat(at, part, flags, mode);
            }
            let next = rustix::fs::openat(
                at,
                part,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            dir = Some(next);
        }
        Err(Errno::INVAL)
    }

    /// A directory of the tree, for `*at` calls and `fsync`.
    pub(super) fn dir(&self, rel: &str, op: &'static str) -> Result<OwnedFd> {
        self.resolve(rel, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
            .map_err(|e| match e {
                // O_DIRECTORY meets a link as "not a directory": say which.
                Errno::NOTDIR => match self.kind(rel, op) {
                    Ok(Some((Kind::Link, _))) => self.fail(rel, op, Errno::LOOP),
                    Ok(Some((found, _))) => Error::from(ErrorKind::NotRegular {
                        what: "directory",
                        found: found.name(),
                    })
                    .in_file(&self.display(rel))
                    .during(op),
                    Ok(None) | Err(_) => self.fail(rel, op, e),
                },
                e => self.fail(rel, op, e),
            })
    }

    /// Opens a regular file for reading, with its length; `None` when the
    /// name does not exist. Anything but a regular file is refused without
    /// a read.
    pub(super) fn open_regular(&self, rel: &str, op: &'static str) -> Result<Option<(File, u64)>> {
        let fd = match self.resolve(rel, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(self.fail(rel, op, e)),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| self.fail(rel, op, e))?;
        let kind = Kind::of(FileType::from_raw_mode(st.st_mode));
        if kind != Kind::File {
            return Err(Error::from(ErrorKind::NotRegular {
                what: "file",
                found: kind.name(),
            })
            .in_file(&self.display(rel))
            .during(op));
        }
        Ok(Some((File::from(fd), st.st_size.max(0) as u64)))
    }

    /// Reads a small regular file whole, refusing one past `limit` before
    /// reading it; `None` when the name does not exist.
    pub(super) fn read_small(
        &self,
        rel: &str,
        limit: u64,
        op: &'static str,
    ) -> Result<Option<Vec<u8>>> {
        let Some((file, len)) = self.open_regular(rel, op)? else {
            return Ok(None);
        };
        let mut buf = Vec::new();
        self.read_bounded_into(rel, &file, len, limit, "file", op, &mut buf)?;
        Ok(Some(buf))
    }

    /// Reads `file` (of `len` bytes, as its `fstat` said) whole into
    /// `buf`, once `len` is known to be within `limit`. A file that changes
    /// length meanwhile is read only up to `len`, and found short. `buf` is
    /// reused as it is, so a pooled buffer is zeroed only where it grows.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn read_bounded_into(
        &self,
        rel: &str,
        file: &File,
        len: u64,
        limit: u64,
        what: &'static str,
        op: &'static str,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        use std::os::unix::fs::FileExt;
        if len > limit {
            return Err(Error::from(ErrorKind::TooLarge {
                what,
                claimed: len,
                limit,
            })
            .in_file(&self.display(rel))
            .during(op));
        }
        buf.resize(len as usize, 0);
        file.read_exact_at(buf, 0).map_err(|e| {
            Error::from(ErrorKind::Io(e))
                .in_file(&self.display(rel))
                .during(op)
        })
    }

    /// Creates a new file (it must not exist) for writing.
    pub(super) fn create_new(&self, rel: &str, op: &'static str) -> Result<File> {
        self.resolve(
            rel,
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL,
            Mode::from_raw_mode(0o644),
        )
        .map(File::from)
        .map_err(|e| self.fail(rel, op, e))
    }

    fn split(rel: &str) -> (&str, &str) {
        rel.rsplit_once('/').unwrap_or(("", rel))
    }

    /// Renames `from` to `to`, both beneath the root; `to` is replaced if
    /// it exists (a link there is replaced, never followed).
    pub(super) fn rename(&self, from: &str, to: &str, op: &'static str) -> Result<()> {
        let (fd, fname) = Self::split(from);
        let (td, tname) = Self::split(to);
        let from_dir = self.dir(fd, op)?;
        let to_dir = if td == fd {
            None
        } else {
            Some(self.dir(td, op)?)
        };
        let to_fd = to_dir.as_ref().unwrap_or(&from_dir);
        rustix::fs::renameat_with(&from_dir, fname, to_fd, tname, RenameFlags::empty())
            .map_err(|e| self.fail(to, op, e))
    }

    /// Removes a name (a file, or a link itself) beneath the root; returns
    /// the bytes a regular file held (0 for anything else).
    pub(super) fn remove(&self, rel: &str, op: &'static str) -> Result<u64> {
        let (d, name) = Self::split(rel);
        let dir = self.dir(d, op)?;
        let len = match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if Kind::of(FileType::from_raw_mode(st.st_mode)) == Kind::File => {
                st.st_size.max(0) as u64
            }
            _ => 0,
        };
        rustix::fs::unlinkat(&dir, name, AtFlags::empty()).map_err(|e| self.fail(rel, op, e))?;
        Ok(len)
    }

    /// A regular file's size, without following links; 0 for anything
    /// else, or a name that went meanwhile.
    pub(super) fn file_size(&self, rel: &str, op: &'static str) -> Result<u64> {
        let (d, name) = Self::split(rel);
        let dir = self.dir(d, op)?;
        match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if Kind::of(FileType::from_raw_mode(st.st_mode)) == Kind::File => {
                Ok(st.st_size.max(0) as u64)
            }
            Ok(_) | Err(Errno::NOENT) => Ok(0),
            Err(e) => Err(self.fail(rel, op, e)),
        }
    }

    /// What a name is, without following it; `None` when it does not exist.
    pub(super) fn kind(&self, rel: &str, op: &'static str) -> Result<Option<(Kind, u64)>> {
        let (d, name) = Self::split(rel);
        let dir = self.dir(d, op)?;
        match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some((
                Kind::of(FileType::from_raw_mode(st.st_mode)),
                st.st_ino,
            ))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(self.fail(rel, op, e)),
        }
    }

    /// The entries of a directory of the tree, `.` and `..` left out.
    pub(super) fn list(&self, rel: &str, op: &'static str) -> Result<Vec<Entry>> {
        let dir = self.dir(rel, op)?;
        let mut out = Vec::new();
        let mut entries = rustix::fs::Dir::read_from(&dir).map_err(|e| self.fail(rel, op, e))?;
        while let Some(entry) = entries.read() {
            let entry = entry.map_err(|e| self.fail(rel, op, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "." || name == ".." {
                continue;
            }
            let kind = match entry.file_type() {
                FileType::Unknown => {
                    match rustix::fs::statat(&dir, entry.file_name(), AtFlags::SYMLINK_NOFOLLOW) {
                        Ok(st) => Kind::of(FileType::from_raw_mode(st.st_mode)),
                        Err(Errno::NOENT) => continue,
                        Err(e) => return Err(self.fail(rel, op, e)),
                    }
                }
                t => Kind::of(t),
            };
            out.push(Entry { name, kind });
        }
        Ok(out)
    }

    /// Makes the directory `name` at the root unless it is there; a name
    /// there of another kind (a link, say) is refused as [`Tree::dir`]
    /// refuses it.
    pub(super) fn ensure_dir(&self, name: &str, op: &'static str) -> Result<()> {
        match rustix::fs::mkdirat(self.root(), name, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(self.fail(name, op, e)),
        }
        self.dir(name, op).map(|_| ())
    }

    /// Flushes a directory, so the names renamed into it are durable.
    pub(super) fn sync_dir(&self, rel: &str) -> Result<()> {
        let dir = self.dir(rel, "flush directory")?;
        rustix::fs::fsync(&dir).map_err(|e| self.fail(rel, "flush directory", e))
    }

    /// The root's descriptor, for `syncfs` and the lock.
    pub(super) fn root(&self) -> &OwnedFd {
        &self.root
    }
}
