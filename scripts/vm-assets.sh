#!/usr/bin/env bash
# What the real-VM tests boot, fetched from Debian and unpacked under
# target/vm (idempotent; a second run does nothing):
#   qemu/    qemu-system-x86 7.2 and its firmware, unpacked with dpkg -x: the
#            image's qemu-utils backport Breaks qemu-system-common, so apt
#            refuses to install it; its shared libraries install normally
#   kernel/  a stock Debian kernel and its modules (virtio, ext4 are modules)
#   busybox  busybox-static, the guest's userland
# scripts/vm-initramfs.sh then builds the guest from these.
set -euo pipefail
cd "$(dirname "$0")/.."
vm=$PWD/target/vm
mkdir -p "$vm/debs"
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
libs=(libslirp0 libfdt1 libpixman-1-0 liburing2 libaio1 libcapstone4 libnuma1 libpmem1
  libseccomp2 libvdeplug2 libibverbs1 librdmacm1 libjpeg62-turbo libpng16-16 libsasl2-2
  libfuse3-3 libbpf1 libgnutls30 libglib2.0-0 cpio)
missing=()
for l in "${libs[@]}"; do dpkg -s "$l" >/dev/null 2>&1 || missing+=("$l"); done
if [ ${#missing[@]} -gt 0 ]; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
kernel_pkg=$(apt-cache depends linux-image-amd64 | sed -n 's/.*Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -1)
want=(qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu busybox-static "$kernel_pkg")
unpack() { # PACKAGE DIR
  [ -e "$2/.done-$1" ] && return
  (cd "$vm/debs" && ls "$1"_*.deb >/dev/null 2>&1 || apt-get download "$1" >/dev/null 2>&1 ||
    { $sudo apt-get update -qq && apt-get download "$1" >/dev/null; })
  mkdir -p "$2"
  dpkg -x "$(ls "$vm/debs/$1"_*.deb | head -1)" "$2"
  touch "$2/.done-$1"
}
for p in qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu; do
  unpack "$p" "$vm/qemu"
done
unpack busybox-static "$vm/busybox-pkg"
unpack "$kernel_pkg" "$vm/kernel"
ln -sf "$vm/busybox-pkg/bin/busybox" "$vm/busybox"
echo "$vm: $(ls "$vm/kernel/boot" | grep vmlinuz), qemu $("$vm/qemu/usr/bin/qemu-system-x86_64" --version | head -1)"
