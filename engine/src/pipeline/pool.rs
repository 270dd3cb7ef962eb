//! Chunk buffers drawn from a fixed pool: the engine's memory budget.
//!
//! A worker takes a buffer before it claims a chunk and the buffer goes
//! back to the pool when whoever holds it last (a sink, or nobody) drops
//! it. When every buffer is in flight, workers wait: that is the
//! back-pressure that keeps memory flat whatever the number or size of the
//! images.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::io::AlignedBuf;

/// A buffer and its index in the pool, which names its registered-buffer
/// slot in each worker's io_uring.
type Slotted = (AlignedBuf, usize);

/// The most buffers a ring registers (the kernel's table limit); buffers
/// past it are read into unregistered.
const MAX_SLOTS: usize = 1 << 14;

/// Buffers are allocated on demand, up to `limit`: a run that keeps only a
/// few in flight (every sink in vsnap hands each straight back) touches
/// only those few, and a sink that held on to them would be capped at the
/// budget.
///
/// The free list is a stack: the buffer returned last is handed out
/// first, still in cache and long since faulted in. A queue would cycle
/// through every buffer ever made, and on a VM each first touch of a page
/// is a fault the hypervisor serves too; at a 256 MiB budget that cost
/// more than the copy itself.
#[derive(Debug)]
pub struct BufferPool {
    shared: Arc<Shared>,
    size: usize,
    limit: usize,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<Free>,
    returned: Condvar,
}

#[derive(Debug, Default)]
struct Free {
    stack: Vec<Slotted>,
    made: usize,
}

impl Shared {
    /// The lock survives a panicking holder: the free list is a plain
    /// vector, never left half-updated.
    fn lock(&self) -> MutexGuard<'_, Free> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BufferPool {
    pub fn new(limit: usize, size: usize) -> Self {
        Self {
            shared: Arc::default(),
            size,
            limit: limit.max(1),
        }
    }

    /// The free buffer returned last, a new one while under the limit, or
    /// else waits for one to come back.
    pub fn take(&self) -> Buffer {
        let mut free = self.shared.lock();
        let data = loop {
            if let Some(d) = free.stack.pop() {
                break d;
            }
            if free.made < self.limit {
                let slot = free.made;
                free.made += 1;
                drop(free);
                break (AlignedBuf::new(self.size), slot);
            }
            free = self
                .shared
                .returned
                .wait(free)
                .unwrap_or_else(|e| e.into_inner());
        };
        Buffer {
            data: Some(data),
            len: self.size,
            home: Arc::clone(&self.shared),
        }
    }

    /// How many registered-buffer slots a ring needs for this pool.
    pub fn slots(&self) -> u16 {
        self.limit.min(MAX_SLOTS) as u16
    }

    /// How many buffers exist: the pool's high-water mark.
    pub fn allocated(&self) -> usize {
        self.shared.lock().made
    }
}

/// A chunk's bytes, returned to the pool on drop.
#[derive(Debug)]
pub struct Buffer {
    /// Always `Some` until the drop hands it back.
    data: Option<Slotted>,
    len: usize,
    home: Arc<Shared>,
}

impl Buffer {
    /// Uses only the first `len` bytes (the last chunk of a disk is short).
    pub fn truncate(&mut self, len: usize) {
        self.len = len.min(self.data.as_ref().map_or(0, |d| d.0.len()));
    }

    /// The whole aligned allocation, past `len` too: an `O_DIRECT` read of
    /// a disk's short tail rounds up into it.
    pub fn full(&mut self) -> &mut [u8] {
        self.data.as_mut().map_or(&mut [], |d| &mut d.0[..])
    }

    /// The buffer's registered-buffer slot, if it has one.
    pub fn slot(&self) -> Option<u16> {
        self.data
            .as_ref()
            .and_then(|d| u16::try_from(d.1).ok())
            .filter(|&s| usize::from(s) < MAX_SLOTS)
    }
}

impl std::ops::Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.data.as_ref().map_or(&[], |d| &d.0[..self.len])
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        self.data.as_mut().map_or(&mut [], |d| &mut d.0[..len])
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some(data) = self.data.take() {
            self.home.lock().stack.push(data);
            self.home.returned.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_made_on_demand_and_capped() {
        let pool = BufferPool::new(3, 16);
        let a = pool.take();
        drop(a);
        let b = pool.take();
        assert_eq!(pool.allocated(), 1, "a returned buffer is reused");
        let c = pool.take();
        let d = pool.take();
        assert_eq!(pool.allocated(), 3);
        // At the cap, take waits until a buffer comes back.
        let waiter = std::thread::scope(|s| {
            let h = s.spawn(|| pool.take().len());
            std::thread::sleep(std::time::Duration::from_millis(50));
            drop(b);
            h.join().unwrap()
        });
        assert_eq!(waiter, 16);
        assert_eq!(pool.allocated(), 3);
        drop((c, d));
    }

    #[test]
    fn the_buffer_returned_last_is_reused_first() {
        let pool = BufferPool::new(4, 16);
        let (a, b, c) = (pool.take(), pool.take(), pool.take());
        let (sa, sb) = (a.slot(), b.slot());
        drop(b);
        drop(a);
        assert_eq!(pool.take().slot(), sa, "the most recent return, still warm");
        // Dropped at the end of that statement: it is on top again.
        assert_eq!(pool.take().slot(), sa);
        let _hold = pool.take();
        assert_eq!(pool.take().slot(), sb);
        assert_eq!(pool.allocated(), 3, "no new buffer while one is free");
        drop(c);
    }
}
