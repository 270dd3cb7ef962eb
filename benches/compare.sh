#!/usr/bin/env bash
# Side-by-side timings of vsnap against the stock tools, in one run, with
# the page cache warm. Prints medians (benches/interleave.py, which
# alternates the two sides round by round) and their ratios.
#
#   benches/compare.sh [WORKDIR]     (default /tmp/vsnap-bench; needs ~8 GiB)
#   VSNAP_BENCH_SETS=vhdx benches/compare.sh    (only the VHDX set)
#
# The image set, per the engine issue: dynamic VHDs of 2 GiB virtual, in
# 64 MiB stripes of random bytes, a hole, compressible text, a hole (so half
# unallocated, a quarter incompressible, a quarter text), converted by
# qemu-img with force_size=on so the VHD and the raw file are the same disk.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/vsnap-bench}
mkdir -p "$work"
for t in hyperfine b3sum zstd qemu-img python3; do
  command -v $t >/dev/null || { echo "compare.sh needs $t (apt-get install $t)"; exit 1; }
done
cargo build --release --quiet -p vsnap -p vsnap-benches
vsnap=$PWD/target/release/vsnap
mkdata=$PWD/target/release/mkdata
interleave=$PWD/benches/interleave.py
cd "$work"
# The zero-leaf cache lives with the images; the warm-up rounds fill it,
# so the timed runs see it warm; the second pair hashes without it.
export VSNAP_CACHE_DIR="$work/cache"

make_image() { # NAME SIZE_MIB SEED
  [ -f "$1.vhd" ] && return
  "$mkdata" "$1.raw" "$2" "$3"
  qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on "$1.raw" "$1.vhd"
}
sets=" ${VSNAP_BENCH_SETS:-vhd vhdx} "
make_image d 2048 1
if [[ $sets == *" vhd "* ]]; then
for i in $(seq 1 16); do make_image s$i 256 $((100 + i)); done
make_image big 4096 7
fi

median() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]]["median"])' "$@"; }
# Each pair runs in alternation, round by round (benches/interleave.py):
# on this shared machine a slow phase of a minute would otherwise land on
# one side of a pair only.
pair() { # LABEL TARGET CMD_VSNAP CMD_PEER
  "$interleave" "${PAIR_RUNS:-10}" true "a=$3" "b=$4" >pair.json
  local a b
  a=$(median pair.json a); b=$(median pair.json b)
  python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f'{sys.argv[3]:<46} vsnap {a*1000:8.1f} ms  peer {b*1000:8.1f} ms  ratio {a/b:5.2f}  (target {sys.argv[4]})')" "$a" "$b" "$1" "$2"
}

# Copy against qemu-img convert to the same format, digest and B3SUMS
# included, at equal durability: qemu-img never flushes its copy, so it
# is timed against `vsnap copy --no-sync`; vsnap's default fsyncs each
# copy before its rename, so it is timed against qemu-img followed by
# `sync FILE` (an fsync). The four commands run in alternation, round by
# round (benches/interleave.py), so the machine's slow phases fall on
# both sides of each pair.
copy_pairs() { # LABEL IMAGE QEMU_FORMAT QEMU_OPTIONS
  local ext=${2##*.}
  mkdir -p out
  # Each run starts with no dirty pages left by the one before (qemu-img's
  # unflushed copy would otherwise be written back during the next run).
  local clean="rm -rf $work/out/$2 $work/out/B3SUMS $work/out/q.$ext && sync"
  local vs="$vsnap copy -q --to $work/out $work/$2"
  local qemu="qemu-img convert -f $3 -O $3 -o $4 $work/$2 $work/out/q.$ext"
  "$interleave" "${COPY_RUNS:-15}" "$clean" "vn=$vs --no-sync" "q=$qemu" "vs=$vs" "qs=$qemu && sync $work/out/q.$ext" >copy.json
  python3 - "$1" <<'PY'
import json, sys
r = json.load(open("copy.json"))
for a, b, what in (("vn", "q", "copy --no-sync / qemu-img convert"), ("vs", "qs", "copy (fsync) / qemu-img + sync")):
    x, y = r[a], r[b]
    label = sys.argv[1] + ": " + what
    print(f"{label:<46} vsnap {x['median']*1000:8.1f} ms  peer {y['median']*1000:8.1f} ms  ratio {x['median']/y['median']:5.2f}  (target <= 1.00)")
    print(f"{'':<46} cpu (user+sys) vsnap {(x['user']+x['system'])*1000:.0f} ms, peer {(y['user']+y['system'])*1000:.0f} ms;"
          f" wall range vsnap {x['min']*1000:.0f}-{x['max']*1000:.0f} ms, peer {y['min']*1000:.0f}-{y['max']*1000:.0f} ms")
PY
  # The order rotates each round, so the last round's last copy is still
  # there; the steps after expect an empty out/.
  eval "$clean"
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(lscpu | sed -n 's/^Model name: *//p')"
echo "vsnap $($vsnap --version | cut -d' ' -f2), $(b3sum --version), $(zstd --version | head -1), $(qemu-img --version | head -1)"
if [[ $sets == *" vhd "* ]]; then
[ "$($vsnap hash -q d.vhd | cut -d' ' -f1)" = "$(b3sum --no-names d.raw)" ] || { echo "digest mismatch"; exit 1; }
pair "hash: vsnap hash d.vhd / b3sum d.raw" "<= 1.20" "$vsnap hash -q d.vhd" "b3sum d.raw"
pair "hash, no zero cache: --no-cache / b3sum" "<= 1.20" "$vsnap hash -q --no-cache d.vhd" "b3sum d.raw"
# zstd -1 through the pipeline (read, hash, compress in one pass; zero
# ranges never compressed) against zstd -1 -T0 of the raw file alone.
pair "compress: vsnap hash --compress / zstd -1 -T0" "<= 0.80" "$vsnap hash -q --compress d.vhd" "zstd -1 -T0 -q -f d.raw -o /dev/null"
echo "compress: sizes, vsnap $($vsnap hash -q --json --compress d.vhd | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["stored_bytes"])') bytes, zstd $(zstd -1 -T0 -c d.raw | wc -c) bytes"

# Copy, dynamic to dynamic, digest and B3SUMS included.
copy_pairs "copy" d.vhd vpc subformat=dynamic,force_size=on

# The read engines, buffered and O_DIRECT (O_DIRECT reads the disk, not
# the page cache).
hyperfine -N -w 1 -r 5 --export-json io.json \
  "$vsnap hash -q --io sync d.vhd" "$vsnap hash -q --io uring d.vhd" \
  "$vsnap hash -q --io sync --direct d.vhd" "$vsnap hash -q --io uring --direct d.vhd" >/dev/null
python3 -c "
import json; r=json.load(open('io.json'))['results']
for x in r: print(f\"io: {x['command'].split('hash -q ')[1]:<32} {x['median']*1000:8.1f} ms\")"

# Many small images against one large one, same total bytes.
"$interleave" 5 true "many=$vsnap hash -q $(echo s{1..16}.vhd)" "big=$vsnap hash -q big.vhd" >many.json
python3 -c "
import json; r=json.load(open('many.json')); m,b=r['many']['median'],r['big']['median']
gib=4
print(f'hash: 16 x 256 MiB {gib/m:6.2f} GiB/s, 1 x 4 GiB {gib/b:6.2f} GiB/s, ratio {b/m:5.2f} (target >= 0.90)')"

# Peak memory, whatever the number of images.
rss() { /usr/bin/time -f %M "$@" 2>&1 >/dev/null | tail -1; }
echo "hash: peak RSS, 1 image $(rss $vsnap hash -q d.vhd) KiB; 16 images $(rss $vsnap hash -q s{1..16}.vhd) KiB; 4 GiB image $(rss $vsnap hash -q big.vhd) KiB"
rm -rf out/*; echo "copy: peak RSS, 16 images $(rss $vsnap copy -q --to out s{1..16}.vhd) KiB (budget 256 MiB + 64 MiB = 327680 KiB)"
rm -rf out/*; echo "copy: peak RSS, 16 images, --memory 64M $(rss $vsnap copy -q --memory 64M --to out s{1..16}.vhd) KiB"
rm -rf out/*
fi

# The same disk as a dynamic VHDX, as qemu-img writes one (16 MiB blocks
# for 2 GiB; its holes stay unallocated).
if [[ $sets == *" vhdx "* ]]; then
[ -f d.vhdx ] || qemu-img convert -f raw -O vhdx -o subformat=dynamic d.raw d.vhdx
[ "$($vsnap hash -q d.vhdx | cut -d' ' -f1)" = "$(b3sum --no-names d.raw)" ] || { echo "VHDX digest mismatch"; exit 1; }
pair "vhdx hash: vsnap hash d.vhdx / b3sum d.raw" "<= 1.20" "$vsnap hash -q d.vhdx" "b3sum d.raw"
pair "vhdx compress: vsnap hash --compress / zstd -1" "<= 0.80" "$vsnap hash -q --compress d.vhdx" "zstd -1 -T0 -q -f d.raw -o /dev/null"
copy_pairs "vhdx copy" d.vhdx vhdx subformat=dynamic
"$vsnap" copy -q --to out d.vhdx >/dev/null && qemu-img check -q out/d.vhdx && qemu-img compare -q d.raw out/d.vhdx && echo "vhdx copy: qemu-img check clean, compare identical"
rm -rf out/*
fi
