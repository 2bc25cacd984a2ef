"""make bench still runs: the quick benchmark without etcd (so no apt) exits 0
and prints every row of its table: Geryon's figures on SQLite, and the rows of
Geryon's etcd store, not run, as "-"; and the quick disk benchmark (where FUSE
is) gives every column a figure and leaves nothing mounted. No timing is
asserted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

ROWS = [
    "grpc.aio echo server (the Python limit), 1 client",
    "grpc.aio echo server (the Python limit), 4 clients",
    "register 100 leased, 1 client",
    "register 400 leased, 4 clients",
    "register 100 persistent, 1 client",
    "register 400 persistent, 4 clients",
    "register 40 leased, 4 agents x 10 in one call",
    "find svc=rstyx (10 of 400), 1 client",
    "watch fan-out: 2 watchers, 50 updates",
    "watch fan-out: 5 watchers, 50 updates",
    "lease churn: 20 leases, 1 client",
    "lease churn: 40 leases, 4 clients",
    "death notice: holder kill -9 until delete seen",
    "restart with 400 services: first read",
    "restart with 400 services: all 4 leases renewed",
    "re-announce: 2 agents x 5 services, registry kill -9 until Find has all 10",
    "re-announce: registry kill -9 until all 2 agents' leases renewed",
    "re-announce: watch events for the 10 entries (goal 0)",
    "agent with 5 services kill -9 until watcher sees all deleted",
    "reconciler: chunk up/down until disk entry follows, p50 (20 changes, 10 disks)",
    "reconciler: chunk up/down until disk entry follows, p99 (20 changes, 10 disks)",
    "reconciler: full resync of 50 disk names, first pass (creates 50)",
    "reconciler: full resync of 50 disk names, nothing to change",
]

# Geryon on its etcd store: printed, but not measured without etcd.
ETCD_STORE_ROWS = [
    "register 100 leased, 1 client (etcd store)",
    "register 400 leased, 4 clients (etcd store)",
    "register 100 persistent, 1 client (etcd store)",
    "register 400 persistent, 4 clients (etcd store)",
    "register 40 leased, 4 agents x 10 in one call (etcd store)",
    "find svc=rstyx (10 of 400), 1 client (etcd store)",
    "watch fan-out: 2 watchers, 50 updates (etcd store)",
    "watch fan-out: 5 watchers, 50 updates (etcd store)",
    "death notice: holder kill -9 until delete seen (etcd store)",
    "failover: front kill -9 until a write is acked via the other front (etcd store)",
    "failover: etcd leader kill -9 until a write is acked (etcd store)",
]


@pytest.mark.timeout(300)
def test_quick_bench_without_etcd_prints_the_table() -> None:
    env = {**os.environ, "BENCH_QUICK": ""}
    r = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--no-etcd"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
        timeout=240,
    )
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-4000:]}"
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["operation", "unit", "Geryon", "etcd", "ratio", "of", "echo"]
    legend = next(i for i, line in enumerate(lines) if line.startswith("ratio: "))
    table = lines[2:legend]
    assert len(table) == len(ROWS) + len(ETCD_STORE_ROWS), r.stdout
    for row in ROWS + ETCD_STORE_ROWS:
        match = [line for line in table if line.startswith(row + "  ")]
        assert match, f"no row {row!r} in:\n{r.stdout}"
        cells = match[0][len(row) :].split()
        # unit, Geryon, etcd, ratio, of echo: Geryon measured on SQLite, etcd
        # not run, and so neither is Geryon on its etcd store.
        assert (cells[1] != "-") == (row in ROWS), match[0]
        assert cells[2] == "-" and cells[3] == "-", match[0]
    assert "etcd not run" in r.stdout


DISK_ROWS = [
    "sequential write 4 MiB (1 MiB writes, fsync, close)",
    "sequential read 4 MiB (1 MiB reads), nothing dropped",
    "sequential read 4 MiB, its cached pages dropped first",
    "create + write 1 KiB + close, 50 files",
    "ls -l of a 50-file directory",
]


def _fuse_missing() -> str | None:
    from geryon.disk.mount import fuse_unavailable

    return fuse_unavailable()


@pytest.mark.timeout(180)
@pytest.mark.skipif(_fuse_missing() is not None, reason=f"FUSE: {_fuse_missing()}")
def test_quick_disk_bench_prints_every_column() -> None:
    """bench.disk --quick: the geryon mount, the passthrough and the local
    disk each give a figure for every row, and nothing stays mounted."""
    r = subprocess.run(
        [sys.executable, "-m", "bench.disk", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "BENCH_QUICK": ""},
        timeout=150,
    )
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-4000:]}"
    lines = r.stdout.splitlines()
    assert lines[0].split() == [
        "operation", "unit", "local", "passthrough", "geryon", "g/passthrough", "g/local",
    ]  # fmt: skip
    for row in DISK_ROWS:
        match = [line for line in lines if line.startswith(row + "  ")]
        assert match, f"no row {row!r} in:\n{r.stdout}"
        cells = match[0][len(row) :].split()
        assert len(cells) == 6 and "-" not in cells, match[0]
    with open("/proc/self/mounts") as f:
        assert "geryon-bench-disk-" not in f.read()


@pytest.mark.timeout(120)
def test_quick_cpu_bench_prints_every_row() -> None:
    """bench.cpu --quick: a figure for every row, the ratios line last."""
    r = subprocess.run(
        [sys.executable, "-m", "bench.cpu", "--quick"],
        cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=100,
    )  # fmt: skip
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-4000:]}"
    lines = r.stdout.splitlines()
    labels = ["session start-up", "a session alone", "local fork+exec", "stdout: cat of",
              "local pipe"]  # fmt: skip
    for label in labels:
        rows = [line for line in lines[:-1] if label in line]
        assert rows and all(re.search(r"\d+\.\d\d (ms|MB/s)$", row) for row in rows), label
    assert lines[-1].startswith("(a session alone / local fork+exec, p50: ")


@pytest.mark.timeout(120)
def test_quick_flood_bench_prints_every_row() -> None:
    """bench.flood --quick: the polite node alone, beside one flooder, alone."""
    r = subprocess.run(
        [sys.executable, "-m", "bench.flood", "--quick"],
        cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=100,
    )  # fmt: skip
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-4000:]}"
    rows = [line.split() for line in r.stdout.splitlines() if re.match(r"\s+\d+\s+\d+", line)]
    assert [row[0] for row in rows] == ["0", "1", "0"], r.stdout  # alone around the flood
    assert rows[0][2] == rows[2][2] == "-" and float(rows[1][2].rstrip("x")) > 0


@pytest.mark.timeout(120)
def test_quick_scale_bench_prints_every_row() -> None:
    """bench.scale --quick: one small size, a figure in every row."""
    r = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--quick"],
        cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=100,
    )  # fmt: skip
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-4000:]}"
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["scale", "(SQLite", "store)", "unit"], r.stdout
    labels = ["RSS after load", "until the first Get", "until Find answers", "all is served",
              "CPU time",
              "RSS after restart", "full Watch snapshot", "slowest idle Get/Find"]  # fmt: skip
    for label in labels:
        rows = [line for line in lines if label in line]
        assert rows and re.search(r"\d+\.\d\d ", rows[0]), label
