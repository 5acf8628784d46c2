#!/usr/bin/env bash
# Set up, build, and run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
swift build
swift test --parallel --num-workers 2 2>&1 | tee /tmp/vloop-test.log
