#!/usr/bin/env bash
# The freeze-window scaling study of docs/freeze-window.md: the freeze
# window against disk size (1, 4, 16 GiB, 4 guests, 5 rounds) and against
# the number of guests (1, 4, 16, 1 GiB disks, 3 rounds), for reflink and
# copy, with a random-4k-fsync writer in every guest. Needs root (it builds
# loop-mounted guests under /var/tmp); prints the tables and leaves the
# JSON and SVG files in OUT.
#
#   sudo benches/freeze-study.sh [OUT]   (default docs/freeze-window)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/freeze-window}
mkdir -p "$out"
cargo build --release --quiet -p vsnap
v=target/release/vsnap
$v bench freeze --guests 4 --disk-size 1G --disk-size 4G --disk-size 16G \
  --provider all --rounds 5 --plot "$out/size.svg" --json > "$out/size.json"
for g in 1 4 16; do
  $v bench freeze --guests "$g" --disk-size 1G --provider all --rounds 3 \
    --plot "$out/guests-$g.svg" --json > "$out/guests-$g.json"
done
benches/freeze-summary.py "$out/size.json" "$out"/guests-{1,4,16}.json
