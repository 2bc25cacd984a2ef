"""Watch fan-out: W watchers of one prefix, each on its own TCP connection and
its own Watch stream (on both servers; etcd could multiplex watchers on one
stream, Geryon has one watch per stream), while N writers on N connections
make U updates. Timed from the first update sent until every watcher holds
every event; reported as events delivered per second (W x U / that time)."""

from __future__ import annotations

import asyncio
import time

from bench.core import (
    REGISTRIES,
    Bench,
    Conn,
    Row,
    Side,
    Sizes,
    Watch,
    Workload,
    bounded,
    close_all,
    connections,
    spread,
)

PREFIX = "fan!"
NAMES = 100  # the updates cycle over this many services


def workload(sizes: Sizes) -> Workload:
    w, u = sizes.watchers, sizes.updates
    rows = (
        Row(
            "fanout",
            f"watch fan-out: {w} watchers, {u:,} updates",
            "events/s",
            echo="echo.n",
        ),
    )

    async def measure(bench: Bench, side: Side) -> dict[str, float]:
        writers = await connections(side, sizes.concurrency)
        readers = await connections(side, w)
        watches: list[Watch] = [c.watch(PREFIX) for c in readers]
        try:
            await bounded(asyncio.gather(*(x.started() for x in watches)), 30, "watches start")
            finished: list[float] = []

            async def consume(watch: Watch) -> None:
                got = 0
                async for batch in watch.batches():
                    got += len(batch)
                    if got >= u:
                        break
                if got != u:
                    raise AssertionError(f"bench: a {side.name} watcher got {got} of {u} events")
                finished.append(time.perf_counter())

            consumers = asyncio.gather(*(consume(x) for x in watches))

            async def update(conn: Conn, i: int) -> None:
                await conn.put(f"{PREFIX}{i % NAMES}", {"svc": "fan", "seq": str(i)})

            started = time.perf_counter()
            await spread(writers, list(range(u)), update)
            await bounded(consumers, 60, f"{w} watchers receive {u} events")
            return {"fanout": w * u / (max(finished) - started)}
        finally:
            for x in watches:
                x.close()
            await close_all(readers + writers)

    return Workload("fanout", rows, measure, sides=REGISTRIES)
