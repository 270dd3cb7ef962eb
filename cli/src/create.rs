//! `vsnap create`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::ValueEnum;
use vsnap_formats::vhd::{self, CreateOptions, DiskType};
use vsnap_formats::vhdx::{NewVhdx, VhdxIdentity, VhdxImage, VhdxWriter};
use vsnap_formats::DiskImage;

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
    let ext = args.path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let vhdx = match args.format {
        Some(f) => matches!(f, ContainerArg::Vhdx),
        None => ext.eq_ignore_ascii_case("vhdx") || ext.eq_ignore_ascii_case("avhdx"),
    };
    let info = if vhdx {
        create_vhdx(args, disk_type, size, block_size)?
    } else {
        let mut opts = CreateOptions::new(disk_type, size);
        opts.block_size = block_size.unwrap_or(2 << 20);
        opts.parent.clone_from(&args.parent);
        vhd::create(&args.path, &opts)?.info()?
    };
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&info)?)?;
    } else {
        writeln!(
            out,
            "created {}: {} {}, {} ({} bytes){}",
            args.path.display(),
            disk_type.name(),
            if vhdx { "VHDX" } else { "VHD" },
            human(info.virtual_size),
            info.virtual_size,
            args.parent
                .as_ref()
                .map_or(String::new(), |p| format!(", parent {}", p.display()))
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn create_vhdx(
    args: &Args,
    disk_type: DiskType,
    size: u64,
    block_size: Option<u32>,
) -> Result<vsnap_formats::ImageInfo> {
    let new = match (disk_type, &args.parent) {
        (DiskType::Differencing, Some(parent)) => {
            let mut new = NewVhdx::child_of(parent, &args.path)?;
            if let Some(b) = block_size {
                new.identity.block_size = b;
            }
            new
        }
        (DiskType::Differencing, None) => bail!("--parent is required for a differencing disk"),
        _ => {
            let mut id = VhdxIdentity::new(size);
            id.fixed = disk_type == DiskType::Fixed;
            if let Some(b) = block_size {
                id.block_size = b;
            }
            NewVhdx::new(size, id)
        }
    };
    let mut writer = VhdxWriter::create(&args.path, new, &[])?;
    writer.finish()?;
    Ok(VhdxImage::open(&args.path)?.info()?)
}
