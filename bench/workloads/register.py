"""Registration throughput: services with 4 attributes, under leases of 100
services each (etcd: put with the lease) and persistent (etcd: plain put), 1
client and N concurrent on N connections; and in batches, as agents announce:
A agents on A connections, each registering its B services under its own
lease in one RegisterBatch (etcd: one Txn of B puts with the lease), all at
once. Every round starts on an empty server; the lease grants are not timed."""

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
    agents, per_agent = sizes.batch_agents, sizes.batch_size
    rows += (
        Row(
            "register.batch",
            f"register {agents * per_agent:,} leased, {agents} agents x {per_agent} in one call",
            "ops/s",
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
        out["register.batch"] = await batches(side)
        return out

    async def batches(side: Side) -> float:
        """Each agent on its own connection, with its own lease, registers
        its services in one call (etcd: one Txn of puts), all at once."""
        conns = await connections(side, agents)
        try:
            leases = [(await conn.grant(LEASE_TTL_S))[0] for conn in conns]
            items = [
                [
                    (*service(a * per_agent + i, agents * per_agent, sizes.rstyx, "batch!"), lease)
                    for i in range(per_agent)
                ]
                for a, lease in enumerate(leases)
            ]

            async def put(conn: Conn, batch: list[tuple[str, dict[str, str], int]]) -> None:
                await conn.put_batch(batch)

            # One batch per connection: spread gives connection i batch i.
            took = await spread(conns, items, put)
            for conn, lease in zip(conns, leases, strict=True):
                await conn.revoke(lease)
            return agents * per_agent / took
        finally:
            await close_all(conns)

    return Workload(
        "register", rows, measure, sides=REGISTRIES, reset_each_round=True, timeout=300.0
    )
