//! Reading and writing the repository's files: chunks, indexes and
//! manifests, each written whole under `tmp/` and renamed into place.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::blob::{self, BlobKind, Encoding, HEADER_LEN};
use super::index::Index;
use super::manifest::Manifest;
use super::{Durable, Repository};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::pipeline::Stored;

/// An index plaintext larger than this is refused before it is allocated:
/// 33 bytes a cell, so this is a 2 TiB disk at 1 KiB chunks.
const INDEX_LIMIT: u64 = 33 << 31;

/// What a snapshot listing found: a manifest, or why it could not be read.
#[derive(Debug)]
pub struct Listed {
    pub id: String,
    pub path: PathBuf,
    pub manifest: Result<Manifest>,
}

impl Repository {
    pub fn chunk_path(&self, id: &blake3::Hash) -> PathBuf {
        let hex = id.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(hex.as_str())
    }

    pub fn index_path(&self, hex: &str) -> PathBuf {
        self.root.join("indexes").join(hex)
    }

    pub fn manifest_path(&self, id: &str) -> PathBuf {
        self.root.join("snapshots").join(format!("{id}.json"))
    }

    /// Whether a whole chunk is stored under `id`: its header must parse
    /// and its length match the file's. A damaged or truncated file counts
    /// as absent, so the next backup writes the chunk again.
    pub fn has_chunk(&self, id: &blake3::Hash) -> Result<bool> {
        let path = self.chunk_path(id);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io(e).in_file(&path).during("look up chunk")),
        };
        let mut head = [0u8; HEADER_LEN];
        if file.read_exact_at(&mut head, 0).is_err() {
            return Ok(false);
        }
        let len = file.metadata().ctx_file(&path, "look up chunk")?.len();
        Ok(blob::parse_header(BlobKind::Chunk, &head).is_ok_and(|h| h.blob_len() == len))
    }

    /// Stores a chunk; `plain` is its plaintext, `stored` what the worker's
    /// zstd made of it. Returns the bytes written. The data is not fsynced
    /// here: the backup's one `syncfs` does it before the manifest.
    pub fn write_chunk(&self, id: &blake3::Hash, plain: &[u8], stored: Stored<'_>) -> Result<u64> {
        let (encoding, payload) = match stored {
            Stored::Compressed(z) => (Encoding::Zstd, z),
            Stored::Raw => (Encoding::Raw, plain),
        };
        let header = blob::encode_header(BlobKind::Chunk, encoding, payload, plain.len() as u64);
        self.place(
            &self.chunk_path(id),
            &[&header, payload],
            Durable::Later("chunk"),
        )?;
        Ok((HEADER_LEN + payload.len()) as u64)
    }

    /// Reads a chunk into `out` (its plaintext length), checking its CRC
    /// and that its plaintext hashes to its name.
    pub fn read_chunk(&self, id: &blake3::Hash, out: &mut [u8]) -> Result<()> {
        let path = self.chunk_path(id);
        let bytes = std::fs::read(&path).ctx_file(&path, "read chunk")?;
        check_chunk(id, &bytes, out).map_err(|e| e.in_file(&path))
    }

    /// Writes an index; returns the BLAKE3 of its plaintext, its name.
    pub fn write_index(&self, index: &Index) -> Result<blake3::Hash> {
        let plain = index.to_bytes();
        let digest = blake3::hash(&plain);
        let path = self.index_path(digest.to_hex().as_str());
        if path.exists() {
            return Ok(digest);
        }
        let (header, payload) = blob::encode(BlobKind::Index, &plain, 3)?;
        self.place(&path, &[&header, &payload], Durable::Later("index"))?;
        Ok(digest)
    }

    /// Reads an index and checks that its plaintext hashes to its name.
    pub fn read_index(&self, hex: &str) -> Result<Index> {
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ErrorKind::Corrupt {
                what: "manifest",
                reason: format!("{hex:?} is not an index name"),
            }
            .into());
        }
        let path = self.index_path(hex);
        let bytes = std::fs::read(&path).ctx_file(&path, "read index")?;
        let plain =
            blob::decode(BlobKind::Index, &bytes, INDEX_LIMIT).map_err(|e| e.in_file(&path))?;
        let computed = blake3::hash(&plain).to_hex();
        if computed.as_str() != hex {
            return Err(Error::from(ErrorKind::DigestMismatch {
                what: "index",
                expected: hex.into(),
                found: computed.to_string().into(),
            })
            .in_file(&path));
        }
        Index::parse(&plain).map_err(|e| e.in_file(&path))
    }

    /// Commits a snapshot: the manifest is written last, durably, and the
    /// snapshot exists from the rename on.
    pub fn write_manifest(&self, manifest: &Manifest) -> Result<()> {
        let bytes = manifest.to_bytes()?;
        self.place(&self.manifest_path(&manifest.id), &[&bytes], Durable::Now)
    }

    pub fn read_manifest(&self, path: &Path) -> Result<Manifest> {
        let bytes = std::fs::read(path).ctx_file(path, "read manifest")?;
        Manifest::parse(&bytes).map_err(|e| e.in_file(path))
    }

    /// Every snapshot, oldest first; a manifest that cannot be read is
    /// listed with its error rather than hidden.
    pub fn list(&self) -> Result<Vec<Listed>> {
        let dir = self.root.join("snapshots");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).ctx_file(&dir, "list snapshots")? {
            let entry = entry.ctx_file(&dir, "list snapshots")?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            let path = entry.path();
            out.push(Listed {
                id: id.to_owned(),
                manifest: self.read_manifest(&path),
                path,
            });
        }
        out.sort_by(|a, b| {
            let time = |l: &Listed| l.manifest.as_ref().map(|m| m.time.clone()).ok();
            time(a).cmp(&time(b)).then_with(|| a.id.cmp(&b.id))
        });
        Ok(out)
    }

    /// The snapshot whose id starts with `prefix`.
    pub fn find(&self, prefix: &str) -> Result<Manifest> {
        let mut hits: Vec<Listed> = self
            .list()?
            .into_iter()
            .filter(|l| l.id.starts_with(prefix))
            .collect();
        if prefix.is_empty() || hits.is_empty() {
            return Err(ErrorKind::NoSuchSnapshot(prefix.to_owned()).into());
        }
        if let Some(exact) = hits.iter().position(|l| l.id == prefix) {
            return hits.swap_remove(exact).manifest;
        }
        if hits.len() > 1 {
            return Err(ErrorKind::AmbiguousSnapshot {
                prefix: prefix.to_owned(),
                count: hits.len(),
            }
            .into());
        }
        hits.swap_remove(0).manifest
    }
}

/// Checks a chunk blob's bytes and decodes them into `out`.
pub(super) fn check_chunk(id: &blake3::Hash, bytes: &[u8], out: &mut [u8]) -> Result<()> {
    blob::decode_into(BlobKind::Chunk, bytes, out)?;
    let computed = blake3::hash(out);
    if computed != *id {
        return Err(ErrorKind::DigestMismatch {
            what: "chunk",
            expected: id.to_hex().to_string().into(),
            found: computed.to_hex().to_string().into(),
        }
        .into());
    }
    Ok(())
}
