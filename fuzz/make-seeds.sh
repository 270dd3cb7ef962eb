#!/usr/bin/env bash
# Writes the named seed inputs (seed-*) into fuzz/corpus/: small valid images
# from qemu-img and vsnap, and the structures the parsers see. Run it before
# fuzzing from scratch; the committed corpus already holds them.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet -p vsnap-engine --examples
cargo build --quiet -p vsnap
V="$PWD/target/debug/vsnap"
W="$PWD/target/debug/examples/vhd_write"
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
O=fuzz/corpus/vhd_open P=fuzz/corpus/vhd_parse
mkdir -p "$O" "$P"
qemu-img create -q -f vpc -o subformat=fixed "$T/f.vhd" 8K
qemu-io -f vpc -c 'write -P 0x5a 512 1k' "$T/f.vhd" >/dev/null
cp "$T/f.vhd" "$O/seed-fixed-qemu"
qemu-img create -q -f vpc -o subformat=fixed,force_size=on "$T/f2.vhd" 6144
cp "$T/f2.vhd" "$O/seed-fixed-force"
"$V" create -t dynamic -s 64K --block-size 4K "$T/d.vhd" >/dev/null
"$W" "$T/d.vhd" 5000 3000 ab
"$W" "$T/d.vhd" 65000 536 cd
cp "$T/d.vhd" "$O/seed-dynamic-4k"
"$V" create -t differencing -p "$T/d.vhd" "$T/c.vhd" >/dev/null
"$W" "$T/c.vhd" 700 100 ee
cp "$T/c.vhd" "$O/seed-differencing"
cp fixtures/dynamic-empty.vhd "$O/seed-dynamic-empty"
cp fixtures/bad-truncated.vhd "$O/seed-truncated"
tail -c 512 "$T/f.vhd" > "$P/seed-footer"
dd if="$T/d.vhd" bs=512 skip=1 count=2 status=none > "$P/seed-header"
dd if="$T/c.vhd" bs=512 skip=1 count=2 status=none > "$P/seed-header-diff"
ls "$O"/seed-* "$P"/seed-*
