//! zstd in the workers: one reused context per worker.

use super::Stored;
use crate::error::Result;

/// A worker's zstd context and output buffer, reused for every chunk.
pub(super) struct Compress {
    ctx: zstd::bulk::Compressor<'static>,
    out: Vec<u8>,
}

impl Compress {
    pub(super) fn new(level: i32, chunk: usize) -> Result<Self> {
        let ctx = zstd::bulk::Compressor::new(level).map_err(crate::Error::from)?;
        Ok(Self {
            ctx,
            out: Vec::with_capacity(zstd::zstd_safe::compress_bound(chunk)),
        })
    }

    /// Compresses a chunk into what it is stored as: the compressed
    /// bytes, or the raw ones when compression does not shrink it.
    pub(super) fn compress(&mut self, data: &[u8]) -> Result<Stored<'_>> {
        self.out.clear();
        let n = self
            .ctx
            .compress_to_buffer(data, &mut self.out)
            .map_err(crate::Error::from)?;
        Ok(if n < data.len() {
            Stored::Compressed(&self.out[..n])
        } else {
            Stored::Raw
        })
    }
}
