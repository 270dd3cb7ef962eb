//! An object store in memory, with a clock of its own: the third backend
//! beside a directory and S3, so that what a bucket's rules promise (gc's
//! grace periods and leases, conditional writes, a failed upload's
//! stickiness, a session's fresh view) is tested without a server, and
//! time is moved on by a test rather than waited for.
//!
//! It behaves as the S3 services do where the repository relies on it:
//! modification times have whole seconds and come from the store's clock,
//! `put_new` never replaces, listings see every write at once. It can be
//! told to refuse writes, to stand for a server that fails.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, ErrorKind, Result};
use crate::objects::{ObjectInfo, ObjectStore};

#[derive(Debug)]
struct State {
    objects: BTreeMap<String, (Vec<u8>, SystemTime)>,
    now: SystemTime,
    /// Writes to refuse, by key prefix: how many of them are left.
    refuse: Vec<(String, usize)>,
}

#[derive(Debug)]
pub struct MemStore {
    location: String,
    state: Mutex<State>,
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore::new("mem://bucket/repo")
    }
}

impl MemStore {
    /// An empty store whose clock reads some whole second of 2026.
    pub fn new(location: &str) -> MemStore {
        MemStore {
            location: location.to_owned(),
            state: Mutex::new(State {
                objects: BTreeMap::new(),
                now: UNIX_EPOCH + Duration::from_secs(1_780_000_000),
                refuse: Vec::new(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the store's clock on; the times of new objects follow it.
    pub fn advance(&self, by: Duration) {
        self.state().now += by;
    }

    /// Refuses the next `count` writes (`put` or `put_new`) of keys that
    /// start with `prefix`, as a failing server would.
    pub fn refuse_writes(&self, prefix: &str, count: usize) {
        self.state().refuse.push((prefix.to_owned(), count));
    }

    /// The keys under `prefix`, sorted: what a test looks at.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.state()
            .objects
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Replaces an object's bytes behind the repository's back, keeping
    /// its time: what a test of damage does.
    pub fn tamper(&self, key: &str, f: impl FnOnce(&mut Vec<u8>)) -> bool {
        match self.state().objects.get_mut(key) {
            Some((bytes, _)) => {
                f(bytes);
                true
            }
            None => false,
        }
    }

    fn write(&self, key: &str, bytes: Vec<u8>, replace: bool) -> Result<bool> {
        let mut s = self.state();
        if let Some(slot) = s
            .refuse
            .iter_mut()
            .find(|(p, n)| *n > 0 && key.starts_with(p.as_str()))
        {
            slot.1 -= 1;
            return Err(Error::from(ErrorKind::Remote {
                reason: format!("{}/{key}: the store refused the write", self.location),
                cause: None,
            }));
        }
        if !replace && s.objects.contains_key(key) {
            return Ok(false);
        }
        let now = s.now;
        s.objects.insert(key.to_owned(), (bytes, now));
        Ok(true)
    }
}

impl ObjectStore for MemStore {
    fn location(&self) -> &str {
        &self.location
    }

    fn get(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        match self.state().objects.get(key) {
            None => Ok(None),
            Some((bytes, _)) if bytes.len() as u64 > limit => {
                Err(Error::from(ErrorKind::TooLarge {
                    what: "object",
                    claimed: bytes.len() as u64,
                    limit,
                }))
            }
            Some((bytes, _)) => Ok(Some(bytes.clone())),
        }
    }

    fn get_range_into(&self, key: &str, range: Range<u64>, buf: &mut Vec<u8>) -> Result<()> {
        let s = self.state();
        let Some((bytes, _)) = s.objects.get(key) else {
            return Err(Error::from(ErrorKind::Remote {
                reason: format!("{}/{key}: no such object", self.location),
                cause: None,
            }));
        };
        let slice = usize::try_from(range.start)
            .ok()
            .zip(usize::try_from(range.end).ok())
            .and_then(|(a, b)| bytes.get(a..b))
            .ok_or_else(|| {
                Error::from(ErrorKind::Truncated {
                    what: "object range",
                    needed: range.end.saturating_sub(range.start),
                    at: range.start,
                    available: bytes.len() as u64,
                })
            })?;
        buf.clear();
        buf.extend_from_slice(slice);
        Ok(())
    }

    fn put_new(&self, key: &str, bytes: Vec<u8>) -> Result<bool> {
        self.write(key, bytes, false)
    }

    fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        self.write(key, bytes, true).map(|_| ())
    }

    fn copy(&self, from: &str, to: &str) -> Result<bool> {
        let Some(bytes) = self.state().objects.get(from).map(|(b, _)| b.clone()) else {
            return Ok(false);
        };
        self.write(to, bytes, true).map(|_| true)
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.state().objects.remove(key);
        Ok(())
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        Ok(self
            .state()
            .objects
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, (bytes, modified))| ObjectInfo {
                key: k.clone(),
                size: bytes.len() as u64,
                modified: *modified,
            })
            .collect())
    }

    fn probe(&self) -> Result<()> {
        Ok(())
    }
}
