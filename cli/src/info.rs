//! `vsnap info`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Result;
use vsnap_formats::ImageInfo;

use crate::units::human;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Images to describe.
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
    /// Print a JSON array with one object per image that opened.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    format: crate::SourceFormat,
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<ExitCode> {
    let mut infos = Vec::new();
    let mut failed = false;
    for path in &args.images {
        match vsnap_formats::open(path, args.format.format.forced()).and_then(|img| img.info()) {
            Ok(info) => infos.push(info),
            Err(err) => {
                say!("vsnap: error: {err}");
                failed = true;
            }
        }
    }
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&infos)?)?;
    } else {
        for (i, info) in infos.iter().enumerate() {
            if i > 0 {
                writeln!(out)?;
            }
            print_info(out, info)?;
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print_info(out: &mut dyn Write, i: &ImageInfo) -> std::io::Result<()> {
    writeln!(out, "image:          {}", i.path.display())?;
    writeln!(out, "format:         {}", i.format.name())?;
    writeln!(out, "disk type:      {}", i.disk_type.name())?;
    writeln!(
        out,
        "virtual size:   {} ({} bytes)",
        human(i.virtual_size),
        i.virtual_size
    )?;
    if let Some(g) = i.geometry {
        writeln!(
            out,
            "geometry:       {}/{}/{} (C/H/S)",
            g.cylinders, g.heads, g.sectors_per_track
        )?;
    }
    match &i.creator {
        // A VHDX records its creator as one free-form string.
        Some(c) if i.vhdx.is_some() => writeln!(out, "creator:        {:?}", c.application)?,
        Some(c) => writeln!(
            out,
            "creator:        {:?} version {} on {:?}",
            c.application, c.version, c.host_os
        )?,
        None => {}
    }
    if let Some(bs) = i.block_size {
        writeln!(out, "block size:     {}", human(bs.into()))?;
    }
    writeln!(
        out,
        "allocated:      {} ({} bytes)",
        human(i.allocated_bytes),
        i.allocated_bytes
    )?;
    writeln!(
        out,
        "file size:      {} ({} bytes)",
        human(i.file_size),
        i.file_size
    )?;
    if let Some(id) = i.unique_id {
        writeln!(out, "unique id:      {id}")?;
    }
    if let Some(x) = &i.vhdx {
        writeln!(
            out,
            "sectors:        {} logical, {} physical",
            x.logical_sector_size, x.physical_sector_size
        )?;
        writeln!(out, "data write id:  {}", x.data_write_guid)?;
        if !x.log_guid.is_nil() {
            writeln!(
                out,
                "log:            {} ({} entries replayed in memory)",
                x.log_guid, x.replayed_log_entries
            )?;
        }
    }
    if let Some(ts) = i.timestamp {
        let t = UNIX_EPOCH + Duration::from_secs(ts);
        writeln!(
            out,
            "created:        {}",
            humantime::format_rfc3339_seconds(t)
        )?;
    }
    if !i.parents.is_empty() {
        writeln!(out, "parent chain:")?;
        for (depth, p) in i.parents.iter().enumerate() {
            writeln!(
                out,
                "  {}. {} ({}, id {}, {} allocated)",
                depth + 1,
                p.path.display(),
                p.disk_type.name(),
                p.unique_id,
                human(p.allocated_bytes)
            )?;
        }
    }
    for w in &i.warnings {
        writeln!(out, "warning:        {w}")?;
    }
    Ok(())
}
