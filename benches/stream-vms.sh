#!/usr/bin/env bash
# Does a coordinated backup stream every VM's disks at once? Times the
# streaming phase (the report's `streamed.seconds`) of `vsnap backup
# --inventory` for 4 VMs of one disk each against 1 VM of the same 4 disks,
# alternating round by round, each round into a fresh repository. Agents
# are "none" and the provider "copy", so the phase timed is the engine's
# alone. Prints medians and the ratio (target: at most 1.10).
#
#   benches/stream-vms.sh [WORKDIR] [VSNAP]    (default /tmp/vsnap-vms, target/release/vsnap)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/vsnap-vms}
vsnap=${2:-$PWD/target/release/vsnap}
rounds=${ROUNDS:-7}
[ -n "${2:-}" ] || cargo build --release --quiet -p vsnap -p vsnap-benches
mkdata=$PWD/target/release/mkdata
mkdir -p "$work"
cd "$work"
export VSNAP_CACHE_DIR="$work/cache"
for i in 1 2 3 4; do
  [ -f "d$i.vhd" ] && continue
  "$mkdata" "d$i.raw" 256 "$((40 + i))"
  qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on "d$i.raw" "d$i.vhd"
  rm -f "d$i.raw"
done
{
  for i in 1 2 3 4; do
    printf '[[vm]]\nname = "vm%s"\ndisks = ["d%s.vhd"]\nagent = "none"\n\n' "$i" "$i"
  done
} > four.toml
printf '[[vm]]\nname = "one"\ndisks = ["d1.vhd", "d2.vhd", "d3.vhd", "d4.vhd"]\nagent = "none"\n' > one.toml
stream() { # INVENTORY -> seconds of the streaming phase
  rm -rf repo && "$vsnap" repo init repo >/dev/null && sync
  "$vsnap" backup -q --json --provider copy --inventory "$1" --repo repo |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["streamed"]["seconds"])'
}
four=() one=()
stream four.toml >/dev/null; stream one.toml >/dev/null   # warm-up
for r in $(seq 1 "$rounds"); do
  if [ $((r % 2)) -eq 0 ]; then four+=("$(stream four.toml)"); one+=("$(stream one.toml)")
  else one+=("$(stream one.toml)"); four+=("$(stream four.toml)"); fi
done
python3 - "${four[*]}" "${one[*]}" <<'PY'
import statistics, sys
four = [float(x) for x in sys.argv[1].split()]
one = [float(x) for x in sys.argv[2].split()]
a, b = statistics.median(four), statistics.median(one)
print(f"4 VMs x 1 disk: median {a*1000:.0f} ms (range {min(four)*1000:.0f}-{max(four)*1000:.0f})")
print(f"1 VM x 4 disks: median {b*1000:.0f} ms (range {min(one)*1000:.0f}-{max(one)*1000:.0f})")
print(f"ratio {a/b:.2f} (target <= 1.10)")
PY
