//! The storage layer under a repository kept in object storage: a flat
//! namespace of whole objects, written once and read by range.
//!
//! The engine is synchronous and knows no network: a client for S3 (the
//! `vsnap-s3` crate) implements [`ObjectStore`], with its own retries and
//! back-off, and the repository (`bucket/`) decides what goes in
//! which object. Everything an implementation returns is still untrusted:
//! the repository checks every object's length, checksum and hash.

use std::ops::Range;
use std::time::SystemTime;

use crate::error::Result;

/// One object, as a listing names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The key, relative to the repository's prefix.
    pub key: String,
    pub size: u64,
    /// When the server stored it, by the server's clock: gc's grace
    /// periods and leases are measured on it, never on a host's.
    pub modified: SystemTime,
}

/// What a repository asks of an object store. Keys are relative to the
/// repository's prefix and use `/` between parts. Errors name the object
/// (as [`ObjectStore::location`] plus the key) and say what to do: wrong
/// credentials, a missing bucket and an unreachable endpoint each have
/// their own message.
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// The repository's address, `s3://BUCKET/PREFIX`, for messages.
    fn location(&self) -> &str;

    /// The whole object, or `None` where there is none. An object larger
    /// than `limit` bytes is refused before its body is read.
    fn get(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>>;

    /// Bytes `range` of an object into `buf`, whose allocation is reused:
    /// exactly that many, or an error. Reads of whole windows go through
    /// here, into buffers given back by the windows before them.
    fn get_range_into(&self, key: &str, range: Range<u64>, buf: &mut Vec<u8>) -> Result<()>;

    /// Bytes `range` of an object, in a buffer of their own.
    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.get_range_into(key, range, &mut buf)?;
        Ok(buf)
    }

    /// Stores an object only where none is: `false` when one was there
    /// already, which is left as it was (a conditional put, so two hosts
    /// never overwrite each other's manifest).
    fn put_new(&self, key: &str, bytes: Vec<u8>) -> Result<bool>;

    /// Stores an object, replacing any: only for objects one writer owns
    /// (its own lease).
    fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()>;

    /// Copies object `from` to `to` (over any there) inside the server,
    /// whatever its size: `false` where `from` is not there.
    fn copy(&self, from: &str, to: &str) -> Result<bool>;

    /// Removes an object; one already gone is not an error.
    fn delete(&self, key: &str) -> Result<()>;

    /// Every object whose key starts with `prefix` (a directory-like
    /// prefix ending in `/`), in no particular order.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;

    /// One cheap request (a listing of at most one object under the
    /// prefix) that fails, with the clear error, where the bucket is
    /// missing or the credentials are refused: asked when an object the
    /// repository needs is not found, to tell "no repository here" from
    /// "no bucket".
    fn probe(&self) -> Result<()>;
}
