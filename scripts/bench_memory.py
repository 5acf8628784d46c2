#!/usr/bin/env python3
"""Memory on huge images: the resident set of `vloop serve` (and of qemu-nbd, side by
side) while fio reads random 4 KiB blocks across fully mapped 64 TiB qcow2, vhdx, vmdk
and vdi images, against the same formats at 1 GiB. Writes the "Memory on huge images"
section of BENCHMARKS.md. Run through scripts/bench-memory.sh (as root).

Fully mapped means every table entry is set: every qcow2 L2 entry and refcount (made by
qemu-img with preallocation=metadata), every VHDX BAT payload entry (1 MiB blocks, so
the BAT is 513 MiB), every VDI block-map entry (256 MiB map), every VMDK grain-table
entry (4 GiB of grain tables). The data itself lies in holes of sparse files on XFS
(ext4 caps files at 16 TiB). VMDK grain offsets are 32-bit sector numbers, so a sparse
extent addresses at most 2 TiB of file: its grain-table entries point at 33 million
distinct grains, each shared by 32 guest grains; the grain tables are all distinct.
"""
import json, os, re, signal, subprocess, sys, time

import numpy as np

from benchlib import VLOOP, sh, write_section

BACKING = os.environ.get("VLOOP_MEMBENCH_FILE", "/var/tmp/vloop-membench.xfs")
MNT = os.environ.get("VLOOP_MEMBENCH_DIR", "/mnt/vloop-membench")
SECONDS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
CACHES = ["32M", "1M"]
SIZES = [("64 TiB", 64 << 40), ("1 GiB", 1 << 30)]
FORMATS = ["qcow2", "vhdx", "vmdk", "vdi"]


def mount_scratch():
    if os.path.ismount(MNT):
        return
    os.makedirs(MNT, exist_ok=True)
    if not os.path.exists(BACKING):
        sh(f"truncate -s 600G {BACKING} && mkfs.xfs -q -f {BACKING}")
    sh(f"mount -o loop {BACKING} {MNT}")


def u32s(path, at, values):
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(values.astype("<u4").tobytes())


def fill_vdi(path, size):
    """Point block i at data block i; the data area becomes a sparse tail."""
    with open(path, "r+b") as f:
        h = f.read(0x190)
    off_blocks, off_data = np.frombuffer(h, "<u4", 2, 0x154)
    block = int(np.frombuffer(h, "<u4", 1, 0x178)[0])
    n = size // block
    for start in range(0, n, 1 << 24):
        u32s(path, int(off_blocks) + start * 4, np.arange(start, min(n, start + (1 << 24)), dtype=np.uint64))
    with open(path, "r+b") as f:
        f.seek(0x184)
        f.write(int(n).to_bytes(4, "little"))
        f.truncate(int(off_data) + n * block)


def fill_vhdx(path, size, block=1 << 20, sector=512):
    """Every payload entry FULLY_PRESENT, blocks laid end to end after the metadata."""
    with open(path, "r+b") as f:
        f.seek(0x30000)
        rt = f.read(65536)
        end = os.fstat(f.fileno()).st_size
    bat = None
    for i in range(int.from_bytes(rt[8:12], "little")):
        e = rt[16 + 32 * i:48 + 32 * i]
        if e[:16].hex() == "6677c22d23f600429d64115e9bfd4a08":
            bat = int.from_bytes(e[16:24], "little")
    chunk = (1 << 23) * sector // block
    n = size // block
    first_mb = (end + (1 << 20) - 1) >> 20
    with open(path, "r+b") as f:
        for start in range(0, n, chunk * 256):
            idx = np.arange(start, min(n, start + chunk * 256), dtype=np.uint64)
            entries = np.zeros(len(idx) + len(idx) // chunk + 1, dtype="<u8")
            pos = idx + idx // chunk - (start + start // chunk)
            entries[pos] = 6 | ((first_mb + idx * (block >> 20)) << 20)
            f.seek(bat + (start + start // chunk) * 8)
            f.write(entries[:int(pos[-1]) + 1].tobytes())
        f.truncate((first_mb << 20) + n * block)


def fill_vmdk(path, size):
    """qemu-img preallocates the grain tables contiguously; set every entry."""
    with open(path, "rb") as f:
        h = f.read(512)
    grain = int.from_bytes(h[20:28], "little")
    per_gt = int.from_bytes(h[44:48], "little")
    gd = int.from_bytes(h[56:64], "little")
    overhead = int.from_bytes(h[64:72], "little")
    with open(path, "rb") as f:
        f.seek(gd * 512)
        first_gt = int.from_bytes(f.read(4), "little")
    grains = size // (grain * 512)
    distinct = min(grains, ((1 << 32) - overhead) // grain - 1)
    for start in range(0, grains, 1 << 26):
        g = np.arange(start, min(grains, start + (1 << 26)), dtype=np.uint64)
        u32s(path, first_gt * 512 + start * 4, overhead + (g % distinct) * grain)
    with open(path, "r+b") as f:
        f.truncate((overhead + distinct * grain) * 512)
    assert per_gt == 512


def build(fmt, size):
    name = f"{MNT}/{fmt}-{size >> 30}G.{fmt}"
    if os.path.exists(name + ".done"):
        return name
    t = time.time()
    for p in (name, name + ".done"):
        if os.path.exists(p):
            os.remove(p)
    if fmt == "qcow2":
        sh(f"qemu-img create -q -f qcow2 -o preallocation=metadata,cluster_size=64k {name} {size}")
    elif fmt == "vmdk":
        sh(f"qemu-img create -q -f vmdk -o subformat=monolithicSparse {name} {size}")
        fill_vmdk(name, size)
    elif fmt == "vhdx":
        sh(f"{VLOOP} create -q -f vhdx -o block_size=1M {name} {size}")
        fill_vhdx(name, size)
    else:
        sh(f"{VLOOP} create -q -f vdi {name} {size}")
        fill_vdi(name, size)
    # The image must read as fully mapped: one allocated run from 0 to the end.
    m = json.loads(sh(f"{VLOOP} map --output=json {name}"))
    assert all(e["data"] for e in m) and m[-1]["start"] + m[-1]["length"] == size, f"{name} is not fully mapped"
    open(name + ".done", "w").close()
    print(f"built {name} in {time.time() - t:.0f} s", file=sys.stderr)
    return name


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def serve(kind, path, fmt, port):
    if kind.startswith("vloop"):
        cmd = [VLOOP, "serve", "-r", "-f", fmt, "-p", str(port), "-x", "d", "--cache-size", kind.split()[-1], path]
    else:
        cmd = ["qemu-nbd", "-r", "-f", fmt, "-p", str(port), "-x", "d", "-t", "--cache=writeback", path]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    uri = f"nbd://127.0.0.1:{port}/d"
    for _ in range(600):
        if subprocess.run(f"nbdinfo --size {uri}", shell=True, capture_output=True).returncode == 0:
            return proc, uri
        if proc.poll() is not None:
            raise SystemExit(f"{kind} could not serve {path}: {proc.stderr.read().decode()}")
        time.sleep(0.1)
    raise SystemExit(f"{kind} did not start serving {path}")


def measure(kind, path, fmt, size, port):
    # Every server starts with the image's metadata out of the host's page cache: the
    # first one to sweep a 64 TiB image would otherwise warm it for the others.
    sh("sync; echo 3 > /proc/sys/vm/drop_caches")
    proc, uri = serve(kind, path, fmt, port)
    try:
        fio = subprocess.Popen(f"fio --name=m --ioengine=nbd --uri={uri} --rw=randread --bs=4k --iodepth=32 "
                               f"--size={size} --runtime={SECONDS} --time_based --norandommap --randrepeat=0 "
                               f"--output-format=json", shell=True, stdout=subprocess.PIPE, text=True)
        peak = 0
        while fio.poll() is None:
            peak = max(peak, rss_kib(proc.pid))
            time.sleep(0.2)
        out = fio.stdout.read()
        iops = json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"]
        end = rss_kib(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL if kind == "qemu-nbd" else signal.SIGTERM)
        proc.wait()
    return peak / 1024, end / 1024, iops


def main():
    mount_scratch()
    rows = []
    port = 10900
    for fmt in FORMATS:
        for label, size in SIZES:
            path = build(fmt, size)
            for kind in [f"vloop cache {c}" for c in CACHES] + ["qemu-nbd"]:
                port += 1
                peak, end, iops = measure(kind, path, fmt, size, port)
                rows.append((fmt, label, kind, peak, end, iops))
                print(f"{fmt:6} {label:7} {kind:16} peak {peak:7.1f} MiB  end {end:7.1f} MiB  {iops / 1e3:6.1f} kIOPS", file=sys.stderr)
    report(rows)


def report(rows):
    cpu = re.sub(r"\s+", " ", sh("grep -m1 'model name' /proc/cpuinfo").split(":", 1)[1]).strip()
    lines = ["## Memory on huge images", "",
             f"Resident set (VmRSS sampled every 0.2 s; peak and at the end) of the NBD server while "
             f"`fio --ioengine=nbd --rw=randread --bs=4k --iodepth=32` reads random blocks across the whole "
             f"disk for {SECONDS} s. vloop runs with `--cache-size {CACHES[0]}` (its default) and `{CACHES[1]}`; qemu-nbd with its defaults "
             f"(`--cache=writeback`). The host's page cache is dropped before each server starts, so each reads "
             f"the metadata it needs from disk (ext4 on virtio, under an XFS file system in a file). Every table entry of each image is set (see `scripts/bench_memory.py` "
             f"for how each is made); the data lies in sparse files on XFS. {os.cpu_count()} cores, {cpu}.", "",
             "| format | size | server | peak RSS (MiB) | RSS at end (MiB) | kIOPS |", "|---|---|---|---|---|---|"]
    for fmt, label, kind, peak, end, iops in rows:
        lines.append(f"| {fmt} | {label} | {kind} | {peak:.1f} | {end:.1f} | {iops / 1e3:.1f} |")
    lines += ["", "vloop, 64 TiB against 1 GiB (peak RSS, same cache budget). A 64 TiB image fills whatever cache it is "
              "given, a 1 GiB one needs little of it, so the growth is about the budget; choose the budget for the gap you accept:", ""]
    for fmt in FORMATS:
        for c in CACHES:
            kind = f"vloop cache {c}"
            big = next(r[3] for r in rows if r[0] == fmt and r[1] == "64 TiB" and r[2] == kind)
            small = next(r[3] for r in rows if r[0] == fmt and r[1] == "1 GiB" and r[2] == kind)
            limit = int(c.rstrip("M")) + 16
            lines.append(f"- {fmt}, cache {c}: {big:.1f} MiB vs {small:.1f} MiB ({big - small:+.1f} MiB, {(big / small - 1) * 100:+.1f}%); "
                         f"{'within' if big <= limit else 'over'} the budget + 16 MiB ({limit} MiB)")
    lines += ["", f"Reproduce: `bash scripts/bench-memory.sh {SECONDS}` (root; needs about 25 GiB free for the "
              f"sparse XFS file it makes at /var/tmp/vloop-membench.xfs, or VLOOP_MEMBENCH_FILE; building the images once takes about 15 minutes, "
              f"later runs reuse them)."]
    write_section("memory", lines)


if __name__ == "__main__":
    main()
