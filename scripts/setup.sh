#!/usr/bin/env bash
# Install what vloop needs on a fresh Debian machine (run as root). Idempotent.
set -euo pipefail
need=()
for pkg in libfuse3-dev fuse3 zlib1g-dev libzstd-dev qemu-utils libnbd-bin fio e2fsprogs xz-utils fdisk util-linux udev libvhdi-utils openssl nbdkit; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
