#!/usr/bin/env bash
# A repository in a bucket against one in a directory, in one run: the
# same dynamic VHD (SIZE_GIB GiB allocated, mkdata's stripes: random, hole,
# text, hole) backed up, restored and verified into each, RUNS rounds
# interleaved, medians and ratios, and the bucket's PUT and GET counts.
# The bucket is s3s-fs on 127.0.0.1, on the same disk as the directory,
# timed directly and again through the tests' proxy (which counts the
# requests), with s3s-fs's own CPU time. Warm cache.
#
#   SIZE_GIB=2 RUNS=3 benches/s3.sh [WORKDIR]   (default /tmp/vsnap-s3-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v qemu-img >/dev/null || { echo "s3.sh needs qemu-img (qemu-utils)"; exit 1; }
s3s=$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")
[ -x "$s3s" ] || { echo "s3.sh needs s3s-fs: cargo install --locked s3s-fs@0.14.1 --features binary"; exit 1; }
work=${1:-/tmp/vsnap-s3-bench}
size=${SIZE_GIB:-2}
runs=${RUNS:-3}
cargo build --release --quiet -p vsnap -p vsnap-benches
rm -rf "$work"; mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
target/release/mkdata "$work/d.raw" $(( size * 2 * 1024 )) 7
qemu-img convert -O vpc -o subformat=dynamic "$work/d.raw" "$work/d.vhd"
rm "$work/d.raw"
cat "$work/d.vhd" > /dev/null
VSNAP=$PWD/target/release/vsnap S3S_FS=$s3s target/release/s3_bench "$work" "$size" "$runs"
