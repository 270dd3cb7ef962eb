//! The AEADs an encrypted repository could seal its blobs with, on a
//! chunk's worth of bytes (2 MiB, the default chunk size) and on a small
//! blob (4 KiB, a manifest or a lease): seal and open, in MB/s; and
//! Argon2id at candidate costs, so the choices in docs/repository.md rest
//! on this machine's figures.
//!
//! Run: `cargo bench -p vsnap-benches --bench aead`.

#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const SIZES: [usize; 2] = [4 << 10, 2 << 20];

fn data(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in v.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    v
}

fn aeads(c: &mut Criterion) {
    let key = [7u8; 32];
    let aad = b"vsnap chunk 0123456789abcdef";
    let mut g = c.benchmark_group("aead");
    g.sample_size(20);
    for len in SIZES {
        let plain = data(len);
        g.throughput(Throughput::Bytes(len as u64));

        let x = chacha20poly1305::XChaCha20Poly1305::new((&key).into());
        let xn = chacha20poly1305::XNonce::default();
        g.bench_with_input(
            BenchmarkId::new("xchacha20poly1305-seal", len),
            &plain,
            |b, p| {
                let mut buf = p.clone();
                b.iter(|| {
                    buf.copy_from_slice(p);
                    let tag = x.encrypt_in_place_detached(&xn, aad, &mut buf).unwrap();
                    black_box(tag);
                })
            },
        );

        let a = aes_gcm::Aes256Gcm::new((&key).into());
        let an = aes_gcm::Nonce::default();
        g.bench_with_input(
            BenchmarkId::new("rustcrypto-aes256gcm-seal", len),
            &plain,
            |b, p| {
                let mut buf = p.clone();
                b.iter(|| {
                    buf.copy_from_slice(p);
                    let tag = a.encrypt_in_place_detached(&an, aad, &mut buf).unwrap();
                    black_box(tag);
                })
            },
        );

        for (name, alg) in [
            ("ring-aes256gcm", &ring::aead::AES_256_GCM),
            ("ring-chacha20poly1305", &ring::aead::CHACHA20_POLY1305),
        ] {
            let k = ring::aead::LessSafeKey::new(ring::aead::UnboundKey::new(alg, &key).unwrap());
            g.bench_with_input(
                BenchmarkId::new(format!("{name}-seal"), len),
                &plain,
                |b, p| {
                    let mut buf = p.clone();
                    b.iter(|| {
                        buf.copy_from_slice(p);
                        let n = ring::aead::Nonce::assume_unique_for_key([0; 12]);
                        let tag = k
                            .seal_in_place_separate_tag(n, ring::aead::Aad::from(aad), &mut buf)
                            .unwrap();
                        let _ = black_box(tag);
                    })
                },
            );
            // Open: what restore and verify pay.
            let mut sealed = plain.clone();
            let n = ring::aead::Nonce::assume_unique_for_key([0; 12]);
            k.seal_in_place_append_tag(n, ring::aead::Aad::from(aad), &mut sealed)
                .unwrap();
            g.bench_with_input(
                BenchmarkId::new(format!("{name}-open"), len),
                &sealed,
                |b, s| {
                    let mut buf = s.clone();
                    b.iter(|| {
                        buf.copy_from_slice(s);
                        let n = ring::aead::Nonce::assume_unique_for_key([0; 12]);
                        let out = k
                            .open_in_place(n, ring::aead::Aad::from(aad), &mut buf)
                            .unwrap();
                        black_box(out.len());
                    })
                },
            );
        }
        // vsnap's own seal and open: a salt from the OS, the blob's key
        // derived (BLAKE3, AES key schedule), a fresh output buffer.
        let keys = vsnap_repo::crypto::MasterKey::from_bytes(key).keys();
        let kind = vsnap_repo::crypto::SealKind::Chunk;
        g.bench_with_input(BenchmarkId::new("vsnap-seal", len), &plain, |b, p| {
            b.iter(|| black_box(keys.seal(kind, "place", &[p]).unwrap()))
        });
        let sealed = keys.seal(kind, "place", &[&plain]).unwrap();
        g.bench_with_input(BenchmarkId::new("vsnap-open", len), &sealed, |b, s| {
            let mut buf = s.clone();
            b.iter(|| {
                buf.clear();
                buf.extend_from_slice(s);
                keys.open_in_place(kind, "place", &mut buf).unwrap();
                black_box(buf.len());
            })
        });
        // The copy alone, which every case above includes.
        g.bench_with_input(BenchmarkId::new("memcpy", len), &plain, |b, p| {
            let mut buf = p.clone();
            b.iter(|| {
                buf.copy_from_slice(p);
                black_box(&buf);
            })
        });
    }
    g.finish();
}

/// Argon2id at the costs a passphrase slot could take: the default is
/// the cheapest of these that takes 0.5 s or more here.
fn argon2id(c: &mut Criterion) {
    let mut g = c.benchmark_group("argon2id");
    g.sample_size(10);
    for (m_mib, t) in [(64u32, 3u32), (128, 3), (256, 2), (256, 3)] {
        let params = argon2::Params::new(m_mib * 1024, t, 1, Some(32)).unwrap();
        let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        g.bench_function(format!("m{m_mib}MiB-t{t}-p1"), |b| {
            let mut out = [0u8; 32];
            b.iter(|| {
                a.hash_password_into(b"correct horse battery staple", &[1; 32], &mut out)
                    .unwrap();
                black_box(out);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, aeads, argon2id);
criterion_main!(benches);
