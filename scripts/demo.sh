#!/usr/bin/env bash
# vsnap's main job on the bundled fixtures: describe every image, then map a
# dynamic disk and a three-deep differencing chain, and print their
# virtual-disk digests (b3sum of their raw conversion); copy two of them
# and check the copies with the stock b3sum.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is needed (https://rustup.rs)"; exit 1; }
cargo build --release --quiet -p vsnap
vsnap=target/release/vsnap
set -x
$vsnap info fixtures/fixed-qemu.vhd fixtures/dynamic-16k.vhd fixtures/chain/child3.vhd
$vsnap map fixtures/dynamic-16k.vhd
$vsnap map fixtures/chain/child3.vhd
$vsnap hash fixtures/fixed-qemu.vhd fixtures/dynamic-16k.vhd fixtures/chain/child3.vhd
out=$(mktemp -d)
$vsnap copy -q --verify --to "$out" fixtures/dynamic-16k.vhd fixtures/chain/child3.vhd
(cd "$out" && b3sum -c B3SUMS)
rm -rf "$out"
