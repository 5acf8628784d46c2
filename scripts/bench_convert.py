#!/usr/bin/env python3
"""`vloop convert` against `qemu-img convert`, on their own: nothing else runs in
between, the tools take turns (which goes first alternates by round), each conversion
runs twice in a row with the second timed, and every sample is kept. Writes the
"Convert on its own" section of BENCHMARKS.md. Run through scripts/bench-convert.sh.

Why apart from scripts/bench.sh: in that run the convert figures swung (0.34x to 2.31x
across three runs on one VM, either tool the slow one), while this loop alone gives the
same ratio every time; the samples below show how far the runs spread."""
import os, shutil, statistics, sys, tempfile, time

from benchlib import SETTLE, VLOOP, machine, settle, sh, write_section

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
SIZE_MB = 1024
# (label, options both tools take, source: the random raw file or its qcow2 copy)
CASES = [("qcow2 → raw", "-O raw", "qcow2"), ("raw → qcow2", "-O qcow2", "raw"),
         ("raw → vhdx", "-O vhdx", "raw"), ("raw → qcow2 -c", "-O qcow2 -c", "raw")]
TOOLS = {"qemu-img": "qemu-img", "vloop": VLOOP}


def main():
    w = tempfile.mkdtemp(prefix="vloop-convert-", dir="/dev/shm")
    try:
        src = {"raw": f"{w}/src.raw", "qcow2": f"{w}/src.qcow2"}
        sh(f"dd if=/dev/urandom of={src['raw']} bs=1M count={SIZE_MB} status=none")
        sh(f"qemu-img convert -O qcow2 {src['raw']} {src['qcow2']}")
        samples = {(label, tool): [] for label, _, _ in CASES for tool in TOOLS}
        for n in range(ROUNDS):
            order = list(TOOLS) if n % 2 == 0 else list(reversed(TOOLS))
            for label, opts, source in CASES:
                for tool in order:
                    out = f"{w}/out"
                    # Twice in a row, the second timed: on a VM the first touch of memory
                    # freed a moment ago (the last output) can be several times slower.
                    for timed in [False, True]:
                        if os.path.exists(out): os.unlink(out)
                        sh("sync"); settle(); t = time.time()
                        sh(f"{TOOLS[tool]} convert {opts} {src[source]} {out}")
                        if timed: samples[(label, tool)].append(SIZE_MB * 1.048576 / (time.time() - t))
                    os.unlink(out)
                print(label, {t: [round(x) for x in samples[(label, t)]] for t in TOOLS}, flush=True)
        report(samples)
    finally:
        shutil.rmtree(w, ignore_errors=True)


def report(samples):
    med = lambda label, tool: statistics.median(samples[(label, tool)])
    lines = ["## Convert on its own", "",
             f"`vloop convert` vs `qemu-img convert` of a {SIZE_MB} MiB file of random data (and of its qcow2 copy, "
             f"made by qemu-img), files in tmpfs, with nothing else running: {ROUNDS} rounds, the tools taking turns "
             f"(which goes first alternates), each conversion run twice in a row and the second timed, each started "
             f"once the CPUs are 90% idle (waiting {SETTLE['waited']:.0f} s in all; {SETTLE['gave_up']} times not idle "
             f"after 180 s). {machine()}, {time.strftime('%Y-%m-%d')}. MB/s, medians; every sample in the last columns.", "",
             "| conversion | qemu-img | vloop | vloop / qemu-img | qemu-img samples | vloop samples |", "|---|---|---|---|---|---|"]
    for label, _, _ in CASES:
        q, v = med(label, "qemu-img"), med(label, "vloop")
        lines.append(f"| {label} | {q:.0f} | {v:.0f} | {v / q:.2f}× | "
                     + " | ".join(", ".join(f"{x:.0f}" for x in samples[(label, t)]) for t in TOOLS) + " |")
    lines += ["", f"Reproduce: `bash scripts/bench-convert.sh {ROUNDS}` (installs what it needs, as scripts/setup.sh does)."]
    write_section("convert", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
