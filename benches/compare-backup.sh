#!/usr/bin/env bash
# Side-by-side timings of vsnap's repository against restic and borg, in
# one run, with the page cache warm. Prints medians (hyperfine) and ratios.
#
#   benches/compare-backup.sh [WORKDIR]   (default /tmp/vsnap-bench; shares
#                                          compare.sh's image set)
#
# The image: compare.sh's d.vhd, a 2 GiB dynamic VHD (half unallocated, a
# quarter random bytes, a quarter text). Every tool backs up the same .vhd
# file. restic always encrypts (AES-256 + Poly1305; it cannot be turned
# off); borg runs with `-e none --compression zstd,1`; vsnap compresses new
# chunks with zstd -1 and stores each once. Between runs each tool starts
# from the same state (--prepare), so every timed run does the same work,
# and with nothing of an earlier run still being written back (`sync`):
# otherwise a tool that makes its data durable (vsnap's syncfs) pays for
# the writeback another tool's run left behind.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/vsnap-bench}
for pkg in restic borgbackup hyperfine qemu-utils python3; do
  dpkg -s "$pkg" >/dev/null 2>&1 || {
    [ "$(id -u)" = 0 ] || { echo "compare-backup.sh needs $pkg"; exit 1; }
    apt-get install -y -q "$pkg" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "$pkg" >/dev/null; }
  }
done
[ -f "$work/d.vhd" ] || { echo "run benches/compare.sh $work first (it makes the image set)"; exit 1; }
cargo build --release --quiet -p vsnap
vsnap=$PWD/target/release/vsnap
cd "$work"
export VSNAP_CACHE_DIR="$work/cache" RESTIC_PASSWORD=bench BORG_PASSPHRASE= \
  BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
runs=${RUNS:-5}

# The 1%-changed image: d.vhd with 4 KiB rewritten in 1% of its allocated
# 2 MiB blocks (5 of 512), and a new mtime.
if [ ! -f d1.vhd ]; then
  cp d.vhd d1.vhd
  for i in 0 100 200 300 400; do
    # Allocated blocks sit in 64 MiB stripes: random, hole, text, hole.
    off=$(( (i / 32) * 128 * 1048576 + (i % 32) * 2097152 + 4096 ))
    qemu-io -f vpc -c "write -P 0x5a $off 4096" d1.vhd >/dev/null
  done
fi
touch d1.vhd

fresh() { # the three repositories, empty; nothing left to write back
  rm -rf rv rr rb
  $vsnap repo init rv >/dev/null
  restic init -q --repo rr >/dev/null
  borg init -e none rb >/dev/null
  sync
}
first() { # the three repositories, after a first backup of d.vhd
  fresh
  $vsnap backup -q --repo rv --name d d.vhd >/dev/null
  restic backup -q --repo rr d.vhd >/dev/null
  borg create --compression zstd,1 rb::first d.vhd
  sync
}
export -f fresh first
export vsnap

median() { python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["results"]; print(" ".join(str(x["median"]) for x in r))' "$1"; }
ratios() { # LABEL JSON: vsnap first, then restic, then borg
  read -r v r b < <(median "$2")
  python3 -c "import sys; v,r,b=map(float,sys.argv[1:4]); print(f'{sys.argv[4]:<34} vsnap {v*1000:8.0f} ms  restic {r*1000:8.0f} ms ({r/v:5.1f}x)  borg {b*1000:8.0f} ms ({b/v:5.1f}x)')" "$v" "$r" "$b" "$1"
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(lscpu | sed -n 's/^Model name: *//p')"
echo "vsnap $($vsnap --version | cut -d' ' -f2), $(restic version | cut -d' ' -f1-2), $(borg --version)"

hyperfine -N -r "$runs" --export-json first.json \
  --prepare "bash -c fresh" \
  "$vsnap backup -q --repo rv --name d d.vhd" \
  "restic backup -q --repo rr d.vhd" \
  "borg create --compression zstd,1 rb::run d.vhd" >/dev/null
ratios "first backup (peer time / vsnap)" first.json

hyperfine -N -r "$runs" --export-json changed.json \
  --prepare "bash -c first" \
  "$vsnap backup -q --repo rv --name d d1.vhd" \
  "restic backup -q --repo rr d1.vhd" \
  "borg create --compression zstd,1 rb::changed d1.vhd" >/dev/null
ratios "1% changed (peer time / vsnap)" changed.json
echo "stored: vsnap $(du -sb rv | cut -f1) B, restic $(du -sb rr | cut -f1) B, borg $(du -sb rb | cut -f1) B"

# Verify: every chunk re-read and re-hashed. borg check --verify-data is
# borg's equivalent of restic check --read-data.
bash -c first
hyperfine -N -w 1 -r "$runs" --export-json verify.json \
  "$vsnap verify -q --repo rv" \
  "restic check -q --read-data --repo rr" \
  "borg check --verify-data rb" >/dev/null
ratios "verify (peer time / vsnap)" verify.json

# Restore from the page cache, into a fresh file each run.
snap=$($vsnap snapshots --repo rv --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')
mkdir -p out
hyperfine -N -w 1 -r "$runs" --export-json restore.json \
  --prepare "bash -c 'rm -rf $work/out/r.vhd $work/out/restic $work/out/borg; sync'" \
  "$vsnap restore -q --repo rv $snap:d.vhd --to $work/out/r.vhd" \
  "restic restore -q --repo rr latest --target $work/out/restic" \
  "bash -c 'mkdir -p $work/out/borg && cd $work/out/borg && borg extract $work/rb::first'" >/dev/null
ratios "restore (peer time / vsnap)" restore.json
read -r v _ < <(median restore.json)
python3 -c "import sys; v=float(sys.argv[1]); print(f'restore throughput: {2*1024**3/v/1e9:.2f} GB/s of virtual disk ({1024**3/v/1e9:.2f} GB/s of data)')" "$v"
