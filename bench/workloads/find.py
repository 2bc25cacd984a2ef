"""Find throughput: the services with svc=rstyx among all of them, 1 client.
Geryon answers from its attribute index; etcd has none, so its users range
over the prefix and filter on the client, which is what this does."""

from __future__ import annotations

import time

from bench.core import (
    REGISTRIES,
    Bench,
    Conn,
    Row,
    Side,
    Sizes,
    Workload,
    close_all,
    connections,
    service,
    spread,
)


def workload(sizes: Sizes) -> Workload:
    n = sizes.services
    rows = (
        Row(
            "find",
            f"find svc=rstyx ({sizes.rstyx} of {n:,}), 1 client",
            "finds/s",
            echo="echo.1",
        ),
    )

    async def prepare(bench: Bench, side: Side) -> None:
        conns = await connections(side, sizes.concurrency)
        try:

            async def put(conn: Conn, i: int) -> None:
                await conn.put(*service(i, n, sizes.rstyx))

            await spread(conns, list(range(n)), put)
        finally:
            await close_all(conns)

    async def measure(bench: Bench, side: Side) -> dict[str, float]:
        (conn,) = await connections(side, 1)
        try:
            found = await conn.find("svc", "rstyx")
            if len(found) != sizes.rstyx:
                raise AssertionError(
                    f"bench: {side.name} found {len(found)} rstyx, not {sizes.rstyx}"
                )
            count = 0
            started = time.perf_counter()
            until = started + sizes.find_seconds
            while (now := time.perf_counter()) < until:
                await conn.find("svc", "rstyx")
                count += 1
            return {"find": count / (now - started)}
        finally:
            await conn.close()

    return Workload("find", rows, measure, prepare=prepare, sides=REGISTRIES)
