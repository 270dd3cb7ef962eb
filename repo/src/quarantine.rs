//! Moving a damaged manifest or pack index aside.
//!
//! gc deletes nothing while a manifest, an index or a pack index cannot be
//! read: what it references is unknown, and any chunk might be its. The
//! operator, having looked (verify names the damage), moves the object
//! aside under `quarantine/`, where nothing reads it but people; gc then
//! runs again, and collects what only the quarantined object referenced.
//! Nothing is deleted: the object's bytes stay for forensics, and moving
//! the file back undoes it.
//!
//! A snapshot whose index is damaged is quarantined by its manifest: the
//! index, no longer named, goes with gc. A pack index quarantined leaves
//! its packs unindexed, so gc removes them after the grace period, and
//! the snapshots that used their chunks report damage in verify (or heal
//! at the next backup of the same data, which stores those chunks again).

use std::path::PathBuf;

use serde::Serialize;

use crate::error::{ErrorKind, Result};
use crate::Repository;

/// Where quarantined objects go, at the repository's root.
pub const QUARANTINE: &str = "quarantine";

/// What [`quarantine`] moved.
#[derive(Debug, Clone, Serialize)]
pub struct Quarantined {
    /// `"manifest"` or `"pack index"`.
    pub what: &'static str,
    /// The snapshot's id, or the pack index's name.
    pub name: String,
    pub from: PathBuf,
    pub to: PathBuf,
}

/// Moves aside the snapshot `name` (its id, or a prefix only it has;
/// readable or not), or in a bucket the pack index `name` (its BLAKE3, or
/// `packindex/` and that).
pub fn quarantine(repo: &Repository, name: &str) -> Result<Quarantined> {
    let name = name.trim();
    if name.is_empty() {
        return Err(ErrorKind::NoSuchSnapshot(String::new()).into());
    }
    let listed = repo.list()?;
    let hits: Vec<&crate::Listed> = listed.iter().filter(|l| l.id.starts_with(name)).collect();
    let exact = listed.iter().find(|l| l.id == name);
    let (what, rel, id) = match (
        exact.or(hits.first().copied().filter(|_| hits.len() == 1)),
        hits.as_slice(),
    ) {
        (Some(l), _) => ("manifest", format!("snapshots/{}.json", l.id), l.id.clone()),
        (None, []) => {
            let prefix = crate::bucket::PACK_INDEXES;
            let hex = name.strip_prefix(prefix).unwrap_or(name);
            if !repo.is_bucket() || blake3::Hash::from_hex(hex).is_err() {
                return Err(ErrorKind::NoSuchSnapshot(name.to_owned()).into());
            }
            ("pack index", format!("{prefix}{hex}"), hex.to_owned())
        }
        (None, many) => {
            return Err(ErrorKind::AmbiguousSnapshot {
                prefix: name.to_owned(),
                count: many.len(),
            }
            .into())
        }
    };
    let from = repo.display(&rel);
    let to = rel.replace('/', ".");
    match repo.backend.quarantine(&rel, &to)? {
        Some(to) => Ok(Quarantined {
            what,
            name: id,
            from,
            to,
        }),
        None if what == "pack index" => Err(ErrorKind::InvalidArgument(format!(
            "no snapshot matches {name:?}, and the bucket holds no pack index of that name"
        ))
        .into()),
        None => Err(ErrorKind::NoSuchSnapshot(name.to_owned()).into()),
    }
}
