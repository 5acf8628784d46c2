#!/usr/bin/env bash
# `vloop convert` against `qemu-img convert` on their own, ROUNDS rounds (default 5);
# writes the "Convert on its own" section of BENCHMARKS.md.
#   bash scripts/bench-convert.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
swift build -c release --static-swift-stdlib 2>&1 | tail -1
exec python3 scripts/bench_convert.py "${1:-5}"
