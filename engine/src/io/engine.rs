//! The read engines: io_uring, or plain `pread`, picked at run time.
//!
//! A worker hands its engine every read a chunk needs at once (a chunk of
//! a dynamic VHD is one read per allocated block; of a chain, one per run
//! of a layer). The sync engine issues them one by one; io_uring submits
//! them together and the disk sees them all in flight. Both handle short
//! reads by reading the rest, and report end of file as an error.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// io_uring if the kernel allows it, else sync.
    #[default]
    Auto,
    Uring,
    Sync,
}

/// What runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    Uring,
    Sync,
}

/// Decides the engine once per run. With `Auto`, a kernel without io_uring
/// (or with it disabled by `kernel.io_uring_disabled`) falls back to sync,
/// and the reason is returned for the caller to show; so is the reason
/// when io_uring runs but cannot register buffers (a low
/// `RLIMIT_MEMLOCK`, an old kernel), in which case reads go unregistered.
pub fn probe(mode: IoMode, depth: u32) -> io::Result<(IoKind, Option<String>)> {
    let ring = match mode {
        IoMode::Sync => return Ok((IoKind::Sync, None)),
        IoMode::Uring => io_uring::IoUring::new(depth.max(1))?,
        IoMode::Auto => match io_uring::IoUring::new(depth.max(1)) {
            Ok(r) => r,
            Err(e) => {
                return Ok((
                    IoKind::Sync,
                    Some(format!("io_uring unavailable ({e}); using pread")),
                ))
            }
        },
    };
    let mut fixed = Fixed::new(&ring, 1);
    let probe_buf = AlignedBuf::new(ALIGN);
    fixed.register(&ring, 0, &probe_buf);
    Ok((
        IoKind::Uring,
        fixed.off.map(|why| format!("{why}; using plain reads")),
    ))
}

/// The ring's registered-buffer table, one slot per pool buffer. A
/// registered buffer is pinned once instead of on every read.
#[derive(Debug)]
pub struct Fixed {
    /// What each slot holds: a buffer's address and length.
    slots: Vec<Option<(usize, usize)>>,
    /// Why registration is off, once it failed.
    off: Option<String>,
}

impl Fixed {
    fn new(ring: &io_uring::IoUring, slots: u16) -> Fixed {
        if slots == 0 {
            return Fixed {
                slots: Vec::new(),
                off: Some("no buffer slots".into()),
            };
        }
        match ring.submitter().register_buffers_sparse(u32::from(slots)) {
            Ok(()) => Fixed {
                slots: vec![None; usize::from(slots)],
                off: None,
            },
            Err(e) => Fixed {
                slots: Vec::new(),
                off: Some(format!("io_uring cannot register buffers ({e})")),
            },
        }
    }

    /// Registers `buf` in `slot` unless it is there already; false when
    /// the read must go unregistered.
    fn register(&mut self, ring: &io_uring::IoUring, slot: u16, buf: &[u8]) -> bool {
        if self.off.is_some() {
            return false;
        }
        let want = (buf.as_ptr() as usize, buf.len());
        let Some(entry) = self.slots.get_mut(usize::from(slot)) else {
            return false;
        };
        if *entry == Some(want) {
            return true;
        }
        let iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: the iovec describes `buf`, which the caller keeps
        // allocated for as long as the ring may use the slot: slots hold
        // pool buffers, which outlive the engine (an engine lives within
        // one run, and the run's pool is dropped after its workers). A
        // slot whose buffer changed is registered again before use, so a
        // fixed read never targets memory other than the caller's.
        match unsafe {
            ring.submitter()
                .register_buffers_update(u32::from(slot), &[iov], None)
        } {
            Ok(_) => {
                *entry = Some(want);
                true
            }
            Err(e) => {
                self.off = Some(format!("io_uring cannot register buffers ({e})"));
                false
            }
        }
    }
}

/// One positional read into a caller's buffer.
#[derive(Debug, Clone, Copy)]
pub struct ReadOp<'a> {
    pub file: &'a File,
    pub file_offset: u64,
    pub buf_offset: usize,
    pub len: usize,
}

pub enum Engine {
    Sync,
    Uring {
        ring: Box<io_uring::IoUring>,
        depth: u32,
        fixed: Fixed,
    },
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sync => "Engine::Sync",
            Self::Uring { .. } => "Engine::Uring",
        })
    }
}

impl Engine {
    /// `slots` is how many buffers io_uring may register: the size of the
    /// buffer pool whose buffers are read into, each under its own slot.
    pub fn new(kind: IoKind, depth: u32, slots: u16) -> io::Result<Engine> {
        Ok(match kind {
            IoKind::Sync => Engine::Sync,
            IoKind::Uring => {
                let ring = Box::new(io_uring::IoUring::new(depth.max(1))?);
                let fixed = Fixed::new(&ring, slots);
                Engine::Uring {
                    ring,
                    depth: depth.max(1),
                    fixed,
                }
            }
        })
    }

    /// Whether reads go through registered buffers, or why not.
    pub fn registered_buffers(&self) -> Result<(), String> {
        match self {
            Engine::Sync => Err("sync reads".into()),
            Engine::Uring { fixed, .. } => fixed.off.clone().map_or(Ok(()), Err),
        }
    }

    /// Performs every read in full. On error, returns the index of the
    /// failing op with the error, after all reads in flight have finished
    /// (the kernel must be done with `buf` before this returns). `slot`
    /// names `buf`'s registered-buffer slot (its index in the pool): the
    /// same slot must always be given the same buffer.
    pub fn read(
        &mut self,
        ops: &[ReadOp<'_>],
        buf: &mut [u8],
        slot: Option<u16>,
    ) -> Result<(), (usize, io::Error)> {
        for (i, op) in ops.iter().enumerate() {
            if op
                .buf_offset
                .checked_add(op.len)
                .is_none_or(|end| end > buf.len())
            {
                return Err((
                    i,
                    io::Error::new(io::ErrorKind::InvalidInput, "read outside the buffer"),
                ));
            }
        }
        match self {
            Engine::Sync => {
                for (i, op) in ops.iter().enumerate() {
                    let dst = &mut buf[op.buf_offset..op.buf_offset + op.len];
                    op.file
                        .read_exact_at(dst, op.file_offset)
                        .map_err(|e| (i, e))?;
                }
                Ok(())
            }
            Engine::Uring { ring, depth, fixed } => {
                let index = slot.filter(|&s| fixed.register(ring, s, buf));
                uring_read(ring, *depth, ops, buf, index)
            }
        }
    }
}

fn uring_read(
    ring: &mut io_uring::IoUring,
    depth: u32,
    ops: &[ReadOp<'_>],
    buf: &mut [u8],
    fixed: Option<u16>,
) -> Result<(), (usize, io::Error)> {
    use io_uring::{opcode, types};
    // Bytes done so far for each op; an op is resubmitted for the rest
    // after a short read.
    let mut done = vec![0usize; ops.len()];
    let mut queue: Vec<usize> = (0..ops.len()).rev().collect();
    let mut in_flight = 0usize;
    let mut first_error: Option<(usize, io::Error)> = None;
    let base = buf.as_mut_ptr();
    loop {
        while first_error.is_none() && in_flight < depth as usize {
            let Some(i) = queue.pop() else { break };
            let op = &ops[i];
            let rest = op.len - done[i];
            let len = u32::try_from(rest).unwrap_or(u32::MAX);
            // SAFETY: `buf_offset + len <= buf.len()` was checked for every
            // op, so the pointer stays inside `buf`. `buf` is borrowed
            // mutably for this whole function, and the function does not
            // return until every submitted read has completed (the drain
            // below runs on errors too), so the kernel never writes to it
            // after we give it back.
            let ptr = unsafe { base.add(op.buf_offset + done[i]) };
            let fd = types::Fd(op.file.as_raw_fd());
            let at = op.file_offset + done[i] as u64;
            // A registered buffer covers all of `buf`, so any piece of it
            // reads through the slot.
            let sqe = match fixed {
                Some(slot) => opcode::ReadFixed::new(fd, ptr, len, slot)
                    .offset(at)
                    .build(),
                None => opcode::Read::new(fd, ptr, len).offset(at).build(),
            }
            .user_data(i as u64);
            // SAFETY: the entry refers to `buf` (see above), through its
            // registered slot or not, and to a file descriptor that
            // `op.file` keeps open until we return.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                queue.push(i);
                break;
            }
            in_flight += 1;
        }
        if in_flight == 0 {
            break;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // Nothing more can be awaited through a broken ring; the reads
            // already queued would still complete into `buf`, so wait for
            // them the slow way: the ring is dropped only after they end.
            first_error.get_or_insert((0, e));
            while in_flight > 0 {
                if ring.submit_and_wait(in_flight).is_err() {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                in_flight -= ring.completion().count();
            }
            break;
        }
        let completions: Vec<(usize, i32)> = ring
            .completion()
            .map(|c| (c.user_data() as usize, c.result()))
            .collect();
        for (i, res) in completions {
            in_flight -= 1;
            let Some(op) = ops.get(i) else { continue };
            match res {
                r if r < 0 => {
                    first_error.get_or_insert((i, io::Error::from_raw_os_error(-r)));
                }
                0 => {
                    first_error.get_or_insert((i, io::Error::from(io::ErrorKind::UnexpectedEof)));
                }
                r => {
                    done[i] += r as usize;
                    if done[i] < op.len {
                        queue.push(i);
                    }
                }
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A buffer aligned for `O_DIRECT` (4 KiB, enough for any logical block).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

/// The alignment of every [`AlignedBuf`].
pub const ALIGN: usize = 4096;

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only ever reads, like &Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (at least one alignment unit).
    pub fn new(len: usize) -> AlignedBuf {
        let len = len.max(1).div_ceil(ALIGN) * ALIGN;
        let layout = std::alloc::Layout::from_size_align(len, ALIGN)
            .unwrap_or_else(|_| std::alloc::handle_alloc_error(std::alloc::Layout::new::<u8>()));
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points at `len` initialised (zeroed at allocation)
        // bytes that this value owns.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Ok(layout) = std::alloc::Layout::from_size_align(self.len, ALIGN) {
            // SAFETY: allocated in `new` with this same layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// Opens a file for reading, with `O_DIRECT` when asked.
pub fn open_for_read(path: &std::path::Path, direct: bool) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
        f.as_file().write_all_at(&data, 0).unwrap();
        (f, data)
    }

    #[test]
    fn both_engines_read_the_same_bytes_and_refuse_end_of_file() {
        let (f, data) = file_with(1 << 20);
        let file = f.as_file();
        let ops: Vec<ReadOp<'_>> = (0..40)
            .map(|i| ReadOp {
                file,
                file_offset: i * 25_000,
                buf_offset: (i * 25_000) as usize,
                len: 25_000,
            })
            .collect();
        for (kind, slot) in [
            (IoKind::Sync, None),
            (IoKind::Uring, None),
            (IoKind::Uring, Some(1)),
        ] {
            let Ok(mut engine) = Engine::new(kind, 8, 2) else {
                assert_eq!(kind, IoKind::Uring, "sync always works");
                continue;
            };
            let mut buf = AlignedBuf::new(1 << 20);
            engine.read(&ops, &mut buf, slot).unwrap();
            assert!(buf[..1_000_000] == data[..1_000_000], "{kind:?} {slot:?}");
            if kind == IoKind::Uring {
                // Root (as the tests run in CI) may pin memory: the slot
                // must really be registered, and read through again.
                if running_as_root() {
                    assert_eq!(engine.registered_buffers(), Ok(()));
                }
                buf.fill(0);
                engine.read(&ops, &mut buf, slot).unwrap();
                assert!(buf[..1_000_000] == data[..1_000_000], "again {slot:?}");
            }
            // A read that runs past the end of the file is an error, not
            // silently short.
            let past = [ReadOp {
                file,
                file_offset: (1 << 20) - 100,
                buf_offset: 0,
                len: 4096,
            }];
            let (i, e) = engine.read(&past, &mut buf, slot).unwrap_err();
            assert_eq!((i, e.kind()), (0, io::ErrorKind::UnexpectedEof), "{kind:?}");
        }
    }

    fn running_as_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .map(|s| {
                s.lines()
                    .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false)
    }

    #[test]
    fn aligned_buffers_are_aligned_and_zeroed() {
        let b = AlignedBuf::new(10_000);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert_eq!(b.len(), 12_288);
        assert!(b.iter().all(|&x| x == 0));
    }
}
