#!/usr/bin/env bash
# vsnap's main job on a bundled default, without root: `vsnap demo` builds
# 4 throw-away VMs (ext4 filesystems in dynamic VHDs, a vsnap agent each,
# a simulated application whose writer hook the agent runs), backs them up
# app-consistently inside one freeze window, verifies the repository and
# restores a disk, checked by digest.
#
#   scripts/demo.sh        everything the demo made is removed at the end
#   scripts/demo.sh DIR    it is kept in DIR (which must not exist yet)
#
# VSNAP_PROFILE=dev runs it on the debug build instead (the test script
# does, on the build its tests just made, rather than spend 8 minutes of
# CI on a release build of the same code).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is needed (https://rustup.rs)"; exit 1; }
command -v mkfs.ext4 >/dev/null || [ -x /sbin/mkfs.ext4 ] || [ -x /usr/sbin/mkfs.ext4 ] ||
  { echo "mkfs.ext4 is needed (Debian: apt-get install e2fsprogs)"; exit 1; }
case "${VSNAP_PROFILE:-release}" in
  release) build=(--release); vsnap=target/release/vsnap ;;
  dev) build=(); vsnap=target/debug/vsnap ;;
  *) echo "VSNAP_PROFILE must be release or dev, not ${VSNAP_PROFILE}" >&2; exit 2 ;;
esac
echo "building vsnap (${VSNAP_PROFILE:-release}; the first build takes a few minutes, cargo shows its progress)" >&2
cargo build "${build[@]}" -p vsnap
if [ $# -ge 1 ]; then
  "$vsnap" demo "$1"
else
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
  "$vsnap" demo "$out/demo"
  echo "$out/demo was a temporary directory: scripts/demo.sh removed it; run scripts/demo.sh DIR (or vsnap demo DIR) to keep what the demo makes"
fi
