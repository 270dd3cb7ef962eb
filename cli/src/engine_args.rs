//! The engine's tuning flags, shared by every command that streams images.

use vsnap_engine::pipeline::Options;

use crate::units::parse_size;

#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Chunk size: a power of two of at least 1K.
    #[arg(long, value_parser = parse_size, default_value = "4M")]
    pub chunk_size: u64,
    /// Worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Memory for chunk buffers, all images together; memory use does not
    /// grow with the number or size of images.
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    pub memory: u64,
}

impl EngineArgs {
    pub fn options(&self, keep_chunks: bool) -> Options {
        Options {
            chunk_size: self.chunk_size,
            threads: self.threads,
            keep_chunks,
            memory: self.memory,
            compress: None,
        }
    }
}
