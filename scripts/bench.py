#!/usr/bin/env python3
"""vloop benchmarks against qemu-storage-daemon, qemu-nbd, qemu-img and a raw loop
device, run side by side and interleaved on the same machine; medians of RUNS.
Writes BENCHMARKS.md. Run through scripts/bench.sh (as root)."""
import json, os, platform, re, shutil, signal, statistics, subprocess, sys, tempfile, time

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLOOP = os.path.join(ROOT, ".build/release/vloop")
# Images live in tmpfs: "in the page cache" for every path alike, including the raw
# loop device's direct I/O (on a disk-backed file it would measure the disk).
W = tempfile.mkdtemp(prefix="vloop-bench-", dir="/dev/shm")
SIZE_MB = 1024
RUNTIME = 6


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, text=True, capture_output=True, **kw).stdout.strip()


def fio(target, rw, bs, qd, engine="libaio", extra=""):
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
    for fmt in ["qcow2"]:
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
        for kind, target, fmt in [("raw", raw, "raw"), ("qsd", img, "qcow2"), ("vloop", img, "qcow2")]:
            with Attached(kind, target, fmt) as a:
                add("attach", kind, "seq read 1M QD4 (MB/s)", fio(a.dev, "read", "1M", 4)[0] / 1e6)
                add("attach", kind, "4k randread QD32 (kIOPS)", fio(a.dev, "randread", "4k", 32)[1] / 1e3)
                add("attach", kind, "4k randread QD1 (kIOPS)", fio(a.dev, "randread", "4k", 1)[1] / 1e3)
        for kind, fmt in [("raw", "raw"), ("qsd", "qcow2"), ("vloop", "qcow2")]:
            target = f"{W}/w.raw" if kind == "raw" else fresh("qcow2", "w")
            if kind == "raw": sh(f"truncate -s 0 {target}; truncate -s {SIZE_MB}M {target}")
            with Attached(kind, target, fmt) as a:
                add("attach", kind, "4k randwrite QD32, fresh image (kIOPS)", fio(a.dev, "randwrite", "4k", 32)[1] / 1e3)
        # NBD.
        for kind in ["qemu-nbd", "vloop"]:
            port += 1
            with Served(kind, img, "qcow2", port) as s:
                add("nbd", kind, "4k randread QD32 (kIOPS)", fio(s.uri, "randread", "4k", 32, engine="nbd")[1] / 1e3)
                t = time.time(); sh(f"nbdcopy {s.uri} null:"); add("nbd", kind, "nbdcopy to null (MB/s)", SIZE_MB * 1.048576 / (time.time() - t))
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
                if os.path.exists(o): os.unlink(o)
                sh("sync"); t = time.time()
                sh(f"{tool} convert {args} {src} {o}")
                add("convert", kind, label, SIZE_MB * 1.048576 / (time.time() - t))
                os.unlink(o)

    # Space after mkfs on 100 MiB.
    space = {}
    for fmt in ["qcow2", "qcow", "vpc", "raw"]:
        for tool in ["qemu-img", "vloop"]:
            p = f"{W}/space.{fmt}"
            if os.path.exists(p): os.unlink(p)
            if tool == "vloop":
                sh(f"{VLOOP} create -q -f {fmt} {p} 100M")
            else:
                sh(f"qemu-img create -q -f {fmt} {p} 100M")
            empty = int(sh(f"du -B1 {p}").split()[0])
            if tool == "vloop":
                dev = sh(f"{VLOOP} attach {p}"); sh(f"mkfs.ext4 -q {dev}"); sh(f"{VLOOP} detach {dev}")
            else:
                q = Attached("qsd", p, fmt if fmt != "vpc" else "vpc")
                with q as a: sh(f"mkfs.ext4 -q {a.dev}"); sh("sync")
            after = int(sh(f"du -B1 {p}").split()[0])
            space.setdefault(fmt, {})[tool] = (empty, after, os.path.getsize(p))
            os.unlink(p)

    write_report(results, space)
    shutil.rmtree(W, ignore_errors=True)


def write_report(results, space):
    cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
    lines = ["# Benchmarks", "",
             f"Measured by `bash scripts/bench.sh {RUNS}` on {platform.node()}: {os.cpu_count()} cores ({cpu}), "
             f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, kernel {platform.release()}, "
             f"{time.strftime('%Y-%m-%d')}. Images are {SIZE_MB} MiB (qcow2, 64 KiB clusters, written with random data), "
             f"files in tmpfs; each figure is the median of {RUNS} interleaved runs of {RUNTIME} s fio jobs "
             "(libaio, O_DIRECT on the device) or whole-image copies. Ratios are vloop / peer.", ""]
    titles = {"attach": "Block device: `vloop attach` vs qemu-storage-daemon FUSE export + loop, and a raw file on a loop device",
              "nbd": "NBD: `vloop serve` vs `qemu-nbd --cache=writeback` (fio nbd engine, nbdcopy)",
              "convert": "`vloop convert` vs `qemu-img convert`"}
    for table, rows in results.items():
        cols = list(next(iter(rows.values())).keys())
        peers = [r for r in rows if r != "vloop"]
        lines += [f"## {titles[table]}", "", "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for r, vals in rows.items():
            lines.append(f"| {r} | " + " | ".join(f"{median(vals[c]):.1f}" for c in cols) + " |")
        for p in peers:
            lines.append(f"| vloop / {p} | " + " | ".join(f"{median(rows['vloop'][c]) / median(rows[p][c]):.2f}×" for c in cols) + " |")
        lines.append("")
    lines += ["## Space after `mkfs.ext4` on a 100 MiB image", "",
              "Allocated bytes (du) when empty and after mkfs.ext4 through a block device (vloop attach; qemu-storage-daemon for qemu's images), and the file size.", "",
              "| format | qemu-img empty | vloop empty | qemu after mkfs | vloop after mkfs | qemu file size | vloop file size |", "|---|---|---|---|---|---|---|"]
    for fmt, t in space.items():
        q, v = t["qemu-img"], t["vloop"]
        lines.append(f"| {fmt} | {q[0]} | {v[0]} | {q[1]} | {v[1]} | {q[2]} | {v[2]} |")
    lines += ["", "Reproduce: `bash scripts/bench.sh 3` (root; installs fio, qemu-system-common and nbdkit if missing)."]
    with open(os.path.join(ROOT, "BENCHMARKS.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
