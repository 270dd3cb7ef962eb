//! The engine benchmark (`vsnap bench engine`): before any backup, what
//! this host can do, in MB/s, for each stage a backup or a verify runs:
//! BLAKE3, zstd both ways at the configured level, chunk verify (CRC32C,
//! decompress, re-hash, as `vsnap verify` does), and reads through each
//! I/O engine, buffered and O_DIRECT. Each on incompressible data and on
//! realistic mixed data.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use vsnap_engine::io::{open_for_read, probe, AlignedBuf, Engine, IoKind, IoMode, ReadOp};
use vsnap_engine::units::human;
use vsnap_repo::blob::{self, BlobKind};

use crate::{io, Result};

/// What to measure.
#[derive(Debug, Clone)]
pub struct Study {
    /// zstd level, as `vsnap backup --level`.
    pub level: i32,
    /// Where the file the read tests use is made (and removed).
    pub dir: PathBuf,
    /// That file's size.
    pub read_size: u64,
    /// How long each measurement runs at least.
    pub time: Duration,
}

const CHUNK: usize = 4 << 20;

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub test: String,
    /// `incompressible` or `mixed`.
    pub data: &'static str,
    pub mb_per_s: f64,
}

/// 64 MiB of one kind of data, in 4 MiB chunks.
fn data(kind: &str) -> Vec<u8> {
    let n = 64 << 20;
    use rand::{Rng as _, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0x2545_f491_4f6c_dd1d);
    let mut rand = move || rng.next_u64();
    let mut v = Vec::with_capacity(n);
    if kind == "incompressible" {
        while v.len() < n {
            v.extend_from_slice(&rand().to_le_bytes());
        }
        return v;
    }
    // Mixed, per 4 MiB chunk: half text, a quarter random, a quarter zeros,
    // like a used disk's allocated blocks.
    let words = [
        "backup", "guest", "freeze", "the", "snapshot", "of", "record", "index", "table", "and",
        "to", "disk", "sector", "a", "writer", "block",
    ];
    for c in 0..(n / CHUNK) {
        let start = v.len();
        match c % 4 {
            0 | 1 => {
                while v.len() - start < CHUNK {
                    let r = rand();
                    v.extend_from_slice(words[(r % 16) as usize].as_bytes());
                    v.push(if r % 11 == 0 { b'\n' } else { b' ' });
                    if r % 7 == 0 {
                        v.extend_from_slice((r % 9973).to_string().as_bytes());
                    }
                }
                v.truncate(start + CHUNK);
            }
            2 => {
                while v.len() - start < CHUNK {
                    v.extend_from_slice(&rand().to_le_bytes());
                }
            }
            _ => v.resize(start + CHUNK, 0),
        }
    }
    v
}

/// Runs `f` over the data's chunks until `min` passes; MB/s of input.
fn rate(input: &[u8], min: Duration, mut f: impl FnMut(usize, &[u8]) -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    let mut bytes = 0u64;
    let mut i = 0;
    while t.elapsed() < min || bytes == 0 {
        for (k, c) in input.chunks(CHUNK).enumerate() {
            f(k, c)?;
            bytes += c.len() as u64;
        }
        i += 1;
        if i > 10_000 {
            break;
        }
    }
    Ok(bytes as f64 / t.elapsed().as_secs_f64() / 1e6)
}

fn read_rate(path: &std::path::Path, kind: IoKind, direct: bool, min: Duration) -> Result<f64> {
    let file = open_for_read(path, direct).map_err(io("open", path))?;
    let len = file.metadata().map_err(io("stat", path))?.len();
    let mut engine = Engine::new(kind, 32, 1).map_err(io("start an I/O engine", path))?;
    let mut buf = AlignedBuf::new(CHUNK);
    let t = Instant::now();
    let mut bytes = 0u64;
    while t.elapsed() < min || bytes == 0 {
        let mut at = 0u64;
        while at < len {
            let n = ((len - at) as usize).min(CHUNK);
            let ops: Vec<ReadOp<'_>> = (0..n)
                .step_by(256 << 10)
                .map(|o| ReadOp {
                    file: &file,
                    file_offset: at + o as u64,
                    buf_offset: o,
                    len: (256 << 10).min(n - o),
                })
                .collect();
            engine
                .read(&ops, &mut buf, Some(0))
                .map_err(|(_, e)| io("read", path)(e))?;
            at += n as u64;
            bytes += n as u64;
        }
    }
    Ok(bytes as f64 / t.elapsed().as_secs_f64() / 1e6)
}

/// Runs every measurement; `note` hears of an I/O engine this host
/// lacks.
pub fn run(study: &Study, note: &dyn Fn(&str)) -> Result<Vec<Row>> {
    let min = study.time;
    let mut rows = Vec::new();
    for kind in ["incompressible", "mixed"] {
        let input = data(kind);
        let mut push = |test: String, mb: f64| {
            rows.push(Row {
                test,
                data: kind,
                mb_per_s: mb,
            })
        };
        push(
            "blake3".into(),
            rate(&input, min, |_, c| {
                std::hint::black_box(blake3::hash(c));
                Ok(())
            })?,
        );
        let blobs: Vec<Vec<u8>> = input
            .chunks(CHUNK)
            .map(|c| {
                let (h, p) = blob::encode(BlobKind::Chunk, c, study.level)?;
                Ok([&h[..], &p].concat())
            })
            .collect::<Result<_>>()?;
        push(
            format!("zstd -{} compress", study.level),
            rate(&input, min, |_, c| {
                std::hint::black_box(
                    zstd::bulk::compress(c, study.level).map_err(io("compress", "memory"))?,
                );
                Ok(())
            })?,
        );
        let frames: Vec<Vec<u8>> = input
            .chunks(CHUNK)
            .map(|c| zstd::bulk::compress(c, study.level))
            .collect::<std::io::Result<_>>()
            .map_err(io("compress", "memory"))?;
        let mut plain = vec![0u8; CHUNK];
        push(
            "zstd decompress".into(),
            rate(&input, min, |k, _| {
                std::hint::black_box(
                    zstd::bulk::decompress_to_buffer(&frames[k], &mut plain)
                        .map_err(io("decompress", "memory"))?,
                );
                Ok(())
            })?,
        );
        push(
            "chunk verify (CRC32C, decompress, BLAKE3)".into(),
            rate(&input, min, |k, _| {
                blob::decode_into(BlobKind::Chunk, &blobs[k], &mut plain)?;
                std::hint::black_box(blake3::hash(&plain));
                Ok(())
            })?,
        );
        // Reads: the data repeated into a file.
        let path = study
            .dir
            .join(format!("vsnap-bench-read-{}.dat", std::process::id()));
        let measured = (|| -> Result<()> {
            let f = std::fs::File::create(&path).map_err(io("create", &path))?;
            let mut at = 0u64;
            while at < study.read_size {
                let n = (study.read_size - at).min(input.len() as u64) as usize;
                f.write_all_at(&input[..n], at)
                    .map_err(io("write", &path))?;
                at += n as u64;
            }
            f.sync_all().map_err(io("flush", &path))?;
            for (name, mode) in [("sync", IoMode::Sync), ("io_uring", IoMode::Uring)] {
                let kind = match probe(mode, 32) {
                    Ok((k, _)) => k,
                    Err(e) => {
                        note(&format!("{name} reads unavailable: {e}"));
                        continue;
                    }
                };
                // Buffered, from the page cache (read once to warm it).
                read_rate(&path, kind, false, Duration::ZERO)?;
                push(
                    format!("read {name}, page cache"),
                    read_rate(&path, kind, false, min)?,
                );
                push(
                    format!("read {name}, O_DIRECT"),
                    read_rate(&path, kind, true, min)?,
                );
            }
            Ok(())
        })();
        let _ = std::fs::remove_file(&path);
        measured?;
    }
    Ok(rows)
}

/// The rows as a table, a test a line, a column per kind of data.
pub fn table(rows: &[Row], out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<44} {:>14} {:>14}",
        "TEST", "INCOMPRESSIBLE", "MIXED"
    )?;
    let tests: Vec<&str> = rows
        .iter()
        .filter(|r| r.data == "incompressible")
        .map(|r| r.test.as_str())
        .collect();
    for t in tests {
        let get = |d: &str| {
            rows.iter()
                .find(|r| r.test == t && r.data == d)
                .map_or("-".into(), |r| {
                    format!("{}/s", human((r.mb_per_s * 1e6) as u64))
                })
        };
        writeln!(
            out,
            "{:<44} {:>14} {:>14}",
            t,
            get("incompressible"),
            get("mixed")
        )?;
    }
    Ok(())
}
