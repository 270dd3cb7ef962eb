//! Chunk buffers drawn from a fixed pool: the engine's memory budget.
//!
//! A worker takes a buffer before it claims a chunk and the buffer goes
//! back to the pool when whoever holds it last (a writer, or nobody) drops
//! it. When every buffer is in flight, workers wait: that is the
//! back-pressure that keeps memory flat whatever the number or size of the
//! images.

use crossbeam_channel::{bounded, Receiver, Sender};

#[derive(Debug)]
pub struct BufferPool {
    free: Receiver<Vec<u8>>,
    home: Sender<Vec<u8>>,
    size: usize,
}

impl BufferPool {
    pub fn new(count: usize, size: usize) -> Self {
        let count = count.max(1);
        let (home, free) = bounded(count);
        for _ in 0..count {
            // Capacity `count`, filled with exactly `count` buffers.
            let _ = home.send(vec![0u8; size]);
        }
        Self { free, home, size }
    }

    /// Waits for a free buffer. `None` only if the pool is gone.
    pub fn take(&self) -> Option<Buffer> {
        let data = self.free.recv().ok()?;
        Some(Buffer {
            data,
            len: self.size,
            home: self.home.clone(),
        })
    }
}

/// A chunk's bytes, returned to the pool on drop.
#[derive(Debug)]
pub struct Buffer {
    data: Vec<u8>,
    len: usize,
    home: Sender<Vec<u8>>,
}

impl Buffer {
    /// Uses only the first `len` bytes (the last chunk of a disk is short).
    pub fn truncate(&mut self, len: usize) {
        self.len = len.min(self.data.len());
    }
}

impl std::ops::Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let _ = self.home.send(std::mem::take(&mut self.data));
    }
}
