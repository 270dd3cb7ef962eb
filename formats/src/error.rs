//! The formats' one error type: an [`ErrorKind`] saying what is wrong with
//! an image, plus the context an operator needs to find it (file, offset,
//! operation).
//!
//! Parsers are pure functions over bytes and do not know which file or at
//! which absolute offset they run, so they report offsets relative to the
//! structure they parse; the open path then rebases them with
//! [`Error::rebase`] and names the file with [`Error::in_file`].

use std::path::PathBuf;

/// What went wrong. Tests match on these, so each distinct failure has its
/// own variant rather than a formatted string.
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
    /// An image whose bytes come from elsewhere than a file (a snapshot in
    /// a repository) failed there: that layer's own error, whole, so the
    /// layer gets it back unchanged (`downcast`) when it comes up again.
    #[error(transparent)]
    Backing(Box<dyn std::error::Error + Send + Sync + 'static>),
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

vsnap_error::context_error!(ErrorKind, Io);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_cause_appears_once_in_the_chain() {
        let e = Error::from(std::io::Error::other("short read"))
            .in_file(std::path::Path::new("vm.vhd"))
            .at(512)
            .during("read BAT");
        let text = vsnap_error::chain(&e);
        assert_eq!(
            text,
            "vm.vhd: read BAT at offset 512: I/O error: short read"
        );
    }
}
