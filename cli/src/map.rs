//! `vsnap map`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use serde::Serialize;
use vsnap_formats::ExtentKind;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image to map; for a differencing VHD, the whole chain is resolved.
    #[arg(value_name = "IMAGE")]
    image: PathBuf,
    /// Print a JSON array of extents, with the fields of `qemu-img map
    /// --output=json` (start, length, data, zero, offset) plus kind, layer
    /// and file.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    format: crate::SourceFormat,
}

#[derive(Serialize)]
struct JsonExtent {
    start: u64,
    length: u64,
    kind: ExtentKind,
    data: bool,
    zero: bool,
    /// 0 for the image itself, 1 for its parent, ...; null where no layer
    /// holds the range.
    layer: Option<usize>,
    offset: Option<u64>,
    file: Option<PathBuf>,
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<ExitCode> {
    let image = vsnap_formats::open(&args.image, args.format.format.forced())?;
    let map = image.allocation_map()?;
    let files: Vec<PathBuf> = {
        let info = image.info()?;
        std::iter::once(info.path)
            .chain(info.parents.into_iter().map(|p| p.path))
            .collect()
    };
    let extents: Vec<JsonExtent> = map
        .extents()
        .iter()
        .map(|e| JsonExtent {
            start: e.offset,
            length: e.length,
            kind: e.kind,
            data: e.kind == ExtentKind::Data,
            zero: e.kind != ExtentKind::Data,
            layer: e.layer,
            offset: e.file_offset,
            file: e.layer.and_then(|l| files.get(l).cloned()),
        })
        .collect();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&extents)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<18} {:<18} {:<12} {:>5} {:<18} File",
        "Start", "Length", "Kind", "Layer", "File offset"
    )?;
    for e in &extents {
        let kind = match e.kind {
            ExtentKind::Data => "data",
            ExtentKind::Zero => "zero",
            ExtentKind::Unallocated => "unallocated",
        };
        writeln!(
            out,
            "{:<#18x} {:<#18x} {:<12} {:>5} {:<18} {}",
            e.start,
            e.length,
            kind,
            e.layer.map_or("-".into(), |l| l.to_string()),
            e.offset.map_or("-".into(), |o| format!("{o:#x}")),
            e.file
                .as_ref()
                .map_or(String::new(), |f| f.display().to_string()),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
