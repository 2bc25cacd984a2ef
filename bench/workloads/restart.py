"""Restart: kill -9 a server holding many services under leases and start it
again on the same data; the time from the kill until the first read succeeds,
and until a keepalive on every lease succeeds. Reads poll every few
milliseconds on fresh connections, so no client reconnect backoff is timed."""

from __future__ import annotations

import asyncio
import time

import grpc

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
    service,
    spread,
)

LEASE_TTL_S = 300.0
DEADLINE_S = 60.0
POLL_S = 0.005


def workload(sizes: Sizes) -> Workload:
    n, leases = sizes.services, sizes.leases
    rows = (
        Row("restart.read", f"restart with {n:,} services: first read", "ms", better="lower"),
        Row(
            "restart.leases",
            f"restart with {n:,} services: all {leases} leases renewed",
            "ms",
            better="lower",
        ),
    )
    per_lease = max(1, n // leases)

    async def prepare(bench: Bench, side: Side) -> None:
        conns = await connections(side, sizes.concurrency)
        try:
            ids = [(await conns[0].grant(LEASE_TTL_S))[0] for _ in range(leases)]

            async def put(conn: Conn, i: int) -> None:
                name, attrs = service(i, n, sizes.rstyx)
                await conn.put(name, attrs, ids[i // per_lease % leases])

            await spread(conns, list(range(n)), put)
        finally:
            await close_all(conns)
        bench.state[side.name] = {"leases": ids, "probe": service(n - 1, n, sizes.rstyx)[0]}

    async def first_read(side: Side, name: str, deadline: float) -> None:
        while True:
            conn = side.connect()
            try:
                if await conn.get(name, timeout=0.5):
                    return
                raise AssertionError(f"bench: {side.name} lost {name} in the restart")
            except (grpc.aio.AioRpcError, TimeoutError):
                pass
            finally:
                await conn.close()
            if time.perf_counter() > deadline:
                raise TimeoutError(f"bench: {side.name}: no read {DEADLINE_S}s after restart")
            await asyncio.sleep(POLL_S)

    async def renew_all(side: Side, conn: Conn, ids: list[int], deadline: float) -> KeepAlive:
        pending = list(ids)
        while True:
            stream = await conn.keepalive()
            try:
                while pending:
                    if await stream.renew(pending[0]) <= 0:
                        raise AssertionError(f"bench: {side.name} lost lease {pending[0]}")
                    pending.pop(0)
                return stream
            except (grpc.aio.AioRpcError, ConnectionError, TimeoutError):
                stream.close()
            if time.perf_counter() > deadline:
                raise TimeoutError(f"bench: leases not renewable {DEADLINE_S}s after restart")
            await asyncio.sleep(POLL_S)

    async def measure(bench: Bench, side: Side) -> dict[str, float]:
        st = bench.state[side.name]
        # The stream that renewed the leases last round stays open until the
        # kill: closing it would end Geryon's leases (its stream rule).
        held = st.pop("held", None)
        started = time.perf_counter()
        deadline = started + DEADLINE_S
        side.kill9()
        side.respawn()
        await first_read(side, st["probe"], deadline)
        read = time.perf_counter()
        conn = side.connect()
        stream = await renew_all(side, conn, st["leases"], deadline)
        renewed = time.perf_counter()
        st["held"] = (conn, stream)
        if held is not None:
            held[1].close()
            await close_all([held[0]])

        async def close_held() -> None:
            if "held" in st:
                st["held"][1].close()
                await close_all([st["held"][0]])

        if not st.get("cleanup"):
            st["cleanup"] = True
            bench.cleanups.append(close_held)
        return {
            "restart.read": (read - started) * 1000,
            "restart.leases": (renewed - started) * 1000,
        }

    return Workload("restart", rows, measure, prepare=prepare, timeout=180.0)
