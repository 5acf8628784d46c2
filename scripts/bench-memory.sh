#!/usr/bin/env bash
# Resident memory of `vloop serve` and qemu-nbd on fully mapped 64 TiB images (qcow2,
# vhdx, vmdk, vdi) against 1 GiB ones; writes the memory section of BENCHMARKS.md.
#   bash scripts/bench-memory.sh [SECONDS]   (default 20; root needed)
# The images live on an XFS file system in a sparse file (VLOOP_MEMBENCH_FILE, default
# /var/tmp/vloop-membench.xfs, ~25 GiB used) mounted at VLOOP_MEMBENCH_DIR (default
# /mnt/vloop-membench); they are built once and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
need=()
for pkg in fio xfsprogs; do dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg"); done
if [ ${#need[@]} -gt 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; fi
python3 -c "import numpy" 2>/dev/null || pip install -q numpy
swift build -c release --static-swift-stdlib 2>&1 | tail -1
exec python3 scripts/bench_memory.py "${1:-20}"
