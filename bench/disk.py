"""make bench, disk half: `geryon mount` beside the local disk and a plain FUSE passthrough.

    python -m bench.disk [--quick] [--out FILE] [--profile DIR]

Why three columns: a `geryon mount` on loopback stacks the kernel's FUSE, a
pyfuse3 daemon, 9P2000 over TCP and the chunk server's SQLite on top of the
local disk. The local disk is the physical limit here; a plain pyfuse3
passthrough of it (bench/passthrough.py, made like the geryon mount) is what
any Python FUSE file system pays before it does anything; the geryon mount's
distance from each says whose cost is whose.

One run starts a geryon-registryd, formats a chunk and serves it with
`geryon disk serve`, registers the disk name ``bench.disk`` pointing at it,
mounts it with `geryon mount --at DIR bench.disk` (the command users run: it
returns once the mount answers and leaves a background mount process), and
mounts the passthrough of a local directory. Then, on each of the three
directories, in rounds alternating the order (A/B/C, C/B/A, A/B/C), it times:

- sequential write of a 64 MiB file in 1 MiB writes, then fsync and close;
- sequential read of it in 1 MiB reads, nothing dropped first (what the
  kernel kept of the write may serve it; the daemons' byte counters say how
  much went through each daemon, printed as a note);
- the same read after ``posix_fadvise(DONTNEED)`` drops the file's cached
  pages: on the FUSE mounts every byte then comes through the daemon; on
  the local disk it comes from the (virtual) disk;
- create + write 1 KiB + close of 1,000 files in a new directory;
- `ls -l` of that directory (a real `ls` process, LC_ALL=C).

Before each timed step, ``sync`` (not timed) writes back what earlier
steps left dirty. Each figure is the median of the rounds. The table goes to stdout; a full
run (no --quick, --profile) writes bench/results/disk-latest.json. The CPU
each daemon spent per operation (from /proc) is printed below the table: it
says where the time goes without a profiler. ``--profile DIR`` runs the
chunk server and the mount process (then in the foreground, as the
background one is) under cProfile, every thread (bench/threadprof.py), and
writes one summary per thread into DIR.

Bounded and self-cleaning: every step has a timeout and the whole run has
one; in ``finally`` (also on Ctrl-C and SIGTERM) both mounts are unmounted
(fusermount3 -u -z), every process is ended, and the temporary directory is
removed once nothing is mounted under it. Processes started here die with
the benchmark even on kill -9 (bench/procs.py); the background mount
process of `geryon mount` does not (it is meant to outlive its command),
so a run killed outright leaves it, and the next run unmounts what it finds
under an old run's directory, which ends it. Without FUSE (no pyfuse3, no
/dev/fuse or no fusermount3) it says why and exits 0: `make bench` runs it
after the registry's benchmark, which should not fail for it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import pstats
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import procs, report
from bench.core import bounded

BIN = Path(sys.executable).parent
DISK_NAME = "bench.disk"
CHUNK_SIZE = "256MiB"
TOTAL_BUDGET_S = 15 * 60
STEP_TIMEOUT_S = 180.0  # one operation on one target
TMP_PREFIX = "geryon-bench-disk-"
LOCAL, PASSTHROUGH, GERYON = "local", "passthrough", "geryon"
TARGETS = (LOCAL, PASSTHROUGH, GERYON)
MB = 1_000_000  # the table's MB/s are 10^6 bytes a second
# bench/passthrough.py's READY (not imported: that module needs pyfuse3).
PASSTHROUGH_READY = "passthrough: serving"
CLK_TCK = os.sysconf("SC_CLK_TCK")  # /proc/PID/task/TID/stat counts in these


@dataclasses.dataclass(frozen=True)
class Sizes:
    big_mib: int = 64
    block: int = 1 << 20
    files: int = 1000
    small: int = 1024
    rounds: int = 3
    quick: bool = False

    @classmethod
    def quick_sizes(cls) -> Sizes:
        return cls(big_mib=4, files=50, rounds=1, quick=True)


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    label: str
    unit: str
    better: str  # "higher" or "lower"


def rows_for(s: Sizes) -> list[Row]:
    big = f"{s.big_mib} MiB"
    return [
        Row("write", f"sequential write {big} (1 MiB writes, fsync, close)", "MB/s", "higher"),
        Row("read", f"sequential read {big} (1 MiB reads), nothing dropped", "MB/s", "higher"),
        Row(
            "read_cold", f"sequential read {big}, its cached pages dropped first", "MB/s", "higher"
        ),
        Row("create", f"create + write 1 KiB + close, {s.files:,} files", "files/s", "higher"),
        Row("ls", f"ls -l of a {s.files:,}-file directory", "s", "lower"),
    ]


def log(text: str) -> None:
    print(f"bench.disk: {text}", file=sys.stderr, flush=True)


def run_cmd(argv: list[str], timeout: float = 60.0) -> str:
    """A command that must succeed; its stdout."""
    r = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()[-2000:]}")
    return r.stdout


# ---- mounts and processes --------------------------------------------------


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ROOT, deepest first."""
    prefix = str(root).rstrip("/") + "/"
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            point = line.split()[1].replace("\\040", " ")
            if point == str(root) or point.startswith(prefix):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def unmount(point: str) -> None:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(
            ["fusermount3", "-u", "-z", point],
            capture_output=True,
            timeout=15,
            stdin=subprocess.DEVNULL,
            check=False,
        )


def remove_tree(root: Path) -> bool:
    """Unmount whatever is mounted under ROOT and remove it; never into a mount."""
    for point in mounts_under(root):
        unmount(point)
    if mounts_under(root):
        log(f"left {root}: still mounted under it")
        return False
    shutil.rmtree(root, ignore_errors=True)
    return True


def sweep_stale(prefix: str = TMP_PREFIX) -> None:
    """Directories of earlier runs killed outright: unmount (which ends their
    background mount processes) and remove."""
    for old in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            os.kill(int((old / "pid").read_text()), 0)
        except ProcessLookupError:
            remove_tree(old)
        except (OSError, ValueError):
            pass


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie of ours is dead too (the background mount is no child of ours).
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def end_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM a process that is not our child, then SIGKILL if it stays."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def mount_process(point: str) -> int | None:
    """The pid of the `geryon ... mount --foreground --at POINT` process, if any."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = cmdline.read_bytes().split(b"\0")
            if b"mount" in argv and b"--foreground" in argv and os.fsencode(point) in argv:
                return int(cmdline.parent.name)
    return None


def proc_threads(pid: int | None) -> dict[int, float]:
    """CPU seconds each live thread of PID has run, by thread id (schedstat:
    nanoseconds, where /proc/PID/stat counts 10 ms ticks); empty when gone."""
    out: dict[int, float] = {}
    if pid is None:
        return out
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            out[int(task.name)] = int((task / "schedstat").read_text().split()[0]) / 1e9
    return out


def proc_wchar(pid: int | None) -> int:
    """Bytes PID has written with write-like system calls (/proc/PID/io)."""
    if pid is None:
        return 0
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def thread_cpu(pid: int | None) -> dict[str, float]:
    """CPU seconds per thread of PID, by thread name (numbered when names repeat)."""
    out: dict[str, float] = {}
    if pid is None:
        return out
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        key, n = name, 1
        while key in out:
            n += 1
            key = f"{name}#{n}"
        out[key] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


class Rig:
    """The registry, the chunk server, the two mounts and the local directory."""

    def __init__(self, tmp: Path, profile_dir: Path | None) -> None:
        self.tmp = tmp
        self.profile_dir = profile_dir
        self.registry: procs.Proc | None = None
        self.chunkd: procs.Proc | None = None
        self.passthrough: procs.Proc | None = None
        self.mount_proc: procs.Proc | None = None  # --profile: the foreground mount
        self.mount_pid: int | None = None
        self.registry_addr = ""
        self.dirs = {
            LOCAL: tmp / "local",
            PASSTHROUGH: tmp / "passthrough",
            GERYON: tmp / "geryon",
        }
        self.pt_src = tmp / "passthrough-src"
        self.profiles: list[Path] = []  # --profile: file stems

    def _profiled(self, stem: str, module: str, args: list[str]) -> list[str]:
        """MODULE ARGS under cProfile, every thread (bench/threadprof.py)."""
        if self.profile_dir is None:
            raise AssertionError("not profiling")
        out = self.profile_dir / stem
        self.profiles.append(out)
        return [sys.executable, "-m", "bench.threadprof", str(out), "-m", module, *args]

    async def start(self) -> None:
        t = self.tmp
        port = procs.free_port()
        self.registry_addr = f"127.0.0.1:{port}"
        self.registry = procs.Proc(
            [str(BIN / "geryon-registryd"), "--listen", self.registry_addr,
             "--data-dir", str(t / "registry")],
            t / "registry.log",
            ready="serving on",
        )  # fmt: skip
        await self.registry.start()

        chunk = t / "chunk"
        await asyncio.to_thread(
            run_cmd, [str(BIN / "geryon"), "disk", "format", str(chunk), "--size", CHUNK_SIZE]
        )
        serve = ["disk", "serve", str(chunk), "--listen", "127.0.0.1:0"]
        argv = (
            self._profiled("chunk-server", "geryon.cli", serve)
            if self.profile_dir
            else [str(BIN / "geryon"), *serve]
        )
        self.chunkd = procs.Proc(argv, t / "chunk-server.log", ready="disk: serving")
        await self.chunkd.start()
        m = re.search(r"disk: serving \S+ on 127\.0\.0\.1:(\d+)", self.chunkd.output())
        if m is None:
            raise RuntimeError(f"no port in the chunk server's ready line:\n{self.chunkd.tail()}")
        chunk_addr = f"tcp!127.0.0.1!{m.group(1)}"
        g = [str(BIN / "geryon"), "--registry", self.registry_addr]
        await asyncio.to_thread(
            run_cmd, [*g, "set", "--persist", DISK_NAME, f"addr={chunk_addr}", "status=up"]
        )

        for d in (self.dirs[LOCAL], self.pt_src, self.dirs[PASSTHROUGH], self.dirs[GERYON]):
            d.mkdir()
        self.passthrough = procs.Proc(
            [sys.executable, "-m", "bench.passthrough", str(self.pt_src),
             str(self.dirs[PASSTHROUGH])],
            t / "passthrough.log",
            ready=PASSTHROUGH_READY,
        )  # fmt: skip
        await self.passthrough.start()

        point = str(self.dirs[GERYON])
        if self.profile_dir is None:
            # What a user runs: returns once the mount answers, leaving its
            # mount process in the background (its pid is in its log).
            mount_log = t / "geryon-mount.log"
            await asyncio.to_thread(
                run_cmd, [*g, "mount", "--at", point, "--log", str(mount_log), DISK_NAME], 90
            )
            found = re.search(r"mount: pid (\d+)", mount_log.read_text())
            self.mount_pid = int(found.group(1)) if found else mount_process(point)
            if self.mount_pid is None:
                log(f"no mount process found for {point}: its CPU is not counted")
        else:
            # The same mount process, run in the foreground under cProfile.
            args = ["--registry", self.registry_addr, "mount", "--foreground", "--at", point,
                    DISK_NAME]  # fmt: skip
            self.mount_proc = procs.Proc(
                self._profiled("geryon-mount", "geryon.cli", args),
                t / "geryon-mount.log",
                ready="mounted at",
            )
            await self.mount_proc.start()
            self.mount_pid = self.mount_proc.pid
            await bounded(asyncio.to_thread(os.stat, point), 30, "geryon mount answering")
        if point not in mounts_under(self.dirs[GERYON]):
            raise RuntimeError(f"{point}: geryon mount did not mount")

    def daemons(self) -> dict[str, int | None]:
        """The processes whose CPU each operation costs, by role."""
        return {
            "passthrough daemon": self.passthrough.pid if self.passthrough else None,
            "geryon mount daemon": self.mount_pid,
            "chunk server": self.chunkd.pid if self.chunkd else None,
        }

    def versions(self) -> dict[str, str]:
        out = {"kernel": os.uname().release}
        with contextlib.suppress(Exception):
            import pyfuse3

            out["pyfuse3"] = pyfuse3.__version__
        with contextlib.suppress(Exception):
            r = subprocess.run(["fusermount3", "-V"], capture_output=True, text=True, timeout=5)
            out["fusermount3"] = r.stdout.strip().rsplit(" ", 1)[-1]
        return out

    def stop(self) -> None:
        """Unmount both, end every process (in that order: a mount whose
        server is gone would make the unmount wait). Safe to call twice."""
        for target in (GERYON, PASSTHROUGH):
            for point in mounts_under(self.dirs[target]):
                unmount(point)
        # Unmounted, the mount processes end by themselves; a profiled one
        # must exit cleanly for cProfile to write its file.
        for proc in (self.mount_proc, self.passthrough):
            if proc is not None:
                proc.stop()
        if self.mount_pid is not None and self.mount_proc is None:
            end_pid(self.mount_pid)
        for proc in (self.chunkd, self.registry):
            if proc is None:
                continue
            if self.profile_dir is not None and proc is self.chunkd:
                proc.stop()
            else:
                proc.kill9()


# ---- the operations --------------------------------------------------------


def _pattern(block: int) -> bytes:
    return random.Random(0).randbytes(block)


def op_write(path: Path, s: Sizes) -> float:
    """Seconds to open, write big_mib MiB in blocks, fsync and close."""
    buf = _pattern(s.block)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(s.big_mib * (1 << 20) // s.block):
            view = memoryview(buf)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def op_read(path: Path, s: Sizes, *, drop: bool) -> float:
    """Seconds to open, read the file through in blocks and close; checked
    against what was written (after the clock stops)."""
    if drop:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    pieces: list[bytes] = []
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while piece := os.read(fd, s.block):
            pieces.append(piece)
    finally:
        os.close(fd)
    took = time.perf_counter() - t0
    data = b"".join(pieces)
    want = _pattern(s.block)
    if len(data) != s.big_mib << 20 or any(
        data[i : i + s.block] != want for i in range(0, len(data), s.block)
    ):
        raise RuntimeError(f"{path}: read back {len(data)} bytes, not what was written")
    return took


def op_create(d: Path, s: Sizes) -> float:
    """Seconds to create, write 1 KiB into and close each of s.files files in D."""
    buf = _pattern(s.small)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    t0 = time.perf_counter()
    for i in range(s.files):
        fd = os.open(d / f"f{i:05d}", flags, 0o644)
        try:
            if os.write(fd, buf) != len(buf):
                raise RuntimeError(f"{d}: short write")
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def op_ls(d: Path, s: Sizes) -> float:
    """Seconds for `ls -l D` to run, checked to list every file."""
    env = {**os.environ, "LC_ALL": "C"}
    t0 = time.perf_counter()
    r = subprocess.run(
        ["ls", "-l", str(d)],
        capture_output=True,
        timeout=STEP_TIMEOUT_S,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    took = time.perf_counter() - t0
    lines = r.stdout.count(b"\n")
    if r.returncode != 0 or lines != s.files + 1:
        raise RuntimeError(f"ls -l {d}: exit {r.returncode}, {lines} lines: {r.stderr[-500:]!r}")
    return took


# ---- the run ---------------------------------------------------------------


@dataclasses.dataclass
class Results:
    # row key -> target -> one figure per round
    values: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)
    # row key -> target -> seconds the operation took, per round
    seconds: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)
    # row key -> target -> daemon -> CPU seconds per round
    cpu: dict[str, dict[str, dict[str, list[float]]]] = dataclasses.field(default_factory=dict)
    # read row key -> target -> fraction of the file's bytes the target's daemon wrote to FUSE
    through: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)
    # daemon -> thread -> CPU seconds over the whole run
    threads: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    def add(self, key: str, target: str, value: float, seconds: float) -> None:
        self.values.setdefault(key, {}).setdefault(target, []).append(value)
        self.seconds.setdefault(key, {}).setdefault(target, []).append(seconds)


async def timed(
    rig: Rig,
    res: Results,
    key: str,
    target: str,
    fn: Callable[[], float],
    what: str,
) -> float:
    """Run FN (seconds it took) in a thread, bounded, and note the CPU the
    daemons spent meanwhile, and their main threads (the event loops) and
    other threads apart (in the JSON)."""
    # Not timed: write back what earlier steps left dirty (the last round's
    # deletions among them), so that no step pays for another's writeback.
    await bounded(asyncio.to_thread(os.sync), 60, f"sync before {what}")
    daemons = rig.daemons()
    before = {name: proc_threads(pid) for name, pid in daemons.items()}
    took = await bounded(asyncio.to_thread(fn), STEP_TIMEOUT_S, what)
    for name, pid in daemons.items():
        after = proc_threads(pid)
        main = other = 0.0
        for tid, cpu in after.items():
            used = cpu - before[name].get(tid, 0.0)
            if tid == pid:
                main += used
            else:
                other += used
        per = res.cpu.setdefault(key, {}).setdefault(target, {})
        per.setdefault(name, []).append(main + other)
        per.setdefault(f"{name}: main thread", []).append(main)
        per.setdefault(f"{name}: other threads", []).append(other)
    return took


async def measure(rig: Rig, res: Results, target: str, r: int, s: Sizes) -> None:
    base = rig.dirs[target]
    big = base / f"big-{r}"
    small = base / f"small-{r}"
    mb = (s.big_mib << 20) / MB
    daemon = {PASSTHROUGH: rig.passthrough.pid if rig.passthrough else None,
              GERYON: rig.mount_pid}.get(target)  # fmt: skip
    where = f"round {r + 1} on {target}"

    t = await timed(rig, res, "write", target, lambda: op_write(big, s), f"write, {where}")
    res.add("write", target, mb / t, t)
    for key, drop in (("read", False), ("read_cold", True)):
        w0 = proc_wchar(daemon)
        t = await timed(
            rig, res, key, target, lambda d=drop: op_read(big, s, drop=d), f"{key}, {where}"
        )
        res.add(key, target, mb / t, t)
        if daemon is not None:
            frac = (proc_wchar(daemon) - w0) / (s.big_mib << 20)
            res.through.setdefault(key, {}).setdefault(target, []).append(frac)
    await bounded(asyncio.to_thread(small.mkdir), 30, f"mkdir, {where}")
    t = await timed(rig, res, "create", target, lambda: op_create(small, s), f"create, {where}")
    res.add("create", target, s.files / t, t)
    t = await timed(rig, res, "ls", target, lambda: op_ls(small, s), f"ls -l, {where}")
    res.add("ls", target, t, t)
    # Not timed: leave the disk as empty as it was for the next round.
    await bounded(asyncio.to_thread(big.unlink), 60, f"rm, {where}")
    await bounded(asyncio.to_thread(shutil.rmtree, small), STEP_TIMEOUT_S, f"rm -r, {where}")
    shown = ", ".join(
        f"{k} {res.values[k][target][-1]:,.3g}"
        for k in ("write", "read", "read_cold", "create", "ls")
    )
    log(f"{where}: {shown}")


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def _sig(x: float | None, digits: int = 4) -> float | None:
    """X to DIGITS significant digits, for the JSON."""
    return None if x is None else float(f"{x:.{digits}g}")


def _sigs(values: dict[str, list[float]]) -> dict[str, list[float | None]]:
    return {k: [_sig(x) for x in v] for k, v in values.items()}


def build_rows(s: Sizes, res: Results) -> list[dict[str, Any]]:
    out = []
    for row in rows_for(s):
        per = res.values.get(row.key, {})
        med = {t: (statistics.median(per[t]) if per.get(t) else None) for t in TARGETS}

        def ratio(other: str, med: dict[str, float | None] = med, row: Row = row) -> float | None:
            g, o = med[GERYON], med[other]
            if not g or not o:
                return None
            return g / o if row.better == "higher" else o / g

        out.append(
            {
                "key": row.key,
                "operation": row.label,
                "unit": row.unit,
                "better": row.better,
                **{t: _sig(med[t]) for t in TARGETS},
                "geryon/passthrough": _sig(ratio(PASSTHROUGH), 3),
                "geryon/local": _sig(ratio(LOCAL), 3),
                "rounds": _sigs(per),
                "seconds": {
                    t: _sig(statistics.median(v)) for t, v in res.seconds.get(row.key, {}).items()
                },
                "daemon_cpu_s": {
                    t: {d: _sig(statistics.median(v)) for d, v in cpus.items()}
                    for t, cpus in res.cpu.get(row.key, {}).items()
                },
            }
        )
    return out


def table(rows: list[dict[str, Any]], notes: list[str]) -> str:
    head = ("operation", "unit", "local", "passthrough", "geryon", "g/passthrough", "g/local")
    lines = [
        (
            r["operation"],
            r["unit"],
            _fmt(r[LOCAL]),
            _fmt(r[PASSTHROUGH]),
            _fmt(r[GERYON]),
            "-" if r["geryon/passthrough"] is None else f"{r['geryon/passthrough']:.2f}",
            "-" if r["geryon/local"] is None else f"{r['geryon/local']:.2f}",
        )
        for r in rows
    ]
    text = _columns(head, lines)
    text.append(
        "g/passthrough, g/local: geryon's figure over the other's, above 1 = geryon faster "
        "(for s: the other's over geryon's)."
    )
    text.extend(f"note: {n}" for n in notes)
    return "\n".join(text)


def _columns(head: tuple[str, ...], lines: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]

    def fmt(cols: tuple[str, ...]) -> str:
        left = cols[0].ljust(widths[0]) + "  " + cols[1].ljust(widths[1])
        return left + "".join("  " + c.rjust(w) for c, w in zip(cols[2:], widths[2:], strict=True))

    return [fmt(head), "-" * len(fmt(head)), *(fmt(x) for x in lines)]


def cpu_table(rows: list[dict[str, Any]]) -> str:
    """CPU seconds each daemon spent per operation (median), beside the wall time."""
    head = (
        "CPU s per operation (median)",
        "target",
        "wall s",
        "FUSE daemon",
        "chunk server",
    )
    lines = []
    for r in rows:
        for t in (PASSTHROUGH, GERYON):
            cpu = r["daemon_cpu_s"].get(t)
            wall = r["seconds"].get(t)
            if cpu is None or wall is None:
                continue
            daemon = "passthrough daemon" if t == PASSTHROUGH else "geryon mount daemon"
            chunk = _fmt(cpu["chunk server"]) if t == GERYON else "-"
            lines.append((r["operation"], t, _fmt(wall), _fmt(cpu[daemon]), chunk))
    return "\n".join(_columns(head, lines))


def notes_for(s: Sizes, res: Results, rig: Rig) -> list[str]:
    notes = [
        "local: a directory on the same file system as the passthrough's source and the "
        "chunk file (the physical limit here); passthrough: bench/passthrough.py, a pyfuse3 "
        "passthrough of a local directory, made as geryon's mount is (1 s attribute and "
        "entry timeouts, pyfuse3's default keep_cache, no writeback cache)",
        f"geryon: `geryon mount --at DIR {DISK_NAME}` on loopback, plain 9P2000 to "
        f"`geryon disk serve` of a {CHUNK_SIZE} chunk; every process on the same 2 cores",
        "create: no fsync asked for; geryon's mount makes a file durable at close (its flush "
        "waits for the chunk server's sync), the local disk and the passthrough do not",
        "ls -l: right after the files were made (readdir always goes to the FUSE daemon; "
        "readdirplus brings the attributes with the names)",
    ]
    for key, what in (("read", "nothing dropped"), ("read_cold", "pages dropped first")):
        per = res.through.get(key, {})
        parts = [
            f"{t} {'/'.join(f'{x:.0%}' for x in v)}"
            for t in (PASSTHROUGH, GERYON)
            if (v := per.get(t))
        ]
        if parts:
            notes.append(
                f"read, {what}: the file's bytes that came through each FUSE daemon "
                f"(its /proc wchar), round by round: {', '.join(parts)}; the rest came from "
                "the kernel's page cache"
                + (
                    "; local: from the page cache (the file just written)"
                    if key == "read"
                    else "; local: from the disk (a virtual one here)"
                )
            )
    if rig.profile_dir is not None:
        notes.append("profiled: the chunk server and the mount daemon ran under cProfile")
    return notes


async def main_async(args: argparse.Namespace, rig: Rig) -> int:
    s = Sizes.quick_sizes() if args.quick else Sizes()
    profile_dir = rig.profile_dir
    res = Results()
    load_start = os.getloadavg()[0]
    try:
        await bounded(rig.start(), 180, "start")
        log(f"registry {rig.registry_addr}; mounts ready; sizes {'quick' if s.quick else 'full'}")
        for r in range(s.rounds):
            order = TARGETS if r % 2 == 0 else TARGETS[::-1]
            for target in order:
                await measure(rig, res, target, r, s)
        for name, pid in rig.daemons().items():
            res.threads[name] = thread_cpu(pid)
    finally:
        # On the loop's thread, not awaited: a second cancellation cannot cut it short.
        rig.stop()
        if profile_dir is not None:
            summarize_profiles(rig.profiles)
    load_end = os.getloadavg()[0]
    notes = notes_for(s, res, rig)
    if max(load_start, load_end) > (os.cpu_count() or 1) / 2:
        notes.append(
            f"machine busy: load average {load_start:.1f} at start, {load_end:.1f} at end "
            "(other processes): figures are noisy"
        )
    rows = build_rows(s, res)
    print(table(rows, notes), flush=True)
    print(flush=True)
    print(cpu_table(rows), flush=True)
    out = args.out
    if out is None and not (args.quick or profile_dir):
        out = report.RESULTS / "disk-latest.json"
    if out is not None:
        extra = {**rig.versions(), "loadavg": f"{load_start:.1f} at start, {load_end:.1f} at end"}
        doc = {
            "rows": rows,
            # read row -> target -> per round: the share of the file its FUSE daemon sent
            "through_fuse_daemon": {k: _sigs(v) for k, v in res.through.items()},
            "threads_cpu_s": res.threads,
            "machine": report.machine(extra),
            "commit": report.commit(),
            "sizes": dataclasses.asdict(s),
            "notes": notes,
        }
        report.save(out, doc, stem="disk", copy=args.out is None)
    return 0


def summarize_profiles(stems: list[Path]) -> None:
    """One text summary beside each profile file (one per thread)."""
    for stem in stems:
        files = sorted(stem.parent.glob(f"{stem.name}-*.prof"))
        if not files:
            log(f"profile: no {stem}-*.prof written")
        for path in files:
            summary = path.with_suffix(".txt")
            with open(summary, "w") as f:
                stats = pstats.Stats(str(path), stream=f)
                stats.sort_stats("tottime").print_stats(40)
                stats.sort_stats("cumulative").print_stats(60)
            log(f"profile: {summary}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.disk",
        description="Time a geryon mount beside the local disk and a plain FUSE passthrough.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get("BENCH_QUICK", "") not in ("", "0"),
        help="a small smoke run: 4 MiB, 50 files, 1 round (also BENCH_QUICK=1)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="write the results here (default: bench/results/disk-latest.json after a "
        "full run; nowhere after --quick or --profile)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run the chunk server and the mount daemon under cProfile; summaries in DIR",
    )
    return p.parse_args(argv)


def fuse_unavailable() -> str | None:
    """Why FUSE cannot be used here (None: it can): `geryon mount`'s answer."""
    from geryon.disk.mount import fuse_unavailable as why_not

    why = why_not()
    return None if why is None else f"{why}; make fuse-deps installs what it can"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    why = fuse_unavailable()
    if why is not None:
        # make bench runs this after the registry's benchmark: say so, do not fail it.
        log(f"FUSE is not available here ({why}): no disk figures")
        sys.exit(0)
    sweep_stale()
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    (tmp / "pid").write_text(str(os.getpid()))
    profile_dir = args.profile.resolve() if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    rig = Rig(tmp, profile_dir)

    def logs() -> list[Path]:
        names = ("registry.log", "chunk-server.log", "passthrough.log", "geryon-mount.log")
        return [tmp / name for name in names]

    run_bench(lambda: main_async(args, rig), tmp, logs=logs, cleanup=rig.stop)


def run_bench(
    main_async: Callable[[], Any],
    tmp: Path,
    *,
    logs: Callable[[], list[Path]],
    cleanup: Callable[[], None],
) -> None:
    """Run MAIN_ASYNC() within TOTAL_BUDGET_S and exit with its status: Ctrl-C
    or SIGTERM end it (130), a failure prints the tails of LOGS(); whatever
    happens, CLEANUP(), every process ended and TMP removed (kept with
    BENCH_KEEP=1). Shared with bench.replica."""
    code = 1
    try:

        async def guarded() -> int:
            task = asyncio.current_task()
            assert task is not None
            # SIGTERM ends the run like Ctrl-C; SIGINT is handled here too,
            # since a shell starts a background job with SIGINT ignored.
            for sig in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
            return await bounded(main_async(), TOTAL_BUDGET_S, "the whole run")

        code = asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted")
        code = 130
    except Exception as exc:
        traceback.print_exc()
        log(f"failed: {exc}")
        for path in logs():
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-15:]
                name = path.relative_to(tmp)
                print(f"---- {name} (last lines) ----", *tail, sep="\n", file=sys.stderr)
        code = 1
    finally:
        cleanup()
        procs.kill_all()
        if os.environ.get("BENCH_KEEP"):
            log(f"kept {tmp}")
        else:
            remove_tree(tmp)
    if threading.active_count() > 1:
        # A worker thread still stuck in a file system call: do not wait for it.
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
