"""Watch fan-out: W watchers of one prefix, each on its own TCP connection and
its own Watch stream (on both servers; etcd could multiplex watchers on one
stream, Geryon has one watch per stream), spread over a few client processes
(bench/watchers.py) so that the clients are not what is measured, while N
writers on N connections make U updates. Timed from the first update sent
until every watcher holds every event; reported as events delivered per
second (W x U / that time). A row per watcher count, to show how the fan-out
scales; the events per message each side sent are noted under the table."""

from __future__ import annotations

import sys
import time

from bench import procs
from bench.core import (
    ETCD,
    REGISTRIES,
    Bench,
    Conn,
    Row,
    Side,
    Sizes,
    Workload,
    close_all,
    connections,
    spread,
)

PREFIX = "fan!"
NAMES = 100  # the updates cycle over this many services
# How long the watcher processes may take to deliver every event.
DELIVERY_S = 120.0


def key(w: int) -> str:
    # 100 watchers keeps the key the single fan-out row had.
    return "fanout" if w == 100 else f"fanout.{w}"


def workload(sizes: Sizes) -> Workload:
    u = sizes.updates
    rows = tuple(
        Row(key(w), f"watch fan-out: {w:,} watchers, {u:,} updates", "events/s", echo="echo.n")
        for w in sizes.watchers
    )

    async def measure(bench: Bench, side: Side) -> dict[str, float]:
        out = {}
        for w in sizes.watchers:
            rate, per_message = await fan_out(bench, side, w, u, sizes)
            out[key(w)] = rate
            bench.note(
                f"fan-out, {side.name}, {w:,} watchers: {per_message:.1f} events per message"
            )
        return out

    # Writers and watchers of the largest count take a while to connect.
    return Workload("fanout", rows, measure, sides=REGISTRIES, timeout=300.0)


async def fan_out(bench: Bench, side: Side, w: int, u: int, sizes: Sizes) -> tuple[float, float]:
    """(events/s, events per message) for ``w`` watchers and ``u`` updates."""
    server = "etcd" if side.name == ETCD else "geryon"
    n = min(sizes.watcher_procs, w)
    helpers = [
        procs.Proc(
            [
                sys.executable,
                "-m",
                "bench.watchers",
                server,
                side.address,  # type: ignore[attr-defined]
                PREFIX,
                str(w // n + (i < w % n)),
                str(u),
            ],
            bench.tmp / f"watchers-{side.name}-{i}.log",
            ready=None,
        )
        for i in range(n)
    ]
    offsets = [h.spawn() for h in helpers]
    writers: list[Conn] = []
    try:
        for h, at in zip(helpers, offsets, strict=True):
            await h.wait_for("watching", at, timeout=60)
        writers = await connections(side, sizes.concurrency)

        # Values new to this run: an update that changes nothing makes no event.
        run = str(time.monotonic_ns())

        async def update(conn: Conn, i: int) -> None:
            await conn.put(f"{PREFIX}{i % NAMES}", {"svc": "fan", "run": run, "seq": str(i)})

        started = time.monotonic()
        await spread(writers, list(range(u)), update)
        last, messages = 0.0, 0
        for h, at in zip(helpers, offsets, strict=True):
            await h.wait_for("\ndone ", at, timeout=DELIVERY_S)
            done = h.output(at).split("\ndone ", 1)[1].split()
            last, messages = max(last, float(done[0])), messages + int(done[1])
        return w * u / (last - started), w * u / messages
    finally:
        for h in helpers:
            h.kill9()
        await close_all(writers)
