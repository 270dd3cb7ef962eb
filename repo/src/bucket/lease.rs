//! Leases: how backups and gc that share a bucket know of each other
//! without a lock service. Each running backup (and gc) keeps an object
//! under `leases/`; gc reads them to learn which backups began before a
//! given moment, and so which packs one of them could still reference.
//!
//! Times are the server's: an object's last-modified time is set by the
//! server that stored it, so hosts' clocks never enter the rule. A lease
//! records its own start (the server time of its first write) and is
//! rewritten every [`REFRESH`]; one not rewritten for [`STALE`] belongs to
//! a process that died, and counts no more.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::LEASES;
use crate::error::{Error, ErrorKind, Result};
use crate::objects::ObjectStore;

/// How often a lease is rewritten while its process runs.
pub const REFRESH: Duration = Duration::from_secs(5 * 60);
/// A lease not rewritten for this long is a dead process's.
pub const STALE: Duration = Duration::from_secs(30 * 60);

/// A lease's body. A lease is a few hundred bytes; more is refused.
const LIMIT: u64 = 4096;

#[derive(Debug, Serialize, Deserialize)]
struct Body {
    kind: String,
    host: String,
    pid: u32,
    /// Server time of the first write, in seconds since the epoch; absent
    /// from the first write itself, whose last-modified time is the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    started: Option<u64>,
}

/// A lease this process holds: rewritten by a thread of its own, removed
/// on drop.
#[derive(Debug)]
pub(super) struct Lease {
    store: Arc<dyn ObjectStore>,
    key: String,
    /// The server's time when the lease was first written.
    pub started: SystemTime,
    stop: Option<mpsc::Sender<()>>,
    refresher: Option<JoinHandle<()>>,
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Lease {
    /// Writes a lease of `kind` (`backup`, `restore`, `verify` or `gc`)
    /// and learns its start
    /// from the server.
    pub(super) fn take(store: Arc<dyn ObjectStore>, kind: &str) -> Result<Lease> {
        let host = crate::host_name();
        let pid = std::process::id();
        let key = format!(
            "{LEASES}{kind}.{}.{pid}.{}.json",
            host.replace(['/', '\\'], "_"),
            uuid::Uuid::new_v4().simple()
        );
        let mut body = Body {
            kind: kind.to_owned(),
            host,
            pid,
            started: None,
        };
        store.put(&key, to_bytes(&body))?;
        let Some(started) = store
            .list(LEASES)?
            .into_iter()
            .find(|o| o.key == key)
            .map(|o| o.modified)
        else {
            return Err(Error::from(ErrorKind::Remote {
                reason: format!("the lease {key} just written is not listed; the store does not read its own writes"),
                cause: None,
            }));
        };
        body.started = Some(secs(started));
        let (stop, stopped) = mpsc::channel::<()>();
        let (s, k, bytes) = (Arc::clone(&store), key.clone(), to_bytes(&body));
        let refresher = std::thread::Builder::new()
            .name("vsnap-lease".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(REFRESH) {
                    // A failed refresh is retried at the next; gc only
                    // treats the lease as dead after STALE without one.
                    let _ = s.put(&k, bytes.clone());
                }
            })
            .map_err(|e| Error::io(e).during("start the lease's refresher"))?;
        Ok(Lease {
            store,
            key,
            started,
            stop: Some(stop),
            refresher: Some(refresher),
        })
    }

    pub(super) fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        let _ = self.store.delete(&self.key);
    }
}

fn to_bytes(body: &Body) -> Vec<u8> {
    serde_json::to_vec(body).unwrap_or_default()
}

/// A lease another process holds, as gc sees it.
#[derive(Debug, Clone)]
pub(super) struct Live {
    pub key: String,
    pub kind: String,
    /// When its process began, by the server's clock. A lease whose body
    /// cannot be read counts as begun at the epoch: before everything, so
    /// it holds back every deletion until it goes stale.
    pub started: SystemTime,
}

/// The leases written within [`STALE`] of `now`, and the keys of stale
/// ones (to remove).
pub(super) fn read(store: &dyn ObjectStore, now: SystemTime) -> Result<(Vec<Live>, Vec<String>)> {
    let mut live = Vec::new();
    let mut stale = Vec::new();
    for o in store.list(LEASES)? {
        if o.modified + STALE < now {
            stale.push(o.key);
            continue;
        }
        let body = store
            .get(&o.key, LIMIT)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice::<Body>(&b).ok());
        let (kind, started) = match body {
            Some(b) => {
                let started = match b.started {
                    Some(s) => UNIX_EPOCH + Duration::from_secs(s),
                    None => o.modified,
                };
                // A start after the last write is not one: the earlier.
                (b.kind, started.min(o.modified))
            }
            None => ("unknown".to_owned(), UNIX_EPOCH),
        };
        live.push(Live {
            key: o.key,
            kind,
            started,
        });
    }
    Ok((live, stale))
}
