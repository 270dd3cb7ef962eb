//! The bucket as the repository sees it: [`Backend`] over the packs,
//! pack indexes and conditional puts of [`super`].

use std::collections::HashSet;
use std::path::PathBuf;

use super::lease::Lease;
use super::{missing, Bucket, PACKS};
use crate::backend::{Backend, Durable, HeadCheck, Held, Named};
use crate::error::{Error, ErrorKind, Result};
use crate::gc::{GcOptions, GcReport};
use crate::objects::ObjectStore;
use crate::{Repository, Stray, Usage};

/// Whether `key` holds exactly `bytes`: a conditional create refused
/// because an earlier try of the same request took effect and only its
/// answer was lost, and the client's retry met the object it had made.
pub(crate) fn already(store: &dyn ObjectStore, key: &str, bytes: &[u8]) -> bool {
    let limit = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    store
        .get(key, limit)
        .ok()
        .flatten()
        .is_some_and(|b| b == bytes)
}

impl Backend for Bucket {
    fn kind(&self) -> &'static str {
        "bucket"
    }

    fn display(&self, rel: &str) -> PathBuf {
        Bucket::display(self, rel)
    }

    fn chunk_path(&self, id: &blake3::Hash) -> PathBuf {
        Bucket::display(self, &format!("{PACKS}…/{}", id.to_hex()))
    }

    fn session(&self) -> Result<Box<dyn Backend>> {
        Ok(Box::new(self.fresh()))
    }

    /// A conditional put: an object there already is left alone, which for
    /// a name that is a hash is the same content, and for a manifest
    /// (`Now`) is refused unless it holds these very bytes.
    fn put(&self, rel: &str, parts: &[&[u8]], durable: Durable) -> Result<()> {
        let bytes = parts.concat();
        let created = self.store().put_new(rel, bytes.clone())?;
        match durable {
            Durable::Now if !created && !already(self.store(), rel, &bytes) => {
                Err(Error::from(ErrorKind::Exists(Bucket::display(self, rel))).during("create"))
            }
            _ => Ok(()),
        }
    }

    fn has_cheaply(&self, _rel: &str) -> Result<bool> {
        Ok(false)
    }

    fn get_small(&self, rel: &str, limit: u64, op: &'static str) -> Result<Option<Vec<u8>>> {
        self.store().get(rel, limit).map_err(|e| e.during(op))
    }

    /// One GET, bounded by `limit`; the head is checked once it is here.
    fn get_blob(
        &self,
        rel: &str,
        limit: u64,
        check: HeadCheck<'_>,
        op: &'static str,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        let path = Bucket::display(self, rel);
        let Some(bytes) = self.store().get(rel, limit)? else {
            return Err(missing(&path, op));
        };
        *buf = bytes;
        check(buf, buf.len() as u64).map_err(|e| e.in_file(&path).during(op))
    }

    fn remove(&self, rel: &str) -> Result<()> {
        self.store().delete(rel)
    }

    /// A copy inside the server, then the delete: an object of any size
    /// moves aside without passing through this host.
    fn quarantine(&self, rel: &str, to: &str) -> Result<Option<PathBuf>> {
        let store = self.store();
        let taken: HashSet<String> = store
            .list(&format!("{}/", crate::QUARANTINE))?
            .into_iter()
            .map(|o| o.key)
            .collect();
        let mut dest = format!("{}/{to}", crate::QUARANTINE);
        let mut n = 1;
        while taken.contains(&dest) {
            dest = format!("{}/{to}.{n}", crate::QUARANTINE);
            n += 1;
        }
        if !store.copy(rel, &dest).map_err(|e| e.during("quarantine"))? {
            return Ok(None);
        }
        store.delete(rel)?;
        Ok(Some(Bucket::display(self, &dest)))
    }

    /// A delete is durable when it returns.
    fn sync_removals(&self, _dir: &str) -> Result<()> {
        Ok(())
    }

    fn list_snapshots(&self) -> Result<Vec<Named>> {
        Ok(self
            .store()
            .list("snapshots/")?
            .into_iter()
            .filter_map(|o| {
                Some(Named {
                    name: o.key.strip_prefix("snapshots/")?.to_owned(),
                    not_file: None,
                })
            })
            .collect())
    }

    /// Whether a pack index lists it, in a copy not found bad.
    fn has_chunk(&self, id: &blake3::Hash) -> Result<bool> {
        Bucket::has_chunk(self, id)
    }

    fn chunk_in_place(&self, id: &blake3::Hash) -> Result<bool> {
        Bucket::has_chunk(self, id)
    }

    /// Into the open pack, uploaded when it fills.
    fn put_chunk(&self, id: &blake3::Hash, parts: &[&[u8]]) -> Result<u64> {
        self.write_chunk(id, parts)
    }

    /// Where its window holds it, without a copy; the pack entry bounds
    /// its length.
    fn with_chunk(
        &self,
        id: &blake3::Hash,
        _limit: u64,
        check: HeadCheck<'_>,
        _scratch: &mut Vec<u8>,
        f: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let path = || Backend::chunk_path(self, id);
        self.with_chunk_blob(id, &mut |blob| {
            check(blob, blob.len() as u64).map_err(|e| e.in_file(&path()).during("read chunk"))?;
            f(blob)
        })
    }

    /// Pack, then offset in it: neighbours share one ranged read.
    fn chunk_order(&self, id: &blake3::Hash) -> u64 {
        Bucket::chunk_order(self, id)
    }

    /// Fetches the packs' windows that hold them ahead of the reads.
    fn plan_reads(&self, ids: &mut dyn Iterator<Item = &blake3::Hash>) -> Result<()> {
        Bucket::plan_reads(self, ids)
    }

    /// Objects are never rewritten: the copies in use are recorded as bad,
    /// in one `bad/` object for the lot.
    fn set_aside(&self, ids: &[blake3::Hash]) -> Result<u64> {
        Bucket::set_aside(self, ids)
    }

    /// Chunks as the pack indexes count them; bytes as the listing does.
    fn usage(&self) -> Result<Usage> {
        let mut u = Usage {
            chunks: self.chunk_count()?,
            ..Usage::default()
        };
        for o in self.store().list(PACKS)? {
            u.chunk_bytes += o.size;
        }
        for o in self.store().list("indexes/")? {
            u.indexes += 1;
            u.index_bytes += o.size;
        }
        Ok(u)
    }

    fn strays(&self) -> Result<Vec<Stray>> {
        Bucket::strays(self)
    }

    fn damaged(&self) -> Result<Vec<crate::Damaged>> {
        Bucket::damaged(self)
    }

    /// A lease object, kept fresh while held and removed on drop.
    fn lock_shared(&self) -> Result<Held> {
        Ok(Box::new(Lease::take(self.shared_store(), "backup")?))
    }

    /// gc repacks packs that hold live chunks, and deletes them only once
    /// every lease older than their condemnation has ended, so a long read
    /// that found a chunk in such a pack can still fetch it.
    fn lease_for_reading(&self, kind: &'static str) -> Result<Option<Held>> {
        Ok(Some(Box::new(Lease::take(self.shared_store(), kind)?)))
    }

    /// The open pack, and the pack index of every pack uploaded.
    fn sync_all(&self) -> Result<()> {
        self.flush()
    }

    /// Beside running backups, by leases and a grace period.
    fn gc(&self, repo: &Repository, opts: &GcOptions) -> Result<GcReport> {
        super::gc(repo, self, opts)
    }
}
