//! Positional I/O.
//!
//! Every image reader and writer works through [`Storage`], which has no
//! cursor: many threads can read one image at once, and the same open path
//! runs over a real file or over bytes in memory ([`MemStorage`]), so the
//! fuzzer and the property tests exercise exactly the code users run.
//!
//! This is the only module of the crate allowed to contain `unsafe`.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::RwLock;

/// A byte store addressed by offset. (Emptiness is no question anyone asks
/// of it, hence no `is_empty`.)
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync + std::fmt::Debug {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes written data durable.
    fn sync(&self) -> io::Result<()>;
    /// The ranges `[start, end)` in `range` that may hold data, as far as the
    /// store knows; `None` when it cannot tell holes from data.
    fn data_ranges(&self, range: std::ops::Range<u64>) -> io::Result<Option<Vec<(u64, u64)>>> {
        let _ = range;
        Ok(None)
    }
}

impl Storage for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_all()
    }

    fn data_ranges(&self, range: std::ops::Range<u64>) -> io::Result<Option<Vec<(u64, u64)>>> {
        data_ranges(self, range)
    }
}

/// Finds the data ranges of a sparse file with `SEEK_DATA`/`SEEK_HOLE`.
///
/// `lseek` moves the descriptor's cursor, but nothing in vsnap reads through
/// the cursor, so sharing the descriptor stays safe.
fn data_ranges(file: &File, range: std::ops::Range<u64>) -> io::Result<Option<Vec<(u64, u64)>>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = range.start;
    while pos < range.end {
        let Ok(at) = libc::off_t::try_from(pos) else {
            break;
        };
        // SAFETY: lseek takes a plain descriptor that `file` keeps open for
        // the whole call and touches no memory of ours.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                // No data after `pos`: the rest is a hole.
                Some(libc::ENXIO) => Ok(Some(out)),
                // The filesystem cannot say: treat everything as data.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(None),
                _ => Err(err),
            };
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (Ok(data), Ok(hole)) = (u64::try_from(data), u64::try_from(hole)) else {
            return Ok(None);
        };
        if data >= range.end {
            break;
        }
        let end = hole.min(range.end);
        if end <= data {
            break;
        }
        out.push((data, end));
        pos = end;
    }
    Ok(Some(out))
}

/// Starts writing a file's dirty pages to the disk without waiting, so
/// the `fsync` that makes a copy durable finds little left to do: the disk
/// writes while the cores hash. Only a hint; errors surface at `fsync`.
pub fn start_writeback(file: &File) {
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is a descriptor `file` owns and keeps open for the call;
    // sync_file_range reads no memory of ours. Offset 0 and length 0 mean
    // the whole file; SYNC_FILE_RANGE_WRITE only queues writeback.
    let _ = unsafe { libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

/// Allocates a range of a file just before it is written, in one call
/// per chunk: a buffered write into allocated space skips the
/// filesystem's per-page delayed-allocation bookkeeping (on ext4 a
/// quarter of the write's cost), and the file's extents come out in
/// large contiguous runs. Filesystems that cannot preallocate are simply
/// written as before.
pub fn preallocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(at), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    if n == 0 {
        return Ok(());
    }
    // SAFETY: `file` keeps the descriptor open for the call; fallocate
    // reads no memory of ours. Mode FALLOC_FL_KEEP_SIZE leaves the file's
    // length (and so the image's layout) as it was.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, at, n) };
    if r == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
        _ => Err(err),
    }
}

/// Creates a file that must not exist yet, open for reading and writing:
/// vsnap never overwrites an image.
pub fn create_new(path: &std::path::Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
}

/// An in-memory [`Storage`], for fuzzing and tests that must not need files.
#[derive(Debug, Default)]
pub struct MemStorage {
    bytes: RwLock<Vec<u8>>,
}

impl MemStorage {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self {
            bytes: RwLock::new(bytes),
        }
    }

    /// A copy of the current contents.
    pub fn to_vec(&self) -> io::Result<Vec<u8>> {
        Ok(self.bytes.read().map_err(poisoned)?.clone())
    }
}

fn poisoned<T>(_: T) -> io::Error {
    io::Error::other("in-memory storage lock poisoned")
}

fn span(offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
    let end = start.checked_add(len).ok_or(io::ErrorKind::UnexpectedEof)?;
    Ok(start..end)
}

impl Storage for MemStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.bytes.read().map_err(poisoned)?;
        let src = bytes
            .get(span(offset, buf.len())?)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.bytes.write().map_err(poisoned)?;
        let range = span(offset, buf.len())?;
        if bytes.len() < range.end {
            bytes.resize(range.end, 0);
        }
        if let Some(dst) = bytes.get_mut(range) {
            dst.copy_from_slice(buf);
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.read().map_err(poisoned)?.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        self.bytes.write().map_err(poisoned)?.resize(len, 0);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_storage_reads_back_and_refuses_past_end() {
        let s = MemStorage::default();
        s.write_all_at(b"abc", 5).unwrap();
        assert_eq!(s.len().unwrap(), 8);
        let mut buf = [0u8; 4];
        s.read_exact_at(&mut buf, 4).unwrap();
        assert_eq!(&buf, b"\0abc");
        let err = s.read_exact_at(&mut buf, 6).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn sparse_file_reports_its_holes() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(64 << 20).unwrap();
        FileExt::write_all_at(&f, &[1u8; 4096], 16 << 20).unwrap();
        let ranges = data_ranges(&f, 0..64 << 20).unwrap();
        // A filesystem that cannot tell holes may say None; one that can
        // must cover the write and leave the rest out.
        if let Some(ranges) = ranges {
            let w = (16u64 << 20)..(16u64 << 20) + 4096;
            assert!(ranges.iter().any(|(s, e)| *s <= w.start && *e >= w.end));
            let total: u64 = ranges.iter().map(|(s, e)| e - s).sum();
            assert!(total < 64 << 20, "no hole reported: {ranges:?}");
        }
    }
}
