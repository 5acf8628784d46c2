#!/usr/bin/env bash
# The main job end to end on a built-in sample: a QCOW2 chain is made, written,
# converted, checked and mapped, with qemu-img as a witness.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
swift build -c release 2>&1 | tail -1
V="$PWD/.build/release/vloop"
D=$(mktemp -d /tmp/vloop-demo.XXXXXX)
trap 'rm -rf "$D"' EXIT
cd "$D"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
step "$V" create -f qcow2 base.qcow2 64M
printf 'vloop sample data\n' > note.txt
step qemu-io -f qcow2 -c 'write -P 0x61 0 1M' base.qcow2
step "$V" create -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
step qemu-io -f qcow2 -c 'write -P 0x62 512k 1M' -c 'write -z 4M 1M' top.qcow2
step "$V" info --backing-chain top.qcow2
step "$V" map --output json top.qcow2
step "$V" convert -p -O qcow2 -c top.qcow2 flat.qcow2
step "$V" check flat.qcow2
step "$V" compare top.qcow2 flat.qcow2
step qemu-img compare top.qcow2 flat.qcow2
step "$V" snapshot -c before-commit top.qcow2
step "$V" snapshot -l top.qcow2
step "$V" commit -d top.qcow2
step "$V" check base.qcow2
step qemu-img check base.qcow2
step "$V" compare base.qcow2 flat.qcow2
echo
echo "demo: every step succeeded"
