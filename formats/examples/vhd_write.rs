//! Writes a byte pattern into a VHD through vsnap's writer, for the fixtures
//! script (qemu cannot write differencing VHDs correctly: it ignores the
//! parent). Usage: vhd_write IMAGE OFFSET LENGTH BYTE

use std::path::PathBuf;
use std::process::ExitCode;

use vsnap_formats::vhd::VhdImage;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [image, offset, length, byte] = args.as_slice() else {
        eprintln!("usage: vhd_write IMAGE OFFSET LENGTH BYTE");
        return ExitCode::from(2);
    };
    let parse = |s: &str| s.parse::<u64>().map_err(|e| format!("{s:?}: {e}"));
    let byte = u8::from_str_radix(byte.trim_start_matches("0x"), 16).map_err(|e| e.to_string());
    let run = || -> Result<(), String> {
        let (offset, length, byte) = (parse(offset)?, parse(length)?, byte?);
        let mut img = VhdImage::open_rw(&PathBuf::from(image)).map_err(|e| e.to_string())?;
        let data = vec![byte; usize::try_from(length).map_err(|e| e.to_string())?];
        img.write_at(&data, offset).map_err(|e| e.to_string())?;
        img.flush().map_err(|e| e.to_string())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhd_write: {e}");
            ExitCode::FAILURE
        }
    }
}
