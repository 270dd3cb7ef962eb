//! The read engines (io_uring, or plain positional reads), the aligned
//! buffers they fill, and the few file-system calls a repository needs.
//! Positional I/O on images themselves is `vsnap_formats::storage`.
//!
//! This is the only module allowed to contain `unsafe`.
#![allow(unsafe_code)]

mod engine;
pub mod fiemap;

pub use engine::{open_for_read, probe, AlignedBuf, Engine, IoKind, IoMode, ReadOp, ALIGN};

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Flushes the whole filesystem that holds `file`: one barrier that makes
/// every file a repository write wrote durable (data and renames), instead
/// of one `fsync` per chunk.
pub fn sync_filesystem(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is a descriptor `file` owns and keeps open for the call;
    // syncfs reads no memory of ours.
    if unsafe { libc::syncfs(fd) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens a regular file for reading without following a link at its
/// name and without blocking on a FIFO; anything but a regular file is
/// refused.
pub fn open_regular_nofollow(path: &std::path::Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if f.metadata()?.is_file() {
        Ok(f)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ))
    }
}

/// Renames `from` to `to` only if `to` does not exist, atomically
/// (`renameat2(RENAME_NOREPLACE)`); where the filesystem lacks that, a
/// hard link (which fails on an existing name) and an unlink do the same.
/// An existing `to` is `AlreadyExists`.
pub fn rename_noreplace(from: &std::path::Path, to: &std::path::Path) -> io::Result<()> {
    use rustix::fs::{RenameFlags, CWD};
    match rustix::fs::renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOSYS) => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        Err(e) => Err(e.into()),
    }
}
