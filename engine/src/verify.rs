//! Proving a repository has not rotted: every manifest's self-digest,
//! every index's digest, and every referenced chunk read back, its CRC
//! checked, decompressed and re-hashed. Chunks are read in inode order,
//! which on most filesystems is close to on-disk order, so a cold verify
//! seeks less. Bad chunks are moved aside (`*.bad`) so the next backup
//! that meets their content stores it again.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::pipeline::Progress;
use crate::repo::{Entry, Repository};

/// What is wrong, and what it hits.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// `manifest`, `index` or `chunk`.
    pub what: &'static str,
    /// The manifest's path, the index's digest or the chunk's digest.
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
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Verifies the snapshots whose ids start with one of `only` (all when
/// empty), with `threads` readers.
pub fn verify(
    repo: &Repository,
    only: &[String],
    threads: usize,
    progress: &Progress,
) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    // Every referenced chunk: its plaintext length and who uses it.
    let mut chunks: HashMap<blake3::Hash, (u64, BTreeSet<String>)> = HashMap::new();
    let listed = repo.list()?;
    if let Some(prefix) = only
        .iter()
        .find(|p| !listed.iter().any(|l| l.id.starts_with(p.as_str())))
    {
        return Err(crate::ErrorKind::NoSuchSnapshot(prefix.clone()).into());
    }
    for l in listed {
        if !only.is_empty() && !only.iter().any(|p| l.id.starts_with(p.as_str())) {
            continue;
        }
        report.snapshots += 1;
        let m = match l.manifest {
            Ok(m) => m,
            Err(e) => {
                report.problems.push(Problem {
                    what: "manifest",
                    name: l.path.display().to_string(),
                    error: e.to_string(),
                    affects: vec![l.id.clone()],
                });
                continue;
            }
        };
        for disk in &m.disks {
            report.disks += 1;
            let who = format!("{}:{}", m.id, disk.name);
            let index = match repo.read_index(&disk.index) {
                Ok(i) => i,
                Err(e) => {
                    report.problems.push(Problem {
                        what: "index",
                        name: disk.index.clone(),
                        error: e.to_string(),
                        affects: vec![who],
                    });
                    continue;
                }
            };
            for (i, e) in index.entries.iter().enumerate() {
                if let Entry::Data(id) = e {
                    let len = index.range(i).1;
                    chunks
                        .entry(*id)
                        .or_insert_with(|| (len, BTreeSet::new()))
                        .1
                        .insert(who.clone());
                }
            }
        }
    }
    // Inode order; a missing chunk sorts first and is reported as such.
    let mut order: Vec<(u64, [u8; 32])> = chunks
        .keys()
        .map(|id| {
            let ino = std::fs::metadata(repo.chunk_path(id)).map_or(0, |m| m.ino());
            (ino, *id.as_bytes())
        })
        .collect();
    order.sort_unstable();
    let total: u64 = chunks.values().map(|c| c.0).sum();
    Progress::add(&progress.total, total);
    let next = AtomicUsize::new(0);
    let bytes = AtomicU64::new(0);
    let bad: Mutex<Vec<(blake3::Hash, Error)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut buf = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(_, raw)) = order.get(i) else { break };
                    let id = blake3::Hash::from_bytes(raw);
                    let len = chunks.get(&id).map_or(0, |c| c.0);
                    buf.resize(len as usize, 0);
                    if let Err(e) = repo.read_chunk(&id, &mut buf) {
                        if let Ok(mut b) = bad.lock() {
                            b.push((id, e));
                        }
                    }
                    bytes.fetch_add(len, Ordering::Relaxed);
                    Progress::add(&progress.done, len);
                }
            });
        }
    });
    report.chunks = order.len() as u64;
    report.bytes = bytes.into_inner();
    let mut bad = bad
        .into_inner()
        .map_err(|_| Error::io(std::io::Error::other("a verify thread panicked")))?;
    bad.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    for (id, e) in bad {
        let path = repo.chunk_path(&id);
        if path.exists() {
            let mut aside = path.clone().into_os_string();
            aside.push(".bad");
            if std::fs::rename(&path, &aside).is_ok() {
                report.moved_aside += 1;
            }
        }
        report.problems.push(Problem {
            what: "chunk",
            name: id.to_hex().to_string(),
            error: e.to_string(),
            affects: chunks
                .get(&id)
                .map(|c| c.1.iter().cloned().collect())
                .unwrap_or_default(),
        });
    }
    Ok(report)
}
