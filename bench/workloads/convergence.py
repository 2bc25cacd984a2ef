"""Reconciler convergence (issue 6): how soon a disk name's entry follows its
chunk, and how long a full resync takes. Geryon only; two workloads.

1. ``convergence`` (latency). An ndb file names D disks (``name=dK kfs
   master=hostH!chunkC``), their chunks are registered under a lease the
   benchmark holds, as node agents register them, and a real
   ``geryon-reconciler`` process (started once, kept for every round) keeps
   the disk names. Each round makes C changes, one at a time, alternating
   on each disk in turn: its chunk is unregistered (it died: the entry must
   go ``status down``), then registered again at a new address (the entry
   must be ``status up`` with that ``addr``). Each is timed from the
   Register or Unregister call being sent until a watcher on the disk-name
   entries (``managed-by``) sees the entry reflect it; p50 and p99 over the
   C changes.
2. ``resync``. Every round on an empty registry: an ndb file names R disks
   whose chunks are registered (under leases); an in-process ``Reconciler``
   (geryon/reconciler.py) runs forced full passes (the ndb files re-read,
   every entry and chunk re-listed): the first creates the R entries, the
   second finds nothing to do.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from pathlib import Path

from bench import procs
from bench.core import (
    GERYON,
    Bench,
    Conn,
    Row,
    Side,
    Sizes,
    Workload,
    bounded,
    close_all,
    connections,
    spread,
)
from geryon.client import Client
from geryon.model import EventType, Service
from geryon.reconciler import MANAGED_FILTER, MANAGED_VALUE, Reconciler

CHUNKS_PER_HOST = 100
CHANGE_TIMEOUT_S = 10.0  # one change reflected
LEASE_TTL_MS = 60_000


def ndb_text(disks: int, prefix: str) -> str:
    return "".join(f"name={prefix}{i} kfs\n  master={host(i)}!{chunk(i)}\n\n" for i in range(disks))


def host(i: int) -> str:
    return f"host{i // CHUNKS_PER_HOST:03d}"


def chunk(i: int) -> str:
    return f"chunk{i % CHUNKS_PER_HOST}"


def chunk_attrs(i: int) -> dict[str, str]:
    return {"id": chunk(i), "host": host(i), "name": host(i), "kfs": "1", "health": "passing"}


def chunk_name(i: int, generation: int) -> str:
    # A chunk that comes back comes back on a new port: a new address.
    return f"tcp!127.0.0.{1 + generation % 200}!{10_000 + i}"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def workload(sizes: Sizes) -> Workload:
    """Convergence latency: one reconciler process for every round."""
    d, c = sizes.conv_disks, sizes.conv_changes
    what = f"{c} changes, {d} disks"
    rows = (
        Row(
            "convergence.p50",
            f"reconciler: chunk up/down until disk entry follows, p50 ({what})",
            "ms",
            better="lower",
        ),
        Row(
            "convergence.p99",
            f"reconciler: chunk up/down until disk entry follows, p99 ({what})",
            "ms",
            better="lower",
        ),
    )

    async def prepare(bench: Bench, side: Side) -> None:
        address = side.address  # type: ignore[attr-defined]
        ndb = bench.tmp / "convergence.ndb"
        ndb.write_text(ndb_text(d, "d"))
        client = Client(address, own_connection=True)
        lease = client.lease(LEASE_TTL_MS)
        reconciler = procs.Proc(
            [
                str(Path(sys.executable).parent / "geryon-reconciler"),
                "--registry",
                address,
                "--ndb",
                str(ndb),
            ],
            bench.tmp / "reconciler.log",
            ready="reconciler: watching",
            env={**os.environ, "GERYON_TLS_DIR": "", "GERYON_USER": ""},
        )

        async def clean_up() -> None:
            await asyncio.to_thread(reconciler.stop)
            await lease.close(revoke=True)
            await client.close()

        bench.cleanups.append(clean_up)
        await lease.start()
        await asyncio.gather(
            *(client.register(chunk_name(i, 0), chunk_attrs(i), lease=lease.id) for i in range(d))
        )
        await reconciler.start()
        await bounded(all_up(client, d), 30, "every disk up")
        bench.state["latency"] = (client, lease.id, [0] * d)

    async def all_up(client: Client, disks: int) -> None:
        while True:
            up, _ = await client.find({**MANAGED_FILTER, "status": "up"})
            if len(up) == disks:
                return
            await asyncio.sleep(0.02)

    async def measure(bench: Bench, side: Side) -> dict[str, float]:
        client, lease, gen = bench.state["latency"]
        waiting: dict[str, tuple[dict[str, str], asyncio.Future[float]]] = {}
        watch = client.watch(MANAGED_FILTER)
        it = aiter(watch)
        first = await bounded(anext(it), 10, "disk-name watch start")
        if first.kind != "progress":
            raise AssertionError(f"bench: disk-name watch began with {first.kind}")

        def follows(s: Service, want: dict[str, str]) -> bool:
            return all(s.attrs.get(k) == v for k, v in want.items())

        async def consume() -> None:
            async for m in it:
                now = time.perf_counter()
                for e in m.events:
                    w = waiting.get(e.service.name)
                    if w is not None and e.type is EventType.PUT and follows(e.service, w[0]):
                        if not w[1].done():
                            w[1].set_result(now)

        consumer = asyncio.create_task(consume(), name="disk-name watch")
        took: list[float] = []
        try:
            for k in range(c):
                i = (k // 2) % d
                disk = f"d{i}"
                done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
                if k % 2 == 0:  # the chunk dies
                    waiting[disk] = ({"status": "down"}, done)
                    started = time.perf_counter()
                    await client.unregister(chunk_name(i, gen[i]))
                else:  # and comes back at a new address
                    gen[i] += 1
                    name = chunk_name(i, gen[i])
                    waiting[disk] = ({"status": "up", "addr": name}, done)
                    started = time.perf_counter()
                    await client.register(name, chunk_attrs(i), lease=lease)
                seen = await bounded(
                    asyncio.shield(done), CHANGE_TIMEOUT_S, f"{disk} follows change {k}"
                )
                del waiting[disk]
                took.append((seen - started) * 1000)
        finally:
            consumer.cancel()
            await watch.close()
        return {"convergence.p50": percentile(took, 50), "convergence.p99": percentile(took, 99)}

    return Workload("convergence", rows, measure, prepare=prepare, sides=(GERYON,), timeout=120.0)


def resync_workload(sizes: Sizes) -> Workload:
    """Full resync: forced passes of an in-process Reconciler, each round on
    an empty registry."""
    r = sizes.resync_disks
    rows = (
        Row(
            "resync.first",
            f"reconciler: full resync of {r:,} disk names, first pass (creates {r:,})",
            "ms",
            better="lower",
        ),
        Row(
            "resync.noop",
            f"reconciler: full resync of {r:,} disk names, nothing to change",
            "ms",
            better="lower",
        ),
    )

    async def measure(bench: Bench, side: Side) -> dict[str, float]:
        address = side.address  # type: ignore[attr-defined]
        ndb = bench.tmp / "resync.ndb"
        ndb.write_text(ndb_text(r, "r"))
        conns = await connections(side, sizes.concurrency)
        try:
            hosts = -(-r // CHUNKS_PER_HOST)
            leases = [(await conns[0].grant(LEASE_TTL_MS / 1000))[0] for _ in range(hosts)]

            async def put(conn: Conn, i: int) -> None:
                await conn.put(chunk_name(i, 0), chunk_attrs(i), leases[i // CHUNKS_PER_HOST])

            await spread(conns, list(range(r)), put)
        finally:
            await close_all(conns)
        async with Client(address, user=MANAGED_VALUE, own_connection=True) as client:
            rec = Reconciler(client, ndb, failback="auto")
            t0 = time.perf_counter()
            first = await rec.reconcile(force_read=True)
            t1 = time.perf_counter()
            second = await rec.reconcile(force_read=True)
            t2 = time.perf_counter()
        if (first.disks, first.changes, first.failed) != (r, r, 0) or second.changes:
            raise AssertionError(f"bench: resync passes did {first} then {second}")
        return {"resync.first": (t1 - t0) * 1000, "resync.noop": (t2 - t1) * 1000}

    return Workload("resync", rows, measure, sides=(GERYON,), reset_each_round=True, timeout=120.0)
