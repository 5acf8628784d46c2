#!/usr/bin/env python3
"""vloop benchmarks against qemu-storage-daemon, qemu-nbd, qemu-img and a raw loop
device, run side by side and interleaved on the same machine; medians of RUNS.
Writes BENCHMARKS.md. Run through scripts/bench.sh (as root)."""
import json, os, platform, re, shutil, signal, statistics, subprocess, sys, tempfile, time

from benchlib import SETTLE, VLOOP, sections, settle, sh

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Images live in tmpfs: "in the page cache" for every path alike, including the raw
# loop device's direct I/O (on a disk-backed file it would measure the disk).
W = tempfile.mkdtemp(prefix="vloop-bench-", dir="/dev/shm")
SIZE_MB = 1024
RUNTIME = 6
ATTACH_FORMATS = ["qcow2", "vhdx", "vmdk"]
SPACE_FORMATS = [("qcow2", "qcow2"), ("qcow", "qcow"), ("vpc", "vhd"), ("vhdx", "vhdx"), ("vmdk", "vmdk"), ("vdi", "vdi"), ("raw", "raw")]


def fio(target, rw, bs, qd, engine="libaio", extra=""):
    settle()
    if engine == "nbd":
        tgt = f"--ioengine=nbd --uri={target}"
    else:
        tgt = f"--ioengine=libaio --direct=1 --filename={target}"
    out = sh(f"fio --name=b {tgt} --rw={rw} --bs={bs} --iodepth={qd} --runtime={RUNTIME} --time_based "
             f"--size={SIZE_MB}M --group_reporting --output-format=json {extra}")
    j = json.loads(out[out.index("{"):])["jobs"][0]
    side = j["read"] if "read" in rw else j["write"]
    return side["bw_bytes"], side["iops"]


def make_images():
    raw = f"{W}/src.raw"
    sh(f"dd if=/dev/urandom of={raw} bs=1M count={SIZE_MB} status=none")
    for fmt in ATTACH_FORMATS:
        sh(f"qemu-img convert -O {fmt} {raw} {W}/full.{fmt}")
    return raw


class Attached:
    """A block device backed by one of the FUSE paths."""
    def __init__(self, kind, image, fmt):
        self.kind, self.image, self.fmt = kind, image, fmt
        self.proc = None

    def __enter__(self):
        if self.kind == "vloop":
            self.dev = sh(f"{VLOOP} attach {self.image}")
        elif self.kind == "qsd":
            self.mnt = self.image + ".fuse"
            open(self.mnt, "w").close()
            self.proc = subprocess.Popen(["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f,filename={self.image},cache.direct=off",
                                          "--blockdev", f"driver={self.fmt},node-name=q,file=f",
                                          "--export", f"type=fuse,id=e,node-name=q,mountpoint={self.mnt},writable=on"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(100):
                if os.path.getsize(self.mnt) > 0: break
                time.sleep(0.05)
            # qemu-storage-daemon's FUSE file is page-cached: loop direct I/O on top of it
            # corrupts file systems (PLATFORM-NOTES), so the loop device uses buffered I/O.
            self.dev = sh(f"losetup -f --show {self.mnt}")
        elif self.kind == "raw":
            self.dev = sh(f"losetup -f --show --direct-io=on {self.image}")
        return self

    def __exit__(self, *a):
        if self.kind == "vloop":
            sh(f"{VLOOP} detach {self.dev}")
        else:
            sh(f"losetup -d {self.dev}")
            if self.proc:
                self.proc.send_signal(signal.SIGTERM); self.proc.wait()
                os.unlink(self.mnt)


class Served:
    def __init__(self, kind, image, fmt, port):
        self.kind, self.image, self.fmt, self.port = kind, image, fmt, port

    def __enter__(self):
        if self.kind == "vloop":
            self.proc = subprocess.Popen([VLOOP, "serve", "-p", str(self.port), "-x", "d", self.image])
        else:
            self.proc = subprocess.Popen(["qemu-nbd", "-f", self.fmt, "-p", str(self.port), "-x", "d", "-t", "-e", "8",
                                          "--cache=writeback", self.image])
        for _ in range(100):
            if subprocess.run(f"nbdinfo --size nbd://127.0.0.1:{self.port}/d", shell=True, capture_output=True).returncode == 0: break
            time.sleep(0.1)
        self.uri = f"nbd://127.0.0.1:{self.port}/d"
        return self

    def __exit__(self, *a):
        self.proc.send_signal(signal.SIGTERM); self.proc.wait()


def median(xs):
    return statistics.median(xs)


def fresh(fmt, name):
    p = f"{W}/{name}.{fmt}"
    if os.path.exists(p): os.unlink(p)
    sh(f"qemu-img create -q -f {fmt} {p} {SIZE_MB}M")
    return p


def main():
    results = {}
    def add(table, row, col, value):
        results.setdefault(table, {}).setdefault(row, {}).setdefault(col, []).append(value)

    raw = make_images()
    img = f"{W}/full.qcow2"
    port = 10900
    for run in range(RUNS):
        # Block device paths: interleaved per run.
        paths = [("raw", raw, "raw")] + [(k, f"{W}/full.{f}", f) for f in ATTACH_FORMATS for k in ["qsd", "vloop"]]
        for kind, target, fmt in paths:
            row = kind if kind == "raw" else f"{kind} {fmt}"
            with Attached(kind, target, fmt) as a:
                add("attach", row, "seq read 1M QD4 (MB/s)", fio(a.dev, "read", "1M", 4)[0] / 1e6)
                add("attach", row, "4k randread QD32 (kIOPS)", fio(a.dev, "randread", "4k", 32)[1] / 1e3)
                add("attach", row, "4k randread QD1 (kIOPS)", fio(a.dev, "randread", "4k", 1)[1] / 1e3)
        for kind, _, fmt in paths:
            row = kind if kind == "raw" else f"{kind} {fmt}"
            target = f"{W}/w.raw" if kind == "raw" else fresh(fmt, "w")
            if kind == "raw": sh(f"truncate -s 0 {target}; truncate -s {SIZE_MB}M {target}")
            with Attached(kind, target, fmt) as a:
                add("attach", row, "4k randwrite QD32, fresh image (kIOPS)", fio(a.dev, "randwrite", "4k", 32)[1] / 1e3)
                add("attach", row, "4k randwrite QD1 (kIOPS)", fio(a.dev, "randwrite", "4k", 1)[1] / 1e3)
        # NBD.
        for kind in ["qemu-nbd", "vloop"]:
            port += 1
            with Served(kind, img, "qcow2", port) as s:
                add("nbd", kind, "4k randread QD32 (kIOPS)", fio(s.uri, "randread", "4k", 32, engine="nbd")[1] / 1e3)
                settle(); t = time.time(); sh(f"nbdcopy {s.uri} null:"); add("nbd", kind, "nbdcopy to null (MB/s)", SIZE_MB * 1.048576 / (time.time() - t))
            port += 1
            w = fresh("qcow2", "nw")
            with Served(kind, w, "qcow2", port) as s:
                add("nbd", kind, "4k randwrite QD32, fresh image (kIOPS)", fio(s.uri, "randwrite", "4k", 32, engine="nbd")[1] / 1e3)
        # Convert.
        for kind in ["qemu-img", "vloop"]:
            tool = "qemu-img" if kind == "qemu-img" else VLOOP
            for label, args, out in [("qcow2 → raw (MB/s)", "-O raw", "o.raw"), ("raw → qcow2 (MB/s)", "-O qcow2", "o.qcow2"),
                                     ("raw → qcow2 -c (MB/s)", "-O qcow2 -c", "oc.qcow2")]:
                src = img if "qcow2 →" in label else raw
                o = f"{W}/{out}"
                # Twice in a row, the second timed: on a VM the first touch of memory
                # freed a moment ago (the last output) can be several times slower, for
                # either tool, as the host takes freed pages back.
                for timed in [False, True]:
                    if os.path.exists(o): os.unlink(o)
                    sh("sync"); settle(); t = time.time()
                    sh(f"{tool} convert {args} {src} {o}")
                    if timed: add("convert", kind, label, SIZE_MB * 1.048576 / (time.time() - t))
                os.unlink(o)

    # Space on 100 MiB: empty, after mkfs.ext2, after mkfs.ext4 (each on a fresh image).
    space = {}
    for qfmt, vfmt in SPACE_FORMATS:
        for tool in ["qemu-img", "vloop"]:
            row = space.setdefault((vfmt, tool), {})
            for mkfs in ["ext2", "ext4"]:
                p = f"{W}/space.{vfmt}"
                if os.path.exists(p): os.unlink(p)
                if tool == "vloop":
                    sh(f"{VLOOP} create -q -f {vfmt} {p} 100M")
                else:
                    sh(f"qemu-img create -q -f {qfmt} {p} 100M")
                row["empty"] = int(sh(f"du -B1 {p}").split()[0])
                if tool == "vloop":
                    dev = sh(f"{VLOOP} attach {p}"); sh(f"mkfs.{mkfs} -q {dev}"); sh(f"{VLOOP} detach {dev}")
                else:
                    with Attached("qsd", p, qfmt) as a: sh(f"mkfs.{mkfs} -q {a.dev}"); sh("sync")
                row[mkfs] = int(sh(f"du -B1 {p}").split()[0])
                row[mkfs + " size"] = os.path.getsize(p)
                os.unlink(p)

    write_report(results, space)
    shutil.rmtree(W, ignore_errors=True)


def write_report(results, space):
    cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
    lines = ["# Benchmarks", "",
             f"Measured by `bash scripts/bench.sh {RUNS}` on {platform.node()}: {os.cpu_count()} cores ({cpu}), "
             f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, kernel {platform.release()}, "
             f"{time.strftime('%Y-%m-%d')}. Images are {SIZE_MB} MiB (qcow2, vhdx, vmdk as qemu-img converts a file of random data into them), "
             f"files in tmpfs; each figure is the median of {RUNS} interleaved runs of {RUNTIME} s fio jobs "
             "(libaio, O_DIRECT on the device) or whole-image copies, each started once the CPUs are 90% idle "
             f"(waiting {SETTLE['waited']:.0f} s in all; {SETTLE['gave_up']} times not idle after 180 s). Ratios are vloop / peer.", ""]
    titles = {"attach": "Block device: `vloop attach` vs qemu-storage-daemon FUSE export + loop, and a raw file on a loop device",
              "nbd": "NBD: `vloop serve` vs `qemu-nbd --cache=writeback` (fio nbd engine, nbdcopy)",
              "convert": "`vloop convert` vs `qemu-img convert` (each run twice in a row, the second timed; see also \"Convert on its own\" below)"}
    for table, rows in results.items():
        cols = list(next(iter(rows.values())).keys())
        lines += [f"## {titles[table]}", ""]
        if table == "attach":
            lines += ["qemu-storage-daemon's FUSE file is page-cached, so its loop device uses buffered I/O: with "
                      "direct I/O on both layers file systems on it get corrupted on this kernel. vloop's and the raw "
                      "file's loop devices use direct I/O.", ""]
        if table == "nbd":
            lines += ["vloop answers reads that memory holds on its event loop (the page cache through "
                      "`preadv2(RWF_NOWAIT)`, or a file in tmpfs as here) and hands the rest to its I/O threads; "
                      "see Sources/NBDServer/README.md.", ""]
        lines += ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for r, vals in rows.items():
            lines.append(f"| {r} | " + " | ".join(f"{median(vals[c]):.1f}" for c in cols) + " |")
        # vloop against each peer on the same format, and against the raw loop device.
        for v in [r for r in rows if r.split()[0] == "vloop"]:
            fmt = v.split()[1] if " " in v else None
            for p in [r for r in rows if r.split()[0] != "vloop" and (r == "raw" or " " not in r or r.split()[1] == fmt)]:
                lines.append(f"| {v} / {p} | " + " | ".join(f"{median(rows[v][c]) / median(rows[p][c]):.2f}×" for c in cols) + " |")
        lines.append("")
    mib = lambda b: f"{b / 2**20:.2f}"
    lines += ["## Space on a 100 MiB image", "",
              "Allocated MiB (du) of a new image, and after mkfs.ext2 or mkfs.ext4 (each on a fresh image) through a block "
              "device: `vloop attach` for vloop's images, a qemu-storage-daemon FUSE export + loop for qemu-img's. "
              "File size (MiB) after mkfs.ext4 in the last column.", "",
              "| format | made by | empty | after mkfs.ext2 | after mkfs.ext4 | file size |", "|---|---|---|---|---|---|"]
    for (fmt, tool), t in space.items():
        lines.append(f"| {fmt} | {tool} | {mib(t['empty'])} | {mib(t['ext2'])} | {mib(t['ext4'])} | {mib(t['ext4 size'])} |")
    lines += ["", "Reproduce: `bash scripts/bench.sh 3` (root; installs fio, qemu-system-common and nbdkit if missing)."]
    # Keep the sections the other bench scripts wrote (memory, convert on its own).
    path = os.path.join(ROOT, "BENCHMARKS.md")
    old = open(path).read() if os.path.exists(path) else ""
    for section in sections(old):
        lines += ["", section]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
