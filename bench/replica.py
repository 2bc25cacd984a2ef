"""make bench, replica half: a replicated disk's lag, failover and write cost.

    python -m bench.replica [--quick] [--out FILE]

What is measured: a disk (a file system inside a chunk file, served over
9P2000 by `geryon disk serve`) with a replica on a second "host", set up as
tests/test_replica.py does: a geryon-registryd, two `geryon-agent`s (host0
and host1, each serving one 256 MiB chunk) and `geryon-reconciler --promote
auto` over the ndb text naming ``d0.mbox`` (master host0!chunk0) and its
replica ``d0.replica`` (host1!chunk0). Nothing is measured before the
replica has caught up (the `geryon disk status --json` positions, as the
test's ``caught_up``). Everything runs on loopback, plain 9P, every process
on the same cores.

Each round uses a lone chunk server and two fresh clusters, one per mode:

- unreplicated, the throughputs' peer: `geryon disk format` and `geryon
  disk serve` of one chunk, no registry, no replica (as bench/disk.py);
  0. write throughput: FILES files of 64 KiB, each `Remote.write_file`
     (create, write, clunk; the clunk returns once durable) over one 9P
     connection, one after the other;
- asynchronous (no ``sync`` in the agents' configs):
  1. the same write throughput, to the primary; printed with the ratio
     async/unreplicated;
  2. replication lag under a steady write load: a writer puts a 64 KiB
     file every 10 ms (a fixed schedule; a late write goes at once) for
     LAG seconds. The lag of one write runs from its acknowledgement
     (write_file returned) to the end of the first read of it on the
     replica that returns its full contents. A poller on its own 9P
     connection to the replica starts on a file once it is acknowledged
     and reads it again at once until it is all there (the replica applies
     changes in log order, so only the oldest file not yet seen is polled).
     Resolution: one poll attempt (a failed walk, or walk, open, read,
     clunk), whose median is printed, with the share of writes already
     whole at their first poll: for those the figure is an upper bound
     (the primary wakes its followers before it acknowledges, so the
     replica may have a write before its writer hears it is durable). The
     poller loads the replica's server as any reader of a replica would;
  3. kill -9 of the primary to the first successful read through a mount:
     `geryon mount --at DIR d0.mbox` is made before the kills. Before each
     kill, 50 files of 4 KiB are written over 9P to a new directory (never
     read through the mount: none of them is in the kernel's page cache).
     Right after SIGKILL of the primary's agent (its keeper kills its
     chunk server), a thread reads them in turn through the mount (open,
     ``posix_fadvise(DONTNEED)``, read, close, contents checked), again at
     once after a failure; each read is bounded by the mount's own
     ``--wait`` (5 s, then EIO). The killed agent is then started again,
     its chunk comes back as the standby, and once it has caught up the new
     primary is killed: KILLS kills per cluster, alternating hosts.
- synchronous (``sync = true`` on both chunks, so that each promoted
  primary is synchronous too; tests/test_replica.py sets it on host0's):
  4. the same write throughput, each clunk held until the replica has
     applied it; printed with the ratio sync/async. A primary that gave up
     waiting (SYNC_TIMEOUT) and acknowledged asynchronously says so in its
     log, and the table then says so in a note;
  5. kill -9 of the primary, in sync, to the first successful write through
     a mount made before it: create (O_EXCL, a new name every attempt),
     write 4 KiB, close; a failed attempt (EIO while the mount has no
     server; EROFS while a replica serves unpromoted, or before the new
     primary has heard of its promotion) is retried after 2 ms, the
     figure's resolution. The new file, and one written through
     the mount before the kill, are then read back over 9P from the new
     primary. KILLS kills, as in 3.

For 3 and 5, a registry watch on d0.mbox (started before the kills) times
when the reconciler made the entry name the surviving chunk and when it
named it the promoted primary (with --promote auto and a safe replica,
one write: the two coincide); the rest of the figure is the mount's.

The order of the three alternates from round to round. Full run: 3 rounds,
3 kills per cluster (about 100 s); --quick: 1 round, 3 s of lag load, 50
files, 2 kills (about 25 s). The lag percentiles pool every round's
writes; the failover figures are the median of every kill, the throughputs
the median of the rounds. The table goes to stdout; a full run (no
--quick) writes bench/results/replica-latest.json with the machine
(bench/report.py). Without FUSE (no pyfuse3, /dev/fuse or fusermount3)
rows 3 and 5 are "-", with the reason in a note; the others still run, and
the exit status is 0.

Bounded and self-cleaning: every step has a timeout (2 min; 10 min for the
run). In ``finally`` (also on Ctrl-C and SIGTERM) mounts are unmounted
(fusermount3 -u -z) and their processes ended, every process is ended
(bench/procs.py: they die with the benchmark even on kill -9; the agents'
keepers take the chunk servers with them), and the temporary directory is
removed once nothing is mounted under it. A mount process of `geryon mount`
outlives a benchmark killed outright (it is meant to outlive its command):
the next run unmounts what it finds under a dead run's directory, which
ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import getpass
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from bench import procs, report
from bench.core import bounded
from bench.disk import (
    _columns,
    _fmt,
    _sig,
    end_pid,
    fuse_unavailable,
    mounts_under,
    run_bench,
    sweep_stale,
    unmount,
)
from bench.report import pct
from geryon.client import Client
from geryon.disk import client as styx_client

BIN = Path(sys.executable).parent
NAME = "d0.mbox"
NDB = """\
name=d0.mbox kfs
  master=host0!chunk0
  replica=d0.replica

name=d0.replica kfs
  master=host1!chunk0 replica
"""
CHUNK_SIZE = "256MiB"
TOTAL_BUDGET_S = 10 * 60
STEP_TIMEOUT_S = 120.0
START_TIMEOUT_S = 90.0
FAILOVER_LIMIT_S = 60.0  # attempts through the mount give up after this
MOUNT_WAIT_S = 5.0  # the mount's --wait: one FUSE call's bound
WRITE_PAUSE_S = 0.002  # between failed write attempts through the mount
TMP_PREFIX = "geryon-bench-replica-"
MB = 1_000_000
KiB64 = 64 * 1024
SMALL = 4096
READ_FILES = 50


@dataclasses.dataclass(frozen=True)
class Sizes:
    rounds: int = 3
    lag_seconds: float = 10.0
    lag_interval: float = 0.010
    lag_size: int = KiB64
    files: int = 200  # throughput: files of file_size
    file_size: int = KiB64
    kills: int = 3  # failovers per cluster (and round)
    quick: bool = False

    @classmethod
    def quick_sizes(cls) -> Sizes:
        return cls(rounds=1, lag_seconds=3.0, files=50, kills=2, quick=True)


def log(text: str) -> None:
    print(f"bench.replica: {text}", file=sys.stderr, flush=True)


def payload(i: int, size: int) -> bytes:
    """SIZE bytes unique to I (a file whose contents are all there is this one)."""
    head = f"{i:08d}\n".encode()
    return (head * (size // len(head) + 1))[:size]


# ---- the cluster -----------------------------------------------------------


class Cluster:
    """A registry, two agents (host0 the master, host1 the replica) and the
    reconciler, as tests/test_replica.py's ``Cluster`` and ``start``."""

    def __init__(self, tmp: Path, *, sync: bool) -> None:
        self.tmp = tmp
        self.sync = sync
        self.registry_addr = ""
        self.env: dict[str, str] = {}
        self.registry: procs.Proc | None = None
        self.agents: dict[str, procs.Proc] = {}
        self.reconciler: procs.Proc | None = None
        self.client: Client | None = None
        self.mount_point: Path | None = None
        self.mount_pid: int | None = None

    async def start(self) -> None:
        t = self.tmp
        t.mkdir(parents=True)
        self.registry_addr = f"127.0.0.1:{procs.free_port()}"
        self.env = {
            **os.environ,
            "GERYON_REGISTRY": self.registry_addr,
            "GERYON_TLS_DIR": "",  # plain text on loopback
        }
        self.registry = procs.Proc(
            [
                str(BIN / "geryon-registryd"),
                "--listen",
                self.registry_addr,
                "--data-dir",
                str(t / "registry"),
            ],
            t / "registry.log",
            ready="serving on",
            env=self.env,
        )
        await self.registry.start()
        for host in ("host0", "host1"):
            config = t / f"{host}.toml"
            (t / host).mkdir()
            # Both chunks sync in synchronous mode: the one promoted is a
            # synchronous primary too (tests/test_replica.py sets host0's only).
            sync = self.sync
            config.write_text(
                f'registry = "{self.registry_addr}"\nhost = "{host}"\nadvertise = "127.0.0.1"\n'
                f'[[chunk]]\nid = "chunk0"\npath = "{t / host / "chunk0"}"\n'
                f'size = "{CHUNK_SIZE}"\nattrs = {{ kfs = "1" }}\n'
                + ("sync = true\n" if sync else "")
            )
            agent = procs.Proc(
                [str(BIN / "geryon-agent"), "--config", str(config)],
                t / f"{host}.log",
                ready="services announced",
                env=self.env,
            )
            self.agents[host] = agent
            await agent.start()
        ndb = t / "cluster.ndb"
        ndb.write_text(NDB)
        self.reconciler = procs.Proc(
            [str(BIN / "geryon-reconciler"), "--ndb", str(ndb), "--promote", "auto"],
            t / "reconciler.log",
            ready="reconciler: watching",
            env=self.env,
        )
        await self.reconciler.start()
        self.client = Client(self.registry_addr, tls_dir="", retry_for=10.0)

        await self.ready_to_kill()

    async def entry(self) -> dict[str, str]:
        assert self.client is not None
        try:
            return dict((await self.client.get(NAME)).attrs)
        except Exception:
            return {}

    def status(self) -> dict[str, Any] | None:
        """`geryon disk status --json d0.mbox`; None when it fails."""
        try:
            r = subprocess.run(
                [str(BIN / "geryon"), "disk", "status", "--json", NAME],
                capture_output=True,
                text=True,
                timeout=30,
                env=self.env,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    async def caught_up(self, timeout: float = 60.0) -> dict[str, Any]:
        """The status once the replica follows with nothing left to apply."""

        async def check() -> dict[str, Any] | None:
            st = await asyncio.to_thread(self.status)
            if st is None or len(st.get("chunks", [])) != 2:
                return None
            prim, rep = st["chunks"]
            ok = (
                isinstance(prim.get("seq"), int)
                and prim.get("writable")
                and rep.get("following")
                and not rep.get("error")
                and rep.get("lag") == 0
                and rep.get("seq") == prim["seq"]
            )
            return st if ok else None

        return await poll(check, timeout, "the replica caught up", interval=0.2)

    async def remote(self, addr: str) -> styx_client.Remote:
        return await styx_client.connect(addr, uname=getpass.getuser())

    async def mount(self, point: Path) -> None:
        point.mkdir()
        mount_log = self.tmp / "mount.log"
        argv = [
            str(BIN / "geryon"),
            "mount",
            "--wait",
            str(MOUNT_WAIT_S),
            "--at",
            str(point),
            "--log",
            str(mount_log),
            NAME,
        ]
        self.mount_point = point
        await bounded(asyncio.to_thread(run_env, argv, self.env, 90), 100, "geryon mount")
        found = re.search(r"mount: pid (\d+)", mount_log.read_text(errors="replace"))
        self.mount_pid = int(found.group(1)) if found else None
        if str(point) not in mounts_under(point):
            raise RuntimeError(f"{point}: geryon mount did not mount")

    async def ready_to_kill(self) -> dict[str, str]:
        """The entry, once served by its primary with the standby caught up
        (and, in synchronous mode, in sync)."""
        e = await poll(self._served, 30, "d0.mbox served by its primary, with a standby")
        await poll(
            self._steady,
            60,
            "the standby caught up" + (" and in sync" if self.sync else ""),
            interval=0.2,
        )
        return e

    async def _served(self) -> dict[str, str] | None:
        e = await self.entry()
        return e if e.get("serving") == "master" and e.get("replica-addr") else None

    async def _steady(self) -> bool:
        st = await self.caught_up()
        return not self.sync or st.get("in_sync") is True

    def kill_primary(self, e: dict[str, str]) -> tuple[float, str]:
        """SIGKILL the agent of the primary in entry E (its keeper kills its
        chunk server): the time of the kill, and the other host."""
        host = e["primary"].split("!")[0]
        agent = self.agents[host]
        assert agent.proc is not None
        t = time.perf_counter()
        agent.proc.kill()
        agent.kill9()  # reap
        return t, next(h for h in self.agents if h != host)

    def fell_back(self) -> bool:
        """Whether a synchronous primary acknowledged asynchronously (its log says so)."""
        return any(
            "acknowledging asynchronously" in agent.output() for agent in self.agents.values()
        )

    async def revive(self) -> None:
        """Start the agent killed last again: its chunk comes back as the standby."""
        for agent in self.agents.values():
            if not agent.running:
                await agent.start()

    def stop(self) -> None:
        """Unmount, end every process. Safe to call twice; never waits long."""
        if self.mount_point is not None:
            for point in mounts_under(self.mount_point):
                unmount(point)
        if self.mount_pid is not None:
            end_pid(self.mount_pid, timeout=5)
            self.mount_pid = None
        for proc in (self.reconciler, *self.agents.values()):
            if proc is not None:
                proc.stop(timeout=5)
        if self.registry is not None:
            self.registry.kill9()
        # A chunk server whose agent is gone is its keeper's to kill: wait
        # for it (by pid), so that nothing writes under the directory after.
        for pid in chunk_servers(self.tmp):
            end_pid(pid, timeout=5)

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.close(), 5)
            self.client = None


def chunk_servers(tmp: Path) -> list[int]:
    """Pids of live processes serving a chunk under TMP (the agents' children)."""
    want = os.fsencode(str(tmp)) + b"/"
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError, ValueError):
            argv = cmdline.read_bytes().split(b"\0")
            if b"serve" in argv and any(a.startswith(want) for a in argv):
                found.append(int(cmdline.parent.name))
    return found


def run_env(argv: list[str], env: dict[str, str], timeout: float) -> str:
    r = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()[-2000:]}")
    return r.stdout


async def poll(check: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """CHECK() until it returns something true, at most TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench: {what}: not in {timeout:g}s")
        await asyncio.sleep(interval)


# ---- the measurements ------------------------------------------------------


async def write_files(addr: str, directory: str, n: int, size: int) -> float:
    """Seconds to write_file N files of SIZE bytes into DIRECTORY, one at a time."""
    r = await styx_client.connect(addr, uname=getpass.getuser())
    try:
        await r.mkdir(directory)
        t0 = time.perf_counter()
        for i in range(n):
            await r.write_file(f"{directory}/f{i:05d}", payload(i, size))
        return time.perf_counter() - t0
    finally:
        await r.conn.close()


@dataclasses.dataclass
class Lag:
    lags: list[float]  # seconds, one per write
    polls: list[float]  # seconds, one per poll attempt
    rate: float  # writes acknowledged per second
    first_try: int  # writes whole on the replica at the first poll after their ack


async def lag_run(cl: Cluster, s: Sizes) -> Lag:
    e = await cl.entry()
    primary, replica = e["addr"], e["replica-addr"]
    n = max(1, round(s.lag_seconds / s.lag_interval))
    pending: deque[tuple[str, bytes, float]] = deque()
    wake = asyncio.Event()
    done = False
    lags: list[float] = []
    polls: list[float] = []
    span = [0.0, 0.0]
    first_try = 0

    async def writer() -> None:
        nonlocal done
        try:
            t0 = time.perf_counter()
            span[0] = t0
            for i in range(n):
                delay = t0 + i * s.lag_interval - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                path, data = f"/lag/f{i:05d}", payload(i, s.lag_size)
                await w.write_file(path, data)
                pending.append((path, data, time.perf_counter()))
                wake.set()
            span[1] = time.perf_counter()
        finally:
            done = True
            wake.set()

    async def poller() -> None:
        nonlocal first_try
        tries = 0
        while True:
            if not pending:
                if done:
                    return
                wake.clear()
                await wake.wait()
                continue
            path, data, acked = pending[0]
            t = time.perf_counter()
            try:
                got = await p.read_file(path)
            except styx_client.StyxError:
                got = b""
            now = time.perf_counter()
            polls.append(now - t)
            tries += 1
            if got == data:
                lags.append(now - acked)
                pending.popleft()
                first_try += tries == 1
                tries = 0
            elif now - acked > STEP_TIMEOUT_S:
                raise TimeoutError(f"bench: {path} not on the replica in {STEP_TIMEOUT_S:g}s")

    w = await cl.remote(primary)
    try:
        p = await cl.remote(replica)
        try:
            await w.mkdir("/lag")
            await cl.caught_up()
            await bounded(
                asyncio.gather(writer(), poller()), s.lag_seconds + STEP_TIMEOUT_S, "the lag load"
            )
        finally:
            await p.conn.close()
    finally:
        await w.conn.close()
    return Lag(lags, polls, n / (span[1] - span[0]), first_try)


@dataclasses.dataclass
class Failover:
    took: float | None = None  # kill -9 to the first success through the mount, seconds
    # kill -9 to the registry entry naming the surviving chunk (a watch), seconds
    to_replica: float | None = None
    to_promoted: float | None = None  # ... naming it the primary, serving=master
    attempts: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)


class EntryWatch:
    """Times of d0.mbox's changes, from a registry watch started before the kill."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.seen: list[tuple[float, dict[str, str]]] = []
        self.task: asyncio.Task[None] | None = None
        self.synced = asyncio.Event()

    async def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="watch d0.mbox")
        await bounded(self.synced.wait(), 30, "the watch on d0.mbox")

    async def _run(self) -> None:
        watch = self.client.watch(prefix=NAME, snapshot=True)
        try:
            async for m in watch:
                now = time.perf_counter()
                if m.kind == "snapshot":
                    self.synced.set()
                for ev in m.events:
                    if ev.service.name == NAME:
                        self.seen.append((now, dict(ev.service.attrs)))
        finally:
            await watch.close()

    def first(self, since: float, pred: Any) -> float | None:
        return next((t - since for t, a in self.seen if t >= since and pred(a)), None)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


def read_until(point: Path, files: dict[str, bytes], since: float, f: Failover) -> None:
    """Read FILES through the mount in turn until one read succeeds (FAILOVER_LIMIT_S)."""
    names = list(files)
    i = 0
    errors: Counter[str] = Counter()
    while time.perf_counter() - since < FAILOVER_LIMIT_S:
        name = names[i % len(names)]
        i += 1
        f.attempts += 1
        try:
            fd = os.open(point / name, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                got = os.read(fd, SMALL * 2)
            finally:
                os.close(fd)
        except OSError as exc:
            errors[errno.errorcode.get(exc.errno or 0, str(exc.errno))] += 1
            continue
        if got != files[name]:
            errors["short or wrong contents"] += 1
            continue
        f.took = time.perf_counter() - since
        break
    f.errors = dict(errors)


def write_until(point: Path, k: int, since: float, f: Failover) -> str | None:
    """Create, write 4 KiB, close a new file through the mount until it works; its name."""
    errors: Counter[str] = Counter()
    data = payload(7, SMALL)
    name = None
    while time.perf_counter() - since < FAILOVER_LIMIT_S:
        candidate = f"after{k}-{f.attempts:05d}"
        f.attempts += 1
        try:
            fd = os.open(point / candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.EIO, "short write")
            finally:
                os.close(fd)
        except OSError as exc:
            errors[errno.errorcode.get(exc.errno or 0, str(exc.errno))] += 1
            time.sleep(WRITE_PAUSE_S)
            continue
        f.took = time.perf_counter() - since
        name = candidate
        break
    f.errors = dict(errors)
    return name


async def failovers(cl: Cluster, kills: int, *, write: bool) -> list[Failover]:
    """KILLS times: kill -9 the primary, time the first read (or write) through
    a mount made before it; the killed agent is started again (its chunk
    returns as the standby) before the next kill."""
    point = cl.tmp / "mnt"
    await cl.mount(point)
    assert cl.client is not None
    watch = EntryWatch(cl.client)
    await watch.start()
    out = []
    try:
        for k in range(kills):
            if k:
                await cl.revive()
            f = await (failover_write if write else failover_read)(cl, point, k, watch)
            out.append(f)
    finally:
        await watch.stop()
    return out


async def failover_read(cl: Cluster, point: Path, k: int, watch: EntryWatch) -> Failover:
    """One kill -9 of the primary; the first read of a file written before it."""
    e = await cl.ready_to_kill()
    r = await cl.remote(e["addr"])
    files = {f"r{i:03d}": payload(1000 * k + i, SMALL) for i in range(READ_FILES)}
    d = f"fo{k}"
    try:
        await r.mkdir(f"/{d}")
        for name, data in files.items():
            await r.write_file(f"/{d}/{name}", data)
        await r.write_file(f"/{d}/check", b"mounted\n")
    finally:
        await r.conn.close()
    got = await bounded(asyncio.to_thread((point / d / "check").read_bytes), 30, "mount check")
    if got != b"mounted\n":
        raise RuntimeError(f"{point}/{d}/check: read {got!r} through the mount")
    e = await cl.ready_to_kill()
    f = Failover()
    since, survivor = cl.kill_primary(e)
    await bounded(
        asyncio.to_thread(read_until, point / d, files, since, f),
        FAILOVER_LIMIT_S + 30,
        "reads through the mount after the kill",
    )
    if f.took is None:
        raise RuntimeError(f"no read through the mount in {FAILOVER_LIMIT_S:g}s: {f.errors}")
    with contextlib.suppress(TimeoutError):
        await poll(lambda: _true(watch.first(since, _promoted(survivor))), 20, "promotion")
    f.to_replica = watch.first(since, lambda a: a.get("host") == survivor)
    f.to_promoted = watch.first(since, _promoted(survivor))
    return f


async def failover_write(cl: Cluster, point: Path, k: int, watch: EntryWatch) -> Failover:
    """One kill -9 of the primary (sync mode, --promote auto); the first write after it."""
    check = payload(3 + k, SMALL)
    await bounded(asyncio.to_thread((point / f"check{k}").write_bytes, check), 30, "mount check")
    e = await cl.ready_to_kill()
    f = Failover()
    since, survivor = cl.kill_primary(e)
    name = await bounded(
        asyncio.to_thread(write_until, point, k, since, f),
        FAILOVER_LIMIT_S + 30,
        "writes through the mount after the kill",
    )
    if name is None:
        raise RuntimeError(f"no write through the mount in {FAILOVER_LIMIT_S:g}s: {f.errors}")
    f.to_replica = watch.first(since, lambda a: a.get("host") == survivor)
    f.to_promoted = watch.first(since, _promoted(survivor))
    # The write is on the new primary, and so is the one made before the kill.
    e = await cl.entry()
    r = await cl.remote(e["addr"])
    try:
        for path, want in ((f"/{name}", payload(7, SMALL)), (f"/check{k}", check)):
            if await r.read_file(path) != want:
                raise RuntimeError(f"{path}: not on the new primary {e['addr']} as written")
    finally:
        await r.conn.close()
    return f


def _promoted(host: str) -> Any:
    def pred(a: dict[str, str]) -> bool:
        return a.get("primary", "").startswith(f"{host}!") and a.get("serving") == "master"

    return pred


async def _true(x: Any) -> bool:
    return x is not None


# ---- the run ---------------------------------------------------------------


@dataclasses.dataclass
class Results:
    throughput: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # mode -> s
    lags: list[list[float]] = dataclasses.field(default_factory=list)  # per round
    polls: list[float] = dataclasses.field(default_factory=list)
    rates: list[float] = dataclasses.field(default_factory=list)
    first_try: list[float] = dataclasses.field(default_factory=list)  # fraction, per round
    reads: list[list[Failover]] = dataclasses.field(default_factory=list)  # per round
    writes: list[list[Failover]] = dataclasses.field(default_factory=list)
    sync_fell_back: list[bool] = dataclasses.field(default_factory=list)


def log_failovers(r: int, what: str, fs: list[Failover]) -> None:
    for f in fs:
        log(
            f"round {r + 1}, kill -9 -> {what} through the mount: {_ms(f.took)} (entry "
            f"at the standby after {_ms(f.to_replica)}, promoted after "
            f"{_ms(f.to_promoted)}; {f.attempts} attempts{_errors(f)})"
        )


async def round_async(tmp: Path, s: Sizes, res: Results, r: int, mount: bool) -> None:
    cl = Cluster(tmp / f"async-{r}", sync=False)
    try:
        await bounded(cl.start(), START_TIMEOUT_S, f"cluster (asynchronous), round {r + 1}")
        e = await cl.entry()
        took = await bounded(
            write_files(e["addr"], "/tp", s.files, s.file_size),
            STEP_TIMEOUT_S,
            f"throughput (asynchronous), round {r + 1}",
        )
        res.throughput.setdefault("async", []).append(took)
        log(f"round {r + 1}, asynchronous: {s.files / took:,.0f} files/s")
        await cl.caught_up()
        lag = await lag_run(cl, s)
        res.lags.append(lag.lags)
        res.polls.extend(lag.polls)
        res.rates.append(lag.rate)
        res.first_try.append(lag.first_try / max(1, len(lag.lags)))
        log(
            f"round {r + 1}, lag: p50 {pct(lag.lags, 50) * 1e3:.2f} ms, "
            f"p99 {pct(lag.lags, 99) * 1e3:.2f} ms over {len(lag.lags)} writes, "
            f"{lag.rate:.0f} writes/s"
        )
        if mount:
            res.reads.append(await failovers(cl, s.kills, write=False))
            log_failovers(r, "read", res.reads[-1])
    finally:
        cl.stop()
        await cl.close()


async def round_sync(tmp: Path, s: Sizes, res: Results, r: int, mount: bool) -> None:
    cl = Cluster(tmp / f"sync-{r}", sync=True)
    try:
        await bounded(cl.start(), START_TIMEOUT_S, f"cluster (synchronous), round {r + 1}")
        st = await cl.caught_up()
        if not (st.get("sync") is True and st.get("in_sync") is True):
            raise RuntimeError(f"host0's disk is not in synchronous mode: {st}")
        e = await cl.entry()
        took = await bounded(
            write_files(e["addr"], "/tp", s.files, s.file_size),
            STEP_TIMEOUT_S,
            f"throughput (synchronous), round {r + 1}",
        )
        # A follower that missed SYNC_TIMEOUT turns the disk asynchronous
        # until it catches up: the chunk server says so in its agent's log.
        res.sync_fell_back.append(cl.fell_back())
        res.throughput.setdefault("sync", []).append(took)
        log(f"round {r + 1}, synchronous: {s.files / took:,.0f} files/s")
        if mount:
            res.writes.append(await failovers(cl, s.kills, write=True))
            log_failovers(r, "write", res.writes[-1])
    finally:
        cl.stop()
        await cl.close()


async def round_solo(tmp: Path, s: Sizes, res: Results, r: int, mount: bool) -> None:
    """The throughput's peer: one chunk server alone, no registry, no replica."""
    d = tmp / f"solo-{r}"
    d.mkdir()
    chunk = d / "chunk0"
    await bounded(
        asyncio.to_thread(
            run_env,
            [str(BIN / "geryon"), "disk", "format", str(chunk), "--size", CHUNK_SIZE],
            dict(os.environ),
            60,
        ),
        90,
        "geryon disk format",
    )
    server = procs.Proc(
        [str(BIN / "geryon"), "disk", "serve", str(chunk), "--listen", "127.0.0.1:0"],
        d / "chunk-server.log",
        ready="disk: serving",
    )
    try:
        await server.start()
        m = re.search(r"disk: serving \S+ on 127\.0\.0\.1:(\d+)", server.output())
        if m is None:
            raise RuntimeError(f"no port in the chunk server's ready line:\n{server.tail()}")
        took = await bounded(
            write_files(f"tcp!127.0.0.1!{m.group(1)}", "/tp", s.files, s.file_size),
            STEP_TIMEOUT_S,
            f"throughput (unreplicated), round {r + 1}",
        )
        res.throughput.setdefault("solo", []).append(took)
        log(f"round {r + 1}, unreplicated: {s.files / took:,.0f} files/s")
    finally:
        server.kill9()


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f} ms"


def _med(xs: list[float | None]) -> float | None:
    got = [x for x in xs if x is not None]
    return statistics.median(got) if got else None


def build_rows(s: Sizes, res: Results) -> list[dict[str, Any]]:
    size = f"{s.file_size // 1024} KiB"
    every = f"{s.lag_size // 1024} KiB every {s.lag_interval * 1e3:g} ms"
    rows: list[dict[str, Any]] = []

    def row(
        key: str,
        label: str,
        unit: str,
        rounds: list[float | None],
        value: float | None = None,
        ratio: float | None = None,
        peer: str | None = None,
    ) -> None:
        rows.append(
            {
                "key": key,
                "operation": label,
                "unit": unit,
                "value": _sig(value if value is not None else _med(rounds)),
                "rounds": [_sig(x) for x in rounds],
                "ratio": _sig(ratio, 3),
                "ratio_of": peer,
            }
        )

    pooled = [x for lags in res.lags for x in lags]
    for q in (50, 99):
        row(
            f"lag_p{q}",
            f"replication lag p{q}, asynchronous ({every}): ack -> whole on the replica",
            "ms",
            [pct(lags, q) * 1e3 for lags in res.lags],
            value=pct(pooled, q) * 1e3 if pooled else None,
        )
    row(
        "lag_rate",
        f"  write rate achieved under that load (target {1 / s.lag_interval:g}/s)",
        "files/s",
        list(res.rates),
    )

    def ms(per_round: list[list[Failover]], attr: str) -> tuple[list[float | None], float | None]:
        """Per-round medians of ATTR (ms), and the median of every kill."""
        every = [
            getattr(f, attr) * 1e3 for fs in per_round for f in fs if getattr(f, attr) is not None
        ]
        rounds = [
            _med([None if getattr(f, attr) is None else getattr(f, attr) * 1e3 for f in fs])
            for fs in per_round
        ]
        return rounds, (statistics.median(every) if every else None)

    for key, label, per_round, attrs in (
        (
            "failover_read",
            "kill -9 of the primary -> first read through the mount, asynchronous",
            res.reads,
            ("took", "to_replica"),
        ),
        (
            "failover_write",
            "kill -9 of the primary -> first write through the mount, synchronous",
            res.writes,
            ("took", "to_replica", "to_promoted"),
        ),
    ):
        for attr in attrs:
            rounds, value = ms(per_round, attr)
            sub = {
                "took": label,
                "to_replica": "  of which: until the disk's entry names the surviving chunk",
                "to_promoted": "  of which: until the entry names it the promoted primary",
            }[attr]
            row(key if attr == "took" else f"{key}.{attr}", sub, "ms", rounds, value=value)

    mb = s.files * s.file_size / MB
    modes = ("solo", "async", "sync")
    per = {m: [s.files / t for t in res.throughput.get(m, [])] for m in modes}
    mbs = {m: [mb / t for t in res.throughput.get(m, [])] for m in modes}
    med = {m: _med(per[m]) for m in modes}
    what = f"write {s.files:,} files of {size} over 9P, one at a time"
    for m, label, peer in (
        ("solo", "unreplicated disk", None),
        ("async", "asynchronous replica", "solo"),
        ("sync", "synchronous replica", "async"),
    ):
        ratio = med[m] / med[peer] if peer and med[m] and med[peer] else None
        of = {"solo": "async/unreplicated", "async": "sync/async"}.get(peer or "")
        row(f"write_{m}_files", f"{what}, {label}", "files/s", per[m], ratio=ratio, peer=of)
        row(f"write_{m}_mb", f"{what}, {label}", "MB/s", mbs[m], ratio=ratio, peer=of)
    return rows


def table(s: Sizes, rows: list[dict[str, Any]], notes: list[str]) -> str:
    head = ("operation", "unit", "median", "rounds", "ratio")
    lines = [
        (
            r["operation"],
            r["unit"],
            _fmt(r["value"]),
            "/".join(_fmt(x) for x in r["rounds"]) or "-",
            "-" if r["ratio"] is None else f"{r['ratio']:.2f} {r['ratio_of']}",
        )
        for r in rows
    ]
    text = _columns(head, lines)
    text.append(
        "median: the lag percentiles pool every round's writes; the failover rows are the "
        f"median of every kill ({s.kills} a round), the others of the rounds. rounds: each "
        "round's figure (its median of the kills)."
    )
    text.extend(f"note: {n}" for n in notes)
    return "\n".join(text)


def notes_for(s: Sizes, res: Results, no_fuse: str | None) -> list[str]:
    notes = [
        "two agents (host0, host1) each serving a 256 MiB chunk, geryon-reconciler "
        "--promote auto, one registry, plain 9P on loopback; a fresh cluster per mode and "
        "round (synchronous: sync = true on both chunks); unreplicated: one `geryon disk "
        "serve` alone; every process on the same cores",
        "lag: from write_file's return on the primary to the end of the first 9P read on the "
        "replica returning the whole file; polled from the acknowledgement on, again at once",
    ]
    if res.polls:
        notes.append(
            f"lag resolution: one poll attempt took {pct(res.polls, 50) * 1e3:.2f} ms "
            f"(median; p99 {pct(res.polls, 99) * 1e3:.2f} ms); "
            + "/".join(f"{x:.0%}" for x in res.first_try)
            + " of the writes (round by round) were whole at the first poll, so for them the "
            "figure is that poll's duration, an upper bound"
        )
    if no_fuse is not None:
        notes.append(f"no mount rows: FUSE is not available here ({no_fuse})")
    else:
        notes.append(
            f"failover: SIGKILL of the primary's agent (its keeper kills its chunk server), "
            f"which then comes back as the standby before the next kill; the mount (--wait "
            f"{MOUNT_WAIT_S:g}) was made before the first; reads retried at once, writes after "
            f"{WRITE_PAUSE_S * 1e3:g} ms; the entry times come from a registry watch"
        )
        for what, per_round in (("read", res.reads), ("write", res.writes)):
            parts = [
                ", ".join(
                    f"{_ms(f.took)} ({f.attempts} attempt{'s' if f.attempts > 1 else ''}"
                    f"{_errors(f)})"
                    for f in fs
                )
                for fs in per_round
            ]
            if parts:
                notes.append(f"failover {what}s, kill by kill, round by round: {'; '.join(parts)}")
    if any(res.sync_fell_back):
        notes.append(
            "synchronous: the primary fell back to asynchronous during a round (no follower "
            "applied a write within its SYNC_TIMEOUT): that round's figure is not synchronous"
        )
    return notes


def _errors(f: Failover) -> str:
    if not f.errors:
        return ""
    return ": failed " + ", ".join(f"{k} {v}" for k, v in sorted(f.errors.items()))


async def main_async(args: argparse.Namespace, tmp: Path) -> int:
    s = Sizes.quick_sizes() if args.quick else Sizes()
    no_fuse = fuse_unavailable()
    if no_fuse is not None:
        log(f"FUSE is not available here ({no_fuse}): no mount rows")
    res = Results()
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    for r in range(s.rounds):
        # Alternate which mode goes first, as bench.disk alternates its targets.
        steps = (round_solo, round_async, round_sync)
        steps = steps if r % 2 == 0 else steps[::-1]
        for step in steps:
            await step(tmp, s, res, r, no_fuse is None)
    load_end = os.getloadavg()[0]
    log(f"measured in {time.perf_counter() - started:.0f} s")
    notes = notes_for(s, res, no_fuse)
    if max(load_start, load_end) > (os.cpu_count() or 1) / 2:
        notes.append(
            f"machine busy: load average {load_start:.1f} at start, {load_end:.1f} at end "
            "(other processes): figures are noisy"
        )
    rows = build_rows(s, res)
    print(table(s, rows, notes), flush=True)
    out = args.out
    if out is None and not args.quick:
        out = report.RESULTS / "replica-latest.json"
    if out is not None:
        extra = {
            "kernel": os.uname().release,
            "loadavg": f"{load_start:.1f} at start, {load_end:.1f} at end",
        }
        doc = {
            "rows": rows,
            "lag_ms": [
                {q: _sig(pct(lags, int(q[1:])) * 1e3) for q in ("p50", "p90", "p99", "p100")}
                | {"writes": len(lags)}
                for lags in res.lags
            ],
            "failover": {
                "read": [[dataclasses.asdict(f) for f in fs] for fs in res.reads],
                "write": [[dataclasses.asdict(f) for f in fs] for fs in res.writes],
            },
            "sync_fell_back": res.sync_fell_back,
            "machine": report.machine(extra),
            "commit": report.commit(),
            "sizes": dataclasses.asdict(s),
            "notes": notes,
        }
        report.save(out, doc, stem="replica", copy=args.out is None)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.replica",
        description="Time a replicated disk: replication lag, failover through a mount, "
        "and the cost of synchronous replication.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get("BENCH_QUICK", "") not in ("", "0"),
        help="a small smoke run: 1 round, 3 s of lag load, 50 files (also BENCH_QUICK=1)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="write the results here (default: bench/results/replica-latest.json after a "
        "full run; nowhere after --quick)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sweep_stale(TMP_PREFIX)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    (tmp / "pid").write_text(str(os.getpid()))

    def cleanup() -> None:
        procs.kill_all()  # the agents (their keepers end their chunk servers) first
        for pid in chunk_servers(tmp):
            end_pid(pid, timeout=5)

    run_bench(
        lambda: main_async(args, tmp),
        tmp,
        logs=lambda: sorted(tmp.glob("*/*.log")),
        cleanup=cleanup,
    )


if __name__ == "__main__":
    main()
