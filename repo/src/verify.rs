//! Proving a repository has not rotted, and that what it says holds:
//! every manifest's self-digest and names, every index's digest and its
//! fit to its disk, every referenced chunk read back (its CRC checked,
//! decompressed and re-hashed), and each disk's digest rebuilt from its
//! chunks in the same pass. Whatever verify passes, restore restores.
//!
//! Chunks are read in inode order, which on most filesystems is close to
//! on-disk order, so a cold verify seeks less. Bad chunks are moved aside
//! (`*.bad`) so the next backup that meets their content stores it again.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};
use crate::{Entry, Repository};
use vsnap_engine::digest::{DigestPlan, Leaf, ZeroCache};
use vsnap_engine::pipeline::Progress;

/// What is wrong, and what it hits.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// `tree`, `manifest`, `index`, `chunk` or `disk`.
    pub what: &'static str,
    /// The path (tree, manifest), the digest (index, chunk) or the
    /// snapshot:disk (disk).
    pub name: String,
    pub error: String,
    /// The snapshots (id:disk) it hits.
    pub affects: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub snapshots: usize,
    pub disks: usize,
    pub chunks: u64,
    /// Plaintext bytes of the chunks checked.
    pub bytes: u64,
    pub problems: Vec<Problem>,
    /// Bad chunks renamed to `*.bad`.
    pub moved_aside: u64,
    /// Chunks the repository holds that no snapshot names, when every
    /// snapshot was checked: an interrupted backup's, a running one's, or
    /// forgotten snapshots'. Not damage; gc removes what no backup holds.
    pub unreferenced_chunks: u64,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One disk being checked: its digest is rebuilt leaf by leaf as its
/// chunks are read.
struct DiskCheck {
    who: String,
    index: String,
    plan: DigestPlan,
    expected: String,
    leaves: Mutex<Vec<Option<Leaf>>>,
    pieces: Option<crate::index::Pieces>,
    /// The index's own leaves (zeros where a cell is not data), which an
    /// incremental backup will trust: each must be the one rebuilt from
    /// its chunk.
    stored: Option<Vec<[u8; 32]>>,
}

/// A referenced chunk: its plaintext length, who uses it, and where.
struct Use {
    len: u64,
    affects: BTreeSet<String>,
    /// (disk, cell) pairs; most chunks have one.
    at: Vec<(usize, u64)>,
}

fn poisoned() -> Error {
    Error::io(std::io::Error::other("a verify thread panicked"))
}

/// Verifies the snapshots whose ids start with one of `only` (all when
/// empty; `latest` is the newest, as [`Repository::find`] says), with
/// `threads` readers. `zero_cache`, when it is for the
/// repository's chunk size, saves hashing the zeros of sparse disks.
pub fn verify(
    repo: &Repository,
    only: &[String],
    threads: usize,
    zero_cache: Option<&ZeroCache>,
    progress: &Progress,
) -> Result<VerifyReport> {
    let _lease = repo.lease_for_reading("verify")?;
    let mut report = VerifyReport::default();
    let chunk_size = repo.config().chunk_size;
    let zero_cache = zero_cache.filter(|c| c.leaf_size() == chunk_size);
    for s in repo.strays()? {
        report.problems.push(Problem {
            what: "tree",
            name: s.path.display().to_string(),
            error: format!(
                "a {} where {} belongs; it is never followed",
                s.found, s.expected
            ),
            affects: Vec::new(),
        });
    }
    for d in repo.damaged_objects()? {
        report.problems.push(Problem {
            what: d.what,
            name: d.path.display().to_string(),
            error: d.reason,
            affects: Vec::new(),
        });
    }
    let mut chunks: HashMap<blake3::Hash, Use> = HashMap::new();
    let mut disks: Vec<DiskCheck> = Vec::new();
    let only: Vec<String> = only
        .iter()
        .map(|p| match p.as_str() {
            "latest" => repo.find(p).map(|m| m.id),
            _ => Ok(p.clone()),
        })
        .collect::<Result<_>>()?;
    for l in repo.list_only(&only)? {
        report.snapshots += 1;
        let m = match l.manifest {
            Ok(m) => m,
            Err(e) => {
                report.problems.push(Problem {
                    what: "manifest",
                    name: l.path.display().to_string(),
                    error: vsnap_error::chain(&e),
                    affects: vec![l.id.clone()],
                });
                continue;
            }
        };
        for disk in &m.disks {
            report.disks += 1;
            let who = format!("{}:{}", m.id, disk.name);
            let index = match repo.read_index(disk) {
                Ok(i) => i,
                Err(e) => {
                    report.problems.push(Problem {
                        what: "index",
                        name: disk.index.clone(),
                        error: vsnap_error::chain(&e),
                        affects: vec![who],
                    });
                    continue;
                }
            };
            let plan = DigestPlan::new(index.virtual_size, index.chunk_size)?;
            let n = disks.len();
            let mut leaves = vec![None; index.entries.len()];
            for (i, e) in index.entries.iter().enumerate() {
                let cell = i as u64;
                match e {
                    Entry::Data(id) => {
                        let u = chunks.entry(*id).or_insert_with(|| Use {
                            len: index.range(i).1,
                            affects: BTreeSet::new(),
                            at: Vec::new(),
                        });
                        u.affects.insert(who.clone());
                        u.at.push((n, cell));
                    }
                    _ => {
                        leaves[i] = Some(match zero_cache {
                            Some(c) => c.zero_leaf(&plan, cell),
                            None => {
                                let (offset, len) = plan.leaf_range(cell);
                                plan.zero_leaf(offset, len)
                            }
                        });
                    }
                }
            }
            disks.push(DiskCheck {
                who,
                index: disk.index.clone(),
                plan,
                expected: disk.digest.clone(),
                leaves: Mutex::new(leaves),
                pieces: index.pieces,
                stored: index.leaves,
            });
        }
    }
    // Inode order; a missing chunk sorts first and is reported as such.
    let mut order: Vec<(u64, [u8; 32])> = chunks
        .keys()
        .map(|id| (repo.chunk_inode(id), *id.as_bytes()))
        .collect();
    order.sort_unstable();
    let planned: Vec<blake3::Hash> = order
        .iter()
        .map(|&(_, raw)| blake3::Hash::from_bytes(raw))
        .collect();
    repo.plan_reads(&planned)?;
    if only.is_empty() {
        let held = repo.usage()?.chunks;
        report.unreferenced_chunks = held.saturating_sub(chunks.len() as u64);
    }
    let total: u64 = chunks.values().map(|c| c.len).sum();
    Progress::add(&progress.total, total);
    let next = AtomicUsize::new(0);
    let bytes = AtomicU64::new(0);
    let bad: Mutex<Vec<(blake3::Hash, Error)>> = Mutex::new(Vec::new());
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    // (disk, piece) pairs whose piece map disagrees with the chunk.
    let misplaced: Mutex<Vec<(usize, u64)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut buf = Vec::new();
                loop {
                    // A cancelled run stops here; what was not read is
                    // not reported as checked.
                    if progress.stop_requested() {
                        if let Ok(mut f) = failed.lock() {
                            f.get_or_insert_with(|| {
                                Error::from(ErrorKind::Engine(Box::new(
                                    vsnap_engine::ErrorKind::Stopped,
                                )))
                            });
                        }
                        break;
                    }
                    #[cfg(feature = "failpoints")]
                    fail::fail_point!("verify-chunk");
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(_, raw)) = order.get(i) else { break };
                    let id = blake3::Hash::from_bytes(raw);
                    let Some(u) = chunks.get(&id) else { continue };
                    buf.resize(u.len as usize, 0);
                    match repo.read_chunk(&id, &mut buf) {
                        Ok(()) => {
                            // The chunk's place in each disk that holds it.
                            for &(d, cell) in &u.at {
                                let Some(disk) = disks.get(d) else { continue };
                                let (offset, _) = disk.plan.leaf_range(cell);
                                let wrong =
                                    disk.pieces.as_ref().and_then(|p| p.check(offset, &buf));
                                if let (Some(piece), Ok(mut m)) = (wrong, misplaced.lock()) {
                                    m.push((d, piece));
                                }
                                let leaf = disk.plan.leaf(offset, &buf);
                                match disk.leaves.lock() {
                                    Ok(mut l) => {
                                        if let Some(slot) = l.get_mut(cell as usize) {
                                            *slot = Some(leaf);
                                        }
                                    }
                                    Err(_) => {
                                        if let Ok(mut f) = failed.lock() {
                                            *f = Some(poisoned());
                                        }
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            if let Ok(mut b) = bad.lock() {
                                b.push((id, e));
                            }
                        }
                    }
                    bytes.fetch_add(u.len, Ordering::Relaxed);
                    Progress::add(&progress.done, u.len);
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().map_err(|_| poisoned())? {
        return Err(e);
    }
    report.chunks = order.len() as u64;
    report.bytes = bytes.into_inner();
    let mut bad = bad.into_inner().map_err(|_| poisoned())?;
    bad.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let ids: Vec<blake3::Hash> = bad.iter().map(|(id, _)| *id).collect();
    match repo.move_chunks_aside(&ids) {
        Ok(n) => report.moved_aside = n,
        // The chunks are reported all the same; only the repair waits
        // for a later run.
        Err(e) => report.problems.push(Problem {
            what: "chunk",
            name: format!("{} bad chunk(s)", ids.len()),
            error: format!("could not be set aside: {e}"),
            affects: Vec::new(),
        }),
    }
    for (id, e) in bad {
        report.problems.push(Problem {
            what: "chunk",
            name: id.to_hex().to_string(),
            error: vsnap_error::chain(&e),
            affects: chunks
                .get(&id)
                .map(|c| c.affects.iter().cloned().collect())
                .unwrap_or_default(),
        });
    }
    let mut misplaced = misplaced.into_inner().map_err(|_| poisoned())?;
    misplaced.sort_unstable();
    misplaced.dedup_by_key(|m| m.0);
    for (d, piece) in misplaced {
        let Some(disk) = disks.get(d) else { continue };
        report.problems.push(Problem {
            what: "index",
            name: disk.index.clone(),
            error: format!(
                "its piece map disagrees with the chunks, first at piece {piece}; a restore would leave data out or allocate zeros"
            ),
            affects: vec![disk.who.clone()],
        });
    }
    // Each disk whose chunks all read back: its digest, rebuilt, must be
    // the one its manifest records. (A disk with a bad chunk is reported
    // through that chunk.)
    for disk in disks {
        let leaves = disk.leaves.into_inner().map_err(|_| poisoned())?;
        let Some(leaves) = leaves.into_iter().collect::<Option<Vec<Leaf>>>() else {
            continue;
        };
        let wrong = disk.stored.as_ref().and_then(|stored| {
            stored
                .iter()
                .zip(&leaves)
                .position(|(s, leaf)| *s != [0; 32] && Leaf::from_bytes(&disk.plan, *s) != *leaf)
        });
        if let Some(cell) = wrong {
            report.problems.push(Problem {
                what: "index",
                name: disk.index.clone(),
                error: format!(
                    "its leaf for cell {cell} is not the one its chunk hashes to; an incremental backup would fold a wrong digest from it"
                ),
                affects: vec![disk.who.clone()],
            });
        }
        let rebuilt = disk.plan.root(&leaves)?.to_hex();
        if rebuilt.as_str() != disk.expected {
            report.problems.push(Problem {
                what: "disk",
                name: disk.who.clone(),
                error: format!(
                    "the digest rebuilt from its chunks is {rebuilt}, the manifest records {}",
                    disk.expected
                ),
                affects: vec![disk.who],
            });
        }
    }
    Ok(report)
}
