"""Death notice: a client process holding a lease (bench/holder.py) is killed
with kill -9; the time until a watcher sees its entry deleted. Geryon ends the
lease when the holder's KeepAlive stream goes away; etcd only when the TTL,
at its minimum, runs out."""

from __future__ import annotations

import re
import time

from bench import procs
from bench.core import REGISTRIES, Bench, Row, Side, Sizes, Workload, bounded


def workload(sizes: Sizes) -> Workload:
    rows = (
        Row(
            "death",
            "death notice: holder kill -9 until delete seen",
            "ms",
            better="lower",
        ),
    )

    async def measure(bench: Bench, side: Side) -> dict[str, float]:
        n = bench.state[side.name] = bench.state.get(side.name, 0) + 1
        name = f"holder!{n}"
        holder = procs.Proc(
            side.holder_argv(name), bench.tmp / f"holder-{side.name}.log", ready="holding"
        )
        offset = holder.spawn()
        conn = side.connect()
        watch = None
        try:
            await holder.wait_for("holding", offset)
            ttl = re.findall(r"holding ttl=(\S+)", holder.output(offset))[-1]
            bench.note(f"death notice: {side.label} holder lease TTL {ttl} s")
            watch = conn.watch(name)
            await watch.started()
            if not await conn.get(name, timeout=10):
                raise AssertionError(f"bench: {side.name}: holder's {name} not registered")

            async def deleted() -> float:
                assert watch is not None
                async for batch in watch.batches():
                    if ("delete", name) in batch:
                        return time.perf_counter()
                raise AssertionError(f"bench: {side.name} watch ended before the delete")

            started = time.perf_counter()
            holder.kill9()
            seen = await bounded(deleted(), 30, f"{side.name} deletes {name}")
            return {"death": (seen - started) * 1000}
        finally:
            holder.kill9()
            if watch is not None:
                watch.close()
            await conn.close()

    return Workload("death", rows, measure, sides=REGISTRIES)
