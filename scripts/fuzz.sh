#!/usr/bin/env bash
# Fuzz with libFuzzer + AddressSanitizer for SECONDS in all (default 300), split evenly
# across the targets named (default: all of them).
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]
# Targets (one binary; VLOOP_FUZZ_TARGET selects):
#   image            any bytes as an image file, every format
#   vmdk-descriptor  VMDK descriptor text
#   nbd              bytes from an NBD client: framing, handshake, requests
#   arguments        command-line sizes, -o option lists, format names, measure, create
# Crashes land in .fuzz/TARGET/crashes/; copy each into Tests/Fuzz/regressions/ (image
# target) or Tests/Fuzz/regressions/TARGET/ (the others) — the tests replay every file
# there — and fix it.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TOTAL=${1:-${SECONDS_TOTAL:-300}}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(image vmdk-descriptor nbd arguments)
bash scripts/setup.sh
export VLOOP_FUZZ=1
swift build --scratch-path .build-fuzz --product vloop-fuzz \
  -Xswiftc -sanitize=fuzzer,address -Xswiftc -parse-as-library 2>&1 | grep -v "ld.gold: warning" | tail -3
BIN=.build-fuzz/debug/vloop-fuzz
W=.fuzz

seed_image() {
  local S=$1
  # The shared corpus, capped at 1 MiB each (headers and tables come first).
  for f in ../shared/corpus/*.xz; do
    n=$(basename "$f" .xz)
    [ -f "$S/$n" ] || xz -dc "$f" | head -c 1048576 > "$S/$n" || true
  done
  # Images made by qemu-img: every format, a few options.
  local T
  T=$(mktemp -d)
  for spec in "qcow2 -o cluster_size=4k" "qcow2 -o extended_l2=on" "qcow2 -o refcount_bits=1,cluster_size=512" \
              "qcow" "vpc -o subformat=dynamic" "vpc -o subformat=fixed" "vhdx" "vmdk" \
              "vmdk -o subformat=streamOptimized" "vdi" "raw"; do
    set -- $spec
    fmt=$1; shift
    out="$T/seed-$fmt-$RANDOM"
    qemu-img create -q -f "$fmt" "$@" "$out" 4M >/dev/null 2>&1 || continue
    qemu-io -f "$fmt" -c 'write -P 0x5a 0 300k' -c 'write -z 1M 64k' "$out" >/dev/null 2>&1 || true
    head -c 1048576 "$out" > "$S/$(basename "$out")"
  done
  rm -rf "$T"
}

seed_vmdk_descriptor() {
  local S=$1 T
  T=$(mktemp -d)
  # Descriptor files as qemu-img writes them, and the embedded one of a sparse image.
  for sub in monolithicFlat twoGbMaxExtentFlat twoGbMaxExtentSparse; do
    qemu-img create -q -f vmdk -o subformat=$sub "$T/d.vmdk" 3M >/dev/null 2>&1 && cp "$T/d.vmdk" "$S/qemu-$sub.txt"
  done
  qemu-img create -q -f vmdk "$T/s.vmdk" 3M >/dev/null 2>&1 && dd if="$T/s.vmdk" bs=512 skip=1 count=20 status=none | tr -d '\000' > "$S/qemu-embedded.txt"
  qemu-img create -q -f vmdk -b s.vmdk -F vmdk "$T/delta.vmdk" >/dev/null 2>&1 &&
    dd if="$T/delta.vmdk" bs=512 skip=1 count=20 status=none | tr -d '\000' > "$S/qemu-delta.txt"
  rm -rf "$T"
  # Extents of type ZERO need no other file, so the parser's output opens as a disk.
  printf '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\nRW 2048 ZERO\nRDONLY 100 ZERO\nNOACCESS 8 ZERO\n\nddb.virtualHWVersion = "4"\nddb.geometry.cylinders = "2"\n' > "$S/zero-extents.txt"
  printf '# Disk DescriptorFile\r\nversion=3\r\nencoding="UTF-8"\r\nCID=12345678\r\nparentCID=ffffffff\r\ncreateType="vmfsSparse"\r\nRW 4096 ZERO\r\nRW 4096 SPARSE "a b.vmdk" 7\r\n' > "$S/crlf-quoted.txt"
}

seed_nbd() {
  # Client byte streams: flags, options, then requests, as real clients send them.
  python3 - "$1" <<'EOF'
import struct, sys
d = sys.argv[1]
OPT = 0x49484156454F5054
def opt(code, data=b""): return struct.pack(">QII", OPT, code, len(data)) + data
def req(t, off=0, ln=0, flags=0, cookie=1, payload=b""): return struct.pack(">IHHQQI", 0x25609513, flags, t, cookie, off, ln) + payload
def go(name, infos=()): n = name.encode(); return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)
def meta(name, queries): n = name.encode(); q = b"".join(struct.pack(">I", len(x)) + x.encode() for x in queries); return struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries)) + q
io = (req(1, 4096, 4096, 0, 1, b"\x5a" * 4096) + req(0, 0, 8192, 0, 2) + req(3, 0, 0, 0, 3) + req(4, 65536, 65536, 0, 4)
      + req(6, 0, 131072, 0, 5) + req(6, 0, 4096, 2, 6) + req(5, 0, 65536, 0, 7) + req(1, 1048000, 576, 1, 8, b"\x11" * 576) + req(2))
seeds = {
    "go-simple": struct.pack(">I", 3) + opt(7, go("disk")) + io,
    "go-structured": struct.pack(">I", 3) + opt(8) + opt(10, meta("q", ["base:allocation", "qemu:allocation-depth"])) + opt(7, go("q", (0, 1, 2, 3))) + io + req(7, 0, 1048576, 0, 9) + req(7, 0, 65536, 1, 10),
    "export-name": struct.pack(">I", 1) + opt(1, b"ro") + req(0, 0, 512) + req(1, 0, 512, 0, 2, b"x" * 512) + req(2),
    "list-info-abort": struct.pack(">I", 3) + opt(3) + opt(6, go("disk", (3,))) + opt(9, meta("", ["base:", "qemu:"])) + opt(5) + opt(2),
}
for name, data in seeds.items():
    open(f"{d}/{name}", "wb").write(bytes([7]) + data)  # first byte: how the stream is cut into pieces
EOF
}

seed_arguments() {
  local S=$1 i=0
  # Fields, one a line: size, -o options, format, resize target, cache budget.
  while IFS= read -r line; do
    printf '%b' "$line" > "$S/args-$i"; i=$((i + 1))
  done <<'EOF'
10G\ncluster_size=4k,refcount_bits=1\nqcow2\n+1G\n32M\n
1M\ncluster_size=512,extended_l2=on,lazy_refcounts=on\nqcow2\n-512k\n1k\n
4M\nsubformat=fixed,force_size=on\nvpc\n8M\n0\n
3M\nblock_size=1M,log_size=1M,subformat=dynamic\nvhdx\n+0\n64k\n
2M\nsubformat=twoGbMaxExtentSparse,zeroed_grain=on\nvmdk\n1.5M\n1.5G\n
1M\nstatic=on,block_size=64k\nvdi\n+1M\n16E\n
512\npreallocation=full\nraw\n1024\n32M\n
0.5M\ncompat=0.10,,x\nQCOW\n-1\n2T\n
EOF
}

for t in "${TARGETS[@]}"; do
  mkdir -p "$W/$t/corpus" "$W/$t/crashes" "$W/$t/seeds"
  case $t in
    image) seed_image "$W/$t/seeds"; MAXLEN=1048576 ;;
    vmdk-descriptor) seed_vmdk_descriptor "$W/$t/seeds"; MAXLEN=65536 ;;
    nbd) seed_nbd "$W/$t/seeds"; MAXLEN=65536 ;;
    arguments) seed_arguments "$W/$t/seeds"; MAXLEN=4096 ;;
    *) echo "fuzz: unknown target $t" >&2; exit 2 ;;
  esac
  # Inputs kept in the tree: past crashers and a few valid inputs.
  if [ "$t" = image ]; then
    find Tests/Fuzz/regressions -maxdepth 1 -type f -exec cp {} "$W/$t/seeds/" \;
  else
    cp Tests/Fuzz/regressions/"$t"/* Tests/Fuzz/seeds/"$t"/* "$W/$t/seeds/" 2>/dev/null || true
  fi
  per=$((SECONDS_TOTAL / ${#TARGETS[@]}))
  (( per > 0 )) || per=1  # libFuzzer reads -max_total_time=0 as no limit
  echo "fuzz: $t for ${per}s with $(ls "$W/$t/seeds" | wc -l) seeds"
  before=$(ls "$W/$t/crashes" | wc -l)
  VLOOP_FUZZ_TARGET=$t "$BIN" "$W/$t/corpus" "$W/$t/seeds" -max_total_time="$per" -max_len=$MAXLEN -rss_limit_mb=2048 \
    -timeout=20 -artifact_prefix="$W/$t/crashes/" -print_final_stats=1 2>&1 | tail -12 || true
  echo "fuzz: $t: new crashes: $(( $(ls "$W/$t/crashes" | wc -l) - before )) ($(ls "$W/$t/crashes" | wc -l) in $W/$t/crashes)"
done
# Scratch directories of fuzzers that have exited.
for d in /dev/shm/vloop-fuzz-*; do
  [ -d "$d" ] && ! kill -0 "${d##*-}" 2>/dev/null && rm -rf "$d"
done
true
