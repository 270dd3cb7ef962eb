//! Filesystem-level ioctls the coordinator and its agent need: freezing a
//! mounted filesystem, thawing it, and cloning a file's extents (reflink).
//! They live here because this is the one module allowed `unsafe`; callers
//! get plain `io::Result`s and interpret the errno themselves (the agent's
//! rules treat `EBUSY` on freeze and `EINVAL` on thaw as done).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` from linux/fs.h; libc
/// does not export them.
const FIFREEZE: libc::Ioctl = 0xC004_5877u32 as libc::Ioctl;
const FITHAW: libc::Ioctl = 0xC004_5878u32 as libc::Ioctl;

fn ioctl_arg(fd: &File, request: libc::Ioctl, arg: libc::c_int) -> io::Result<()> {
    // SAFETY: `fd` is a descriptor `File` owns and keeps open for the call.
    // The requests used here (FIFREEZE, FITHAW, FICLONE) take a plain int by
    // value and read or write no memory of ours.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Freezes the filesystem mounted at the directory `mount` is open on:
/// the kernel flushes it and blocks every writer until [`thaw`].
pub fn freeze(mount: &File) -> io::Result<()> {
    ioctl_arg(mount, FIFREEZE, 0)
}

/// Thaws a filesystem frozen by [`freeze`] (or by anyone else).
pub fn thaw(mount: &File) -> io::Result<()> {
    ioctl_arg(mount, FITHAW, 0)
}

/// Makes `dst` share `src`'s extents (FICLONE): a point-in-time copy that
/// costs O(1) in the file's size, on filesystems with reflink (XFS, btrfs).
pub fn clone_file(src: &File, dst: &File) -> io::Result<()> {
    ioctl_arg(dst, libc::FICLONE, src.as_raw_fd())
}
