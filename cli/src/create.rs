//! `vsnap create`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::ValueEnum;
use vsnap_engine::format::vhd::{self, CreateOptions, DiskType};
use vsnap_engine::format::DiskImage;

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

#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Sizes take binary units: 512K, 64M, 10G, 2040G (the VHD maximum). The size
is kept exact: when no C/H/S geometry represents it exactly, the maximum
geometry 65535/16/255 is recorded, which tells qemu, Hyper-V and vsnap to use
the size field, so every reader agrees on the size.

Examples:
  vsnap create --type dynamic --size 64G vm.vhd
  vsnap create --type differencing --parent vm.vhd vm-snap.vhd

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
    /// Block size of a dynamic or differencing disk: a power of two of at
    /// least 4K (the format allows less, but qemu misreads smaller blocks).
    #[arg(long, value_parser = parse_size, default_value = "2M")]
    block_size: u64,
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
    if disk_type == DiskType::Fixed && args.parent.is_some() {
        bail!("--parent applies only to --type differencing");
    }
    let Ok(block_size) = u32::try_from(args.block_size) else {
        bail!("--block-size {} is too large", args.block_size);
    };
    let mut opts = CreateOptions::new(disk_type, size);
    opts.block_size = block_size;
    opts.parent.clone_from(&args.parent);
    let image = vhd::create(&args.path, &opts)?;
    let info = image.info()?;
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&info)?)?;
    } else {
        writeln!(
            out,
            "created {}: {} VHD, {} ({} bytes){}",
            args.path.display(),
            disk_type.name(),
            human(info.virtual_size),
            info.virtual_size,
            args.parent
                .as_ref()
                .map_or(String::new(), |p| format!(", parent {}", p.display()))
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
