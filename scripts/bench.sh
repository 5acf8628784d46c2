#!/usr/bin/env bash
# Benchmarks vloop against its peers on this machine, interleaved, medians of runs,
# and writes BENCHMARKS.md.   bash scripts/bench.sh [RUNS]   (default 3; root needed)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
need=()
for pkg in fio qemu-system-common nbdkit; do dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg"); done
if [ ${#need[@]} -gt 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; fi
swift build -c release --static-swift-stdlib 2>&1 | tail -1
exec python3 scripts/bench.py "${1:-3}"
