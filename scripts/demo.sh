#!/usr/bin/env bash
# vsnap's main job on a bundled default, without root: `vsnap demo` builds
# 4 throw-away VMs (ext4 filesystems in dynamic VHDs, a vsnap agent each,
# a simulated application whose writer hook the agent runs), backs them up
# app-consistently inside one freeze window, verifies the repository and
# restores a disk, checked by digest. Everything it made is removed after.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is needed (https://rustup.rs)"; exit 1; }
command -v mkfs.ext4 >/dev/null || [ -x /sbin/mkfs.ext4 ] || [ -x /usr/sbin/mkfs.ext4 ] ||
  { echo "mkfs.ext4 is needed (Debian: apt-get install e2fsprogs)"; exit 1; }
cargo build --release --quiet -p vsnap
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
target/release/vsnap demo "$out/demo"
echo "(scripts/demo.sh removes what the demo made; run \`vsnap demo DIR\` to keep it)"
