"""What the benchmark scripts share: running commands, waiting for idle CPUs, the
machine's description, and keeping each script's own section of BENCHMARKS.md."""
import os, platform, re, subprocess, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VLOOP = os.path.join(ROOT, ".build/release/vloop")
REPORT = os.path.join(ROOT, "BENCHMARKS.md")


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, text=True, capture_output=True, **kw).stdout.strip()


SETTLE = {"waited": 0.0, "gave_up": 0}


def settle(limit=180):
    """Wait (up to `limit` s) until the CPUs are at least 90% idle over half a second:
    kernel work a previous tool left behind would otherwise run during the next timed
    run and slow whichever tool uses both cores most. On this VM a kworker tearing
    down the io_uring of an exited qemu process (qemu's main loop polls through
    io_uring) was seen busy for tens of seconds."""
    def busy():
        a = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        time.sleep(0.5)
        b = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        d = [y - x for x, y in zip(a, b)]
        return 1 - (d[3] + d[4]) / max(1, sum(d))
    start = time.time()
    while busy() > 0.1:
        if time.time() - start >= limit:
            SETTLE["gave_up"] += 1
            break
    SETTLE["waited"] += time.time() - start


def machine():
    cpu = re.sub(r"\s+", " ", sh("grep -m1 'model name' /proc/cpuinfo").split(":", 1)[1]).strip()
    mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    return f"{platform.node()}: {os.cpu_count()} cores ({cpu}), {mem} GiB, kernel {platform.release()}"


SECTION = re.compile(r"<!-- (\w+):begin -->.*?<!-- \1:end -->\n?", re.S)


def sections(text):
    """The sections of BENCHMARKS.md other scripts wrote, in order."""
    return [m.group(0).rstrip("\n") for m in SECTION.finditer(text)]


def write_section(name, lines):
    """Put `lines` in BENCHMARKS.md between this script's markers, replacing what it
    wrote last time (or at the end the first time)."""
    body = "\n".join([f"<!-- {name}:begin -->"] + lines + [f"<!-- {name}:end -->"]) + "\n"
    text = open(REPORT).read() if os.path.exists(REPORT) else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- {name}:begin -->.*?<!-- {name}:end -->\n?", re.S)
    text = pattern.sub(lambda _: body, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + body
    open(REPORT, "w").write(text)
