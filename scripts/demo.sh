#!/usr/bin/env bash
# The main job end to end on a built-in sample: a QCOW2 overlay over a base image is
# attached as a block device, gets a file system, is mounted and written, detached,
# checked (by vloop and qemu-img), re-attached read-only and verified; then the chain
# is inspected, converted, compared and committed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
swift build -c release --static-swift-stdlib 2>&1 | tail -1
V="$PWD/.build/release/vloop"
D=$(mktemp -d /tmp/vloop-demo.XXXXXX)
cleanup() {
  mountpoint -q "$D/mnt" 2>/dev/null && umount "$D/mnt"
  "$V" detach --force "$D/top.qcow2" >/dev/null 2>&1 || true
  rm -rf "$D"
}
trap cleanup EXIT
cd "$D"
mkdir mnt
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step "$V" create -f qcow2 base.qcow2 256M
step qemu-io -f qcow2 -c 'write -P 0x61 0 1M' base.qcow2
step "$V" create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
step "$V" info --backing-chain top.qcow2

printf '\n\033[1m$ vloop attach top.qcow2\033[0m\n'
DEV=$("$V" attach top.qcow2)
echo "$DEV"
step "$V" list
step mkfs.ext4 -q "$DEV"
step mount "$DEV" mnt
step sh -c "head -c 32M /dev/urandom > mnt/random.bin && cp /etc/os-release mnt/ && sync"
SUM=$(sha256sum mnt/random.bin | cut -d' ' -f1)
echo "sha256 of random.bin: $SUM"
step umount mnt
step "$V" detach "$DEV"
step "$V" check top.qcow2
step qemu-img check top.qcow2

printf '\n\033[1m$ vloop attach --read-only top.qcow2\033[0m\n'
DEV=$("$V" attach --read-only top.qcow2)
echo "$DEV"
step mount -o ro "$DEV" mnt
AGAIN=$(sha256sum mnt/random.bin | cut -d' ' -f1)
echo "sha256 after re-attach: $AGAIN"
[ "$SUM" = "$AGAIN" ] || { echo "demo: contents changed!"; exit 1; }
step umount mnt
step "$V" detach "$DEV"

step "$V" map top.qcow2
step "$V" convert -p -O qcow2 -c top.qcow2 flat.qcow2
step "$V" compare top.qcow2 flat.qcow2
step qemu-img compare top.qcow2 flat.qcow2
step "$V" commit top.qcow2
step "$V" check base.qcow2
step "$V" compare base.qcow2 flat.qcow2
step ls -ls base.qcow2 top.qcow2 flat.qcow2
echo
echo "demo: every step succeeded; the file system written through /dev/loop read back identical"
