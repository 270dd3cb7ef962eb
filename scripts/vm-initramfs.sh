#!/usr/bin/env bash
# The real-VM tests' guest, as an initramfs: busybox, the virtio and ext4
# modules of the kernel scripts/vm-assets.sh unpacked, the static
# vsnap-agent (scripts/agent-static.sh), and the stock qemu-ga with the
# libraries it links. Its /init loads the modules, names the virtio-serial
# ports under /dev/virtio-ports, mounts the ext4 on /dev/vda at /data,
# starts a writer appending a record every 10 ms, the vsnap agent on its
# port and qemu-ga on its own, and says "vsnap-guest: ready" on the console.
#
#   scripts/vm-initramfs.sh      builds target/vm/initramfs.gz
set -euo pipefail
cd "$(dirname "$0")/.."
vm=$PWD/target/vm
[ -x "$vm/busybox" ] || scripts/vm-assets.sh >/dev/null
[ -x target/static/vsnap-agent ] || scripts/agent-static.sh >/dev/null
root=$(mktemp -d); trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,run,data,lib/modules,lib64,tmp,var/run}
cp "$vm/busybox" "$root/bin/busybox"
cp target/static/vsnap-agent "$root/bin/vsnap-agent"
modules=$(ls -d "$vm"/kernel/lib/modules/*)
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
  virtio_blk virtio_console crc16 mbcache jbd2 crc32c_generic crc32c-intel ext4; do
  cp "$(find "$modules" -name "$m.ko" | head -1)" "$root/lib/modules/"
done
qga=$(command -v qemu-ga || echo /usr/sbin/qemu-ga)
cp "$qga" "$root/bin/qemu-ga"
ldd "$qga" | awk '/=>/ {print $3} /ld-linux/ {print $1}' | while read -r lib; do
  [ -f "$lib" ] || continue
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cat >"$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs run /run
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
  virtio_blk virtio_console crc16 mbcache jbd2 crc32c_generic crc32c-intel ext4; do
  insmod /lib/modules/$m.ko 2>/dev/null
done
sleep 1
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
  ln -sf /dev/$(basename $p) /dev/virtio-ports/$(cat $p/name)
done
mount -t ext4 /dev/vda /data || echo "vsnap-guest: cannot mount /dev/vda"
# The application: a record every 10 ms, each flushed.
( i=0; while true; do i=$((i+1)); echo "record $i" >> /data/records.log; sync /data/records.log 2>/dev/null; sleep 0.01; done ) &
vsnap-agent --listen serial:/dev/virtio-ports/org.vsnap.agent.0 --freeze /data \
  --marker /run/vsnap.frozen --hold-limit 60s 2>/run/agent.log &
qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run -f /run/qga.pid \
  -F/etc/qemu/fsfreeze-hook &
echo "vsnap-guest: ready"
while true; do sleep 3600; done
INIT
chmod +x "$root/init"
# qemu-ga's freeze hook: says on the console when qemu-ga freezes and
# thaws, so a test on the host sees it.
mkdir -p "$root/etc/qemu"
printf '#!/bin/sh\necho "vsnap-guest: qga $1" > /dev/console\nexit 0\n' >"$root/etc/qemu/fsfreeze-hook"
chmod +x "$root/etc/qemu/fsfreeze-hook"
(cd "$root" && find . | cpio -H newc -o --quiet | gzip -1) >"$vm/initramfs.gz"
echo "$vm/initramfs.gz: $(stat -c %s "$vm/initramfs.gz") bytes"
