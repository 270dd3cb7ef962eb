//! FIEMAP: where a file's bytes lie on the device, extent by extent.
//!
//! Two reflink clones of one file share the physical blocks that were not
//! written between the two clones, so comparing their maps tells which file
//! ranges changed without reading them (see [`crate::cbt`]). The ioctl is
//! one call, kept here in the module allowed `unsafe` rather than behind a
//! dependency, so that its flags (a sync first; shared, unknown and encoded
//! extents reported as such) and its continuation are ours to check.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// One extent as the kernel reports it: `length` bytes of the file from
/// `logical` lie at `physical` on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileExtent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    pub flags: u32,
}

/// The last extent of the file.
pub const FLAG_LAST: u32 = 0x1;
/// The location is not known yet (also set with DELALLOC).
pub const FLAG_UNKNOWN: u32 = 0x2;
/// Delayed allocation: no block on the device yet.
pub const FLAG_DELALLOC: u32 = 0x4;
/// The data is compressed or otherwise encoded: the physical range is not
/// the bytes themselves.
pub const FLAG_ENCODED: u32 = 0x8;
pub const FLAG_ENCRYPTED: u32 = 0x80;
pub const FLAG_NOT_ALIGNED: u32 = 0x100;
/// Stored inside metadata (an inode's inline data): no block of its own.
pub const FLAG_INLINE: u32 = 0x200;
pub const FLAG_TAIL: u32 = 0x400;
/// Allocated, not written: reads as zeros.
pub const FLAG_UNWRITTEN: u32 = 0x800;
pub const FLAG_MERGED: u32 = 0x1000;
/// The blocks are shared with another file (or another place in this one).
pub const FLAG_SHARED: u32 = 0x2000;

/// Flush dirty pages first, so delayed allocations have blocks.
const FLAG_SYNC: u32 = 0x1;

/// `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;

/// Extents asked for per call: 256 × 56 bytes is 14 KiB.
const BATCH: usize = 256;

/// `struct fiemap_extent` of `<linux/fiemap.h>`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

/// `struct fiemap` with its flexible array of [`BATCH`] extents.
#[repr(C)]
struct Request {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [RawExtent; BATCH],
}

/// Every extent of `file`, in logical order, after flushing its dirty
/// pages. `Unsupported` where the filesystem has no FIEMAP.
pub fn fiemap(file: &File) -> io::Result<Vec<FileExtent>> {
    let mut req = Box::new(Request {
        start: 0,
        length: 0,
        flags: 0,
        mapped_extents: 0,
        extent_count: BATCH as u32,
        reserved: 0,
        extents: [RawExtent::default(); BATCH],
    });
    let mut out: Vec<FileExtent> = Vec::new();
    let mut start = 0u64;
    loop {
        req.start = start;
        req.length = u64::MAX - start;
        req.flags = FLAG_SYNC;
        req.mapped_extents = 0;
        req.extent_count = BATCH as u32;
        // SAFETY: `req` is a live, exclusively borrowed `struct fiemap`
        // laid out as the kernel's (repr(C), u64 and u32 fields), followed
        // by room for `extent_count` extents, which is all the kernel
        // writes; `file` keeps the descriptor open for the call.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                FS_IOC_FIEMAP as _,
                std::ptr::from_mut::<Request>(&mut req),
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) => Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "the filesystem has no FIEMAP",
                )),
                _ => Err(err),
            };
        }
        let n = (req.mapped_extents as usize).min(BATCH);
        if n == 0 {
            return Ok(out);
        }
        for raw in &req.extents[..n] {
            out.push(FileExtent {
                logical: raw.logical,
                physical: raw.physical,
                length: raw.length,
                flags: raw.flags,
            });
        }
        let Some(&last) = out.last() else {
            return Ok(out);
        };
        if last.flags & FLAG_LAST != 0 {
            return Ok(out);
        }
        let next = last.logical.saturating_add(last.length);
        if next <= start {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("FIEMAP made no progress past offset {start}"),
            ));
        }
        start = next;
    }
}
