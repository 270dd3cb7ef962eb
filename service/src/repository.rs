//! The service's one repository handle, and the snapshot listing the API
//! answers from.
//!
//! The handle is opened on first use and kept: for a bucket that is one
//! S3 client and one runtime for the life of the service, where opening
//! per request cost a client and a runtime each. A repository that cannot
//! be opened yet (not made, a bucket out of reach) does not stop the
//! service; the next use tries again. Runs take a session of it each
//! ([`vsnap_repo::Repository::session`]), which bucket gc's rule needs.
//!
//! The listing is read once and served until the service changes which
//! snapshots there are (a backup, retention: [`RepoHandle::changed`]) or
//! [`RESCAN`] passes, which is how other hosts' backups into a shared
//! bucket, or a forget run by hand, come to show.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vsnap_repo::{Listed, Repository};

/// How long a listing serves before it is read again, whatever the
/// service itself wrote.
pub const RESCAN: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct RepoHandle {
    location: PathBuf,
    open: Mutex<Option<Arc<Repository>>>,
    listing: Mutex<Listing>,
}

#[derive(Debug, Default)]
struct Listing {
    /// Bumped by every write: a listing read across one is not kept.
    generation: u64,
    current: Option<(Instant, Arc<Vec<Listed>>)>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RepoHandle {
    pub fn new(location: PathBuf) -> RepoHandle {
        RepoHandle {
            location,
            open: Mutex::new(None),
            listing: Mutex::default(),
        }
    }

    /// The open repository, opening it if this is the first use (or the
    /// last one failed). Blocking: call it off the async threads.
    pub fn get(&self) -> vsnap_repo::Result<Arc<Repository>> {
        let mut open = locked(&self.open);
        if let Some(r) = &*open {
            return Ok(Arc::clone(r));
        }
        let r = Arc::new(vsnap_s3::open(&self.location)?);
        // Opened once per process: its caveats (a server that ignores
        // conditional writes, say) are logged once.
        for c in r.caveats() {
            crate::log::event(
                crate::log::Level::Warn,
                &format!("{}: {c}", self.location.display()),
                &[("event", "repository-caveat".into())],
            );
        }
        *open = Some(Arc::clone(&r));
        Ok(r)
    }

    /// A handle of its own for one run, or for a measure of what a bucket's
    /// handle reads once and keeps (its chunk count).
    pub fn session(&self) -> vsnap_repo::Result<Repository> {
        self.get()?.session()
    }

    /// The snapshots, from the listing kept here: read again when the
    /// service wrote since, or after [`RESCAN`]. Blocking.
    pub fn listing(&self) -> vsnap_repo::Result<Arc<Vec<Listed>>> {
        let generation = {
            let l = locked(&self.listing);
            if let Some((at, snapshots)) = &l.current {
                if at.elapsed() < RESCAN {
                    return Ok(Arc::clone(snapshots));
                }
            }
            l.generation
        };
        // Read without the lock held: a slow bucket must not hold up
        // writes, nor other requests.
        let read_at = Instant::now();
        let fresh = Arc::new(self.get()?.list()?);
        let mut l = locked(&self.listing);
        if l.generation == generation {
            l.current = Some((read_at, Arc::clone(&fresh)));
        }
        Ok(fresh)
    }

    /// The service wrote to the repository (or a run may have): the next
    /// listing reads it again.
    pub fn changed(&self) {
        let mut l = locked(&self.listing);
        l.generation += 1;
        l.current = None;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::path::Path;
    use vsnap_engine::pipeline::{Options, Progress};
    use vsnap_repo::BackupOptions;

    fn backup(repo: &Repository, image: &Path) {
        let spec = BackupOptions::crash_consistent("vm");
        let opts = Options {
            chunk_size: 1 << 20,
            ..Options::default()
        };
        vsnap_repo::cbt::backup_files(
            repo,
            &[image.to_path_buf()],
            None,
            &opts,
            &spec,
            &Progress::default(),
            false,
        )
        .unwrap();
    }

    #[test]
    fn one_handle_serves_a_listing_until_the_service_writes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        Repository::init(&root, 1 << 20).unwrap();
        let image = dir.path().join("d.raw");
        std::fs::write(&image, vec![7u8; 1 << 20]).unwrap();
        let h = RepoHandle::new(root.clone());
        assert!(Arc::ptr_eq(&h.get().unwrap(), &h.get().unwrap()));
        assert_eq!(h.listing().unwrap().len(), 0);
        // Another process backs up: the listing kept here does not read
        // the repository again for it, until the rescan is due...
        backup(&Repository::open(&root).unwrap(), &image);
        assert_eq!(h.listing().unwrap().len(), 0);
        // ...or the service writes, through a session of its own handle.
        backup(&h.session().unwrap(), &image);
        h.changed();
        let listed = h.listing().unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed.iter().all(|l| l.manifest.is_ok()));
    }

    #[test]
    fn a_repository_not_there_yet_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        let h = RepoHandle::new(root.clone());
        let err = h.get().unwrap_err();
        assert!(
            matches!(err.kind(), vsnap_repo::ErrorKind::NotARepository { .. }),
            "{err}"
        );
        Repository::init(&root, 1 << 20).unwrap();
        assert_eq!(h.listing().unwrap().len(), 0);
    }
}
