#!/usr/bin/env bash
# Runs every check CI runs: installs what it needs (idempotently), then
# rustfmt, clippy (warnings denied), the fuzz crate's build, and all tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# CI builds each crate once from a fresh clone: incremental state and full
# debug info would only fill its disk (one CI run stopped for want of
# space). Line tables keep a panic's backtrace readable.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
export CARGO_PROFILE_DEV_DEBUG="${CARGO_PROFILE_DEV_DEBUG:-line-tables-only}"

need_apt=()
command -v qemu-img >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v qemu-io >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
command -v b3sum >/dev/null 2>&1 || need_apt+=(b3sum)
# The hostile-repository suite reads each vsnap child's peak RSS from GNU time.
[ -x /usr/bin/time ] || need_apt+=(time)
# The agent's tests freeze ext4 filesystems they make on loop devices.
command -v mkfs.ext4 >/dev/null 2>&1 || need_apt+=(e2fsprogs)
command -v losetup >/dev/null 2>&1 || need_apt+=(mount)
command -v fsfreeze >/dev/null 2>&1 || need_apt+=(util-linux)
# Coordinated backups: guests' disks on an XFS scratch filesystem with
# reflink; one test quiesces through the stock QEMU guest agent.
command -v mkfs.xfs >/dev/null 2>&1 || need_apt+=(xfsprogs)
command -v qemu-ga >/dev/null 2>&1 || need_apt+=(qemu-guest-agent)
# forget's policies are checked against restic's own.
command -v restic >/dev/null 2>&1 || need_apt+=(restic)
command -v debugfs >/dev/null 2>&1 || need_apt+=(e2fsprogs)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${need_apt[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# The object-storage tests run against a real S3 server on loopback that
# checks request signatures. 0.14.1 is the newest that builds on this
# machine's Rust (1.95).
if ! command -v s3s-fs >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/s3s-fs" ]; then
  echo "installing: s3s-fs (cargo install)"
  cargo install --quiet --locked s3s-fs@0.14.1 --features binary
fi
# The bucket cases run against a second S3 implementation too: moto's
# server (Python, from PyPI, in memory). Pinned: the release they were
# written against (tests/src/s3.rs, MOTO).
if ! python3 -c "import moto.server" >/dev/null 2>&1; then
  echo "installing: moto[server] (pip)"
  python3 -m pip install --quiet --disable-pip-version-check "moto[server]==5.2.1"
fi
# The encryption test's independent reader (tests/independent/
# vsnap_reader.py) reads vsnap's formats with these, not vsnap's code;
# cryptography's Argon2id needs 44 or newer.
if ! python3 -c "import blake3; from cryptography.hazmat.primitives.kdf.argon2 import Argon2id" >/dev/null 2>&1; then
  echo "installing: blake3, cryptography (pip)"
  python3 -m pip install --quiet --disable-pip-version-check "blake3==1.0.11" "cryptography>=44"
fi
for c in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
done

echo "== rustfmt";  cargo fmt --all -- --check
echo "== clippy";   cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== no two modules import each other, within any crate"
python3 scripts/module-cycles.py
echo "== fuzz crate builds"
cargo check --quiet --manifest-path fuzz/Cargo.toml --locked
echo "== the static guest agent, and the real VM the tests boot"
# vm-assets fetches QEMU, a Debian kernel and busybox from Debian once
# (target/vm); the initramfs is rebuilt each run around the current agent.
scripts/agent-static.sh
scripts/vm-assets.sh
scripts/vm-initramfs.sh
echo "== tests"
# A test that cannot run here says why and records it in VSNAP_SKIP_LOG;
# cargo reports it "ok", so the summary below counts it as skipped. With
# CI set, a test that would skip for lack of privileges fails instead.
logs=$(mktemp -d); trap 'rm -rf "$logs"' EXIT
export VSNAP_SKIP_LOG="$logs/skipped"
: >"$VSNAP_SKIP_LOG"
# --no-fail-fast: one failing binary must not hide the others; the
# summary names every binary that failed or gave no result (a crash), and
# the demo and the tour run whatever the tests said.
status=0
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$logs/tests" || status=$?
echo "== the README's main command, and the fixture tour"
# On the debug build the tests just made: the same code, where a release
# build would add 8 minutes to CI.
steps=()
VSNAP_PROFILE=dev scripts/demo.sh >"$logs/demo" 2>&1 || { steps+=("scripts/demo.sh failed (its last lines are above)"); tail -20 "$logs/demo"; status=1; }
VSNAP_PROFILE=dev scripts/tour.sh >"$logs/tour" 2>&1 || { steps+=("scripts/tour.sh failed (its last lines are above)"); tail -20 "$logs/tour"; status=1; }
python3 - "$logs/tests" "$VSNAP_SKIP_LOG" "${steps[@]}" <<'PY'
import re, sys
text = open(sys.argv[1], errors="replace").read()
passed = failed = ignored = 0
binaries, current, results, bad = 0, None, {}, []
for line in text.splitlines():
    m = re.match(r"\s*(Running|Doc-tests) (.+)", line)
    if m:
        binaries += 1
        current = m[2].split(" (")[0]
        results[current] = None
        continue
    m = re.search(r"test result: (\w+)\. (\d+) passed; (\d+) failed; (\d+) ignored", line)
    if m and current is not None:
        results[current] = m[1]
        passed += int(m[2]); failed += int(m[3]); ignored += int(m[4])
for name, outcome in results.items():
    if outcome is None:
        bad.append(f"{name}: no result (it crashed or was killed)")
    elif outcome != "ok":
        bad.append(f"{name}: {outcome}")
for l in re.findall(r"^test (\S+) \.\.\. FAILED$", text, re.M):
    print(f"failed: {l}")
skips = [l for l in open(sys.argv[2]).read().splitlines() if l.strip()]
for l in skips:
    print(f"skipped: {l}")
for b in bad:
    print(f"binary: {b}")
for s in sys.argv[3:]:
    print(s)
print(f"tests: {passed - len(skips)} passed, {failed} failed, {len(skips) + ignored} skipped, "
      f"in {binaries} binaries ({len(bad)} not ok)")
PY
exit "$status"
