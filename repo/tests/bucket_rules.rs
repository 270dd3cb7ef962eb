//! A bucket's rules, against the in-memory object store: its clock moves
//! when a test says, and it refuses writes when told, so grace periods,
//! leases, a failed upload, repacking and a session's fresh view are
//! checked without a server and without waiting.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vsnap_engine::pipeline::{Options, Progress};
use vsnap_repo::mem_store::MemStore;
use vsnap_repo::{BackupOptions, GcOptions, Repository};

const CHUNK: u64 = 1 << 20;
const PACK: u64 = 1 << 20;

fn bucket() -> (Arc<MemStore>, Repository) {
    let store = Arc::new(MemStore::default());
    let repo = Repository::init_bucket(store.clone(), CHUNK, PACK, None).unwrap();
    (store, repo)
}

/// A raw image of `chunks` chunks, each different from every other
/// image's (by `seed`), none zero.
fn image(dir: &Path, name: &str, seed: u8, chunks: u64) -> PathBuf {
    let path = dir.join(name);
    let mut bytes = vec![0u8; (chunks * CHUNK) as usize];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i as u64 % 251) as u8 ^ seed ^ (i as u64 / CHUNK) as u8 | 1;
    }
    std::fs::write(&path, bytes).unwrap();
    path
}

fn backup(repo: &Repository, image: &Path) -> vsnap_repo::Result<vsnap_repo::Manifest> {
    backup_outcome(repo, image).map(|o| o.manifest)
}

/// A backup's whole outcome: its manifest, and the damage it met.
fn backup_outcome(
    repo: &Repository,
    image: &Path,
) -> vsnap_repo::Result<vsnap_repo::BackupOutcome> {
    let spec = BackupOptions::crash_consistent("vm");
    let opts = Options {
        chunk_size: CHUNK,
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
}

fn verify_clean(repo: &Repository) {
    let report = vsnap_repo::verify::verify(repo, &[], 2, None, &Progress::default()).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
}

/// One run of gc, as `vsnap gc` is: a process of its own, which reads the
/// bucket afresh (a session of `repo`); it repacks packs whose live
/// chunks fill less than `repack_below` percent of them.
fn gc_with(repo: &Repository, grace: Duration, repack_below: u8) -> vsnap_repo::GcReport {
    vsnap_repo::gc(
        &repo.session().unwrap(),
        &GcOptions {
            grace,
            repack_below,
            ..GcOptions::default()
        },
    )
    .unwrap()
}

/// gc that never repacks.
fn gc(repo: &Repository, grace: Duration) -> vsnap_repo::GcReport {
    gc_with(repo, grace, 0)
}

#[test]
fn a_second_repository_is_never_made_over_the_first() {
    let (store, repo) = bucket();
    let err = Repository::init_bucket(store.clone(), 2 * CHUNK, PACK, None).unwrap_err();
    assert!(
        err.to_string().contains("a repository is there already"),
        "{err}"
    );
    let again = Repository::open_bucket(store, None).unwrap();
    assert_eq!(again.config().chunk_size, CHUNK);
    assert_eq!(again.config().id, repo.config().id);
}

#[test]
fn a_condemned_pack_goes_only_after_its_grace_and_every_older_lease() {
    let dir = tempfile::tempdir().unwrap();
    let (store, repo) = bucket();
    let first = backup(&repo, &image(dir.path(), "a.raw", 1, 3)).unwrap();
    vsnap_repo::forget(&repo, std::slice::from_ref(&first.id)).unwrap();
    let grace = Duration::from_secs(600);
    store.advance(grace * 2);
    // A restore that began before the condemnation may still read them.
    let reader = repo.lease_for_reading("restore").unwrap();
    let condemned = gc(&repo, grace);
    assert!(condemned.packs_condemned >= 1, "{condemned:?}");
    let packs = store.keys("packs/").len();
    // Past the grace, but the reader's lease is older than the
    // condemnation and still live (rewritten within STALE): they wait.
    store.advance(grace + Duration::from_secs(60));
    let waiting = gc(&repo, grace);
    assert_eq!(waiting.packs_removed, 0, "{waiting:?}");
    assert!(waiting.packs_waiting >= 1, "{waiting:?}");
    assert_eq!(store.keys("packs/").len(), packs);
    drop(reader);
    let removed = gc(&repo, grace);
    assert_eq!(
        removed.packs_removed, condemned.packs_condemned,
        "{removed:?}"
    );
    assert!(
        store.keys("packs/").is_empty(),
        "{:?}",
        store.keys("packs/")
    );
    verify_clean(&repo);
}

#[test]
fn a_session_reads_condemnations_its_parent_handle_had_not_seen() {
    let dir = tempfile::tempdir().unwrap();
    let (store, repo) = bucket();
    let first = backup(&repo, &image(dir.path(), "a.raw", 2, 3)).unwrap();
    // Another host forgets the snapshot and condemns its packs, after
    // this handle read the pack indexes.
    let other = Repository::open_bucket(store.clone(), None).unwrap();
    vsnap_repo::forget(&other, std::slice::from_ref(&first.id)).unwrap();
    store.advance(Duration::from_secs(7200));
    assert!(gc(&other, Duration::from_secs(600)).packs_condemned >= 1);
    // A backup in a session of the old handle stores the chunks again,
    // never naming a chunk in a condemned pack. (Its disk has one chunk
    // more, so its pack is never byte for byte the condemned one, whose
    // name a pack of the same chunks in the same order would take.)
    let session = repo.session().unwrap();
    let second = backup(&session, &image(dir.path(), "b.raw", 2, 4)).unwrap();
    assert_eq!(second.totals().new_chunks, 4, "{:?}", second.totals());
    drop(session);
    // So the condemned packs can go, and the new snapshot stays whole.
    store.advance(Duration::from_secs(7200));
    let removed = gc(&other, Duration::from_secs(600));
    assert!(removed.packs_removed >= 1, "{removed:?}");
    verify_clean(&Repository::open_bucket(store, None).unwrap());
}

#[test]
fn a_failed_upload_fails_its_handle_and_not_a_session() {
    let dir = tempfile::tempdir().unwrap();
    let (store, repo) = bucket();
    store.refuse_writes("packs/", 1);
    let err = backup(&repo, &image(dir.path(), "a.raw", 3, 3)).unwrap_err();
    assert!(err.to_string().contains("refused the write"), "{err}");
    // Its chunks may have been named as stored: the handle stays failed.
    let again = backup(&repo, &image(dir.path(), "b.raw", 4, 2)).unwrap_err();
    assert!(
        again.to_string().contains("an earlier pack upload failed"),
        "{again}"
    );
    assert!(store.keys("snapshots/").is_empty());
    // A session of it has uploads of its own.
    let session = repo.session().unwrap();
    let m = backup(&session, &image(dir.path(), "a.raw", 3, 3)).unwrap();
    assert_eq!(m.totals().new_chunks, 3);
    verify_clean(&session);
}

/// gc with repacking: packs whose live chunks fill less than half of
/// them are repacked.
fn gc_repacking(repo: &Repository, grace: Duration) -> vsnap_repo::GcReport {
    gc_with(repo, grace, 50)
}

/// A pack of four chunks, of which one stays live: `b.raw` is the first
/// chunk of `a.raw`, and the snapshot of `a.raw` is forgotten.
fn mostly_dead_pack(dir: &Path, repo: &Repository, seed: u8) -> String {
    let first = backup(repo, &image(dir, "a.raw", seed, 4)).unwrap();
    let kept = backup(repo, &image(dir, "b.raw", seed, 1)).unwrap();
    assert_eq!(kept.totals().new_chunks, 0, "{:?}", kept.totals());
    vsnap_repo::forget(repo, std::slice::from_ref(&first.id)).unwrap();
    kept.id
}

#[test]
fn repacking_copies_the_live_chunks_before_the_old_pack_goes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, repo) = bucket();
    mostly_dead_pack(dir.path(), &repo, 6);
    let old = store.keys("packs/");
    assert_eq!(old.len(), 1, "{old:?}");
    let grace = Duration::from_secs(600);
    store.advance(grace * 2);
    let repacked = gc_repacking(&repo, grace);
    assert_eq!(repacked.packs_repacked, 1, "{repacked:?}");
    assert_eq!(repacked.chunks_repacked, 1, "{repacked:?}");
    assert_eq!(repacked.packs_condemned, 1, "{repacked:?}");
    // The copy is in a new pack, indexed, before the old one is condemned.
    let both = store.keys("packs/");
    assert_eq!(both.len(), 2, "{both:?}");
    verify_clean(&Repository::open_bucket(store.clone(), None).unwrap());
    store.advance(grace * 2);
    let removed = gc_repacking(&repo, grace);
    assert_eq!(removed.packs_removed, 1, "{removed:?}");
    assert_eq!(removed.packs_repacked, 0, "{removed:?}");
    let now = store.keys("packs/");
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now, old, "the old pack is the one gone");
    verify_clean(&Repository::open_bucket(store, None).unwrap());
}

#[test]
fn a_pack_with_a_damaged_chunk_is_never_repacked() {
    let dir = tempfile::tempdir().unwrap();
    let (store, repo) = bucket();
    mostly_dead_pack(dir.path(), &repo, 7);
    let old = store.keys("packs/");
    assert_eq!(old.len(), 1, "{old:?}");
    // Flip a byte of the live chunk's payload, found by its entry: the
    // workers put chunks in a pack in whatever order they finish them.
    let live = blake3::hash(&std::fs::read(dir.path().join("b.raw")).unwrap());
    assert!(store.tamper(&old[0], |bytes| {
        let entries = vsnap_repo::pack::parse_trailer(bytes, bytes.len() as u64).unwrap();
        let e = entries.iter().find(|e| e.id == live).unwrap();
        bytes[e.offset as usize + e.length as usize - 1] ^= 0x40;
    }));
    let grace = Duration::from_secs(600);
    store.advance(grace * 2);
    let report = gc_repacking(&repo, grace);
    assert_eq!(report.packs_repacked, 0, "{report:?}");
    assert_eq!(report.packs_condemned, 0, "{report:?}");
    // Left as it was, for verify to report.
    assert_eq!(store.keys("packs/"), old);
    let fresh = Repository::open_bucket(store, None).unwrap();
    let verified = vsnap_repo::verify::verify(&fresh, &[], 2, None, &Progress::default()).unwrap();
    assert!(!verified.ok(), "verify must report the damaged chunk");
}

/// The problems verify finds that hit a snapshot (damage that hits none,
/// such as a record of a pack that is gone, is reported apart).
fn snapshots_hit(repo: &Repository) -> Vec<String> {
    let report = vsnap_repo::verify::verify(repo, &[], 2, None, &Progress::default()).unwrap();
    let mut hit: Vec<String> = report
        .problems
        .iter()
        .flat_map(|p| {
            p.affects
                .iter()
                .map(|a| a.split(':').next().unwrap().to_owned())
        })
        .collect();
    hit.sort();
    hit.dedup();
    hit
}

#[test]
fn a_backup_after_a_pack_went_missing_stores_its_chunks_again_and_says_so() {
    use vsnap_repo::ObjectStore;
    let dir = tempfile::tempdir().unwrap();
    let (store, repo) = bucket();
    let img = image(dir.path(), "a.raw", 5, 3);
    let first = backup(&repo, &img).unwrap();
    let packs = store.keys("packs/");
    assert!(!packs.is_empty(), "{packs:?}");
    // Lost: deleted by hand, or by a provider.
    store.delete(&packs[0]).unwrap();
    assert_eq!(
        snapshots_hit(&repo.session().unwrap()),
        std::slice::from_ref(&first.id)
    );
    // A new process backs up the same disk: the chunk the lost pack held
    // is stored again, and the backup says what it met.
    let next = Repository::open_bucket(store.clone(), None).unwrap();
    let outcome = backup_outcome(&next, &img).unwrap();
    assert!(
        outcome.manifest.totals().new_chunks >= 1,
        "{:?}",
        outcome.manifest.totals()
    );
    let met: Vec<String> = outcome
        .damage_met
        .iter()
        .map(|d| format!("{} {}: {}", d.what, d.path.display(), d.reason))
        .collect();
    assert_eq!(met.len(), 1, "{met:?}");
    assert!(
        met[0].starts_with("pack ") && met[0].contains(&packs[0]),
        "{met:?}"
    );
    assert!(
        met[0].contains("names it, but the bucket does not hold it"),
        "{met:?}"
    );
    // Both snapshots are whole again: the chunk is in the bucket once more.
    let fresh = Repository::open_bucket(store, None).unwrap();
    assert_eq!(snapshots_hit(&fresh), Vec::<String>::new());
    assert_eq!(outcome.manifest.disks[0].digest, first.disks[0].digest);
}

#[test]
fn a_pack_byte_for_byte_a_condemned_one_goes_up_under_a_new_name() {
    let dir = tempfile::tempdir().unwrap();
    let (store, repo) = bucket();
    let img = image(dir.path(), "a.raw", 6, 3);
    let first = backup(&repo, &img).unwrap();
    let old = store.keys("packs/");
    vsnap_repo::forget(&repo, std::slice::from_ref(&first.id)).unwrap();
    let grace = Duration::from_secs(600);
    store.advance(grace * 2);
    assert!(gc(&repo, grace).packs_condemned >= old.len() as u64);
    // The same disk again, in a process that knows the condemnation: the
    // same chunks in the same order make the same packs, whose names
    // are condemned. Each goes up under a name of its own.
    let again = Repository::open_bucket(store.clone(), None).unwrap();
    let second = backup(&again, &img).unwrap();
    assert_eq!(second.totals().new_chunks, 3);
    let now = store.keys("packs/");
    assert_eq!(now.len(), old.len() * 2, "{now:?}");
    // The condemned packs go, and the new snapshot stays whole.
    store.advance(grace * 2);
    let removed = gc(&again, grace);
    assert_eq!(removed.packs_removed, old.len() as u64, "{removed:?}");
    assert!(store.keys("packs/").iter().all(|k| !old.contains(k)));
    verify_clean(&Repository::open_bucket(store, None).unwrap());
}

/// A pack index for whole `packs`, stored under its own digest as a
/// hostile writer would.
fn put_pack_index(store: &MemStore, packs: &[&[u8]]) -> String {
    use vsnap_repo::ObjectStore;
    let bytes = vsnap_repo::pack_index_of(packs).unwrap();
    let hex = blake3::hash(&bytes).to_hex().to_string();
    store.put(&format!("packindex/{hex}"), bytes).unwrap();
    hex
}

#[test]
fn a_pack_entry_longer_than_a_chunk_can_be_is_never_fetched() {
    use vsnap_repo::ObjectStore;
    let dir = tempfile::tempdir().unwrap();
    let (store, repo) = bucket();
    let img = image(dir.path(), "a.raw", 8, 2);
    let plain = std::fs::read(&img).unwrap();
    let id = blake3::hash(&plain[..CHUNK as usize]);
    // A pack that claims the disk's first chunk in a blob of 3 MiB, in a
    // repository of 1 MiB chunks: a real object, a valid index.
    let payload = vec![7u8; 3 << 20];
    let head = vsnap_repo::blob::encode_header(
        vsnap_repo::blob::BlobKind::Chunk,
        vsnap_repo::blob::Encoding::Raw,
        &payload,
        payload.len() as u64,
    );
    let mut pack = vsnap_repo::pack::PackBuilder::new();
    pack.push(id, &[&head, &payload]).unwrap();
    let (bytes, name, _) = pack.finish();
    let data_end = (head.len() + payload.len()) as u64;
    store
        .put(&format!("packs/{}", name.to_hex()), bytes.clone())
        .unwrap();
    let index = put_pack_index(&store, &[&bytes]);
    drop(repo);
    let repo = Repository::open_bucket(store.clone(), None).unwrap();
    let outcome = backup_outcome(&repo, &img).unwrap();
    // The chunk is stored for real, not taken from the bogus entry.
    assert_eq!(outcome.manifest.totals().new_chunks, 2);
    let met: Vec<String> = outcome
        .damage_met
        .iter()
        .map(|d| d.reason.clone())
        .collect();
    assert_eq!(outcome.damage_met.len(), 1, "{met:?}");
    assert_eq!(outcome.damage_met[0].what, "pack index");
    assert!(
        outcome.damage_met[0].path.ends_with(&index),
        "{:?}",
        outcome.damage_met[0].path
    );
    assert!(
        met[0].contains(&format!("its entry for chunk {} in pack {} is {data_end} bytes; a chunk's blob in this repository is at most {}", id.to_hex(), name.to_hex(), CHUNK + 40)),
        "{met:?}"
    );
    let fresh = Repository::open_bucket(store, None).unwrap();
    assert_eq!(snapshots_hit(&fresh), Vec::<String>::new());
}

#[test]
fn the_pack_index_cache_holds_only_indexes_that_parse_and_that_the_bucket_lists() {
    use vsnap_repo::ObjectStore;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let store = Arc::new(MemStore::default());
    let repo = Repository::init_bucket(store.clone(), CHUNK, PACK, Some(&cache)).unwrap();
    backup(&repo, &image(dir.path(), "a.raw", 9, 2)).unwrap();
    let cached = |cache: &Path| -> Vec<String> {
        let mut v: Vec<String> = walk(cache)
            .into_iter()
            .filter(|p| p.parent().is_some_and(|d| d.ends_with("packindex")))
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    };
    let listed = |store: &MemStore| -> Vec<String> {
        let mut v: Vec<String> = store
            .keys("packindex/")
            .iter()
            .map(|k| k.trim_start_matches("packindex/").to_owned())
            .collect();
        v.sort();
        v
    };
    let good = listed(&store);
    assert_eq!(good.len(), 1);
    // An index that does not parse, under its own digest; and a cached
    // index the bucket no longer lists (gc rewrote it).
    let junk = vec![0x5a; 4096];
    let junk_hex = blake3::hash(&junk).to_hex().to_string();
    store.put(&format!("packindex/{junk_hex}"), junk).unwrap();
    let dir_of_cache = walk(&cache)[0].parent().unwrap().to_path_buf();
    let stale = "ab".repeat(32);
    std::fs::write(dir_of_cache.join(&stale), b"an index gc deleted").unwrap();
    let reader = Repository::open_bucket(store.clone(), Some(&cache)).unwrap();
    let damaged = reader.damaged_objects().unwrap();
    assert_eq!(damaged.len(), 1, "{damaged:?}");
    assert_eq!(damaged[0].what, "pack index");
    assert_eq!(
        cached(&cache),
        good,
        "only the index that parses, and is listed, is cached"
    );
    let _ = stale;
}

/// Every file under `dir`, depth first.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}
