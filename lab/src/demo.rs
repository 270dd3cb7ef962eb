//! Guests for a machine without root, as `vsnap demo` builds them:
//! nothing can be mounted, so each guest's disk is an ext4 made from a
//! seed tree by `mkfs.ext4 -d` and converted to a dynamic VHD, and its
//! writer is an application that a hook pauses (flush, acknowledge,
//! wait) instead of a filesystem freeze.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vsnap_engine::pipeline::{copy_images, CopySpec, Options, Progress, TargetFormat};
use vsnap_formats::{DiskImage, ImageFormat};

use crate::workload::Background;
use crate::{io, Error, Result};

/// A guest disk in `dir/disk0.vhd`: an ext4 filesystem of `size` bytes
/// labelled `name`, holding a little text and a little noise, made by
/// `mkfs.ext4 -d` (e2fsprogs 1.43 or later) and converted to a dynamic
/// VHD by vsnap's own writer.
pub fn ext4_disk(dir: &Path, name: &str, size: u64) -> Result<PathBuf> {
    let seed = dir.join("seed");
    let data = seed.join("srv/data");
    std::fs::create_dir_all(seed.join("etc")).map_err(io("create", &seed))?;
    std::fs::create_dir_all(&data).map_err(io("create", &data))?;
    let write = |p: PathBuf, bytes: &[u8]| std::fs::write(&p, bytes).map_err(io("write", p));
    write(seed.join("etc/hostname"), format!("{name}\n").as_bytes())?;
    let mut text = String::new();
    for i in 0..60_000 {
        text += &format!("{name} order {i} shipped to warehouse {}\n", i % 17);
    }
    write(data.join("orders.csv"), text.as_bytes())?;
    let noise: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    write(data.join("blob.bin"), &noise)?;
    let raw = dir.join("build.img");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(size))
        .map_err(io("create", &raw))?;
    let mut mkfs = Command::new(crate::sbin("mkfs.ext4"));
    mkfs.args(["-q", "-F", "-L", name, "-d"])
        .arg(&seed)
        .arg(&raw);
    crate::run(&mut mkfs).map_err(|e| match e {
        Error::Command { command, stderr } => Error::Command {
            command,
            stderr: format!("{stderr} (it needs e2fsprogs 1.43 or later, for -d)"),
        },
        other => other,
    })?;
    let disk = dir.join("disk0.vhd");
    let image = vsnap_formats::open(&raw, Some(ImageFormat::Raw))?;
    let refs: Vec<&dyn DiskImage> = vec![&*image];
    let spec = CopySpec {
        target: disk.clone(),
        format: TargetFormat::DynamicVhd,
        replace: false,
        expect: None,
        durable: true,
    };
    copy_images(&refs, &[spec], &Options::default(), &Progress::default())?;
    std::fs::remove_file(&raw).map_err(io("remove", &raw))?;
    std::fs::remove_dir_all(&seed).map_err(io("remove", &seed))?;
    Ok(disk)
}

/// The hook that is the application's writer: `freeze` asks it to pause
/// and waits (up to 5 s) for it to say it has flushed; `thaw` and `abort`
/// let it go on.
pub fn pause_hook(app: &Path) -> String {
    let app = app.display();
    format!(
        r#"#!/bin/sh
# The demo application's writer: pause it for the freeze, resume it after.
case "$1" in
  freeze)
    touch "{app}/pause"
    i=0
    while [ ! -e "{app}/paused" ]; do
      i=$((i + 1)); [ $i -gt 500 ] && {{ echo "the application did not pause" >&2; rm -f "{app}/pause"; exit 1; }}
      sleep 0.01
    done ;;
  thaw|abort) rm -f "{app}/pause" ;;
esac
exit 0
"#
    )
}

/// An application in `dir`: appends records to its log and fsyncs, and
/// honours [`pause_hook`]'s request (flush, acknowledge, wait). Its
/// result: how many records it wrote, and the longest it was held.
pub fn start_app(dir: &Path) -> Result<Background<(u64, Duration)>> {
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let dir = dir.to_path_buf();
    Ok(Background::spawn("the demo application", move |stop| {
        let log_path = dir.join("records.log");
        let (pause, paused) = (dir.join("pause"), dir.join("paused"));
        let work = || -> std::io::Result<(u64, Duration)> {
            let mut log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)?;
            let mut n = 0u64;
            let mut held = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                if pause.exists() {
                    log.sync_all()?;
                    std::fs::write(&paused, b"")?;
                    let t = Instant::now();
                    while pause.exists() && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    held = held.max(t.elapsed());
                    let _ = std::fs::remove_file(&paused);
                }
                writeln!(log, "record {n}")?;
                log.sync_data()?;
                n += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok((n, held))
        };
        work().map_err(io("write", &log_path))
    }))
}
