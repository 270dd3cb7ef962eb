//! What the repository asks of the storage it lives in.
//!
//! The repository format (blobs, indexes, manifests, their checks) is
//! written once, in the crate root's modules, against this trait; each
//! layout implements it in a module of its own: a local directory with a
//! file per chunk ([`crate::dir`]), object storage with chunks in packs
//! ([`crate::bucket`]). A new backend (another object store protocol, a
//! tape library) is a third module implementing [`Backend`]; it sees only
//! names and sealed bytes, so whatever the blob layer adds (compression,
//! checksums, encryption) reaches it for free.
//!
//! Names are relative to the repository's root and use `/`:
//! `vsnap-repository`, `snapshots/ID.json`, `indexes/HEX`. Chunks are
//! addressed by id only, as each layout keeps them its own way.

use std::path::PathBuf;

use crate::error::Result;
use crate::gc::{GcOptions, GcReport};
use crate::{Repository, Stray, Usage};

/// A held lock or lease, released on drop.
pub(crate) type Held = Box<dyn std::any::Any + Send + Sync>;

/// A name under `snapshots/`, as a listing found it.
#[derive(Debug)]
pub(crate) struct Named {
    pub name: String,
    /// What stands there where it is not a regular file (a link, a
    /// directory): a listing reports it rather than following it.
    pub not_file: Option<&'static str>,
}

/// When a file written by [`Backend::put`] must be durable.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Durable {
    /// Before `put` returns: the config and manifests. A bucket refuses
    /// to put one where a different object stands.
    Now,
    /// By the backup's [`Backend::sync_all`], before its manifest; the
    /// name says what the object holds, for a temporary file's name.
    Later(&'static str),
}

/// Checks a blob's first bytes and its length before the rest is read,
/// so no file can make a reader allocate past the blob's ceiling.
pub(crate) type HeadCheck<'a> = &'a dyn Fn(&[u8], u64) -> Result<()>;

/// One storage layout of a repository. Every method is safe to call from
/// many threads at once: a backup's workers write chunks together.
pub(crate) trait Backend: Send + Sync + std::fmt::Debug {
    /// `"directory"` or `"bucket"`: what a message says the repository is in.
    fn kind(&self) -> &'static str;

    /// A name's address, for messages.
    fn display(&self, rel: &str) -> PathBuf;

    /// Where a chunk is stored, for messages.
    fn chunk_path(&self, id: &blake3::Hash) -> PathBuf;

    /// A handle of its own for one run, over the same connection: see
    /// [`Repository::session`].
    fn session(&self) -> Result<Box<dyn Backend>>;

    /// Writes `parts`, one after another, under `rel`, so that the name
    /// only ever holds a whole object.
    fn put(&self, rel: &str, parts: &[&[u8]], durable: Durable) -> Result<()>;

    /// Whether `rel` is stored already, where the backend can tell without
    /// a request: a directory looks; a bucket says no and lets its
    /// conditional put decide.
    fn has_cheaply(&self, rel: &str) -> Result<bool>;

    /// A small object whole, or `None` where there is none; one larger
    /// than `limit` is refused unread.
    fn get_small(&self, rel: &str, limit: u64, op: &'static str) -> Result<Option<Vec<u8>>>;

    /// Reads the blob `rel` into `buf`, at most `limit` bytes, after
    /// `check` has passed its head: a missing blob is an error.
    fn get_blob(
        &self,
        rel: &str,
        limit: u64,
        check: HeadCheck<'_>,
        op: &'static str,
        buf: &mut Vec<u8>,
    ) -> Result<()>;

    /// Removes a manifest (or any name a layout shares), by its name.
    fn remove(&self, rel: &str) -> Result<()>;

    /// Moves `rel` aside as `quarantine/{to}`, where nothing reads it but
    /// an operator; `None` when there is no `rel`. A directory renames
    /// (a link moves as a link); a bucket copies inside the server, then
    /// deletes.
    fn quarantine(&self, rel: &str, to: &str) -> Result<Option<PathBuf>>;

    /// Makes the removals so far durable.
    fn sync_removals(&self, dir: &str) -> Result<()>;

    /// The names under `snapshots/`.
    fn list_snapshots(&self) -> Result<Vec<Named>>;

    /// Whether a whole chunk `id` is stored, as a backup decides to
    /// store it again or not.
    fn has_chunk(&self, id: &blake3::Hash) -> Result<bool>;

    /// Whether chunk `id` is in its place, as cheaply as the layout can
    /// tell: for chunks a snapshot names already, whose content verify
    /// checks.
    fn chunk_in_place(&self, id: &blake3::Hash) -> Result<bool>;

    /// Stores a chunk's blob, given as parts. Returns the bytes written.
    fn put_chunk(&self, id: &blake3::Hash, parts: &[&[u8]]) -> Result<u64>;

    /// Hands `f` chunk `id`'s blob as stored. `check` has passed its head
    /// first; `scratch` holds it where the layout reads it whole.
    fn with_chunk(
        &self,
        id: &blake3::Hash,
        limit: u64,
        check: HeadCheck<'_>,
        scratch: &mut Vec<u8>,
        f: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()>;

    /// A number to sort chunk reads by, so they run in storage order.
    fn chunk_order(&self, id: &blake3::Hash) -> u64;

    /// Says which chunks will be read next, in the order they will be.
    fn plan_reads(&self, ids: &mut dyn Iterator<Item = &blake3::Hash>) -> Result<()>;

    /// Sets bad chunks aside, so the next backup that meets their
    /// content stores it again. Returns how many were set aside.
    fn set_aside(&self, ids: &[blake3::Hash]) -> Result<u64>;

    /// What the repository holds: chunks and indexes, and their bytes.
    fn usage(&self) -> Result<Usage>;

    /// Names the repository does not put where they stand.
    fn strays(&self) -> Result<Vec<Stray>>;

    /// Layout-level objects that could not be used, each with what it is
    /// and why (a bucket's pack indexes and lists, and the packs they name
    /// that are gone or cut short): their chunks count as absent.
    fn damaged(&self) -> Result<Vec<crate::Damaged>>;

    /// Held by every backup for its whole run.
    fn lock_shared(&self) -> Result<Held>;

    /// Held by a long read (restore, verify), where gc needs to know of
    /// it; `None` where the layout's gc never removes what a snapshot
    /// names.
    fn lease_for_reading(&self, kind: &'static str) -> Result<Option<Held>>;

    /// Makes everything written so far durable and findable.
    fn sync_all(&self) -> Result<()>;

    /// Removes what no snapshot uses, by the layout's own rule.
    fn gc(&self, repo: &Repository, opts: &GcOptions) -> Result<GcReport>;
}
