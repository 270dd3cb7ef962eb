//! The engine's one error type: a [`ErrorKind`] saying what went wrong, plus
//! the context an operator needs to find it (file, offset, operation).
//!
//! Parsers are pure functions over bytes and do not know which file or at
//! which absolute offset they run, so they report offsets relative to the
//! structure they parse; the open path then rebases them with
//! [`Error::rebase`] and names the file with [`Error::in_file`].

use std::fmt;
use std::path::{Path, PathBuf};

/// Shorthand used throughout the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong. Tests match on these, so each distinct failure an image
/// can exhibit has its own variant rather than a formatted string.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    #[error(
        "truncated: {what} needs {needed} bytes at offset {at}, but only {available} are there"
    )]
    Truncated {
        what: &'static str,
        needed: u64,
        at: u64,
        available: u64,
    },
    #[error("bad magic in {what}: expected {expected:?}, found {found:?}")]
    BadMagic {
        what: &'static str,
        expected: &'static str,
        found: String,
    },
    #[error("bad {what} checksum: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum {
        what: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("unsupported {what} version {found:#010x} (expected {expected:#010x})")]
    UnsupportedVersion {
        what: &'static str,
        found: u32,
        expected: u32,
    },
    #[error("unknown VHD disk type {0} (expected 2 fixed, 3 dynamic or 4 differencing)")]
    UnknownDiskType(u32),
    #[error("block size {0} is not one the format allows: a power of two, from 512 bytes for a VHD, from 1 MiB to 256 MiB for a VHDX")]
    BadBlockSize(u64),
    #[error("bad disk size {size}: {reason}")]
    BadSize { size: u64, reason: &'static str },
    #[error("BAT entry {index} puts its block at file offset {start}, ending at {end}, past the end of the data area at {limit}")]
    BatEntryPastEnd {
        index: u32,
        start: u64,
        end: u64,
        limit: u64,
    },
    #[error("blocks {first} and {second} overlap in the file at offset {offset}")]
    OverlappingBlocks {
        first: u32,
        second: u32,
        offset: u64,
    },
    #[error("block {index} at file offset {offset} overlaps the {what}")]
    BlockOverlapsMetadata {
        index: u32,
        offset: u64,
        what: &'static str,
    },
    #[error("the BAT has {entries} entries of {block_size} bytes, too few for a disk of {size} bytes (needs {needed})")]
    TooFewBatEntries {
        entries: u32,
        block_size: u32,
        size: u64,
        needed: u64,
    },
    #[error("parent image not found; tried: {}", display_paths(.tried))]
    MissingParent { tried: Vec<PathBuf> },
    #[error("parent {} has unique id {found}, but the child expects {expected}", .parent.display())]
    ParentIdMismatch {
        parent: PathBuf,
        expected: uuid::Uuid,
        found: uuid::Uuid,
    },
    #[error("loop in the parent chain: {} is already in the chain", .path.display())]
    ParentLoop { path: PathBuf },
    #[error("parent {} is not a {expected} (a {expected}'s parent must be one)", .path.display())]
    ParentWrongFormat {
        path: PathBuf,
        expected: &'static str,
    },
    #[error("range {offset}+{len} is outside the virtual disk of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("corrupt {what}: {reason}")]
    Corrupt { what: &'static str, reason: String },
    #[error("{what} digest mismatch: expected {expected}, computed {found}")]
    DigestMismatch {
        what: &'static str,
        expected: Box<str>,
        found: Box<str>,
    },
    #[error("not a vsnap repository (it has no {file}); create one with `vsnap repo init DIR`")]
    NotARepository { file: &'static str },
    #[error("no snapshot matches {0:?}; `vsnap snapshots` lists them")]
    NoSuchSnapshot(String),
    #[error("{prefix:?} matches {count} snapshots; name one by more of its id (`vsnap snapshots` lists them)")]
    AmbiguousSnapshot { prefix: String, count: usize },
    #[error(
        "snapshot {snapshot} has no disk {disk:?}; by position from 1, and by name, it has: {have}"
    )]
    NoSuchDisk {
        snapshot: Box<str>,
        disk: Box<str>,
        have: Box<str>,
    },
    #[error("{} exists already; vsnap does not overwrite it", .0.display())]
    Exists(PathBuf),
    #[error("a symbolic link (or a path leaving the repository) where the repository's own file or directory should be; vsnap never follows links inside a repository")]
    LinkInRepository,
    #[error("expected a {what}, found a {found}")]
    NotRegular {
        what: &'static str,
        found: &'static str,
    },
    #[error("manifest field {field} is {value:?}: {rule}")]
    BadField {
        field: Box<str>,
        value: Box<str>,
        rule: &'static str,
    },
    #[error("{what} claims {claimed} bytes, more than the {limit} it can hold here")]
    TooLarge {
        what: &'static str,
        claimed: u64,
        limit: u64,
    },
    #[error("a memory budget of {memory} bytes is below the floor of {floor} (two chunks of {chunk_size} bytes for each of {workers} workers); give at least that, or fewer threads")]
    MemoryBelowFloor {
        memory: u64,
        floor: u64,
        chunk_size: u64,
        workers: usize,
    },
    #[error("this is a {format} image, which vsnap does not read; {hint}")]
    ForeignFormat {
        format: &'static str,
        hint: &'static str,
    },
    #[error("not a disk image: {0}")]
    NotAnImage(&'static str),
    #[error("the image was opened read-only")]
    ReadOnly,
    #[error("neither VHDX header is valid: header 1: {first}; header 2: {second}")]
    NoValidHeader { first: String, second: String },
    #[error("the VHDX has a required {what} {guid} that vsnap does not know, so it cannot be read safely")]
    UnknownRequired { what: &'static str, guid: String },
    #[error("the VHDX log must be replayed before the image can be read, and cannot be: {reason}")]
    LogReplay { reason: String },
    /// An object store failed or refused a request; the message says what
    /// to do, the client's own error is the source.
    #[error("{reason}")]
    Remote {
        reason: String,
        #[source]
        cause: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },
    /// The message already includes the cause, so it is not also exposed
    /// as `source()` (which would print it twice); match on the kind for it.
    #[error("I/O error: {0}")]
    Io(std::io::Error),
}

fn display_paths(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "no locator names a path".to_owned();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// An [`ErrorKind`] with the file, offset and operation it happened in.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    path: Option<PathBuf>,
    offset: Option<u64>,
    op: Option<&'static str>,
}

impl Error {
    pub fn new(kind: ErrorKind) -> Self {
        Self {
            kind,
            path: None,
            offset: None,
            op: None,
        }
    }

    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    pub fn op(&self) -> Option<&'static str> {
        self.op
    }

    /// Names the file, unless an inner layer (a parent image) already did.
    #[must_use]
    pub fn in_file(mut self, path: &Path) -> Self {
        if self.path.is_none() {
            self.path = Some(path.to_path_buf());
        }
        self
    }

    /// Sets the offset, unless a more precise inner one is already known.
    #[must_use]
    pub fn at(mut self, offset: u64) -> Self {
        if self.offset.is_none() {
            self.offset = Some(offset);
        }
        self
    }

    /// Turns an offset relative to a structure into a file offset.
    #[must_use]
    pub fn rebase(mut self, base: u64) -> Self {
        self.offset = Some(base.saturating_add(self.offset.unwrap_or(0)));
        self
    }

    /// Names the operation, unless an inner layer already did.
    #[must_use]
    pub fn during(mut self, op: &'static str) -> Self {
        if self.op.is_none() {
            self.op = Some(op);
        }
        self
    }

    pub(crate) fn io(err: std::io::Error) -> Self {
        Self::new(ErrorKind::Io(err))
    }

    /// A worker thread panicked (a poisoned lock, a lost result): the
    /// run's outcome cannot be trusted.
    pub(crate) fn worker_panicked() -> Self {
        Self::io(std::io::Error::other("a worker panicked"))
    }
}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Self {
        Self::new(kind)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.path {
            write!(f, "{}: ", path.display())?;
        }
        if let Some(op) = self.op {
            write!(f, "{op}")?;
            match self.offset {
                Some(offset) => write!(f, " at offset {offset}: ")?,
                None => f.write_str(": ")?,
            }
        } else if let Some(offset) = self.offset {
            write!(f, "at offset {offset}: ")?;
        }
        write!(f, "{}", self.kind)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.kind)
    }
}

/// Adds context to results in one call at each I/O site.
pub(crate) trait ResultExt<T> {
    /// For I/O at a place in a file.
    fn ctx(self, path: &Path, offset: u64, op: &'static str) -> Result<T>;
    /// For operations on a whole file (open, stat, flush), where an offset
    /// would only be noise.
    fn ctx_file(self, path: &Path, op: &'static str) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for std::result::Result<T, E> {
    fn ctx(self, path: &Path, offset: u64, op: &'static str) -> Result<T> {
        self.map_err(|e| e.into().in_file(path).at(offset).during(op))
    }

    fn ctx_file(self, path: &Path, op: &'static str) -> Result<T> {
        self.map_err(|e| e.into().in_file(path).during(op))
    }
}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        Self::io(err)
    }
}
