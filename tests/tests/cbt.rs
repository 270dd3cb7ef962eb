//! Changed-block tracking on a real XFS with reflink: after each round of
//! random writes to a disk file, the FIEMAP comparison of a clone kept from
//! the round before (the base) and a new clone must name every range whose
//! bytes differ, and for images, every virtual-disk cell. Root only (it
//! makes and mounts a loop filesystem, removed even when a test fails);
//! skipped, saying so, elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use vsnap_e2e::{skip_unless_root, LoopFs};
use vsnap_engine::io::fiemap::fiemap;
use vsnap_formats::{Extent, ExtentKind};
use vsnap_lab::Rng;
use vsnap_repo::cbt::{changed_cells, changed_ranges};

fn seed() -> u64 {
    let seed = std::env::var("VSNAP_CBT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("seed {seed} (VSNAP_CBT_SEED={seed} replays it)");
    seed
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn reflink(from: &Path, to: &Path) {
    let _ = std::fs::remove_file(to);
    run(Command::new("cp").arg("--reflink=always").arg(from).arg(to));
}

fn xfs_io(file: &Path, cmd: &str) {
    run(Command::new(vsnap_lab::sbin("xfs_io"))
        .args(["-c", cmd])
        .arg(file));
}

fn scratch(test: &str) -> Option<(tempfile::TempDir, LoopFs)> {
    if skip_unless_root(test) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    let fs = LoopFs::xfs_reflink(&dir.path().join("xfs.img"), &mnt, 512).unwrap();
    Some((dir, fs))
}

/// The changed ranges between `base` and `new`, by FIEMAP.
fn compare(base: &Path, new: &Path) -> Vec<Range<u64>> {
    let (b, n) = (File::open(base).unwrap(), File::open(new).unwrap());
    let (bl, nl) = (b.metadata().unwrap().len(), n.metadata().unwrap().len());
    changed_ranges(&fiemap(&b).unwrap(), bl, &fiemap(&n).unwrap(), nl).unwrap()
}

fn total(r: &[Range<u64>]) -> u64 {
    r.iter().map(|r| r.end - r.start).sum()
}

/// What one random change did: the bytes it may have touched, for the
/// precision bound, and the virtual-disk ranges whose content or extents
/// it may have changed (a resize names everything past the shorter size, a
/// replaced file everything), for the recall check: every allocated cell
/// outside them must be taken unread.
struct Change {
    bytes: u64,
    ranges: Vec<Range<u64>>,
}

/// One random change to a raw image, in place or by replacing it.
fn mutate_raw(rng: &mut Rng, disk: &Path, content: &[u8]) -> Change {
    const MAX: u64 = 32 << 20;
    let len = std::fs::metadata(disk).unwrap().len();
    let at = rng.below(len.max(4096)) & !511;
    let n = (1 + rng.below(64)) * 4096;
    let (bytes, range) = match rng.below(8) {
        0 | 1 => {
            let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
            let fill = (rng.next_u64() & 0xff) as u8 | 1;
            f.write_all_at(&vec![fill; n as usize], at).unwrap();
            (n, at..at + n)
        }
        2 => {
            // The same bytes again: the content is unchanged, but the
            // blocks are new, so they count as changed.
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(disk)
                .unwrap();
            let mut buf = vec![0u8; n.min(len.saturating_sub(at)) as usize];
            f.read_exact_at(&mut buf, at).unwrap();
            f.write_all_at(&buf, at).unwrap();
            (buf.len() as u64, at..at + buf.len() as u64)
        }
        3 => {
            xfs_io(disk, &format!("fpunch {at} {n}"));
            (n, at..at + n)
        }
        4 => {
            xfs_io(disk, &format!("fzero -k {at} {n}"));
            (n, at..at + n)
        }
        5 => {
            let to = (rng.below(MAX) + 4096).min(MAX);
            File::options()
                .write(true)
                .open(disk)
                .unwrap()
                .set_len(to)
                .unwrap();
            (to.saturating_sub(len), len.min(to)..u64::MAX)
        }
        6 => {
            // A small write that is not block-aligned.
            let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
            f.write_all_at(b"vsnap", at + 3).unwrap();
            (8192, at + 3..at + 8)
        }
        _ => {
            // Replaced: a new file (a new inode) renamed over the old.
            let tmp = disk.with_extension("new");
            std::fs::write(&tmp, content).unwrap();
            std::fs::rename(&tmp, disk).unwrap();
            (content.len() as u64, 0..u64::MAX)
        }
    };
    Change {
        bytes,
        ranges: vec![range],
    }
}

/// How many cells of `cell` bytes the image holds data in where the
/// file's bytes under them lie outside every range of `touched` (file
/// offsets, widened to whole 4 KiB filesystem blocks: FIEMAP sees no
/// finer): the cells an incremental backup must take unread. A cell lies
/// in one run of the file (a raw file is one; a VHD's cells divide its
/// blocks), holes in it included, so any data extent in it places it.
fn untouched_held(image: &Path, cell: u64, touched: &[Range<u64>]) -> u64 {
    let image = vsnap_formats::open(image, None).unwrap();
    let map = image.allocation_map().unwrap();
    let size = image.virtual_size();
    let touched: Vec<_> = touched
        .iter()
        .map(|r| r.start & !4095..r.end.saturating_add(4095) & !4095)
        .collect();
    (0..size.div_ceil(cell))
        .filter(|i| {
            let (a, b) = (i * cell, ((i + 1) * cell).min(size));
            let Some(e) = map
                .extents()
                .iter()
                .find(|e| e.kind == ExtentKind::Data && e.offset < b && a < e.offset + e.length)
            else {
                return false;
            };
            let f = e.file_offset.unwrap() + a - e.offset;
            let file = f..f + (b - a);
            !touched
                .iter()
                .any(|t| t.start < file.end && file.start < t.end)
        })
        .count() as u64
}

#[test]
fn fiemap_of_two_clones_names_every_changed_byte_of_a_raw_image() {
    let Some((dir, fs)) = scratch("fiemap_of_two_clones_names_every_changed_byte_of_a_raw_image")
    else {
        return;
    };
    let mnt = fs.mount.clone();
    let disk = mnt.join("disk.raw");
    let base = mnt.join("base.raw");
    let new = mnt.join("new.raw");
    let mut rng = Rng::new(seed());
    let content: Vec<u8> = (0..16u64 << 20).map(|i| (i * 7 / 4096) as u8).collect();
    std::fs::write(&disk, &content).unwrap();
    reflink(&disk, &base);
    let (mut changed_total, mut touched_total) = (0u64, 0u64);
    for round in 0..100 {
        let mut touched = 0;
        for _ in 0..1 + rng.below(3) {
            touched += mutate_raw(&mut rng, &disk, &content).bytes;
        }
        reflink(&disk, &new);
        let changed = compare(&base, &new);
        let (b, n) = (std::fs::read(&base).unwrap(), std::fs::read(&new).unwrap());
        // Never wrong: outside the changed ranges, the bytes are the base's.
        let mut at = 0usize;
        for r in changed
            .iter()
            .chain(std::iter::once(&(n.len() as u64..u64::MAX)))
        {
            let end = (r.start as usize).min(n.len());
            if at < end {
                assert!(
                    at < b.len() && end <= b.len() && b[at..end] == n[at..end],
                    "round {round}: bytes {at}..{end} differ but were not named changed ({changed:?})"
                );
            }
            at = r.end.min(n.len() as u64) as usize;
        }
        changed_total += total(&changed);
        touched_total += touched;
        std::fs::rename(&new, &base).unwrap();
    }
    eprintln!(
        "100 rounds: {changed_total} bytes named changed for {touched_total} bytes written, punched, zeroed, grown or replaced"
    );
    // Useful, not only safe: a block is named for a few bytes written,
    // and a fresh file as a whole, but not much more.
    assert!(
        changed_total <= touched_total + 100 * 3 * 8192,
        "{changed_total} > {touched_total}"
    );
    drop(fs);
    drop(dir);
}

/// One random change to a dynamic VHD: a guest's write through qemu-io
/// (which allocates a block where there was none), or a punch or zero-range
/// of the file under it. Returns the file ranges it wrote: a write's data,
/// the bitmap before each block it wrote (qemu rewrites it on every first
/// write to a block), and the old footer and the block table when it
/// allocated a block.
#[allow(clippy::single_range_in_vec_init)] // lists of ranges, some of one
fn mutate_vhd(rng: &mut Rng, disk: &Path, virtual_size: u64) -> Vec<Range<u64>> {
    const BLOCK: u64 = 2 << 20;
    let at = rng.below(virtual_size) & !511;
    let n = ((1 + rng.below(256)) * 512).min(virtual_size - at);
    let data = |disk: &Path| -> Vec<(u64, Extent)> {
        let image = vsnap_formats::open(disk, None).unwrap();
        let map = image.allocation_map().unwrap();
        map.extents()
            .iter()
            .filter_map(|e| e.file_offset.map(|f| (f, *e)))
            .collect()
    };
    let cmd = match rng.below(6) {
        0..=2 => format!("write -P {} {at} {n}", 1 + rng.below(250)),
        3 => format!("write -z {at} {n}"),
        op => {
            // Under a guest's data, never the image's own metadata: a
            // punched BAT or footer is another test (hostile images).
            let data = data(disk);
            if data.is_empty() {
                return Vec::new();
            }
            let (f, e) = data[rng.below(data.len() as u64) as usize];
            let off = f + (rng.below(e.length) & !4095);
            let n = 4096.min(f + e.length - off);
            let how = if op == 4 { "fpunch" } else { "fzero -k" };
            xfs_io(disk, &format!("{how} {off} {n}"));
            return vec![off..off + n];
        }
    };
    let footer = std::fs::metadata(disk).unwrap().len() - 512;
    run(Command::new("qemu-io")
        .args(["-f", "vpc", "-c", &cmd])
        .arg(disk));
    // A block the write allocated went where the footer was, and the
    // footer after it: all new.
    let end = std::fs::metadata(disk).unwrap().len();
    let mut touched = vec![footer..end];
    if end > footer + 512 {
        // And its entry in the block table, which shares a filesystem
        // block with the start of the first block in the file.
        touched.push(0..footer.min(4096));
    }
    for (f, e) in data(disk) {
        let (from, to) = (at.max(e.offset), (at + n).min(e.offset + e.length));
        if from < to {
            touched.push(f + (from - e.offset)..f + (to - e.offset));
        }
        // The bitmap of a block the write reached, 512 bytes before the
        // block's first byte in the file.
        let block = e.offset / BLOCK * BLOCK;
        if block < at + n && at < block + BLOCK && e.offset >= block {
            let bitmap = f - (e.offset - block) - 512;
            touched.push(bitmap..bitmap + 512);
        }
    }
    touched
}

#[test]
fn fiemap_and_the_allocation_maps_name_every_changed_cell_of_a_dynamic_vhd() {
    let Some((dir, fs)) =
        scratch("fiemap_and_the_allocation_maps_name_every_changed_cell_of_a_dynamic_vhd")
    else {
        return;
    };
    let mnt = fs.mount.clone();
    let disk = mnt.join("disk.vhd");
    let base = mnt.join("base.vhd");
    let new = mnt.join("new.vhd");
    let size: u64 = 64 << 20;
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vpc", "-o", "subformat=dynamic"])
        .arg(&disk)
        .arg(size.to_string()));
    let mut rng = Rng::new(seed());
    for _ in 0..8 {
        mutate_vhd(&mut rng, &disk, size);
    }
    reflink(&disk, &base);
    let cell: u64 = 1 << 20;
    let (mut named, mut cells) = (0usize, 0usize);
    for round in 0..100 {
        for _ in 0..1 + rng.below(3) {
            mutate_vhd(&mut rng, &disk, size);
        }
        reflink(&disk, &new);
        let changed = compare(&base, &new);
        let b = vsnap_formats::open(&base, None).unwrap();
        let n = vsnap_formats::open(&new, None).unwrap();
        let (bm, nm) = (b.allocation_map().unwrap(), n.allocation_map().unwrap());
        let which = changed_cells(&bm, &nm, &changed, cell).unwrap();
        let (mut x, mut y) = (vec![0u8; cell as usize], vec![0u8; cell as usize]);
        for (i, &c) in which.iter().enumerate() {
            if c {
                continue;
            }
            let at = i as u64 * cell;
            let len = cell.min(n.virtual_size() - at) as usize;
            b.read_at(&mut x[..len], at).unwrap();
            n.read_at(&mut y[..len], at).unwrap();
            assert!(
                x == y,
                "round {round}: cell {i} differs but was not named changed"
            );
        }
        named += which.iter().filter(|&&c| c).count();
        cells += which.len();
        drop((b, n));
        std::fs::rename(&new, &base).unwrap();
    }
    eprintln!("100 rounds: {named} of {cells} cells named changed");
    assert!(named < cells / 4, "{named} of {cells}");
    drop(fs);
    drop(dir);
}

/// The engine's options for the library tests' repositories, of 256 KiB
/// chunks (more cells, so more chances to be wrong, in a small disk).
fn small_chunks() -> vsnap_engine::pipeline::Options {
    vsnap_engine::pipeline::Options {
        chunk_size: 256 << 10,
        threads: 2,
        ..Default::default()
    }
}

fn crash_consistent(vm: &str) -> vsnap_repo::BackupOptions {
    vsnap_repo::BackupOptions {
        vm: vm.into(),
        host: "h".into(),
        consistency: vsnap_repo::Consistency::CrashConsistent,
        freeze: None,
        level: 1,
        known: Default::default(),
    }
}

/// The whole chain through the library, as `vsnap backup` runs it: after
/// each round of random changes, an incremental backup (a new clone
/// compared with the base before) and a full one of the same content
/// must give the same index (entries, piece map, leaves) and digest, and
/// one base is kept.
fn rounds(
    test: &str,
    vhd: bool,
    make: impl Fn(&Path),
    mutate: impl Fn(&mut Rng, &Path) -> Vec<Range<u64>>,
) {
    use vsnap_engine::pipeline::Progress;
    use vsnap_repo::cbt::backup_files;
    use vsnap_repo::{BackupOptions, Repository};
    let Some((dir, fs)) = scratch(test) else {
        return;
    };
    let repo = Repository::init(&dir.path().join("repo"), 256 << 10).unwrap();
    let (opts, spec) = (small_chunks(), crash_consistent("vm"));
    let disk = fs.mount.join("disk.img");
    make(&disk);
    let backup = |source: &Path, vm: &str, track| {
        let spec = BackupOptions {
            vm: vm.into(),
            ..spec.clone()
        };
        let sources = [source.to_path_buf()];
        backup_files(
            &repo,
            &sources,
            None,
            &opts,
            &spec,
            &Progress::default(),
            track,
        )
        .unwrap()
        .manifest
        .disks
        .remove(0)
    };
    let bases = || {
        std::fs::read_dir(fs.mount.join(".vsnap-base"))
            .unwrap()
            .count()
    };
    let first = backup(&disk, "vm", true);
    let t = first.tracking.as_ref().unwrap();
    assert!(t.base.is_some() && t.since.is_none(), "{t:?}");
    let mut rng = Rng::new(seed());
    let (mut reused, mut untouched, mut cells, mut fallbacks) = (0u64, 0u64, 0u64, Vec::new());
    for round in 0..100 {
        let mut touched = Vec::new();
        for _ in 0..1 + rng.below(3) {
            touched.extend(mutate(&mut rng, &disk));
        }
        let inc = backup(&disk, "vm", true);
        let t = inc.tracking.clone().unwrap();
        // A full backup of the very clone the incremental one read (the
        // live file's holes may differ from a clone's while its pages are
        // being written back, and zeros held and zeros not held are
        // different entries of one digest).
        let base = t.base.as_ref().unwrap();
        let full = backup(&base.path, "full", false);
        assert_eq!(inc.digest, full.digest, "round {round}: digests differ");
        assert_eq!(inc.index, full.index, "round {round}: indexes differ");
        if round % 10 == 0 {
            // b3sum of the raw disk: the file itself, or what qemu-img
            // converts an image to (qemu-img rounds a raw file's size up
            // to whole sectors, so it is not asked to convert one).
            let raw = if vhd {
                let raw = dir.path().join("raw");
                run(Command::new("qemu-img")
                    .args(["convert", "-O", "raw"])
                    .arg(&base.path)
                    .arg(&raw));
                raw
            } else {
                base.path.clone()
            };
            let b3 = blake3::hash(&std::fs::read(&raw).unwrap())
                .to_hex()
                .to_string();
            assert_eq!(inc.digest, b3, "round {round}: not b3sum of the raw disk");
        }
        assert_eq!(bases(), 1, "round {round}: one base is kept ({t:?})");
        match &t.fallback {
            Some(why) => fallbacks.push(why.clone()),
            None => {
                assert!(t.since.is_some());
                // Every held cell no change came near is taken unread.
                let want = untouched_held(&base.path, small_chunks().chunk_size, &touched);
                assert!(
                    t.reused_cells >= want,
                    "round {round}: {} cells taken unread, but {want} held cells were not touched ({touched:?})",
                    t.reused_cells
                );
                untouched += want;
                reused += t.reused_cells;
                cells +=
                    inc.stats.data_chunks + inc.stats.zero_chunks + inc.stats.unallocated_chunks;
            }
        }
    }
    fallbacks.sort();
    fallbacks.dedup();
    eprintln!(
        "{test}: 100 rounds; where tracking held, {reused} of {cells} cells taken unread ({untouched} held and untouched); fallbacks: {fallbacks:?}"
    );
    // Not vacuous: the rounds left cells untouched for the check above.
    assert!(untouched > 0, "no round left a held cell untouched");
    drop(fs);
    drop(dir);
}

#[test]
fn incremental_backups_of_a_dynamic_vhd_equal_full_ones_round_after_round() {
    let size: u64 = 64 << 20;
    rounds(
        "incremental_backups_of_a_dynamic_vhd_equal_full_ones_round_after_round",
        true,
        |disk| {
            run(Command::new("qemu-img")
                .args(["create", "-q", "-f", "vpc", "-o", "subformat=dynamic"])
                .arg(disk)
                .arg(size.to_string()));
        },
        |rng, disk| mutate_vhd(rng, disk, size),
    );
}

#[test]
fn incremental_backups_of_a_raw_image_equal_full_ones_round_after_round() {
    let content: Vec<u8> = (0..16u64 << 20).map(|i| (i * 7 / 4096) as u8).collect();
    rounds(
        "incremental_backups_of_a_raw_image_equal_full_ones_round_after_round",
        false,
        |disk| std::fs::write(disk, &content).unwrap(),
        |rng, disk| mutate_raw(rng, disk, &content).ranges,
    );
}

fn backup_json(repo: &Path, disk: &Path, extra: &[&str]) -> serde_json::Value {
    let o = vsnap_e2e::vsnap_cmd()
        .args(["backup", "--json", "-q", "--name", "vm", "--repo"])
        .arg(repo)
        .args(extra)
        .arg(disk)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn bases_in(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join(".vsnap-base"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn vsnap_backup_keeps_one_base_says_why_it_reads_whole_and_forget_and_gc_release_bases() {
    let test =
        "vsnap_backup_keeps_one_base_says_why_it_reads_whole_and_forget_and_gc_release_bases";
    let Some((dir, fs)) = scratch(test) else {
        return;
    };
    let repo = dir.path().join("repo");
    vsnap_e2e::repo_init(&repo);
    let mnt = fs.mount.clone();
    let disk = mnt.join("disk.vhd");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vpc", "-o", "subformat=dynamic"])
        .arg(&disk)
        .arg("64M"));
    let io = |cmd: &str| {
        run(Command::new("qemu-io")
            .args(["-f", "vpc", "-c", cmd])
            .arg(&disk))
    };
    io("write -P 7 0 40M");

    let first = backup_json(&repo, &disk, &[]);
    let d = &first["disks"][0];
    assert!(
        d["tracking"]["fallback"]
            .as_str()
            .unwrap()
            .contains("no earlier snapshot"),
        "{d}"
    );
    let base1 = d["tracking"]["base"]["path"].as_str().unwrap().to_owned();
    assert_eq!(bases_in(&mnt), [Path::new(&base1)]);
    // The disk's data, readable by its owner alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(Path::new(&base1)), 0o600);
    assert_eq!(mode(&mnt.join(".vsnap-base")), 0o700);

    // One MiB written: its 2 MiB chunk (the repository's default) is
    // read, and at most one more (a VHD's blocks start 512 bytes into a
    // 4 KiB filesystem block, so the block that holds a rewritten footer
    // also holds the end of the last data block).
    io("write -P 9 5M 1M");
    let second = backup_json(&repo, &disk, &[]);
    let d = &second["disks"][0];
    assert_eq!(d["tracking"]["since"], first["snapshot"], "{d}");
    let reused = d["tracking"]["reused_cells"].as_u64().unwrap();
    assert!(reused >= 18, "{d}");
    assert_eq!(d["bytes_read"], (20 - reused) << 21, "{d}");
    let base2 = d["tracking"]["base"]["path"].as_str().unwrap().to_owned();
    assert_eq!(
        bases_in(&mnt),
        [Path::new(&base2)],
        "the old base is released"
    );

    // Nothing changed: nothing read. The text output says so.
    let o = vsnap_e2e::vsnap_cmd()
        .args(["backup", "--name", "vm", "--repo"])
        .arg(&repo)
        .arg(&disk)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("20 allocated chunk(s) unchanged since"),
        "{text}"
    );
    assert!(text.contains("read 0 B"), "{text}");

    // A base touched since its backup is not trusted.
    let base3 = bases_in(&mnt).remove(0);
    run(Command::new("touch").arg(&base3));
    let fourth = backup_json(&repo, &disk, &[]);
    let d = &fourth["disks"][0];
    let why = d["tracking"]["fallback"].as_str().unwrap();
    assert!(why.contains("is not the file recorded"), "{why}");
    assert_eq!(d["bytes_read"], 40 << 20);
    assert_eq!(bases_in(&mnt).len(), 1);

    // --no-track makes no clone and records nothing.
    let plain = backup_json(&repo, &disk, &["--no-track"]);
    assert!(plain["disks"][0].get("tracking").is_none());
    assert_eq!(bases_in(&mnt).len(), 1);

    // A clone a killed backup left, and one of another repository: gc
    // removes the first only.
    let base = bases_in(&mnt).remove(0);
    let name = base.file_name().unwrap().to_str().unwrap().to_owned();
    let tag = name.rsplit('.').nth(1).unwrap();
    let dead = mnt
        .join(".vsnap-base")
        .join(format!("disk.vhd.{tag}.dead0000dead0000"));
    let other = mnt
        .join(".vsnap-base")
        .join("disk.vhd.0123abcd.other000other000");
    reflink(&disk, &dead);
    reflink(&disk, &other);
    let o = vsnap_e2e::vsnap_cmd()
        .args(["gc", "--json", "--repo"])
        .arg(&repo)
        .output()
        .unwrap();
    let gc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(gc["bases_removed"], 1, "{gc}");
    let mut left = vec![base.clone(), other.clone()];
    left.sort();
    assert_eq!(bases_in(&mnt), left);

    // Forgetting the snapshot a base stands for releases it.
    let id = fourth["snapshot"].as_str().unwrap();
    let o = vsnap_e2e::vsnap_cmd()
        .args(["forget", "--repo"])
        .arg(&repo)
        .arg(id)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(bases_in(&mnt), [other]);
    drop(fs);
    drop(dir);
}

/// In a bucket, gc runs beside backups: it removes the clone a dead
/// backup left on this host, never one a running backup holds locked, and
/// that one once its lock is gone and no manifest records it.
#[test]
fn bucket_gc_removes_dead_backups_clones_and_spares_locked_ones() {
    let test = "bucket_gc_removes_dead_backups_clones_and_spares_locked_ones";
    let Some((dir, fs)) = scratch(test) else {
        return;
    };
    let Some(s3) = vsnap_e2e::s3::S3Server::start(test) else {
        return;
    };
    let url = "s3://vsnap/cbt";
    let vsnap = |args: &[&str]| -> serde_json::Value {
        let o = s3
            .env(&mut vsnap_e2e::vsnap_cmd())
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null)
    };
    vsnap(&["repo", "init", url]);
    let mnt = fs.mount.clone();
    let disk = mnt.join("disk.vhd");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vpc", "-o", "subformat=dynamic"])
        .arg(&disk)
        .arg("16M"));
    run(Command::new("qemu-io")
        .args(["-f", "vpc", "-c", "write -P 7 0 8M"])
        .arg(&disk));
    let disk_arg = disk.to_str().unwrap();
    let b = vsnap(&[
        "backup", "--json", "-q", "--name", "vm", "--repo", url, disk_arg,
    ]);
    let base = Path::new(b["disks"][0]["tracking"]["base"]["path"].as_str().unwrap()).to_owned();
    assert_eq!(bases_in(&mnt), std::slice::from_ref(&base));
    // A dead backup's clone, a running one's (locked, as a backup holds
    // its clone until its commit), and another repository's.
    let name = base.file_name().unwrap().to_str().unwrap().to_owned();
    let tag = name.rsplit('.').nth(1).unwrap();
    let at = |n: &str| mnt.join(".vsnap-base").join(n);
    let dead = at(&format!("disk.vhd.{tag}.dead0000dead0000"));
    let running = at(&format!("disk.vhd.{tag}.live0000live0000"));
    let other = at("disk.vhd.0123abcd.other000other000");
    for c in [&dead, &running, &other] {
        reflink(&disk, c);
    }
    let lock = File::open(&running).unwrap();
    lock.lock().unwrap();
    let gc = || vsnap(&["gc", "--json", "--grace", "0s", "--repo", url]);
    let report = gc();
    assert_eq!(report["bases_removed"], 1, "{report}");
    let mut left = vec![base.clone(), running.clone(), other.clone()];
    left.sort();
    assert_eq!(bases_in(&mnt), left);
    drop(lock);
    let report = gc();
    assert_eq!(report["bases_removed"], 1, "{report}");
    let mut left = vec![base.clone(), other];
    left.sort();
    assert_eq!(bases_in(&mnt), left);
    // The recorded base still serves: the next backup reads nothing new.
    let next = vsnap(&[
        "backup", "--json", "-q", "--name", "vm", "--repo", url, disk_arg,
    ]);
    let d = &next["disks"][0];
    assert_eq!(d["tracking"]["since"], b["snapshot"], "{d}");
    assert_eq!(d["bytes_read"], 0, "{d}");
    drop(s3);
    drop(fs);
    drop(dir);
}

/// The coordinated backup with the reflink provider keeps each disk's
/// snapshot clone as its base: after every round of random writes to two
/// disks (a dynamic VHD and a raw image), its incremental snapshot equals
/// a full backup of the same clones, one base per disk is kept, and no
/// snapshot directory is left.
#[test]
fn coordinated_backups_keep_their_reflink_snapshots_as_bases_and_equal_full_ones() {
    use vsnap_coordinator::backup::{run as coordinate, Plan};
    use vsnap_coordinator::inventory::Inventory;
    use vsnap_coordinator::provider::{Choice, Kind};
    use vsnap_repo::Repository;
    let test = "coordinated_backups_keep_their_reflink_snapshots_as_bases_and_equal_full_ones";
    let Some((dir, fs)) = scratch(test) else {
        return;
    };
    let root = dir.path().join("repo");
    let repo = Repository::init(&root, 256 << 10).unwrap();
    let size: u64 = 32 << 20;
    let vhd = fs.mount.join("a.vhd");
    let raw = fs.mount.join("b.img");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "vpc", "-o", "subformat=dynamic"])
        .arg(&vhd)
        .arg(size.to_string()));
    let content: Vec<u8> = (0..8u64 << 20).map(|i| (i * 5 / 4096) as u8).collect();
    std::fs::write(&raw, &content).unwrap();
    let inv = dir.path().join("inv.toml");
    std::fs::write(
        &inv,
        format!(
            "[[vm]]\nname = \"vm\"\ndisks = [\"{}\", \"{}\"]\nagent = \"none\"\npolicy = \"allow-crash-consistent\"\n",
            vhd.display(),
            raw.display()
        ),
    )
    .unwrap();
    let vms = Inventory::load(&inv).unwrap().vms;
    let plan = Plan {
        provider: Choice::Force(Kind::Reflink),
        ..Plan::new(vms)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // One coordinated backup: its snapshot's manifest and what it streamed.
    let run = |plan: &Plan| {
        let r = rt
            .block_on(coordinate(
                plan,
                &repo,
                &vsnap_engine::pipeline::Progress::default(),
                Default::default(),
            ))
            .unwrap();
        assert!(r.failure().is_none(), "{:?}", r.failure());
        assert_eq!(r.session.vms[0].providers, [Kind::Reflink, Kind::Reflink]);
        let id = r.session.vms[0].snapshot.clone().unwrap();
        (repo.read_manifest(&id).unwrap(), r.streamed)
    };
    let backup = || run(&plan);
    let (opts, spec) = (small_chunks(), crash_consistent("full"));
    let (first, _) = backup();
    for d in &first.disks {
        let t = d.tracking.as_ref().unwrap();
        assert!(t.base.is_some() && t.since.is_none(), "{t:?}");
    }
    let mut rng = Rng::new(seed());
    let (mut reused, mut untouched, mut cells) = (0u64, 0u64, 0u64);
    let mut prev = first.id.clone();
    for round in 0..40 {
        // What each disk's changes touched, in the inventory's order.
        let mut touched = [Vec::new(), Vec::new()];
        for _ in 0..1 + rng.below(3) {
            if rng.below(2) == 0 {
                touched[0].extend(mutate_vhd(&mut rng, &vhd, size));
            } else {
                touched[1].extend(mutate_raw(&mut rng, &raw, &content).ranges);
            }
        }
        let (inc, streamed) = backup();
        assert!(
            !fs.mount
                .join(vsnap_coordinator::provider::SNAP_DIR)
                .exists(),
            "round {round}: the snapshot directory is left"
        );
        assert_eq!(
            bases_in(&fs.mount).len(),
            2,
            "round {round}: one base per disk"
        );
        let mut round_reused = 0;
        assert_eq!(inc.disks.len(), 2);
        for (d, touched) in inc.disks.iter().zip(&touched) {
            let t = d.tracking.as_ref().unwrap();
            let base = t.base.as_ref().unwrap();
            let full = vsnap_repo::cbt::backup_files(
                &repo,
                std::slice::from_ref(&base.path),
                None,
                &opts,
                &spec,
                &vsnap_engine::pipeline::Progress::default(),
                false,
            )
            .unwrap()
            .manifest
            .disks
            .remove(0);
            assert_eq!(d.digest, full.digest, "round {round}, {}: digests", d.name);
            assert_eq!(d.index, full.index, "round {round}, {}: indexes", d.name);
            if t.fallback.is_none() {
                assert_eq!(t.since.as_ref(), Some(&prev), "round {round}, {}", d.name);
                let want = untouched_held(&base.path, opts.chunk_size, touched);
                assert!(
                    t.reused_cells >= want,
                    "round {round}, {}: {} cells taken unread, but {want} held cells were not touched ({touched:?})",
                    d.name,
                    t.reused_cells
                );
                untouched += want;
                reused += t.reused_cells;
                round_reused += t.reused_cells;
                // Allocated cells: those a full backup reads.
                cells += d.stats.data_chunks + d.stats.zero_chunks;
            }
        }
        assert_eq!(streamed.reused_chunks, round_reused, "round {round}");
        prev = inc.id.clone();
    }
    eprintln!(
        "{test}: 40 rounds, {reused} of {cells} allocated cells taken unread ({untouched} untouched)"
    );
    assert!(untouched > 0, "no round left a held cell untouched");
    // Without tracking: read whole, nothing said of it, no base touched.
    let before = bases_in(&fs.mount);
    let (m, streamed) = run(&Plan {
        track: false,
        ..plan.clone()
    });
    assert!(m.disks.iter().all(|d| d.tracking.is_none()), "{m:?}");
    assert_eq!(streamed.reused_chunks, 0);
    assert_eq!(bases_in(&fs.mount), before);
    assert!(!fs
        .mount
        .join(vsnap_coordinator::provider::SNAP_DIR)
        .exists());
    drop(rt);
    drop(fs);
    drop(dir);
}
