#!/usr/bin/env bash
# Fuzz the image parsers with libFuzzer + AddressSanitizer for SECONDS (default 300).
#   bash scripts/fuzz.sh [SECONDS]
# Seeds: the corpus in ../shared/corpus and small images of every format made here.
# Crashes land in .fuzz/crashes/; copy each into Tests/Fuzz/regressions/ (the tests
# replay every file there) and fix it.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TOTAL=${1:-${SECONDS_TOTAL:-300}}
bash scripts/setup.sh
export VLOOP_FUZZ=1
swift build --scratch-path .build-fuzz --product vloop-fuzz \
  -Xswiftc -sanitize=fuzzer,address -Xswiftc -parse-as-library 2>&1 | grep -v "ld.gold: warning" | tail -3
BIN=.build-fuzz/debug/vloop-fuzz
W=.fuzz
mkdir -p "$W/corpus" "$W/crashes" "$W/seeds"
# Seeds from the shared corpus, capped at 1 MiB each (headers and tables come first).
for f in ../shared/corpus/*.xz; do
  n=$(basename "$f" .xz)
  [ -f "$W/seeds/$n" ] || xz -dc "$f" | head -c 1048576 > "$W/seeds/$n" || true
done
# Seeds made by qemu-img: every format, a few options.
T=$(mktemp -d)
for spec in "qcow2 -o cluster_size=4k" "qcow2 -o extended_l2=on" "qcow2 -o refcount_bits=1,cluster_size=512" \
            "qcow" "vpc -o subformat=dynamic" "vpc -o subformat=fixed" "vhdx" "vmdk" \
            "vmdk -o subformat=streamOptimized" "vdi" "raw"; do
  set -- $spec
  fmt=$1; shift
  out="$T/seed-$fmt-$RANDOM"
  qemu-img create -q -f "$fmt" "$@" "$out" 4M >/dev/null 2>&1 || continue
  qemu-io -f "$fmt" -c 'write -P 0x5a 0 300k' -c 'write -z 1M 64k' "$out" >/dev/null 2>&1 || true
  head -c 1048576 "$out" > "$W/seeds/$(basename "$out")"
done
rm -rf "$T"
echo "fuzz: running for ${SECONDS_TOTAL}s with $(ls "$W/seeds" | wc -l) seeds"
"$BIN" "$W/corpus" "$W/seeds" -max_total_time="$SECONDS_TOTAL" -max_len=1048576 -rss_limit_mb=2048 \
  -timeout=20 -artifact_prefix="$W/crashes/" -print_final_stats=1 2>&1 | tail -20
echo "fuzz: crashes found: $(ls "$W/crashes" | wc -l) (in $W/crashes)"
