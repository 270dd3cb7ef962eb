//! A bucket's write path: chunks go into the open pack, and a full pack
//! is uploaded by a thread of its own, so the worker that filled it goes
//! back to hashing and compressing while the PUT runs. At most
//! [`IN_FLIGHT`] packs are on their way at once: a worker that fills one
//! more waits for a slot, which bounds the memory to that many packs.
//!
//! **A failed upload fails every flush after it.** Its chunks were pending
//! while it ran, so another worker (of this snapshot or of another in the
//! same run) may have reused one and named it; no manifest may follow a
//! flush that cannot vouch for every chunk written since the bucket was
//! opened. The first caller to meet the failure gets the server's error,
//! every later one an error that repeats it.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, RwLock};

use super::known::Known;
use super::pack_index::{encode_pack_index, write_cache, Record, PACKS, PACK_INDEXES};
use crate::error::{Error, ErrorKind, Result};
use crate::objects::ObjectStore;
use crate::pack::PackBuilder;

/// Packs uploading at once. Two keep the server busy while a worker fills
/// the next, as a double buffer does.
const IN_FLIGHT: usize = 2;

/// A backup writes a pack index at least every this many packs, so one
/// that dies after hours has indexed most of what it uploaded.
const PACKS_PER_INDEX: usize = 1024;

#[derive(Debug, Default)]
struct Writer {
    open: PackBuilder,
    /// Chunks in the open pack or in one being uploaded.
    pending: HashSet<blake3::Hash>,
    uploaded: Vec<Record>,
}

#[derive(Debug, Default)]
struct Uploads {
    running: usize,
    failed: Option<Failed>,
}

#[derive(Debug)]
enum Failed {
    /// Not yet reported to anyone.
    Fresh(Error),
    /// Reported once; its message, for every later caller.
    Told(String),
}

/// An upload's slot: given back when the upload ends, however it ends,
/// so that a flush never waits for an upload that panicked.
struct Slot(Arc<Uploader>);

impl Slot {
    fn fail(&self, e: Error) {
        if let Ok(mut u) = self.0.uploads.lock() {
            u.failed.get_or_insert(Failed::Fresh(e));
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.fail(Error::worker_panicked());
        }
        if let Ok(mut u) = self.0.uploads.lock() {
            u.running = u.running.saturating_sub(1);
        }
        self.0.changed.notify_all();
    }
}

#[derive(Debug)]
pub(super) struct Uploader {
    store: Arc<dyn ObjectStore>,
    pack_size: u64,
    cache: Option<PathBuf>,
    known: Arc<RwLock<Option<Known>>>,
    writer: Mutex<Writer>,
    uploads: Mutex<Uploads>,
    changed: Condvar,
}

impl Uploader {
    pub(super) fn pack_size(&self) -> u64 {
        self.pack_size
    }

    pub(super) fn new(
        store: Arc<dyn ObjectStore>,
        pack_size: u64,
        cache: Option<PathBuf>,
        known: Arc<RwLock<Option<Known>>>,
    ) -> Self {
        Uploader {
            store,
            pack_size,
            cache,
            known,
            writer: Mutex::default(),
            uploads: Mutex::default(),
            changed: Condvar::new(),
        }
    }

    /// Whether the chunk is in the open pack or in one uploading.
    pub(super) fn pending(&self, id: &blake3::Hash) -> Result<bool> {
        Ok(self
            .writer
            .lock()
            .map_err(|_| Error::worker_panicked())?
            .pending
            .contains(id))
    }

    /// Adds a chunk's blob to the open pack, and starts its upload once it
    /// is full. Returns the bytes added: none for a chunk already pending.
    pub(super) fn add(self: &Arc<Self>, id: &blake3::Hash, parts: &[&[u8]]) -> Result<u64> {
        self.check()?;
        let full = {
            let mut w = self.writer.lock().map_err(|_| Error::worker_panicked())?;
            if !w.pending.insert(*id) {
                return Ok(0);
            }
            if w.open.is_empty() {
                // Room for the pack, the blob that fills it past its size,
                // and its trailer.
                let room = self.pack_size.saturating_add(self.pack_size / 4);
                w.open.reserve(usize::try_from(room).unwrap_or(usize::MAX));
            }
            if let Err(e) = w.open.push(*id, parts) {
                w.pending.remove(id);
                return Err(e);
            }
            if w.open.len() >= self.pack_size {
                Some(std::mem::take(&mut w.open))
            } else {
                None
            }
        };
        if let Some(pack) = full {
            self.start(pack)?;
        }
        Ok(parts.iter().map(|p| p.len() as u64).sum())
    }

    /// Uploads the open pack, waits for every upload, and then uploads the
    /// pack index of every pack uploaded since the last: after it, every
    /// chunk written is in the bucket and findable, and a manifest may
    /// name it.
    pub(super) fn flush(self: &Arc<Self>) -> Result<()> {
        let open = {
            let mut w = self.writer.lock().map_err(|_| Error::worker_panicked())?;
            std::mem::take(&mut w.open)
        };
        if !open.is_empty() {
            self.start(open)?;
        }
        self.wait(|u| u.running == 0)?;
        self.check()?;
        self.write_pack_index()
    }

    /// Waits for a slot, then uploads `pack` on a thread of its own.
    fn start(self: &Arc<Self>, pack: PackBuilder) -> Result<()> {
        {
            // Waited for and taken under one lock, so that two workers
            // never both take the last slot.
            let u = self.uploads.lock().map_err(|_| Error::worker_panicked())?;
            let mut u = self
                .changed
                .wait_while(u, |u| u.running >= IN_FLIGHT && u.failed.is_none())
                .map_err(|_| Error::worker_panicked())?;
            if u.failed.is_none() {
                u.running += 1;
            } else {
                drop(u);
                return self.check();
            }
        }
        let slot = Slot(Arc::clone(self));
        let spawned = std::thread::Builder::new()
            .name("vsnap-upload".into())
            .spawn(move || {
                if let Err(e) = slot.0.upload(pack) {
                    slot.fail(e);
                }
            });
        match spawned {
            Ok(_) => Ok(()),
            // The pack's chunks stay pending, never uploaded: as sticky
            // as a failed upload.
            Err(e) => {
                let err = Error::io(e).during("start a pack's upload");
                if let Ok(mut u) = self.uploads.lock() {
                    u.failed.get_or_insert(Failed::Told(err.to_string()));
                }
                Err(err)
            }
        }
    }

    fn wait(&self, ready: impl Fn(&Uploads) -> bool) -> Result<()> {
        let u = self.uploads.lock().map_err(|_| Error::worker_panicked())?;
        let _ready = self
            .changed
            .wait_while(u, |u| !ready(u) && u.failed.is_none())
            .map_err(|_| Error::worker_panicked())?;
        Ok(())
    }

    /// The failure of an earlier upload, if one failed.
    fn check(&self) -> Result<()> {
        let mut u = self.uploads.lock().map_err(|_| Error::worker_panicked())?;
        match u.failed.take() {
            None => Ok(()),
            Some(Failed::Fresh(e)) => {
                u.failed = Some(Failed::Told(e.to_string()));
                Err(e)
            }
            Some(Failed::Told(msg)) => {
                let err = Error::from(ErrorKind::Remote {
                    reason: format!("an earlier pack upload failed: {msg}"),
                    cause: None,
                });
                u.failed = Some(Failed::Told(msg));
                Err(err)
            }
        }
    }

    fn upload(&self, pack: PackBuilder) -> Result<()> {
        let ids: Vec<blake3::Hash> = pack.ids().collect();
        let (mut bytes, mut name, mut entries) = pack.finish();
        // The same name is the same bytes, so a pack there already is this
        // one: unless gc condemned it (it will delete it, whatever this
        // backup names) or it is not what its name says. Then these
        // chunks go up under a name of their own.
        let taken = self
            .known
            .read()
            .map_err(|_| Error::worker_panicked())?
            .as_ref()
            .is_some_and(|k| k.condemned.contains(&name) || k.unusable.contains(&name));
        if taken {
            (bytes, name, entries) = salted(&bytes, &entries)?;
        }
        let len = bytes.len() as u64;
        let data_end = entries.last().map_or(0, |e| e.offset + u64::from(e.length));
        let trailer = bytes.get(data_end as usize..).unwrap_or_default().to_vec();
        let put = self
            .store
            .put_new(&format!("{PACKS}{}", name.to_hex()), bytes);
        let mut w = self.writer.lock().map_err(|_| Error::worker_panicked())?;
        for id in &ids {
            w.pending.remove(id);
        }
        let created = put?;
        {
            let mut known = self.known.write().map_err(|_| Error::worker_panicked())?;
            let known = known.get_or_insert_with(Known::default);
            if created {
                // A pack that was missing is there again.
                known.unusable.remove(&name);
            }
            known.add(name, &entries)?;
        }
        w.uploaded.push(Record { name, len, trailer });
        let full = w.uploaded.len() >= PACKS_PER_INDEX;
        drop(w);
        if full {
            self.write_pack_index()?;
        }
        Ok(())
    }

    fn write_pack_index(&self) -> Result<()> {
        let mut w = self.writer.lock().map_err(|_| Error::worker_panicked())?;
        if w.uploaded.is_empty() {
            return Ok(());
        }
        let bytes = encode_pack_index(&w.uploaded);
        let hex = blake3::hash(&bytes).to_hex();
        if let Some(c) = &self.cache {
            let _ = write_cache(&c.join(hex.as_str()), &bytes);
        }
        self.store.put_new(&format!("{PACK_INDEXES}{hex}"), bytes)?;
        w.uploaded.clear();
        Ok(())
    }
}

/// The pack `bytes` (entries `entries`) with one more blob: a chunk of 32
/// random bytes that no snapshot names, so that its name is new. gc finds
/// it unmarked and collects it with the pack's other dead chunks.
fn salted(
    bytes: &[u8],
    entries: &[crate::pack::PackEntry],
) -> Result<(Vec<u8>, blake3::Hash, Vec<crate::pack::PackEntry>)> {
    let mut b = PackBuilder::new();
    b.reserve(bytes.len() + 128);
    for e in entries {
        let at = usize::try_from(e.offset).unwrap_or(usize::MAX);
        let blob = at
            .checked_add(e.length as usize)
            .and_then(|end| bytes.get(at..end))
            .ok_or_else(|| {
                Error::from(ErrorKind::InvalidArgument(
                    "a pack entry past the pack's end".into(),
                ))
            })?;
        b.push(e.id, &[blob])?;
    }
    let salt: Vec<u8> = [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()]
        .iter()
        .flat_map(|u| *u.as_bytes())
        .collect();
    let (head, payload) = crate::blob::encode(crate::blob::BlobKind::Chunk, &salt, 1)?;
    b.push(blake3::hash(&salt), &[&head, &payload])?;
    Ok(b.finish())
}
