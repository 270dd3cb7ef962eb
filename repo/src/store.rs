//! Reading and writing the repository's files: chunks, indexes and
//! manifests, each written whole under `tmp/` and renamed into place.

use std::path::PathBuf;

use super::backend::Durable;
use super::blob::{self, BlobKind, Encoding, HEADER_LEN};
use super::index::Index;
use super::manifest::{Disk, Manifest};
use super::{Repository, Stray};
use crate::error::{Error, ErrorKind, Result};
use vsnap_engine::pipeline::Stored;

/// A manifest file larger than this is refused unread. A manifest of a
/// hundred disks is some 200 KiB.
pub(crate) const MANIFEST_LIMIT: u64 = 16 << 20;
/// Buffers kept for chunks' stored bytes (see `Repository::give_stored`).
const STORED_POOL: usize = 8;

/// What a snapshot listing found: a manifest, or why it could not be read.
#[derive(Debug)]
pub struct Listed {
    pub id: String,
    pub path: PathBuf,
    pub manifest: Result<Manifest>,
}

/// What [`Repository::usage`] counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub chunks: u64,
    pub chunk_bytes: u64,
    pub indexes: u64,
    pub index_bytes: u64,
}

/// The most bytes a blob holding `plain` bytes of plaintext can take in
/// the store: its header, and the raw bytes or zstd's worst case.
fn blob_limit(plain: u64) -> u64 {
    let plain_usize = usize::try_from(plain).unwrap_or(usize::MAX);
    HEADER_LEN as u64 + (zstd::zstd_safe::compress_bound(plain_usize) as u64).max(plain)
}

impl Repository {
    /// Where a chunk is stored, for messages.
    pub fn chunk_path(&self, id: &blake3::Hash) -> PathBuf {
        self.backend.chunk_path(id)
    }

    /// A name in the repository, for messages.
    pub(super) fn display(&self, rel: &str) -> PathBuf {
        self.backend.display(rel)
    }

    fn manifest_rel(id: &str) -> String {
        format!("snapshots/{id}.json")
    }

    /// Whether a whole chunk is stored under `id`, as a backup decides
    /// whether to store it again: in a directory its header must parse and
    /// its length match the file's, so a damaged or truncated file, or a
    /// link or special file where the chunk should be, counts as absent
    /// (the next backup's rename replaces the name, and never follows
    /// it); in a bucket a pack index must list it in a copy not found bad.
    pub fn has_chunk(&self, id: &blake3::Hash) -> Result<bool> {
        self.backend.has_chunk(id)
    }

    /// Whether a chunk is in its place, as cheaply as the layout can tell
    /// (a directory: a regular file at least a header long, unread). For
    /// the chunks a snapshot names already, whose content verify checks,
    /// what an incremental backup must catch is a chunk moved aside or
    /// removed since; reading each one's header cold cost most of an
    /// unchanged backup's time.
    pub fn chunk_in_place(&self, id: &blake3::Hash) -> Result<bool> {
        self.backend.chunk_in_place(id)
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
        self.put_chunk_blob(id, &[&header, payload])
    }

    /// Stores a chunk's blob, given as parts: into the open pack in a
    /// bucket, as a file renamed into place in a directory (not fsynced:
    /// the backup's one `syncfs` does it before the manifest). Returns the
    /// bytes written.
    fn put_chunk_blob(&self, id: &blake3::Hash, parts: &[&[u8]]) -> Result<u64> {
        self.backend.put_chunk(id, parts)
    }

    /// Reads a blob whose plaintext must be `plain` bytes: the file must
    /// be a regular file, its header must parse, and its lengths must be
    /// the ones expected, all before the payload is read, so no file can
    /// make vsnap read or allocate more than the blob's ceiling.
    fn read_blob(
        &self,
        rel: &str,
        kind: BlobKind,
        plain: u64,
        op: &'static str,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        let check = |head: &[u8], len: u64| check_head(kind, head, plain, len).map(|_| ());
        self.backend
            .get_blob(rel, blob_limit(plain), &check, op, buf)
    }

    /// Reads a chunk into `out` (its plaintext length), checking its CRC
    /// and that its plaintext hashes to its name.
    pub fn read_chunk(&self, id: &blake3::Hash, out: &mut [u8]) -> Result<()> {
        self.read_chunk_checked(id, None, out)
    }

    /// Reads a chunk's plaintext into `out`, checked: header, lengths,
    /// CRC, and the plaintext's BLAKE3; and its blob as stored into
    /// `stored`, where given. A blob in a bucket is read where its window
    /// holds it, so only a caller that keeps the blob pays for a copy.
    fn read_chunk_checked(
        &self,
        id: &blake3::Hash,
        mut stored: Option<&mut Vec<u8>>,
        out: &mut [u8],
    ) -> Result<()> {
        let plain = out.len() as u64;
        let head =
            |head: &[u8], len: u64| check_head(BlobKind::Chunk, head, plain, len).map(|_| ());
        let path = || self.chunk_path(id);
        let mut scratch = self.take_stored();
        let read =
            self.backend
                .with_chunk(id, blob_limit(plain), &head, &mut scratch, &mut |blob| {
                    check_blob(BlobKind::Chunk, blob, plain)
                        .map_err(|e| e.in_file(&path()).during("read chunk"))?;
                    check_chunk(id, blob, out).map_err(|e| e.in_file(&path()))?;
                    if let Some(s) = stored.as_deref_mut() {
                        s.clear();
                        s.extend_from_slice(blob);
                    }
                    Ok(())
                });
        self.give_stored(scratch);
        read
    }

    /// Copies chunk `id` (of `out.len()` bytes of plaintext) from `src`
    /// into this repository as it is stored, without compressing it again,
    /// once it has passed every check a restore makes. Returns the bytes
    /// written: none where this repository has it already.
    pub(super) fn copy_chunk_from(
        &self,
        src: &Repository,
        id: &blake3::Hash,
        bytes: &mut Vec<u8>,
        out: &mut [u8],
    ) -> Result<u64> {
        src.read_chunk_checked(id, Some(bytes), out)?;
        self.put_chunk_blob(id, &[bytes])
    }

    fn take_stored(&self) -> Vec<u8> {
        self.stored
            .lock()
            .ok()
            .and_then(|mut pool| pool.pop())
            .unwrap_or_default()
    }

    /// Keeps at most [`STORED_POOL`] buffers: as many as reads that run at
    /// once, on the machines vsnap is built for, and no more after a burst.
    fn give_stored(&self, buf: Vec<u8>) {
        if let Ok(mut pool) = self.stored.lock() {
            if pool.len() < STORED_POOL {
                pool.push(buf);
            }
        }
    }

    /// Writes an index; returns the BLAKE3 of its plaintext, its name.
    pub fn write_index(&self, index: &Index) -> Result<blake3::Hash> {
        let plain = index.to_bytes();
        let digest = blake3::hash(&plain);
        let rel = format!("indexes/{}", digest.to_hex());
        if self.backend.has_cheaply(&rel)? {
            return Ok(digest);
        }
        let (header, payload) = blob::encode(BlobKind::Index, &plain, 3)?;
        self.backend
            .put(&rel, &[&header, &payload], Durable::Later("index"))?;
        Ok(digest)
    }

    /// Reads a disk's index and checks that it is the disk's: its
    /// plaintext hashes to its name, and it covers the disk's virtual size
    /// at the repository's chunk size. Its plaintext must be as long as
    /// such an index is, so an index can make vsnap allocate no more than
    /// its disk's size implies.
    pub fn read_index(&self, disk: &Disk) -> Result<Index> {
        let hex = disk.index.as_str();
        if !super::validate::is_digest_hex(hex) {
            return Err(ErrorKind::Corrupt {
                what: "manifest",
                reason: format!("{hex:?} is not an index name"),
            }
            .into());
        }
        let rel = format!("indexes/{hex}");
        let path = self.display(&rel);
        let chunk_size = self.config.chunk_size;
        let expected = Index::plain_len(disk.virtual_size, chunk_size, disk.layout());
        let mut bytes = Vec::new();
        self.read_blob(&rel, BlobKind::Index, expected, "read index", &mut bytes)?;
        let plain =
            blob::decode(BlobKind::Index, &bytes, expected).map_err(|e| e.in_file(&path))?;
        let computed = blake3::hash(&plain).to_hex();
        if computed.as_str() != hex {
            return Err(Error::from(ErrorKind::DigestMismatch {
                what: "index",
                expected: hex.into(),
                found: computed.to_string().into(),
            })
            .in_file(&path));
        }
        let index = Index::parse(&plain, disk.layout()).map_err(|e| e.in_file(&path))?;
        if index.virtual_size != disk.virtual_size || index.chunk_size != chunk_size {
            return Err(Error::from(ErrorKind::Corrupt {
                what: "index",
                reason: format!(
                    "covers {} bytes in chunks of {}, but the disk {:?} is {} bytes and the repository's chunks are {}",
                    index.virtual_size, index.chunk_size, disk.name, disk.virtual_size, chunk_size
                ),
            })
            .in_file(&path));
        }
        Ok(index)
    }

    /// Commits a snapshot: the manifest is written last, durably, and the
    /// snapshot exists from the rename on.
    pub fn write_manifest(&self, manifest: &Manifest) -> Result<()> {
        let bytes = manifest.to_bytes()?;
        self.backend
            .put(&Self::manifest_rel(&manifest.id), &[&bytes], Durable::Now)
    }

    /// Reads the manifest of snapshot `id`, checks its self-digest, and
    /// checks its names against the rules of [`super::validate`].
    pub fn read_manifest(&self, id: &str) -> Result<Manifest> {
        self.read_manifest_bytes(id).map(|(m, _)| m)
    }

    /// [`Repository::read_manifest`], with the file's bytes as they are.
    pub(super) fn read_manifest_bytes(&self, id: &str) -> Result<(Manifest, Vec<u8>)> {
        let rel = Self::manifest_rel(id);
        let path = self.display(&rel);
        let bytes = self
            .backend
            .get_small(&rel, MANIFEST_LIMIT, "read manifest")?;
        let Some(bytes) = bytes else {
            return Err(ErrorKind::NoSuchSnapshot(id.to_owned()).into());
        };
        let m = Manifest::parse(&bytes).map_err(|e| e.in_file(&path))?;
        m.validate(id, self.config.chunk_size)
            .map_err(|e| e.in_file(&path))?;
        Ok((m, bytes))
    }

    /// Commits a snapshot from another repository: its manifest's bytes,
    /// checked already by [`Repository::read_manifest_bytes`], written as
    /// they are, so the copy's self-digest is the original's.
    pub(super) fn place_manifest(&self, id: &str, bytes: &[u8]) -> Result<()> {
        self.backend
            .put(&Self::manifest_rel(id), &[bytes], Durable::Now)
    }

    /// What the repository holds: its chunks and indexes, and their bytes
    /// (for a service's metrics). In a directory it costs a stat per file.
    pub fn usage(&self) -> Result<Usage> {
        self.backend.usage()
    }

    /// Every snapshot, oldest first; a manifest that cannot be read is
    /// listed with its error rather than hidden.
    pub fn list(&self) -> Result<Vec<Listed>> {
        let mut out = Vec::new();
        for entry in self.backend.list_snapshots()? {
            let Some(id) = entry.name.strip_suffix(".json") else {
                continue;
            };
            let rel = Self::manifest_rel(id);
            let path = self.display(&rel);
            let manifest = match entry.not_file {
                None => self.read_manifest(id),
                Some(found) => Err(Error::from(ErrorKind::NotRegular {
                    what: "manifest file",
                    found,
                })
                .in_file(&path)),
            };
            out.push(Listed {
                id: id.to_owned(),
                manifest,
                path,
            });
        }
        out.sort_by(|a, b| {
            let time = |l: &Listed| l.manifest.as_ref().map(|m| m.time.clone()).ok();
            time(a).cmp(&time(b)).then_with(|| a.id.cmp(&b.id))
        });
        Ok(out)
    }

    /// [`Repository::list`], only the snapshots whose ids start with one
    /// of `prefixes` (all of them when there are none); a prefix that
    /// matches no snapshot is an error.
    pub fn list_only(&self, prefixes: &[String]) -> Result<Vec<Listed>> {
        let listed = self.list()?;
        if let Some(prefix) = prefixes
            .iter()
            .find(|p| !listed.iter().any(|l| l.id.starts_with(p.as_str())))
        {
            return Err(ErrorKind::NoSuchSnapshot(prefix.clone()).into());
        }
        Ok(listed
            .into_iter()
            .filter(|l| {
                prefixes.is_empty() || prefixes.iter().any(|p| l.id.starts_with(p.as_str()))
            })
            .collect())
    }

    /// The snapshot whose id starts with `prefix`; `latest` is the newest
    /// readable one. (An id is hex, so no id is taken for `latest`.) A
    /// manifest's time has whole seconds: where several share the newest,
    /// which is newest is not known, and `latest` is refused as ambiguous.
    pub fn find(&self, prefix: &str) -> Result<Manifest> {
        if prefix == "latest" {
            let mut readable: Vec<Manifest> = self
                .list()?
                .into_iter()
                .filter_map(|l| l.manifest.ok())
                .collect();
            let newest = readable.last().map(|m| m.time.clone());
            let count = readable
                .iter()
                .filter(|m| Some(&m.time) == newest.as_ref())
                .count();
            return match (readable.pop(), count) {
                (None, _) => Err(ErrorKind::NoSuchSnapshot(prefix.to_owned()).into()),
                (Some(m), 1) => Ok(m),
                (Some(_), count) => Err(ErrorKind::AmbiguousSnapshot {
                    prefix: prefix.to_owned(),
                    count,
                }
                .into()),
            };
        }
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

    /// Removes a snapshot's manifest, by the name its file has.
    pub(super) fn remove_manifest(&self, id: &str) -> Result<()> {
        self.backend.remove(&Self::manifest_rel(id))
    }

    /// Makes the manifests removed so far stay removed.
    pub(super) fn sync_snapshots(&self) -> Result<()> {
        self.backend.sync_removals("snapshots")
    }

    /// Names in the repository that it does not put there: links, special
    /// files, files where directories belong and the reverse, objects of
    /// no kind a bucket holds. None of them is ever followed; verify
    /// reports them as damage.
    pub fn strays(&self) -> Result<Vec<Stray>> {
        self.backend.strays()
    }

    /// Objects of the bucket's own layout that could not be used, and why
    /// (none in a local repository): pack indexes and lists that do not
    /// parse, packs they name that are gone or cut short. Verify reports
    /// them, a backup says it met them, and their chunks count as absent.
    pub fn damaged_objects(&self) -> Result<Vec<crate::Damaged>> {
        self.backend.damaged()
    }

    /// A number to sort chunk reads by, so they run in storage order: a
    /// chunk file's inode, a pack and offset in a bucket; 0 when unknown.
    pub fn chunk_inode(&self, id: &blake3::Hash) -> u64 {
        self.backend.chunk_order(id)
    }

    /// Says which chunks will be read next, in the order they will be: a
    /// bucket fetches the packs' windows that hold them ahead of the
    /// reads. A directory needs no warning.
    pub fn plan_reads<'a>(&self, ids: impl IntoIterator<Item = &'a blake3::Hash>) -> Result<()> {
        self.backend.plan_reads(&mut ids.into_iter())
    }

    /// Sets bad chunks aside, so the next backup that meets their content
    /// stores it again. A directory renames each to `*.bad` (gc removes
    /// it later); a bucket, whose objects are never rewritten, records
    /// the copies in use as bad, in one `bad/` object for the lot.
    /// Returns how many were set aside: a chunk gone, or set aside
    /// already, is not counted.
    pub fn move_chunks_aside(&self, ids: &[blake3::Hash]) -> Result<u64> {
        self.backend.set_aside(ids)
    }
}

fn blob_name(kind: BlobKind) -> &'static str {
    match kind {
        BlobKind::Chunk => "chunk",
        BlobKind::Index => "index",
    }
}

/// Checks a blob's header (its first bytes) against what the reader
/// expects, before any more of it is read: a plaintext of `plain` bytes,
/// in a blob of `len`.
fn check_head(kind: BlobKind, head: &[u8], plain: u64, len: u64) -> Result<blob::Header> {
    let header = blob::parse_header(kind, head)?;
    let name = blob_name(kind);
    if header.plain_len != plain {
        return Err(ErrorKind::Corrupt {
            what: name,
            reason: format!(
                "holds {} bytes of plaintext where {plain} were expected",
                header.plain_len
            ),
        }
        .into());
    }
    if header.blob_len() != len {
        return Err(ErrorKind::Truncated {
            what: name,
            needed: header.blob_len(),
            at: 0,
            available: len,
        }
        .into());
    }
    Ok(header)
}

/// [`check_head`] for a blob read whole.
fn check_blob(kind: BlobKind, bytes: &[u8], plain: u64) -> Result<()> {
    check_head(kind, bytes, plain, bytes.len() as u64).map(|_| ())
}

/// Checks a chunk blob's bytes and decodes them into `out`.
pub(super) fn check_chunk(id: &blake3::Hash, bytes: &[u8], out: &mut [u8]) -> Result<()> {
    blob::decode_into(BlobKind::Chunk, bytes, out)?;
    check_digest(id, out)
}

/// Checks that a chunk's plaintext hashes to its name.
pub(super) fn check_digest(id: &blake3::Hash, plain: &[u8]) -> Result<()> {
    let computed = blake3::hash(plain);
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
