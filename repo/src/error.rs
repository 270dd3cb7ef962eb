//! The repository's one error type: an [`ErrorKind`] plus the file, offset
//! and operation. Errors of the layers below (a disk image's, the engine's)
//! keep their kind and context ([`ErrorKind::Format`], [`ErrorKind::Engine`]).

use std::path::PathBuf;

/// What went wrong. Tests match on these, so each distinct failure has its
/// own variant rather than a formatted string.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A disk image could not be read: its own error, with its context
    /// lifted into this one's.
    #[error(transparent)]
    Format(Box<vsnap_formats::ErrorKind>),
    /// The engine failed: its own error, with its context lifted.
    #[error(transparent)]
    Engine(Box<vsnap_engine::ErrorKind>),
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
    #[error("the {count} pack index(es) hold {bytes} bytes, about {need} bytes of memory once read, over the {limit} this repository allows (index_memory in its config): a bucket this large needs a larger ceiling, and objects someone else put under packindex/ are damage to remove")]
    IndexMemory {
        count: usize,
        bytes: u64,
        need: u64,
        limit: u64,
    },
    /// A sealed blob that does not open: tampered with, cut short, moved
    /// to another name or kind, or sealed with another key.
    #[error("sealed {what}: {reason}")]
    Unsealed { what: &'static str, reason: String },
    #[error("{what} claims {claimed} bytes, more than the {limit} it can hold here")]
    TooLarge {
        what: &'static str,
        claimed: u64,
        limit: u64,
    },
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

vsnap_error::context_error!(ErrorKind, Io);

impl From<vsnap_formats::Error> for Error {
    fn from(err: vsnap_formats::Error) -> Self {
        let (kind, parts) = err.into_parts();
        from_format(kind, parts)
    }
}

impl From<vsnap_engine::Error> for Error {
    fn from(err: vsnap_engine::Error) -> Self {
        let (kind, parts) = err.into_parts();
        match kind {
            vsnap_engine::ErrorKind::Sink(ours) => returned(ours, parts),
            // A format error that passed through the engine is still a
            // format error: one place to match it, whichever way it came.
            vsnap_engine::ErrorKind::Format(kind) => from_format(*kind, parts),
            kind => Error::lift(kind, parts, |k| ErrorKind::Engine(Box::new(k))),
        }
    }
}

type Parts = (Option<PathBuf>, Option<u64>, Option<&'static str>);

fn from_format(kind: vsnap_formats::ErrorKind, parts: Parts) -> Error {
    match kind {
        vsnap_formats::ErrorKind::Backing(ours) => returned(ours, parts),
        kind => Error::lift(kind, parts, |k| ErrorKind::Format(Box::new(k))),
    }
}

/// A repository error the engine or a format carried for us (the
/// repository is their sink, or the storage behind an image), given back as
/// it was, with what they added of context where it said nothing.
fn returned(
    carried: Box<dyn std::error::Error + Send + Sync + 'static>,
    (path, offset, op): Parts,
) -> Error {
    let mut err = match carried.downcast::<Error>() {
        Ok(ours) => *ours,
        Err(other) => Error::new(ErrorKind::Io(std::io::Error::other(other))),
    };
    if let Some(path) = path {
        err = err.in_file(&path);
    }
    if let Some(offset) = offset {
        err = err.at(offset);
    }
    if let Some(op) = op {
        err = err.during(op);
    }
    err
}

/// The repository as the engine's sink: its error goes down whole.
impl From<Error> for vsnap_engine::Error {
    fn from(err: Error) -> Self {
        vsnap_engine::Error::new(vsnap_engine::ErrorKind::Sink(Box::new(err)))
    }
}

/// The repository as the storage behind an image: its error goes down whole.
impl From<Error> for vsnap_formats::Error {
    fn from(err: Error) -> Self {
        vsnap_formats::Error::new(vsnap_formats::ErrorKind::Backing(Box::new(err)))
    }
}

impl Error {
    /// Whether this is damage in what was read (a file or object that is
    /// missing, malformed, of the wrong kind, or fails its digest), not a
    /// store that could not be reached or refused: what gc steps around
    /// and reports, where a failure to reach the store stops it.
    pub fn is_damage(&self) -> bool {
        match self.kind() {
            ErrorKind::Remote { .. } | ErrorKind::IndexMemory { .. } => false,
            ErrorKind::Io(e) => e.kind() == std::io::ErrorKind::NotFound,
            _ => true,
        }
    }

    /// The disk image's own error kind, when that is what failed.
    pub fn format_kind(&self) -> Option<&vsnap_formats::ErrorKind> {
        match self.kind() {
            ErrorKind::Format(kind) => Some(kind),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    use vsnap_error::chain;

    #[test]
    fn a_format_error_keeps_its_kind_and_context_through_the_engine() {
        let inner = vsnap_formats::Error::new(vsnap_formats::ErrorKind::NotAnImage("empty"))
            .in_file(std::path::Path::new("d.vhd"))
            .at(512)
            .during("read image");
        let text = inner.to_string();
        let via_engine = Error::from(vsnap_engine::Error::from(inner));
        assert_eq!(via_engine.to_string(), text);
        assert!(matches!(
            via_engine.format_kind(),
            Some(vsnap_formats::ErrorKind::NotAnImage("empty"))
        ));
        assert_eq!(via_engine.path(), Some(std::path::Path::new("d.vhd")));
    }

    #[test]
    fn a_repository_error_sent_down_comes_back_whole() {
        let ours = Error::new(ErrorKind::Remote {
            reason: "the bucket refused the read".into(),
            cause: Some(Box::new(std::io::Error::other("403"))),
        })
        .during("get pack");
        let down = vsnap_engine::Error::from(ours).during("put chunk");
        // The engine's chain already says it once, the cause once.
        assert_eq!(chain(&down).matches("403").count(), 1);
        let back = Error::from(down);
        assert!(matches!(back.kind(), ErrorKind::Remote { .. }));
        assert_eq!(back.op(), Some("get pack"));
        assert_eq!(chain(&back), "get pack: the bucket refused the read: 403");
        // And through an image whose storage is the repository.
        let image = vsnap_formats::Error::from(back).in_file(std::path::Path::new("snap:disk"));
        let back = Error::from(image);
        assert!(matches!(back.kind(), ErrorKind::Remote { .. }));
        assert_eq!(back.path(), Some(std::path::Path::new("snap:disk")));
        assert_eq!(chain(&back).matches("403").count(), 1);
    }
}
