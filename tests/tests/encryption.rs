//! Encryption at rest, read by someone else: tests/independent/
//! vsnap_reader.py, written from docs/repository.md with PyPI's
//! `cryptography` and `blake3` and none of vsnap's code, unwraps vsnap's
//! key slots, opens its sealed blobs and recomputes its chunk ids.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use vsnap_e2e::*;
use vsnap_repo::crypto::{self, MasterKey, SealKind, Unlock};

/// Runs the reader; `None` (the skip recorded) where Python lacks its
/// packages, which the test command installs (so CI fails instead).
fn reader(test: &str, args: &[&str]) -> Option<String> {
    let ok = Command::new("python3")
        .args(["-c", "import blake3, cryptography"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: python3 lacks blake3 or cryptography, which scripts/test.sh installs"
        );
        skip(
            test,
            "python3 lacks the blake3 or cryptography package (pip install blake3 cryptography)",
            Lack::Host,
        );
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("independent/vsnap_reader.py");
    let o = Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "reader {args:?}: {}", stderr(&o));
    Some(stdout(&o).trim().to_owned())
}

#[test]
fn an_independent_reader_unwraps_slots_opens_blobs_and_recomputes_ids() {
    let test = "an_independent_reader_unwraps_slots_opens_blobs_and_recomputes_ids";
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let master = MasterKey::generate().unwrap();
    let kdf = crypto::Kdf {
        name: "argon2id".into(),
        m_kib: 8 * 1024,
        t: 2,
        p: 1,
    };
    let file = |name: &str, bytes: &[u8]| {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let passphrase = file("passphrase", "pässphrase, long enough".as_bytes());
    let key_file = file("key", &crypto::random::<32>().unwrap());
    let now = || "2026-12-08T00:00:00Z".to_owned();
    let p_slot = crypto::slot::make_slot(
        &master,
        Unlock::Passphrase(&std::fs::read(&passphrase).unwrap()),
        kdf.clone(),
        crypto::random().unwrap(),
        now(),
    )
    .unwrap();
    let k_slot = crypto::slot::make_slot(
        &master,
        Unlock::KeyFile(&std::fs::read(&key_file).unwrap()),
        kdf,
        crypto::random().unwrap(),
        now(),
    )
    .unwrap();
    let p_slot = file("p.json", &serde_json::to_vec(&p_slot).unwrap());
    let k_slot = file("k.json", &serde_json::to_vec(&k_slot).unwrap());
    let want = hex::encode(master.bytes());
    let Some(got) = reader(test, &["slot", &p_slot, "--passphrase-file", &passphrase]) else {
        return;
    };
    assert_eq!(got, want, "the passphrase slot");
    let got = reader(test, &["slot", &k_slot, "--key-file", &key_file]).unwrap();
    assert_eq!(got, want, "the key-file slot");

    let keys = master.keys();
    let chunk = random_bytes(7, 100_000);
    let id = keys.chunk_id(&chunk);
    let plain = file("chunk", &chunk);
    assert_eq!(
        reader(test, &["id", &want, &plain]).unwrap(),
        id.to_hex().as_str()
    );
    let place = id.to_hex().to_string();
    let sealed = file(
        "sealed",
        &keys.seal(SealKind::Chunk, &place, &[&chunk]).unwrap(),
    );
    assert_eq!(
        reader(test, &["open", &want, "chunk", &place, &sealed]).unwrap(),
        hex::encode(&chunk)
    );
    let manifest = br#"{"vm": "secret-name"}"#;
    let sealed = file(
        "manifest",
        &keys
            .seal(SealKind::Manifest, "snapshots/abc.json", &[manifest])
            .unwrap(),
    );
    assert_eq!(
        reader(
            test,
            &["open", &want, "manifest", "snapshots/abc.json", &sealed]
        )
        .unwrap(),
        hex::encode(manifest)
    );
}
