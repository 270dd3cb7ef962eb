#!/usr/bin/env bash
# Writes the named seed inputs (seed-*) into fuzz/corpus/: small valid images
# from qemu-img and vsnap, and the structures the parsers see. Run it before
# fuzzing from scratch; the committed corpus already holds them.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet -p vsnap-formats --examples
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
# VHDX: the smallest layouts vsnap and qemu write (4 MiB of structures
# before the first block), a differencing layer, and the dirty-log fixture;
# the pure parsers get a header, a region table and a log entry.
X=fuzz/corpus/vhdx_open XP=fuzz/corpus/vhdx_parse
XW="$PWD/target/debug/examples/vhdx_write"
mkdir -p "$X" "$XP"
"$XW" "$T/d.vhdx" --size 1048576 --block-size 1048576 4096:512:ab 1048064:512:cd
cp "$T/d.vhdx" "$X/seed-vhdx-dynamic"
"$XW" "$T/c.avhdx" --parent "$T/d.vhdx" 512:1024:ee
cp "$T/c.avhdx" "$X/seed-vhdx-differencing"
qemu-img create -q -f vhdx -o subformat=fixed,block_size=1M "$T/f.vhdx" 1M
cp "$T/f.vhdx" "$X/seed-vhdx-fixed-qemu"
cp fixtures/vhdx/dirty-log.vhdx "$X/seed-vhdx-dirty-log"
dd if="$T/d.vhdx" bs=4096 skip=16 count=1 status=none > "$XP/seed-header"
dd if="$T/d.vhdx" bs=65536 skip=3 count=1 status=none > "$XP/seed-region-table"
dd if=fixtures/vhdx/dirty-log.vhdx bs=4096 skip=256 count=2 status=none > "$XP/seed-log-entry"
# The repository's own files: a manifest of two disks (a VHD and a VHDX),
# an index blob and a chunk blob, as a backup writes them.
R=fuzz/corpus/repo_parse
mkdir -p "$R"
"$V" repo init --chunk-size 64K "$T/repo" >/dev/null
"$V" backup -q --repo "$T/repo" --name vm "$T/d.vhd" "$T/d.vhdx" >/dev/null
cp "$T"/repo/snapshots/*.json "$R/seed-manifest"
cp "$(ls "$T"/repo/indexes/* | head -n 1)" "$R/seed-index"
cp "$(find "$T/repo/chunks" -type f | sort | head -n 1)" "$R/seed-chunk"
ls "$O"/seed-* "$P"/seed-* "$X"/seed-* "$XP"/seed-* "$R"/seed-*
