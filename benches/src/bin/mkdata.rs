//! Writes the benchmark's raw disk: 64 MiB stripes cycling random bytes,
//! a hole, compressible text, a hole. So half the disk is unallocated once
//! qemu-img converts it to a dynamic VHD, a quarter is incompressible and a
//! quarter compresses like prose. Usage: mkdata OUT SIZE_MIB SEED

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::process::ExitCode;

const STRIPE: u64 = 64 << 20;

use vsnap_lab::rng::Rng;

const WORDS: &[&str] = &[
    "the", "disk", "backup", "of", "and", "snapshot", "a", "to", "in", "block", "virtual",
    "machine", "is", "that", "for", "guest", "host", "data", "with", "on", "freeze", "thaw",
    "writer", "volume", "copy", "hash", "chunk", "store", "index", "manifest", "it", "as", "was",
    "were", "this", "which", "restore", "verify", "by", "from", "at", "or", "each", "every",
    "time", "file", "system", "log", "record", "table", "page", "sector",
];

fn text(rng: &mut Rng, out: &mut Vec<u8>, len: usize) {
    out.clear();
    while out.len() < len {
        let r = rng.next_u64();
        out.extend_from_slice(WORDS[(r % WORDS.len() as u64) as usize].as_bytes());
        out.push(match (r >> 32) % 17 {
            0 => b'.',
            1 => b'\n',
            2 => b',',
            _ => b' ',
        });
        if (r >> 40).is_multiple_of(23) {
            out.extend_from_slice(format!("{} ", r >> 50).as_bytes());
        }
    }
    out.truncate(len);
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out, mib, seed] = args.as_slice() else {
        eprintln!("usage: mkdata OUT SIZE_MIB SEED");
        return ExitCode::from(2);
    };
    let (Ok(mib), Ok(seed)) = (mib.parse::<u64>(), seed.parse::<u64>()) else {
        eprintln!("mkdata: SIZE_MIB and SEED are numbers");
        return ExitCode::from(2);
    };
    let run = || -> std::io::Result<()> {
        let size = mib << 20;
        let file = File::create(out)?;
        file.set_len(size)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let mut rng = Rng::new(seed);
        let mut buf = Vec::with_capacity(1 << 20);
        let mut pos = 0;
        while pos < size {
            let stripe = (pos / STRIPE) % 4;
            let len = STRIPE.min(size - pos);
            match stripe {
                0 | 2 => {
                    w.seek(SeekFrom::Start(pos))?;
                    let mut left = len;
                    while left > 0 {
                        let n = left.min(1 << 20) as usize;
                        if stripe == 0 {
                            buf.clear();
                            buf.extend((0..n / 8).flat_map(|_| rng.next_u64().to_le_bytes()));
                        } else {
                            text(&mut rng, &mut buf, n);
                        }
                        w.write_all(&buf)?;
                        left -= n as u64;
                    }
                }
                _ => {} // a hole
            }
            pos += len;
        }
        w.flush()
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mkdata: {out}: {e}");
            ExitCode::FAILURE
        }
    }
}
