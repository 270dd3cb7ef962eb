//! `vsnap create`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::ValueEnum;
use vsnap_formats::new_image::{is_vhdx_name, NewImage};
use vsnap_formats::vhd::DiskType;

use crate::units::{human, parse_size};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TypeArg {
    /// Data then footer: the file is as large as the disk (sparse on disk).
    Fixed,
    /// Blocks allocated on first write.
    Dynamic,
    /// Only what differs from --parent; reads fall through to it.
    Differencing,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ContainerArg {
    Vhd,
    Vhdx,
}

#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Sizes take binary units: 512K, 64M, 10G, 2040G (the VHD maximum). A VHD's
size is kept exact: when no C/H/S geometry represents it exactly, the maximum
geometry 65535/16/255 is recorded, which tells qemu, Hyper-V and vsnap to use
the size field, so every reader agrees on the size.

The container is VHDX when --format vhdx is given or the path ends in .vhdx
or .avhdx, VHD otherwise. A VHDX's block size defaults to qemu's choice (8M up
to 1G, 16M up to 100G, 32M above); a differencing VHDX links to its parent's
DataWriteGuid and records its relative and absolute path.

Examples:
  vsnap create --type dynamic --size 64G vm.vhd
  vsnap create --type differencing --parent vm.vhd vm-snap.vhd
  vsnap create --type dynamic --size 64G vm.vhdx
  vsnap create --type differencing --parent vm.vhdx vm-snap.avhdx

Exit codes:
  0  success
  1  the image could not be created (the message says why)
  2  bad command-line usage")]
pub struct Args {
    /// The image to create; it must not exist yet.
    #[arg(value_name = "PATH")]
    path: PathBuf,
    #[arg(long = "type", short = 't', value_enum)]
    disk_type: TypeArg,
    /// Virtual size; not needed for a differencing disk (it takes the
    /// parent's).
    #[arg(long, short = 's', value_parser = parse_size)]
    size: Option<u64>,
    /// Block size: for a VHD a power of two of at least 4K (the format
    /// allows less, but qemu misreads smaller blocks), 2M by default; for a
    /// VHDX a power of two from 1M to 256M.
    #[arg(long, value_parser = parse_size)]
    block_size: Option<u64>,
    /// The container; by default from the path's extension.
    #[arg(long, value_enum)]
    format: Option<ContainerArg>,
    /// The parent of a differencing disk; the child records its relative and
    /// absolute path.
    #[arg(long, short = 'p')]
    parent: Option<PathBuf>,
    /// Print what was created as JSON (the object `vsnap info --json` gives).
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<ExitCode> {
    let disk_type = match args.disk_type {
        TypeArg::Fixed => DiskType::Fixed,
        TypeArg::Dynamic => DiskType::Dynamic,
        TypeArg::Differencing => DiskType::Differencing,
    };
    let size = match (disk_type, args.size) {
        (DiskType::Differencing, None) => 0,
        (DiskType::Differencing, Some(_)) => {
            bail!("--size does not apply to a differencing disk: it has its parent's size")
        }
        (_, Some(size)) => size,
        (_, None) => bail!("--size is required for a {} disk", disk_type.name()),
    };
    if disk_type != DiskType::Differencing && args.parent.is_some() {
        bail!("--parent applies only to --type differencing");
    }
    let block_size = match args.block_size.map(u32::try_from) {
        Some(Ok(b)) => Some(b),
        Some(Err(_)) => bail!("--block-size {} is too large", args.block_size.unwrap_or(0)),
        None => None,
    };
    let new = NewImage {
        path: args.path.clone(),
        disk_type,
        size,
        block_size,
        vhdx: match args.format {
            Some(f) => matches!(f, ContainerArg::Vhdx),
            None => is_vhdx_name(&args.path),
        },
        parent: args.parent.clone(),
    };
    if new.vhdx && disk_type == DiskType::Differencing && args.parent.is_none() {
        bail!("--parent is required for a differencing disk");
    }
    let info = new.create()?;
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&info)?)?;
    } else {
        writeln!(
            out,
            "created {}: {} {}, {} ({} bytes){}",
            args.path.display(),
            disk_type.name(),
            if new.vhdx { "VHDX" } else { "VHD" },
            human(info.virtual_size),
            info.virtual_size,
            args.parent
                .as_ref()
                .map_or(String::new(), |p| format!(", parent {}", p.display()))
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
