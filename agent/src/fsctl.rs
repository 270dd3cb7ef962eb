//! Freezing and thawing a mounted filesystem (FIFREEZE, FITHAW). No
//! well-kept crate wraps these two ioctls (rustix has FICLONE, not
//! them), so this is the agent's one module allowed `unsafe`. Callers get
//! plain `io::Result`s and interpret the errno themselves (the agent's
//! rules treat `EBUSY` on freeze and `EINVAL` on thaw as done).
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` from linux/fs.h; libc
/// does not export them.
const FIFREEZE: libc::Ioctl = 0xC004_5877u32 as libc::Ioctl;
const FITHAW: libc::Ioctl = 0xC004_5878u32 as libc::Ioctl;

fn ioctl_noarg(fd: &File, request: libc::Ioctl) -> io::Result<()> {
    // SAFETY: `fd` is a descriptor `File` owns and keeps open for the call.
    // FIFREEZE and FITHAW take an int argument by value, which the kernel
    // ignores, and read or write no memory of ours.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, 0 as libc::c_int) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Freezes the filesystem mounted at the directory `mount` is open on:
/// the kernel flushes it and blocks every writer until [`thaw`].
pub fn freeze(mount: &File) -> io::Result<()> {
    ioctl_noarg(mount, FIFREEZE)
}

/// Thaws a filesystem frozen by [`freeze`] (or by anyone else).
pub fn thaw(mount: &File) -> io::Result<()> {
    ioctl_noarg(mount, FITHAW)
}
