"""Lease churn: leases granted, renewed once and revoked, 1 client and N
concurrent, each client on its own connection with one KeepAlive stream open
for all its leases (as a real client keeps one). A lease is three round trips;
the Geryon/echo fraction counts them."""

from __future__ import annotations

from bench.core import (
    Bench,
    Conn,
    KeepAlive,
    Row,
    Side,
    Sizes,
    Workload,
    close_all,
    connections,
    spread,
)

TTL_S = 10.0


def workload(sizes: Sizes) -> Workload:
    c = sizes.concurrency
    rows = (
        Row(
            "churn.1",
            f"lease churn: {sizes.churn_1:,} leases, 1 client",
            "leases/s",
            echo="echo.1",
            rpcs=3,
        ),
        Row(
            "churn.n",
            f"lease churn: {sizes.churn:,} leases, {c} clients",
            "leases/s",
            echo="echo.n",
            rpcs=3,
        ),
    )

    async def churn(pair: tuple[Conn, KeepAlive], _: int) -> None:
        conn, stream = pair
        lease, _ttl = await conn.grant(TTL_S)
        if await stream.renew(lease) <= 0:
            raise AssertionError(f"bench: lease {lease} lost at once")
        await conn.revoke(lease)

    async def measure(bench: Bench, side: Side) -> dict[str, float]:
        out = {}
        for key, clients, count in (("churn.1", 1, sizes.churn_1), ("churn.n", c, sizes.churn)):
            conns = await connections(side, clients)
            streams = [await conn.keepalive() for conn in conns]
            try:
                pairs = list(zip(conns, streams, strict=True))
                out[key] = count / await spread(pairs, list(range(count)), churn)
            finally:
                for s in streams:
                    s.close()
                await close_all(conns)
        return out

    return Workload("churn", rows, measure)
