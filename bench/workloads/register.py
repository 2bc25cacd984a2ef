"""Registration throughput: services with 4 attributes, under leases of 100
services each (etcd: put with the lease) and persistent (etcd: plain put), 1
client and N concurrent on N connections. Every round starts on an empty
server; the lease grants are not timed."""

from __future__ import annotations

import math

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

LEASE_TTL_S = 300.0  # outlives the workload: nothing renews these leases


def workload(sizes: Sizes) -> Workload:
    n, c = sizes.services, sizes.concurrency
    n1 = sizes.services_1
    cut = f" (not {n:,}: time)" if n1 < n and not sizes.quick else ""
    variants = [
        ("register.leased.1", True, 1, n1),
        ("register.leased.n", True, c, n),
        ("register.persistent.1", False, 1, n1),
        ("register.persistent.n", False, c, n),
    ]
    rows = (
        Row("register.leased.1", f"register {n1:,} leased, 1 client{cut}", "ops/s", echo="echo.1"),
        Row("register.leased.n", f"register {n:,} leased, {c} clients", "ops/s", echo="echo.n"),
        Row(
            "register.persistent.1",
            f"register {n1:,} persistent, 1 client{cut}",
            "ops/s",
            echo="echo.1",
        ),
        Row(
            "register.persistent.n",
            f"register {n:,} persistent, {c} clients",
            "ops/s",
            echo="echo.n",
        ),
    )
    per_lease = max(1, sizes.services // sizes.leases)

    def lease_of(leases: list[int], i: int) -> int:
        return leases[i // per_lease] if leases else 0

    async def measure(bench: Bench, side: Side) -> dict[str, float]:
        out = {}
        for key, leased, clients, count in variants:
            conns = await connections(side, clients)
            try:
                leases = []
                if leased:
                    for _ in range(math.ceil(count / per_lease)):
                        leases.append((await conns[0].grant(LEASE_TTL_S))[0])
                prefix = key.replace(".", "-") + "!"
                items = [
                    (*service(i, count, sizes.rstyx, prefix), lease_of(leases, i))
                    for i in range(count)
                ]

                async def put(conn: Conn, item: tuple[str, dict[str, str], int]) -> None:
                    await conn.put(*item)

                out[key] = count / await spread(conns, items, put)
                for lease in leases:  # deletes their services: the next variant starts clean
                    await conns[0].revoke(lease)
            finally:
                await close_all(conns)
        return out

    return Workload(
        "register", rows, measure, sides=REGISTRIES, reset_each_round=True, timeout=300.0
    )
