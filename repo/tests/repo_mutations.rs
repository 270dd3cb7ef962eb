//! The bounded twin of the `repo_parse` fuzz target, run in CI: the
//! repository's own files (the committed seeds: a manifest, an index blob,
//! a chunk blob) mutated byte by byte, and manifests resealed with hostile
//! names so the rules behind the self-digest are reached. Nothing may
//! panic, and every resealed hostile name must be refused by `validate`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use vsnap_repo::validate::exercise;
use vsnap_repo::ErrorKind;
use vsnap_repo::Manifest;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/repo_parse")
}

fn seeds() -> Vec<Vec<u8>> {
    ["seed-manifest", "seed-index", "seed-chunk"]
        .iter()
        .map(|n| std::fs::read(corpus().join(n)).unwrap())
        .collect()
}

#[test]
fn mutated_repository_files_never_panic() {
    // The committed corpus first: the fuzzer's finds, crashes it found
    // (seed-crash-*) among them.
    let mut n = 0;
    for entry in std::fs::read_dir(corpus()).unwrap() {
        exercise(&std::fs::read(entry.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n >= 4, "{n} corpus files");
    let seeds = seeds();
    let mut runner = TestRunner::new(Config::with_cases(3000));
    let flips = prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8);
    let cut = prop::option::weighted(0.1, any::<prop::sample::Index>());
    runner
        .run(&(0usize..3, flips, cut), |(seed, flips, cut)| {
            let mut bytes = seeds[seed].clone();
            for (at, value) in flips {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if let Some(c) = cut {
                bytes.truncate(c.index(bytes.len() + 1));
            }
            exercise(&bytes);
            Ok(())
        })
        .unwrap();
}

#[test]
fn resealed_hostile_manifests_are_refused_by_name() {
    let seed = &seeds()[0];
    let good: Manifest = serde_json::from_slice(seed).unwrap();
    let id = good.id.clone();
    good.validate(&id, good.chunk_size).unwrap();
    type Edit = (&'static str, fn(&mut Manifest));
    let edits: [Edit; 10] = [
        ("disks[0].name", |m| {
            m.disks[0].name = "../../etc/passwd".into()
        }),
        ("disks[0].name", |m| m.disks[0].name = "/abs".into()),
        ("disks[0].name", |m| m.disks[0].name = "..".into()),
        ("disks[0].name", |m| m.disks[0].name = String::new()),
        ("disks[1].name", |m| {
            m.disks[1].name = m.disks[0].name.clone()
        }),
        ("disks[0].index", |m| m.disks[0].index = "../x".into()),
        ("disks[1].digest", |m| m.disks[1].digest = "ABC".into()),
        ("disks[0].virtual_size", |m| {
            m.disks[0].virtual_size = u64::MAX
        }),
        ("id", |m| m.id = "../../victim".into()),
        ("chunk_size", |m| m.chunk_size = 1 << 20),
    ];
    for (field, edit) in edits {
        let mut m = good.clone();
        edit(&mut m);
        let bytes = m.to_bytes().unwrap();
        let parsed = Manifest::parse(&bytes).unwrap();
        let e = parsed.validate(&id, good.chunk_size).unwrap_err();
        match e.kind() {
            ErrorKind::BadField { field: f, .. } => assert_eq!(&**f, field, "{e}"),
            other => panic!("{field}: {other}"),
        }
        exercise(&bytes);
    }
}
