#!/usr/bin/env bash
# What a repository's chunk size costs a full backup, a restore and a
# verify: a dynamic VHD with SIZE_GIB GiB allocated (mkdata's stripes:
# random, hole, text, hole), backed up into fresh repositories of 4, 2 and
# 1 MiB chunks, restored and verified, RUNS rounds, the sizes interleaved
# within each round. Warm cache (the image fits in memory): this measures
# per-chunk work, not the disk.
#
#   SIZE_GIB=2 RUNS=3 benches/chunk_size.sh [WORKDIR]   (default /tmp/vsnap-chunk-size)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-img >/dev/null || { echo "chunk_size.sh needs qemu-img (qemu-utils)"; exit 1; }
work=${1:-/tmp/vsnap-chunk-size}
size=${SIZE_GIB:-2}
runs=${RUNS:-3}
cargo build --release --quiet -p vsnap -p vsnap-benches
vsnap=$PWD/target/release/vsnap
mkdata=$PWD/target/release/mkdata
rm -rf "$work"; mkdir -p "$work"; cd "$work"
trap 'rm -rf "$work"' EXIT
"$mkdata" d.raw $(( size * 2 * 1024 )) 7
qemu-img convert -O vpc -o subformat=dynamic d.raw d.vhd
rm d.raw
cat d.vhd > /dev/null
secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); python3 -c "print($t1 - $t0)"; }
: > times.txt
for round in $(seq 1 "$runs"); do
  for cs in 4M 2M 1M; do
    rm -rf "r$cs" out.vhd
    $vsnap repo init --chunk-size "$cs" "r$cs" >/dev/null
    b=$(secs $vsnap backup -q --repo "r$cs" --name d --no-track d.vhd)
    id=$($vsnap snapshots --json --repo "r$cs" | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
    r=$(secs $vsnap restore -q --repo "r$cs" "$id" --to out.vhd)
    v=$(secs $vsnap verify -q --repo "r$cs")
    files=$(find "r$cs/chunks" -type f | wc -l)
    echo "$cs $b $r $v $files $(du -sb "r$cs" | cut -f1)" >> times.txt
  done
done
python3 - "$size" <<'PY'
import statistics, sys
rows = {}
for line in open("times.txt"):
    cs, *v = line.split()
    rows.setdefault(cs, []).append([float(x) for x in v])
print(f"dynamic VHD, {sys.argv[1]} GiB allocated, warm cache, medians of {len(rows['4M'])}")
print(f"  {'chunk':<6} {'backup':>9} {'restore':>9} {'verify':>9} {'chunk files':>12} {'repository':>11}")
for cs in ["4M", "2M", "1M"]:
    m = [statistics.median(col) for col in zip(*rows[cs])]
    print(f"  {cs:<6} {m[0]*1000:7.0f} ms {m[1]*1000:7.0f} ms {m[2]*1000:7.0f} ms {m[3]:12.0f} {m[4]/2**20:8.0f} MiB")
PY
