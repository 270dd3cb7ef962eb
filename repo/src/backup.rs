//! A backup: every image streamed through the engine into the chunk
//! store at once, then an index per image, one `syncfs`, and the manifest.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::index::{Entry, Index, Pieces};
use super::manifest::{Consistency, Disk, DiskStats, Identity, Manifest, MANIFEST_FORMAT};
use super::Repository;
use crate::error::{Error, ErrorKind, Result};
use vsnap_engine::pipeline::{
    Buffer, ChunkKind, ChunkRecord, Known, Options, Progress, Sink, Stored,
};
use vsnap_formats::DiskImage;

#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub vm: String,
    pub host: String,
    pub consistency: Consistency,
    pub freeze: Option<super::FreezeRecord>,
    /// zstd level for new chunks.
    pub level: i32,
    /// Chunks known to be stored already (a [`Preloaded`] set): they are
    /// neither looked up nor written.
    pub known: HashSet<blake3::Hash>,
}

impl BackupOptions {
    /// A backup of VM `vm` from this host, taken as it stands (no guest
    /// quiesced), at zstd level 1: what `vsnap backup FILE…` does.
    pub fn crash_consistent(vm: &str) -> BackupOptions {
        BackupOptions {
            vm: vm.to_owned(),
            host: super::host_name(),
            consistency: Consistency::CrashConsistent,
            freeze: None,
            level: 1,
            known: HashSet::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct BackupOutcome {
    pub manifest: Manifest,
    pub duration: Duration,
    /// The repository's own objects the backup could not use (a bucket's
    /// packs gone or cut short, pack indexes that do not parse): every
    /// chunk it met there it stored again, so the snapshot is whole, but
    /// older snapshots may not be; the operator is told to run verify.
    pub damage_met: Vec<crate::Damaged>,
}

/// Where the engine's chunks go during a backup. Workers call it in
/// parallel: each writes its own new chunks, so writing is as parallel as
/// reading and hashing.
struct RepoSink<'a> {
    repo: &'a Repository,
    /// Each image's index, filled cell by cell as chunks arrive.
    cells: Vec<Mutex<Cells>>,
    /// Each image's piece size, as its map has it.
    piece_sizes: Vec<u64>,
    /// Each image's piece map from the snapshot before, where cells are
    /// taken from it unread: their pieces are copied from it.
    prior_pieces: Vec<Option<Pieces>>,
    chunk_size: u64,
    new_chunks: Vec<AtomicU64>,
    new_bytes: Vec<AtomicU64>,
    /// Chunks known to be stored, by this run or before it: a chunk that
    /// repeats within the run is looked up and written once.
    known: Mutex<HashSet<blake3::Hash>>,
    /// The snapshots being taken, committed as each one's disks finish.
    snapshots: Option<Snapshots<'a>>,
}

/// One image's index as the run fills it.
struct Cells {
    entries: Vec<Entry>,
    pieces: Pieces,
    leaves: Vec<[u8; 32]>,
}

impl Cells {
    fn new(virtual_size: u64, chunk_size: u64, piece_size: u64) -> Cells {
        let n = Index::cells(virtual_size, chunk_size) as usize;
        Cells {
            entries: vec![Entry::Unallocated; n],
            pieces: Pieces::new(piece_size, virtual_size),
            leaves: vec![[0; 32]; n],
        }
    }
}

impl RepoSink<'_> {
    /// Records a cell's entry and leaf, and for a data cell which of its
    /// pieces hold data (`data`, the cell's bytes).
    fn set(
        &self,
        image: usize,
        offset: u64,
        entry: Entry,
        leaf: vsnap_engine::digest::Leaf,
        data: Option<&[u8]>,
    ) -> Result<()> {
        let cell = (offset / self.chunk_size) as usize;
        let piece_size = self
            .piece_sizes
            .get(image)
            .copied()
            .unwrap_or(self.chunk_size);
        let nonzero = match (entry, data) {
            (Entry::Data(_), Some(data)) => Pieces::nonzero(piece_size, offset, data),
            // A cell taken from the snapshot before, unread.
            (Entry::Data(_), None) => match self.prior_pieces.get(image) {
                Some(Some(prior)) => prior.set_in(offset, self.chunk_size),
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        let mut guard = self.cells[image]
            .lock()
            .map_err(|_| Error::worker_panicked())?;
        let cells = &mut *guard;
        cells.pieces.set_all(&nonzero);
        match (cells.entries.get_mut(cell), cells.leaves.get_mut(cell)) {
            (Some(slot), Some(leaf_slot)) => {
                *slot = entry;
                if matches!(entry, Entry::Data(_)) {
                    *leaf_slot = leaf.to_bytes();
                }
                Ok(())
            }
            _ => Err(
                ErrorKind::InvalidArgument(format!("chunk at {offset} is past the index")).into(),
            ),
        }
    }

    fn known(&self) -> Result<std::sync::MutexGuard<'_, HashSet<blake3::Hash>>> {
        self.known.lock().map_err(|_| Error::worker_panicked())
    }
}

impl Sink for RepoSink<'_> {
    fn wants_ids(&self) -> bool {
        true
    }

    fn image_done(
        &self,
        image: usize,
        outcome: std::result::Result<&vsnap_engine::pipeline::ImageDigest, &vsnap_engine::Error>,
    ) {
        self.image_finished(image, outcome);
    }

    fn wants_payload(&self, _: usize, record: &ChunkRecord) -> vsnap_engine::Result<bool> {
        let Some(id) = record.id else {
            return Ok(false);
        };
        if self.known()?.contains(&id) {
            return Ok(false);
        }
        if self.repo.has_chunk(&id)? {
            self.known()?.insert(id);
            return Ok(false);
        }
        Ok(true)
    }

    fn put(
        &self,
        image: usize,
        record: ChunkRecord,
        data: Option<Buffer>,
        stored: Option<Stored<'_>>,
    ) -> vsnap_engine::Result<()> {
        let entry = match (record.kind, record.id) {
            (ChunkKind::Data, Some(id)) => {
                if let (Some(stored), Some(data)) = (stored, &data) {
                    // Another worker may have stored the same chunk since
                    // this one was asked; writing it again is harmless (the
                    // rename replaces identical bytes) but wasted.
                    if self.known()?.insert(id) {
                        let n = self.repo.write_chunk(&id, data, stored)?;
                        self.new_chunks[image].fetch_add(1, Ordering::Relaxed);
                        self.new_bytes[image].fetch_add(n, Ordering::Relaxed);
                    }
                }
                Entry::Data(id)
            }
            (ChunkKind::Zero, _) => Entry::Zero,
            _ => Entry::Unallocated,
        };
        Ok(self.set(image, record.offset, entry, record.leaf, data.as_deref())?)
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The name a disk goes by in `SNAPSHOT:DISK`: its file name, made unique
/// within the snapshot by a `#N` suffix when two sources share one, and
/// made to follow the manifest's name rule (a backslash becomes `_`).
pub fn disk_names(sources: &[PathBuf]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for s in sources {
        let mut base = s
            .file_name()
            .map(|n| n.to_string_lossy().replace('\\', "_"))
            .unwrap_or_else(|| "disk".into());
        // Room for a `#N` suffix within the name's limit.
        let room = super::validate::MAX_NAME - 8;
        if base.len() > room {
            let mut cut = room;
            while !base.is_char_boundary(cut) {
                cut -= 1;
            }
            base.truncate(cut);
        }
        let mut name = base.clone();
        let mut n = 2;
        while names.contains(&name) {
            name = format!("{base}#{n}");
            n += 1;
        }
        names.push(name);
    }
    names
}

/// Refuses, before anything is read or written, a snapshot whose VM, host
/// or disk names would break the manifest's rules ([`crate::validate`]):
/// a snapshot that verify would call damaged is never taken.
pub fn check_names(options: &BackupOptions, sources: &[PathBuf]) -> Result<()> {
    let refuse = |what: &str, name: &str, rule: &str| -> Error {
        ErrorKind::InvalidArgument(format!("{what} {name:?} cannot be recorded: {rule}")).into()
    };
    for (what, name) in [
        ("the VM name", &options.vm),
        ("the host name", &options.host),
    ] {
        if let Some(rule) = super::validate::label_rule(name) {
            return Err(refuse(what, name, rule));
        }
    }
    for (name, source) in disk_names(sources).iter().zip(sources) {
        if let Some(rule) = super::validate::disk_name_rule(name) {
            return Err(refuse("the disk name", name, rule).in_file(source));
        }
    }
    Ok(())
}

/// What backups can know before they start: for each VM, the chunks its
/// last snapshot references that are in the store. A coordinator loads it
/// before it freezes anything; the repository's shared lock is held from
/// then on, so gc cannot remove those chunks before the backups name them.
#[derive(Debug)]
pub struct Preloaded {
    _lock: super::Lock,
    pub known: HashMap<String, HashSet<blake3::Hash>>,
    /// Each VM's readable snapshots, oldest first: where changed-block
    /// tracking finds the base before, without listing the repository
    /// again.
    pub history: HashMap<String, Vec<Manifest>>,
}

impl Repository {
    /// The chunks of each of `vms`' newest readable snapshot that are
    /// present, the snapshots listed once for all of them. A damaged index
    /// only means less is known: those chunks are looked up as the backup
    /// meets them, as without a preload.
    pub fn preload(&self, vms: &[&str]) -> Result<Preloaded> {
        let lock = self.lock_shared()?;
        let mut history: HashMap<String, Vec<Manifest>> = HashMap::new();
        // Oldest first, so each VM's list ends with its newest.
        for m in self.list()?.into_iter().filter_map(|l| l.manifest.ok()) {
            if vms.contains(&m.vm.as_str()) {
                history.entry(m.vm.clone()).or_default().push(m);
            }
        }
        let mut known = HashMap::new();
        for (vm, m) in history.iter().filter_map(|(vm, h)| Some((vm, h.last()?))) {
            let mut chunks = HashSet::new();
            for d in &m.disks {
                let Ok(index) = self.read_index(d) else {
                    continue;
                };
                for e in index.entries {
                    if let Entry::Data(h) = e {
                        chunks.insert(h);
                    }
                }
            }
            chunks.retain(|h| self.has_chunk(h).unwrap_or(false));
            known.insert(vm.clone(), chunks);
        }
        Ok(Preloaded {
            _lock: lock,
            known,
            history,
        })
    }
}

/// One snapshot of a multi-snapshot backup: a VM's disks, and what to
/// record with them.
pub struct SnapshotPlan<'a> {
    pub images: Vec<&'a dyn DiskImage>,
    pub sources: Vec<PathBuf>,
    pub options: BackupOptions,
    /// Changed-block tracking, one per image, or empty where the caller
    /// does not track changes.
    pub tracking: Vec<DiskTracking>,
}

/// What changed-block tracking found for one disk before its backup.
#[derive(Debug, Clone, Default)]
pub struct DiskTracking {
    /// The cells to take from the snapshot before, unread.
    pub reuse: Option<Reuse>,
    /// Why the disk is read whole, if it is.
    pub fallback: Option<String>,
    /// The clone kept as the base for the next backup.
    pub base: Option<super::BaseRecord>,
}

/// The snapshot before, for one disk: its id, its index, and which cells
/// of the disk are unchanged since.
#[derive(Debug, Clone)]
pub struct Reuse {
    pub since: String,
    pub index: Index,
    pub unchanged: Vec<bool>,
}

/// Called from the worker that finished a snapshot, as soon as its own
/// disks are done and its manifest is written (or it failed).
pub type OnSnapshot<'a> = dyn Fn(usize, &Result<BackupOutcome>) + Sync + 'a;

/// Backs up `images` (opened from `sources`) as one snapshot. The engine
/// options' chunk size is the repository's; compression is always on.
pub fn backup(
    repo: &Repository,
    images: &[&dyn DiskImage],
    sources: &[PathBuf],
    opts: &Options,
    backup: &BackupOptions,
    progress: &Progress,
) -> Result<BackupOutcome> {
    let plan = SnapshotPlan {
        images: images.to_vec(),
        sources: sources.to_vec(),
        options: backup.clone(),
        tracking: Vec::new(),
    };
    backup_all(repo, &[plan], opts, progress, &|_, _| {})?
        .pop()
        .unwrap_or_else(|| Err(ErrorKind::InvalidArgument("no snapshot was taken".into()).into()))
}

/// Backs up several snapshots (one per VM, say) in one engine run: every
/// disk of every snapshot streams at once, sharing the workers and the
/// memory budget, so a VM does not wait for the one before it. Each
/// snapshot's manifest is written as soon as its own disks are done, and
/// a failure of one snapshot's disk fails that snapshot only. Returns each
/// snapshot's outcome, in `plans`' order; the outer error stops them all
/// (the repository could not be locked, the engine could not start). The
/// zstd level is the first plan's.
pub fn backup_all(
    repo: &Repository,
    plans: &[SnapshotPlan<'_>],
    opts: &Options,
    progress: &Progress,
    on_done: &OnSnapshot<'_>,
) -> Result<Vec<Result<BackupOutcome>>> {
    let started = Instant::now();
    let time = now_rfc3339();
    for p in plans {
        if p.images.len() != p.sources.len() || p.images.is_empty() {
            return Err(ErrorKind::InvalidArgument("one source path per image".into()).into());
        }
        check_names(&p.options, &p.sources)?;
    }
    let _lock = repo.lock_shared()?;
    let chunk_size = repo.config().chunk_size;
    let opts = Options {
        chunk_size,
        compress: Some(plans.first().map_or(1, |p| p.options.level)),
        keep_chunks: false,
        zero_cache: opts
            .zero_cache
            .clone()
            .filter(|c| c.leaf_size() == chunk_size),
        ..opts.clone()
    };
    // Each snapshot's maps first: one whose disk cannot be mapped fails on
    // its own, and the others run.
    let mut out: Vec<Option<Result<BackupOutcome>>> = Vec::new();
    let mut live: Vec<(usize, &SnapshotPlan<'_>)> = Vec::new();
    let mut maps = Vec::new();
    for (g, p) in plans.iter().enumerate() {
        match p
            .images
            .iter()
            .map(|i| i.allocation_map())
            .collect::<vsnap_formats::Result<Vec<_>>>()
        {
            Ok(m) => {
                maps.extend(m);
                live.push((g, p));
                out.push(None);
            }
            Err(e) => {
                let failed = Err(e.into());
                on_done(g, &failed);
                out.push(Some(failed));
            }
        }
    }
    let images: Vec<&dyn DiskImage> = live
        .iter()
        .flat_map(|(_, p)| p.images.iter().copied())
        .collect();
    let owner: Vec<usize> = live
        .iter()
        .enumerate()
        .flat_map(|(g, (_, p))| std::iter::repeat_n(g, p.images.len()))
        .collect();
    let piece_sizes: Vec<u64> = images
        .iter()
        .map(|i| Pieces::size_for(i.block_size(), chunk_size))
        .collect();
    let mut known = HashSet::new();
    for p in plans {
        known.extend(p.options.known.iter().copied());
    }
    let tracking: Vec<Option<&DiskTracking>> = live
        .iter()
        .flat_map(|(_, p)| (0..p.images.len()).map(|k| p.tracking.get(k)))
        .collect();
    let mut reusable = Vec::with_capacity(images.len());
    let mut prior_pieces = Vec::with_capacity(images.len());
    for ((image, t), &piece) in images.iter().zip(&tracking).zip(&piece_sizes) {
        let reuse = t.and_then(|t| t.reuse.as_ref());
        let (cells, pieces) = match reuse {
            Some(r) => reusable_cells(repo, *image, r, piece, chunk_size, &known)?,
            None => (Vec::new(), None),
        };
        reusable.push(cells);
        prior_pieces.push(pieces);
    }
    let sink = RepoSink {
        repo,
        cells: images
            .iter()
            .zip(&piece_sizes)
            .map(|(i, &piece)| Mutex::new(Cells::new(i.virtual_size(), chunk_size, piece)))
            .collect(),
        piece_sizes,
        prior_pieces,
        chunk_size,
        new_chunks: images.iter().map(|_| AtomicU64::new(0)).collect(),
        new_bytes: images.iter().map(|_| AtomicU64::new(0)).collect(),
        known: Mutex::new(known),
        snapshots: Some(Snapshots {
            plans: live.iter().map(|(_, p)| *p).collect(),
            index: live.iter().map(|(g, _)| *g).collect(),
            owner,
            started,
            time,
            state: live
                .iter()
                .map(|(_, p)| {
                    Mutex::new(Pending {
                        digests: vec![None; p.images.len()],
                        left: p.images.len(),
                        failed: false,
                        outcome: None,
                    })
                })
                .collect(),
            on_done,
        }),
    };
    if images.is_empty() {
        return Ok(out.into_iter().flatten().collect());
    }
    let mut each =
        vsnap_engine::pipeline::run_each(&images, &maps, &reusable, &opts, progress, &sink)?;
    let Some(snapshots) = sink.snapshots else {
        return Err(Error::worker_panicked());
    };
    for (group, st) in snapshots.state.into_iter().enumerate() {
        let st = st.into_inner().map_err(|_| Error::worker_panicked())?;
        let outcome = match st.outcome {
            Some(o) => o,
            // A failed snapshot: the first failure among its own disks,
            // as the engine gave it.
            None => {
                let first = snapshots.owner.partition_point(|&g| g < group);
                let n = snapshots.plans[group].images.len();
                let err = each[first..first + n]
                    .iter_mut()
                    .find_map(|r| {
                        let gone = std::io::Error::other("a worker panicked");
                        std::mem::replace(r, Err(gone.into())).err()
                    })
                    .map_or_else(Error::worker_panicked, Error::from);
                let failed = Err(err);
                on_done(live[group].0, &failed);
                failed
            }
        };
        out[live[group].0] = Some(outcome);
    }
    Ok(out
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Err(Error::worker_panicked())))
        .collect())
}

/// The cells of `image` a backup may take from the snapshot before
/// unread, as [`Known`] for the engine, and that snapshot's piece map to
/// copy their pieces from. A cell qualifies when tracking found it
/// unchanged and the index before can stand for it: a zero cell, or a data
/// cell with its leaf whose chunk is still stored. Anything that does not
/// fit (another geometry, another piece size, no leaves) reuses nothing.
fn reusable_cells(
    repo: &Repository,
    image: &dyn DiskImage,
    reuse: &Reuse,
    piece: u64,
    chunk_size: u64,
    known: &HashSet<blake3::Hash>,
) -> Result<(Vec<Option<Known>>, Option<Pieces>)> {
    let index = &reuse.index;
    let cells = Index::cells(image.virtual_size(), chunk_size) as usize;
    let pieces = index.pieces.as_ref().filter(|p| p.size == piece);
    if index.virtual_size != image.virtual_size()
        || index.chunk_size != chunk_size
        || index.entries.len() != cells
        || reuse.unchanged.len() != cells
        || index.leaves.is_none()
        || pieces.is_none()
    {
        return Ok((Vec::new(), None));
    }
    let plan = vsnap_engine::digest::DigestPlan::new(image.virtual_size(), chunk_size)?;
    let mut out = Vec::with_capacity(cells);
    let mut check = Vec::new();
    for (i, (entry, &same)) in index.entries.iter().zip(&reuse.unchanged).enumerate() {
        out.push(match (same, entry) {
            (false, _) | (_, Entry::Unallocated) => None,
            (true, Entry::Zero) => Some(Known::Zero),
            (true, Entry::Data(id)) => match index.leaf(i, &plan) {
                Some(leaf) => {
                    if !known.contains(id) {
                        check.push((i, *id));
                    }
                    Some(Known::Data { id: *id, leaf })
                }
                None => None,
            },
        });
    }
    // A chunk no longer in place is read again instead.
    for i in missing_chunks(repo, &check)? {
        if let Some(slot) = out.get_mut(i) {
            *slot = None;
        }
    }
    Ok((out, pieces.cloned()))
}

/// Which of `check`'s chunks are not in place, looked up by a few threads
/// at once: each lookup waits on the disk (a cold directory and inode),
/// not on a core.
fn missing_chunks(repo: &Repository, check: &[(usize, blake3::Hash)]) -> Result<Vec<usize>> {
    const LOOKUPS: usize = 8;
    let per = check.len().div_ceil(LOOKUPS).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = check
            .chunks(per)
            .map(|part| {
                s.spawn(move || -> Result<Vec<usize>> {
                    let mut gone = Vec::new();
                    for (i, id) in part {
                        if !repo.chunk_in_place(id)? {
                            gone.push(*i);
                        }
                    }
                    Ok(gone)
                })
            })
            .collect();
        let mut gone = Vec::new();
        for h in handles {
            gone.extend(h.join().map_err(|_| Error::worker_panicked())??);
        }
        Ok(gone)
    })
}

/// The snapshots a run is taking, and how far each has come.
struct Snapshots<'a> {
    /// The snapshots in the run (those whose disks could be mapped).
    plans: Vec<&'a SnapshotPlan<'a>>,
    /// The snapshot each image of the run belongs to.
    owner: Vec<usize>,
    started: Instant,
    time: String,
    state: Vec<Mutex<Pending>>,
    /// Each snapshot's index in the caller's plans.
    index: Vec<usize>,
    on_done: &'a OnSnapshot<'a>,
}

struct Pending {
    digests: Vec<Option<vsnap_engine::pipeline::ImageDigest>>,
    left: usize,
    /// A disk of it failed: it is reported after the run, with the
    /// engine's own error.
    failed: bool,
    /// Set when it was committed, or its commit failed.
    outcome: Option<Result<BackupOutcome>>,
}

impl RepoSink<'_> {
    /// An image is through: when it is its snapshot's last, the snapshot
    /// is committed (indexes, one `syncfs`, the manifest) or failed.
    fn image_finished(
        &self,
        image: usize,
        outcome: std::result::Result<&vsnap_engine::pipeline::ImageDigest, &vsnap_engine::Error>,
    ) {
        let Some(snaps) = &self.snapshots else { return };
        let Some(&group) = snaps.owner.get(image) else {
            return;
        };
        let first = snaps.owner.partition_point(|&g| g < group);
        let Ok(mut st) = snaps.state[group].lock() else {
            return;
        };
        match outcome {
            Ok(d) => st.digests[image - first] = Some(d.clone()),
            Err(_) => st.failed = true,
        }
        st.left -= 1;
        if st.left > 0 || st.failed {
            return;
        }
        let result = self.commit(snaps, group, first, &st.digests);
        (snaps.on_done)(snaps.index[group], &result);
        st.outcome = Some(result);
    }

    /// Writes a finished snapshot's indexes and, once they and its chunks
    /// are durable, its manifest.
    fn commit(
        &self,
        snaps: &Snapshots<'_>,
        group: usize,
        first: usize,
        digests: &[Option<vsnap_engine::pipeline::ImageDigest>],
    ) -> Result<BackupOutcome> {
        let plan = &snaps.plans[group];
        let names = disk_names(&plan.sources);
        let chunk_size = self.chunk_size;
        let mut disks = Vec::new();
        for (k, image) in plan.images.iter().enumerate() {
            let i = first + k;
            let digest = digests[k].as_ref().ok_or_else(Error::worker_panicked)?;
            let cells = std::mem::replace(
                &mut *self.cells[i].lock().map_err(|_| Error::worker_panicked())?,
                Cells::new(0, chunk_size, chunk_size),
            );
            let piece_size = cells.pieces.size;
            let index = Index {
                virtual_size: image.virtual_size(),
                chunk_size,
                entries: cells.entries,
                pieces: Some(cells.pieces),
                leaves: Some(cells.leaves),
            };
            let index_digest = self.repo.write_index(&index)?;
            let source = &plan.sources[k];
            disks.push(Disk {
                name: names[k].clone(),
                source: std::path::absolute(source).unwrap_or_else(|_| source.clone()),
                format: image.format(),
                virtual_size: image.virtual_size(),
                identity: Identity::of(*image),
                digest: digest.digest.to_hex().to_string(),
                index: index_digest.to_hex().to_string(),
                piece_size: Some(piece_size),
                leaves: true,
                tracking: plan.tracking.get(k).map(|t| super::Tracking {
                    since: t.reuse.as_ref().map(|r| r.since.clone()),
                    reused_cells: digest.reused_chunks,
                    fallback: t.fallback.clone(),
                    base: t.base.clone(),
                }),
                stats: DiskStats {
                    bytes_read: digest.bytes_read,
                    data_chunks: digest.data_chunks,
                    zero_chunks: digest.zero_chunks,
                    unallocated_chunks: digest.unallocated_chunks,
                    new_chunks: self.new_chunks[i].load(Ordering::Relaxed),
                    new_bytes: self.new_bytes[i].load(Ordering::Relaxed),
                },
            });
        }
        // Chunks and indexes durable before the manifest names them.
        self.repo.sync_all()?;
        let id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
        let o = &plan.options;
        let manifest = Manifest {
            self_blake3: String::new(),
            format: MANIFEST_FORMAT,
            id,
            time: snaps.time.clone(),
            host: o.host.clone(),
            vm: o.vm.clone(),
            consistency: o.consistency,
            freeze: o.freeze.clone(),
            chunk_size,
            disks,
        };
        self.repo.write_manifest(&manifest)?;
        let manifest = self.repo.read_manifest(&manifest.id)?;
        Ok(BackupOutcome {
            manifest,
            duration: snaps.started.elapsed(),
            damage_met: self.repo.damaged_objects()?,
        })
    }
}
