//! What `hash` and `copy` report, as `--json` prints it: the shapes
//! scripts rely on, built once from the pipeline's results.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{ChunkKind, CopyResult, ImageDigest};

/// One chunk of an image, as `hash --chunks` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkReport {
    pub offset: u64,
    pub length: u64,
    pub kind: ChunkKind,
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored: Option<u64>,
}

/// An image hashed.
#[derive(Debug, Clone, Serialize)]
pub struct DigestReport {
    pub path: PathBuf,
    pub digest: String,
    pub virtual_size: u64,
    pub bytes_read: u64,
    pub data_chunks: u64,
    pub zero_chunks: u64,
    pub unallocated_chunks: u64,
    /// With compression: what the data chunks would be stored as.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<u64>,
    /// With the chunks kept: each one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunks: Option<Vec<ChunkReport>>,
}

impl DigestReport {
    /// `compressed`: the run compressed, so stored sizes mean something;
    /// `chunks`: it kept every chunk's record.
    pub fn new(path: &Path, d: &ImageDigest, compressed: bool, chunks: bool) -> DigestReport {
        DigestReport {
            path: path.to_path_buf(),
            digest: d.digest.to_hex().to_string(),
            virtual_size: d.virtual_size,
            bytes_read: d.bytes_read,
            data_chunks: d.data_chunks,
            zero_chunks: d.zero_chunks,
            unallocated_chunks: d.unallocated_chunks,
            stored_bytes: compressed.then_some(d.stored_bytes),
            chunks: chunks.then(|| {
                d.chunks
                    .iter()
                    .map(|c| ChunkReport {
                        offset: c.offset,
                        length: c.length,
                        kind: c.kind,
                        id: c.id.map(|h| h.to_hex().to_string()),
                        stored: c.stored,
                    })
                    .collect()
            }),
        }
    }
}

/// An image copied.
#[derive(Debug, Clone, Serialize)]
pub struct CopyReport {
    pub source: PathBuf,
    pub target: PathBuf,
    pub format: &'static str,
    /// The virtual disk's digest, the source's and the copy's.
    pub digest: String,
    /// What `b3sum` prints for the copy's file.
    pub file_digest: String,
    pub virtual_size: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Whether the copy was read back and its digest checked.
    pub verified: bool,
}

impl CopyReport {
    pub fn new(source: &Path, r: &CopyResult, verified: bool) -> CopyReport {
        CopyReport {
            source: source.to_path_buf(),
            target: r.target.clone(),
            format: r.format.name(),
            digest: r.source.digest.to_hex().to_string(),
            file_digest: r.file_digest.to_hex().to_string(),
            virtual_size: r.source.virtual_size,
            bytes_read: r.source.bytes_read,
            bytes_written: r.bytes_written,
            verified,
        }
    }
}
