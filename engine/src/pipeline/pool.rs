//! Chunk buffers drawn from a fixed pool: the engine's memory budget.
//!
//! A worker takes a buffer before it claims a chunk and the buffer goes
//! back to the pool when whoever holds it last (a writer, or nobody) drops
//! it. When every buffer is in flight, workers wait: that is the
//! back-pressure that keeps memory flat whatever the number or size of the
//! images.

use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::io::AlignedBuf;

/// A buffer and its index in the pool, which names its registered-buffer
/// slot in each worker's io_uring.
type Slotted = (AlignedBuf, usize);

/// The most buffers a ring registers (the kernel's table limit); buffers
/// past it are read into unregistered.
const MAX_SLOTS: usize = 1 << 14;

/// Buffers are allocated on demand, up to `limit`: a run that keeps only a
/// few in flight (hashing, where each goes straight back) touches only
/// those few, and a run that holds many (writers putting chunks in order)
/// is capped at the budget.
#[derive(Debug)]
pub struct BufferPool {
    free: Receiver<Slotted>,
    home: Sender<Slotted>,
    size: usize,
    limit: usize,
    made: AtomicUsize,
}

impl BufferPool {
    pub fn new(limit: usize, size: usize) -> Self {
        let limit = limit.max(1);
        let (home, free) = bounded(limit);
        Self {
            free,
            home,
            size,
            limit,
            made: AtomicUsize::new(0),
        }
    }

    /// A free buffer, a new one while under the limit, or else waits for
    /// one to come back. `None` only if the pool is gone.
    pub fn take(&self) -> Option<Buffer> {
        let data = match self.free.try_recv() {
            Ok(d) => d,
            Err(_) => {
                let made = self.made.fetch_add(1, Ordering::Relaxed);
                if made < self.limit {
                    (AlignedBuf::new(self.size), made)
                } else {
                    self.made.fetch_sub(1, Ordering::Relaxed);
                    self.free.recv().ok()?
                }
            }
        };
        Some(Buffer {
            data: Some(data),
            len: self.size,
            home: self.home.clone(),
        })
    }

    /// How many registered-buffer slots a ring needs for this pool.
    pub fn slots(&self) -> u16 {
        self.limit.min(MAX_SLOTS) as u16
    }

    /// How many buffers exist: the pool's high-water mark.
    pub fn allocated(&self) -> usize {
        self.made.load(Ordering::Relaxed).min(self.limit)
    }
}

/// A chunk's bytes, returned to the pool on drop.
#[derive(Debug)]
pub struct Buffer {
    /// Always `Some` until the drop hands it back.
    data: Option<Slotted>,
    len: usize,
    home: Sender<Slotted>,
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
            let _ = self.home.send(data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_made_on_demand_and_capped() {
        let pool = BufferPool::new(3, 16);
        let a = pool.take().unwrap();
        drop(a);
        let b = pool.take().unwrap();
        assert_eq!(pool.allocated(), 1, "a returned buffer is reused");
        let c = pool.take().unwrap();
        let d = pool.take().unwrap();
        assert_eq!(pool.allocated(), 3);
        // At the cap, take waits until a buffer comes back.
        let waiter = std::thread::scope(|s| {
            let h = s.spawn(|| pool.take().map(|x| x.len()));
            std::thread::sleep(std::time::Duration::from_millis(50));
            drop(b);
            h.join().unwrap()
        });
        assert_eq!(waiter, Some(16));
        assert_eq!(pool.allocated(), 3);
        drop((c, d));
    }
}
