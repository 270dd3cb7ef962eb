//! Creates a VHDX with byte patterns written into it through vsnap's
//! writer, for the fixtures script and the tests: qemu cannot create
//! differencing VHDX files at all.
//!
//! Usage: vhdx_write NEW (--parent PARENT | --size BYTES --block-size BYTES) [OFFSET:LENGTH:BYTE]...

use std::path::PathBuf;
use std::process::ExitCode;

use vsnap_formats::vhdx::{NewVhdx, VhdxIdentity, VhdxWriter};

fn run(args: &[String]) -> Result<(), String> {
    let num = |s: &str| s.parse::<u64>().map_err(|e| format!("{s:?}: {e}"));
    let (path, rest) = args.split_first().ok_or("no image given")?;
    let path = PathBuf::from(path);
    let (new, writes) = match rest {
        [flag, parent, writes @ ..] if flag == "--parent" => (
            NewVhdx::child_of(&PathBuf::from(parent), &path).map_err(|e| e.to_string())?,
            writes,
        ),
        [s, size, b, bs, writes @ ..] if s == "--size" && b == "--block-size" => {
            let size = num(size)?;
            let mut id = VhdxIdentity::new(size);
            id.block_size = u32::try_from(num(bs)?).map_err(|e| e.to_string())?;
            (NewVhdx::new(size, id), writes)
        }
        _ => return Err("expected --parent P or --size N --block-size B".into()),
    };
    let mut w = VhdxWriter::create(&path, new, &[]).map_err(|e| e.to_string())?;
    for spec in writes {
        let parts: Vec<&str> = spec.split(':').collect();
        let [off, len, byte] = parts.as_slice() else {
            return Err(format!("{spec:?}: expected OFFSET:LENGTH:BYTE"));
        };
        let byte =
            u8::from_str_radix(byte.trim_start_matches("0x"), 16).map_err(|e| e.to_string())?;
        let data = vec![byte; usize::try_from(num(len)?).map_err(|e| e.to_string())?];
        w.write(&data, num(off)?).map_err(|e| e.to_string())?;
    }
    w.finish().map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhdx_write: {e}");
            eprintln!("usage: vhdx_write NEW (--parent P | --size N --block-size B) [OFFSET:LENGTH:BYTE]...");
            ExitCode::from(2)
        }
    }
}
