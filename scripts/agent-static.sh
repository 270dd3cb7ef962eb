#!/usr/bin/env bash
# The guest agent as one static, stripped binary, for guests with a
# minimal userland (an initramfs, busybox): vsnap-agent links only the
# agent and the protocol, not the engine or the coordinator, and here also
# glibc, statically (crt-static on the host's gnu target).
#
#   scripts/agent-static.sh        builds target/static/vsnap-agent, prints its size
set -euo pipefail
cd "$(dirname "$0")/.."
triple=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --quiet \
  -p vsnap-agent --target "$triple" \
  --config profile.release.debug=false --config profile.release.strip=true
mkdir -p target/static
cp "target/$triple/release/vsnap-agent" target/static/vsnap-agent
# ldd says "statically linked" (or "not a dynamic executable") for a
# binary that needs no shared library; anything else names them.
linked=$(ldd target/static/vsnap-agent 2>&1 || true)
case "$linked" in
  *"statically linked"*|*"not a dynamic executable"*) ;;
  *) echo "target/static/vsnap-agent is not static: $linked" >&2; exit 1 ;;
esac
env -i target/static/vsnap-agent --version >/dev/null
echo "target/static/vsnap-agent: $(stat -c %s target/static/vsnap-agent) bytes, static, stripped"
