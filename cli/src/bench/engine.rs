//! `vsnap bench engine`: what this host can do, before any backup. The
//! benchmark is the lab's ([`vsnap_lab::engine_bench`]); this module turns
//! arguments into its study and prints the table or the JSON.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use vsnap_lab::engine_bench::{self, Study};

use crate::units::parse_size;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// zstd level, as `vsnap backup --level`.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    level: i32,
    /// The file the read tests use (made, then removed) goes here.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Size of that file.
    #[arg(long, value_parser = parse_size, default_value = "512M")]
    read_size: u64,
    /// How long each measurement runs at least.
    #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = crate::units::parse_duration)]
    time: Duration,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args, out: &mut dyn Write) -> Result<ExitCode> {
    let study = Study {
        level: args.level,
        dir: args.dir.clone(),
        read_size: args.read_size,
        time: args.time,
    };
    let rows = engine_bench::run(&study, &|note| eprintln!("vsnap bench: {note}"))?;
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
    } else {
        engine_bench::table(&rows, out)?;
    }
    Ok(ExitCode::SUCCESS)
}
