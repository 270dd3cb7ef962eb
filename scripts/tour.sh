#!/usr/bin/env bash
# A tour of the engine on the bundled fixtures: describe every image, then
# map a dynamic disk and a three-deep differencing chain, and print their
# virtual-disk digests (b3sum of their raw conversion); copy two of them
# and check the copies with the stock b3sum; back them up twice into a
# repository (the second stores nothing new), verify it, and restore.
#
# VSNAP_PROFILE=dev runs it on the debug build instead, as the tests do.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is needed (https://rustup.rs)"; exit 1; }
case "${VSNAP_PROFILE:-release}" in
  release) build=(--release); vsnap=target/release/vsnap ;;
  dev) build=(); vsnap=target/debug/vsnap ;;
  *) echo "VSNAP_PROFILE must be release or dev, not ${VSNAP_PROFILE}" >&2; exit 2 ;;
esac
cargo build "${build[@]}" --quiet -p vsnap
set -x
$vsnap info fixtures/fixed-qemu.vhd fixtures/dynamic-16k.vhd fixtures/chain/child3.vhd
$vsnap map fixtures/dynamic-16k.vhd
$vsnap map fixtures/chain/child3.vhd
$vsnap hash fixtures/fixed-qemu.vhd fixtures/dynamic-16k.vhd fixtures/chain/child3.vhd
out=$(mktemp -d)
$vsnap copy -q --verify --to "$out" fixtures/dynamic-16k.vhd fixtures/chain/child3.vhd
(cd "$out" && b3sum -c B3SUMS)
$vsnap repo init "$out/repo"
export VSNAP_REPO="$out/repo"
$vsnap backup -q --name demo fixtures/fixed-qemu.vhd fixtures/dynamic-16k.vhd fixtures/chain/child3.vhd
$vsnap backup -q --name demo fixtures/fixed-qemu.vhd fixtures/dynamic-16k.vhd fixtures/chain/child3.vhd
$vsnap snapshots
$vsnap verify -q
snap=$($vsnap snapshots --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')
mkdir "$out/restored"
$vsnap restore -q "$snap" --to "$out/restored"
cmp fixtures/fixed-qemu.vhd "$out/restored/fixed-qemu.vhd"
qemu-img compare -f vpc -F vpc fixtures/dynamic-16k.vhd "$out/restored/dynamic-16k.vhd"
rm -rf "$out"
