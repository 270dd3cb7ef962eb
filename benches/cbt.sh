#!/usr/bin/env bash
# Changed-block tracking against a full re-read, restic and borg: a
# dynamic VHD with SIZE_GIB GiB allocated (half its virtual size), 1% of
# its 2 MiB blocks given 64 KiB of new random bytes each, the page cache
# dropped before every timed run (a host's nightly backup reads cold
# data). Root: the disk lives on a loop-mounted XFS with reflink that the
# script makes and removes.
#
#   SIZE_GIB=16 RUNS=3 benches/cbt.sh [WORKDIR]   (default /tmp/vsnap-cbt)
#
# Each round: the disk is reset to the pristine image (a reflink copy),
# vsnap backs it up once untimed (so its base is the pristine state, as
# restic's and borg's last backups are), 1% of its blocks are rewritten,
# then, each from a cold cache and in an order that rotates by round:
# vsnap's incremental backup, vsnap --no-track (today's full re-read),
# restic backup and borg create of the same file; then vsnap again with
# nothing changed. Prints medians, the bytes vsnap read, and the blocks
# the base alone holds (what keeping it costs).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "cbt.sh needs root (a loop-mounted XFS, drop_caches)"; exit 1; }
for pkg in restic borgbackup qemu-utils python3 xfsprogs; do
  dpkg -s "$pkg" >/dev/null 2>&1 || apt-get install -y -q "$pkg" >/dev/null ||
    { apt-get update -q >/dev/null && apt-get install -y -q "$pkg" >/dev/null; }
done
work=${1:-/tmp/vsnap-cbt}
size=${SIZE_GIB:-16}
runs=${RUNS:-3}
cargo build --release --quiet -p vsnap -p vsnap-benches
vsnap=$PWD/target/release/vsnap
mkdata=$PWD/target/release/mkdata
mkdir -p "$work"
cd "$work"
mnt=$work/mnt
cleanup() { umount "$mnt" 2>/dev/null || true; rm -f "$work/xfs.img"; }
trap cleanup EXIT
cleanup
truncate -s $(( size * 3 + 8 ))G xfs.img
mkfs.xfs -q -f -m reflink=1 xfs.img
mkdir -p "$mnt"
mount -o loop xfs.img "$mnt"
export VSNAP_CACHE_DIR="$work/cache" RESTIC_PASSWORD=bench BORG_PASSPHRASE= \
  BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes

# The pristine image: mkdata's stripes (random, hole, text, hole) as a
# dynamic VHD, SIZE_GIB GiB of it allocated.
"$mkdata" "$mnt/d.raw" $(( size * 2 * 1024 )) 7
qemu-img convert -O vpc -o subformat=dynamic "$mnt/d.raw" "$mnt/d0.vhd"
rm "$mnt/d.raw"
fstrim "$mnt" # give the raw file's blocks back to the host (the loop file is sparse)
rm -rf rv rr rb
$vsnap repo init rv >/dev/null
restic init -q --repo rr >/dev/null
borg init -e none rb >/dev/null
cp --reflink=always "$mnt/d0.vhd" "$mnt/d.vhd"
$vsnap backup -q --repo rv --name d --no-track "$mnt/d.vhd" >/dev/null
restic backup -q --repo rr "$mnt/d.vhd" >/dev/null
borg create --compression zstd,1 rb::first "$mnt/d.vhd"

cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
# Seconds a command takes, from a cold cache.
timed() { cold; local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); python3 -c "print($t1 - $t0)"; }
# 1% of the allocated 2 MiB blocks, 64 KiB of random bytes in each, written
# where the VHD keeps that block's data (a guest's write to an allocated
# block changes nothing else).
change() {
  $vsnap map --json "$mnt/d.vhd" > map.json
  python3 - "$mnt/d.vhd" map.json "$1" <<'EOF'
import json, os, random, sys
path, mapfile, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
blocks = []
for e in json.load(open(mapfile)):
    if e["kind"] == "data":
        for b in range(e["start"] // (2 << 20), (e["start"] + e["length"]) // (2 << 20)):
            blocks.append(e["offset"] + b * (2 << 20) - e["start"])
rng = random.Random(seed)
chosen = rng.sample(blocks, max(1, len(blocks) // 100))
fd = os.open(path, os.O_WRONLY)
for at in chosen:
    os.pwrite(fd, os.urandom(64 << 10), at + rng.randrange(0, 32) * (64 << 10))
os.fsync(fd)
os.close(fd)
print(len(chosen), "of", len(blocks), "blocks rewritten", file=sys.stderr)
EOF
}

: > times.txt
for round in $(seq 1 "$runs"); do
  cp --reflink=always "$mnt/d0.vhd" "$mnt/d.vhd"
  $vsnap backup -q --repo rv --name d "$mnt/d.vhd" >/dev/null
  change "$round"
  # What keeping the base costs: the blocks it holds that the disk no
  # longer uses (here d0.vhd shares them too, so its flags cannot say):
  # the ranges where the two files' FIEMAP extents part.
  base=$(ls "$mnt"/.vsnap-base/*)
  python3 - "$base" "$mnt/d.vhd" >> times.txt <<'EOF'
import subprocess, sys
def extents(path):
    out = []
    for line in subprocess.run(["xfs_io", "-c", "fiemap -v", path], capture_output=True, text=True, check=True).stdout.splitlines():
        f = line.split()
        if len(f) < 4 or not f[0].rstrip(":").isdigit() or "hole" in line:
            continue
        a, b = f[1].strip("[]:").split("..")
        p = f[2].split("..")[0]
        out.append((int(a), int(b) + 1, int(p)))
    return out
base, disk = extents(sys.argv[1]), extents(sys.argv[2])
def phys(ext, at):
    for a, b, p in ext:
        if a <= at < b:
            return p + at - a, b
    return None, None
own = 0
for a, b, p in base:
    at = a
    while at < b:
        q, end = phys(disk, at)
        stop = min(b, end) if end else b
        if q != p + at - a:
            own += (stop - at) * 512
        at = stop
print("own", own)
EOF
  cmds=(
    "incremental|$vsnap backup --json --repo rv --name d $mnt/d.vhd"
    "full|$vsnap backup -q --repo rv --name d --no-track $mnt/d.vhd"
    "restic|restic backup -q --repo rr $mnt/d.vhd"
    "borg|borg create --compression zstd,1 rb::r$round $mnt/d.vhd"
  )
  n=${#cmds[@]}
  for k in $(seq 0 $(( n - 1 ))); do
    c=${cmds[$(( (k + round) % n ))]}
    label=${c%%|*}
    cmd=${c#*|}
    if [ "$label" = incremental ]; then
      cold; t0=$(date +%s.%N); $cmd > inc.json; t1=$(date +%s.%N)
      t=$(python3 -c "print($t1 - $t0)")
      python3 -c "import json; d=json.load(open('inc.json'))['disks'][0]; print('read', d['bytes_read'], 'reused', d['tracking'].get('reused_cells'), 'fallback', d['tracking'].get('fallback'))" >> times.txt
    else
      t=$(timed $cmd)
    fi
    echo "$label $t" >> times.txt
  done
  echo "unchanged $(timed $vsnap backup -q --repo rv --name d "$mnt/d.vhd")" >> times.txt
done
allocated=$($vsnap info --json "$mnt/d0.vhd" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["allocated_bytes"])')
python3 - "$allocated" "$size" <<'EOF'
import statistics, sys
allocated, size = int(sys.argv[1]), int(sys.argv[2])
times, reads, own = {}, [], []
for line in open("times.txt"):
    f = line.split()
    if f[0] == "read":
        reads.append(int(f[1]))
    elif f[0] == "own":
        own.append(int(f[1]))
    else:
        times.setdefault(f[0], []).append(float(f[1]))
med = {k: statistics.median(v) for k, v in times.items()}
inc = med["incremental"]
print(f"dynamic VHD, {allocated / 2**30:.1f} GiB allocated, 1% of its blocks rewritten, cold cache, medians of {len(times['incremental'])}")
for k in ["incremental", "full", "restic", "borg", "unchanged"]:
    ratio = "" if k in ("incremental", "unchanged") else f"  ({med[k] / inc:.1f} x the incremental)"
    print(f"  {k:<12} {med[k] * 1000:9.0f} ms{ratio}")
print(f"  bytes read by the incremental backup: {statistics.median(reads) / 2**20:.0f} MiB, {100 * statistics.median(reads) / allocated:.2f} % of allocated")
print(f"  keeping the base: {statistics.median(own) / 2**20:.2f} MiB of blocks it alone holds after the rewrite")
EOF
