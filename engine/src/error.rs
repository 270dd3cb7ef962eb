//! The engine's one error type: an [`ErrorKind`] plus the file, offset and
//! operation. A disk image's own errors keep their kind and context
//! ([`ErrorKind::Format`]).

use std::path::PathBuf;

/// What went wrong. Tests match on these, so each distinct failure has its
/// own variant rather than a formatted string.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The image could not be read: its own error, with its context
    /// lifted into this one's.
    #[error(transparent)]
    Format(Box<vsnap_formats::ErrorKind>),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The work was asked to stop ([`crate::pipeline::Progress::request_stop`]).
    #[error("stopped on request before the disk was read whole")]
    Stopped,
    #[error(
        "truncated: {what} needs {needed} bytes at offset {at}, but only {available} are there"
    )]
    Truncated {
        what: &'static str,
        needed: u64,
        at: u64,
        available: u64,
    },
    #[error("{what} digest mismatch: expected {expected}, computed {found}")]
    DigestMismatch {
        what: &'static str,
        expected: Box<str>,
        found: Box<str>,
    },
    #[error("{} exists already; vsnap does not overwrite it", .0.display())]
    Exists(PathBuf),
    #[error("a memory budget of {memory} bytes is below the floor of {floor} (two chunks of {chunk_size} bytes for each of {workers} workers); give at least that, or fewer threads")]
    MemoryBelowFloor {
        memory: u64,
        floor: u64,
        chunk_size: u64,
        workers: usize,
    },
    /// A sink (the repository) failed: its own error, whole, so the sink's
    /// caller gets it back unchanged (`downcast`).
    #[error(transparent)]
    Sink(Box<dyn std::error::Error + Send + Sync + 'static>),
    /// The message already includes the cause, so it is not also exposed
    /// as `source()` (which would print it twice); match on the kind for it.
    #[error("I/O error: {0}")]
    Io(std::io::Error),
}

vsnap_error::context_error!(ErrorKind, Io);

impl From<vsnap_formats::Error> for Error {
    fn from(err: vsnap_formats::Error) -> Self {
        let (kind, parts) = err.into_parts();
        Error::lift(kind, parts, |k| ErrorKind::Format(Box::new(k)))
    }
}

impl Error {
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
    use super::*;

    #[test]
    fn a_lifted_cause_appears_once_in_the_chain() {
        let image = vsnap_formats::Error::from(std::io::Error::other("short read"))
            .in_file(std::path::Path::new("vm.vhd"))
            .at(512)
            .during("read BAT");
        let lifted = Error::from(image).during("copy");
        let text = vsnap_error::chain(&lifted);
        assert_eq!(
            text,
            "vm.vhd: read BAT at offset 512: I/O error: short read"
        );
        assert!(lifted.format_kind().is_some());
    }
}
