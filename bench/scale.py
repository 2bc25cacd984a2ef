"""`python -m bench.scale`: the registry holding 10,000, 100,000 and 1,000,000
entries (issue 14's size goals beside each figure).

For each size, a real geryon-registryd gets N services with 4 attributes
(``bench.core.service``), under leases of 100 each, and the history a
registry that took them one write at a time holds (one PUT each, the newest
``--history`` of them). Sizes up to ``--api-max`` are loaded through the API
(16 clients, one Register in flight each); larger ones are written into the
SQLite file directly with the store's own row format (``service_row``,
``lease_row``, ``event_row``), as loading a million through the API would
take ten minutes here. Then, on that registry:

- RSS after the load (the first start, for a file written directly);
- ``kill -9`` and start again: the time until the first Get answers, until
  a Find (``svc=rstyx``, 10 entries) answers (both from the database while
  the state loads), until every call is served (the state in memory: a
  Leases call), and the RSS then;
- a full Watch snapshot (every entry): the time until SNAPSHOT_COMPLETE;
- idle: Get and Find one at a time for a few seconds; the slowest of them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench import procs
from bench.core import service
from bench.geryon_side import BIN, QUOTAS_OFF, READY
from bench.report import pct
from geryon import localetcd
from geryon.convert import pb, pb_grpc
from geryon.model import Event, EventType, Service
from geryon.store.sqlite import SCHEMA, SCHEMA_VERSION, event_row, lease_row, service_row

PER_LEASE = 100
LEASE_TTL_MS = 600_000
WRITERS = 16
RSTYX = 10
HISTORY = 100_000  # registryd's default --history
DEADLINE_S = 180.0
POLL_S = 0.005

# (row key, label, unit, goal at 100k, goal at 1M); None: no goal.
ROWS = [
    ("rss_load", "RSS after load", "MB/1k", 1.0, None),
    ("first_get", "kill -9, restart until the first Get", "ms", 500, 5000),
    ("first_find", "kill -9, restart until Find answers", "ms", 1000, None),
    ("loaded", "kill -9, restart until all is served", "ms", None, None),
    ("restart_cpu", "  the registry's CPU time until then", "ms", None, None),
    ("rss_restart", "RSS after restart", "MB/1k", 1.0, None),
    ("snapshot", "full Watch snapshot", "ms", 300, None),
    ("idle_max", "slowest idle Get/Find", "ms", None, 100),
]


def build(data: Path, n: int, history: int) -> None:
    """Write a store holding ``n`` services directly, as the registry would
    have after registering them one revision each."""
    data.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(data / "registry.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    leases = (n + PER_LEASE - 1) // PER_LEASE
    oldest = max(1, n - history + 1)
    now = time.time()
    db.execute("BEGIN")
    db.executemany("INSERT INTO meta VALUES (?, ?)", [
        ("schema", SCHEMA_VERSION), ("revision", n), ("next_lease", leases + 1),
        ("oldest", oldest),
    ])  # fmt: skip
    db.executemany(
        "INSERT INTO leases VALUES (?, ?, ?, ?)",
        (lease_row(i + 1, LEASE_TTL_MS, "admin") for i in range(leases)),
    )
    services = []
    for i in range(n):
        name, attrs = service(i, n, RSTYX)
        services.append(Service(name, attrs, i // PER_LEASE + 1, "admin", i + 1, i + 1))
    db.executemany("INSERT INTO services VALUES (?, ?, ?, ?, ?, ?, ?)", map(service_row, services))
    db.executemany(
        "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            event_row(s.mod_revision, 0, Event(EventType.PUT, s, None, s.mod_revision), now)
            for s in services[oldest - 1 :]
        ),
    )
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def cpu_ms(pid: int) -> float:
    """A process's CPU time so far (user and system): a figure the other
    processes on the machine disturb less than the wall clock."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Registry:
    """A registryd on SQLite in ``root``, or a front of ``etcd`` (endpoints)."""

    def __init__(self, root: Path, history: int, etcd: str | None = None) -> None:
        self.address = f"127.0.0.1:{procs.free_port()}"
        self.data = root / "data"
        store = (
            ["--etcd", etcd, "--etcd-prefix", "/scale/"] if etcd else ["--data-dir", str(self.data)]
        )
        self.argv = [str(BIN / "geryon-registryd"), "--listen", self.address, *store,
                     "--history", str(history), "--log-level", "warning", *QUOTAS_OFF]  # fmt: skip
        self.proc = procs.Proc(self.argv, root / "registry.log", ready=READY)

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(
            self.address,
            options=[("grpc.use_local_subchannel_pool", 1),
                     ("grpc.max_receive_message_length", 1 << 30)],
        )  # fmt: skip


async def until(call, deadline: float) -> None:
    """Poll ``call`` on fresh connections until it answers."""
    while True:
        try:
            await call()
            return
        except grpc.aio.AioRpcError:
            if time.perf_counter() > deadline:
                raise TimeoutError("bench: registry not answering after restart") from None
            await asyncio.sleep(POLL_S)


async def load_api(reg: Registry, n: int) -> None:
    chans = [reg.channel() for _ in range(WRITERS)]
    stubs = [pb_grpc.RegistryStub(c) for c in chans]
    try:
        leases = [
            (await stubs[0].Grant(pb.GrantRequest(ttl_ms=LEASE_TTL_MS))).lease
            for _ in range((n + PER_LEASE - 1) // PER_LEASE)
        ]

        async def writer(w: int) -> None:
            for i in range(w, n, WRITERS):
                name, attrs = service(i, n, RSTYX)
                await stubs[w].Register(
                    pb.RegisterRequest(name=name, attrs=attrs, lease=leases[i // PER_LEASE]),
                    timeout=60,
                )

        await asyncio.gather(*(writer(w) for w in range(WRITERS)))
    finally:
        for c in chans:
            await c.close()


async def snapshot_ms(stub: pb_grpc.RegistryStub, n: int) -> float:
    started = time.perf_counter()
    call = stub.Watch()
    await call.write(pb.WatchRequest(create_request=pb.WatchCreateRequest(snapshot=True)))
    got = 0
    async for r in call:
        got += len(r.events)
        if r.type == pb.WatchResponse.TYPE_SNAPSHOT_COMPLETE:
            break
    took = (time.perf_counter() - started) * 1000
    call.cancel()
    if got != n:
        raise AssertionError(f"bench: snapshot held {got} entries, not {n}")
    return took


async def idle_max_ms(stub: pb_grpc.RegistryStub, n: int, seconds: float) -> tuple[float, float]:
    """Get and Find, one at a time, for ``seconds``: the slowest and the p99."""
    took = []
    rng = random.Random(1)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        if len(took) % 2:
            await stub.Find(pb.FindRequest(attrs={"svc": "rstyx"}), timeout=10)
        else:
            await stub.Get(pb.GetRequest(name=service(rng.randrange(n), n, RSTYX)[0]), timeout=10)
        took.append((time.perf_counter() - t) * 1000)
    return max(took), pct(took, 99)


async def start_etcd(root: Path) -> localetcd.Cluster:
    """A 3-member etcd cluster on loopback, as bench.geryon_etcd_side starts it."""
    cluster = localetcd.Cluster(root / "etcd")
    for m in cluster.members:  # forked on the loop's thread (see procs.adopt)
        m.start(cluster.etcd, cluster.initial)
        procs.adopt(m.proc)
    await asyncio.to_thread(cluster.wait_ready)
    return cluster


async def measure(
    n: int, *, api: bool, history: int, idle_s: float, etcd: bool = False
) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="geryon-bench-scale-") as tmp:
        cluster = await start_etcd(Path(tmp)) if etcd else None
        reg = Registry(Path(tmp), history, cluster.endpoints if cluster else None)
        out: dict[str, float] = {}
        try:
            if api:
                await reg.proc.start()
                started = time.perf_counter()
                await load_api(reg, n)
                out["load_s"] = time.perf_counter() - started
            else:
                started = time.perf_counter()
                build(reg.data, n, history)
                out["build_s"] = time.perf_counter() - started
                await reg.proc.wait_for(READY, reg.proc.spawn(), timeout=DEADLINE_S)
            probe = service(n - 1, n, RSTYX)[0]
            async with reg.channel() as ch:
                stub = pb_grpc.RegistryStub(ch)
                await stub.Get(pb.GetRequest(name=probe), timeout=60)
                out["rss_load"] = rss_mb(reg.proc.pid) / n * 1000
            started = time.perf_counter()
            deadline = started + DEADLINE_S
            reg.proc.kill9()
            reg.proc.spawn()

            async def get() -> None:
                async with reg.channel() as ch:
                    await pb_grpc.RegistryStub(ch).Get(pb.GetRequest(name=probe), timeout=1)

            async def find() -> None:
                async with reg.channel() as ch:
                    r = await pb_grpc.RegistryStub(ch).Find(
                        pb.FindRequest(attrs={"svc": "rstyx"}), timeout=1
                    )
                assert len(r.services) == RSTYX, len(r.services)

            await until(get, deadline)
            out["first_get"] = (time.perf_counter() - started) * 1000
            await until(find, deadline)
            out["first_find"] = (time.perf_counter() - started) * 1000
            # Get and Find are answered from the database while the state
            # loads; Leases, as every other call, waits for it.
            async with reg.channel() as ch:
                await pb_grpc.RegistryStub(ch).Leases(pb.LeasesRequest(), timeout=DEADLINE_S)
            out["loaded"] = (time.perf_counter() - started) * 1000
            out["restart_cpu"] = cpu_ms(reg.proc.pid)
            out["rss_restart"] = rss_mb(reg.proc.pid) / n * 1000
            async with reg.channel() as ch:
                stub = pb_grpc.RegistryStub(ch)
                out["snapshot"] = min([await snapshot_ms(stub, n) for _ in range(2)])
                out["idle_max"], out["idle_p99"] = await idle_max_ms(stub, n, idle_s)
            out["rss_mb"] = rss_mb(reg.proc.pid)
        finally:
            reg.proc.kill9()
            procs.kill_all()  # the etcd members too
        return out


def print_table(results: dict[int, dict[str, float]], store: str) -> None:
    sizes = sorted(results)
    head = f"{f'scale ({store})':<40} {'unit':<6}" + "".join(f"{n:>11,}" for n in sizes)
    print(head + f"  {'goal 100k':>9}  {'goal 1M':>7}")
    print("-" * (len(head) + 20))
    for key, label, unit, g100k, g1m in ROWS:
        cells = "".join(
            f"{results[n][key]:>11.2f}" if key in results[n] else f"{'-':>11}" for n in sizes
        )
        goal = f"  {'<= ' + format(g100k, 'g') if g100k else '-':>9}"
        goal += f"  {'<= ' + format(g1m, 'g') if g1m else '-':>7}"
        print(f"{label:<40} {unit:<6}{cells}{goal}")
    print("MB/1k: resident MB per 1,000 entries (the goal: <= 1 KB an entry)")
    for n in sizes:
        r = results[n]
        how = (f"loaded through the API in {r['load_s']:.1f} s" if "load_s" in r
               else f"written directly in {r['build_s']:.1f} s")  # fmt: skip
        print(f"note: {n:,}: {how}; RSS at the end {r['rss_mb']:.0f} MB; "
              f"idle p99 {r['idle_p99']:.2f} ms")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 2,000 entries")
    p.add_argument("--sizes", help="comma-separated entry counts (default 10000,100000,1000000)")
    p.add_argument("--api-max", type=int, default=100_000,
                   help="load sizes up to this through the API, larger ones directly")  # fmt: skip
    p.add_argument("--history", type=int, default=HISTORY, help="the registry's --history")
    p.add_argument("--idle", type=float, default=None, help="seconds of idle reads (default 5)")
    p.add_argument(
        "--etcd",
        action="store_true",
        help="the etcd store (a front over a 3-member cluster), loaded through the API",
    )
    args = p.parse_args(argv)
    if args.sizes:
        sizes = [int(x) for x in args.sizes.split(",")]
    else:
        sizes = [2_000] if args.quick else [10_000, 100_000, 1_000_000]
    idle = args.idle if args.idle is not None else (0.5 if args.quick else 5.0)
    results = {}
    with contextlib.suppress(KeyboardInterrupt):
        for n in sizes:
            results[n] = asyncio.run(
                measure(
                    n,
                    api=args.etcd or n <= args.api_max,
                    history=args.history,
                    idle_s=idle,
                    etcd=args.etcd,
                )
            )
            print(f"({n:,} done)", file=sys.stderr, flush=True)
    try:
        print_table(results, "etcd store" if args.etcd else "SQLite store")
    finally:
        procs.kill_all()


if __name__ == "__main__":
    main()
