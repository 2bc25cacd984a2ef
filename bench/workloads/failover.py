"""Failover on Geryon's etcd store (the GERYON_ETCD side only): how long a
client writing without pause goes without an acknowledged write when a part
of the registry dies. Two workloads, each round on a fresh three-member etcd
cluster with two fresh fronts over it:

1. ``failover-front``: the front the client uses gets kill -9. The client is
   ``geryon.client.Client("FRONT1,FRONT2")``, the client library every Geryon
   program uses, which moves to the next endpoint when one fails and retries
   there (with its own backoff). Timed from the kill until the first write
   acknowledged through the other front: the write in flight at the kill,
   retried there, or the next one.
2. ``failover-leader``: the etcd leader (``Cluster.leader()``) gets kill -9,
   with the same two fronts and client. Timed from the kill until the first
   write begun after the kill is acknowledged, through either front. A write
   in flight at the kill counts in full (the next one waits for it), and one
   committed just before the kill but acknowledged just after cannot pass
   for a recovery.

The writer registers one persistent entry again and again with a new value
each time (so each is a real write, never a no-op), one write in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable

from bench.core import GERYON_ETCD, Bench, Row, Side, Sizes, Workload, bounded
from geryon.client import Client

NAME = "failover!writer"
DEADLINE_S = 30.0  # each wait in a round
RETRY_FOR_S = 15.0  # the client's retry bound: longer than a front's --etcd-timeout (5 s)

Ack = tuple[float, float, int]  # (begun, acknowledged, endpoint index), perf_counter seconds


class Writer:
    """One client registering ``NAME`` without pause; every acknowledged
    write is kept with the endpoint it went through."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.acks: list[Ack] = []
        self._more = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        seq = 0
        while True:
            seq += 1
            begun = time.perf_counter()
            await self.client.register(NAME, {"seq": str(seq)}, persist=True)
            done = time.perf_counter()
            self.acks.append((begun, done, self.client.endpoint()[0]))
            self._more.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="failover writer")

    async def first(self, want: Callable[[Ack], bool], after: int = 0) -> Ack:
        """The first acknowledged write from index ``after`` on that ``want``s;
        the writer's error if it gave up."""
        assert self._task is not None
        seen = after
        while True:
            for ack in self.acks[seen:]:
                if want(ack):
                    return ack
            seen = len(self.acks)
            self._more.clear()
            if self._task.done():
                self._task.result()
                raise AssertionError("bench: the failover writer stopped")
            more = asyncio.ensure_future(self._more.wait())
            try:
                await asyncio.wait({more, self._task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                more.cancel()

    async def close(self) -> None:
        """Stop writing and close the client; twice is harmless."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.client.close()


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


async def two_fronts(bench: Bench, side: Side, warm: int) -> Writer:
    """Adds a second front; returns a writer on both that has had ``warm``
    writes acknowledged through the first."""
    second, _ = await side.add_front()  # type: ignore[attr-defined]
    first = side.address  # type: ignore[attr-defined]
    client = Client(f"{first},{second}", own_connection=True, retry_for=RETRY_FOR_S)
    writer = Writer(client)
    bench.cleanups.append(writer.close)  # if the round fails before it closes the writer
    writer.start()
    await bounded(writer.first(lambda a: True, after=warm - 1), DEADLINE_S, "writes before a kill")
    if any(ep != 0 for _, _, ep in writer.acks):
        raise AssertionError("bench: the writer left the first front before any kill")
    return writer


def front_workload(sizes: Sizes) -> Workload:
    row = Row(
        "failover.front",
        "failover: front kill -9 until a write is acked via the other front (etcd store)",
        "ms",
        better="lower",
    )
    warm = 5 if sizes.quick else 50

    async def measure(bench: Bench, side: Side) -> dict[str, float]:
        writer = await two_fronts(bench, side, warm)
        try:
            front = side.fronts[0][1]  # type: ignore[attr-defined]
            before = len(writer.acks)
            killed = time.perf_counter()
            front.kill9()
            # Only an ack after the kill counts (an earlier one via the other
            # front would time a switch the kill did not cause).
            ack = await bounded(
                writer.first(lambda a: a[2] == 1 and a[1] > killed, after=before),
                DEADLINE_S,
                "a write via the other front",
            )
            return {"failover.front": (ack[1] - killed) * 1000}
        finally:
            await writer.close()

    return Workload(
        "failover-front",
        (row,),
        measure,
        sides=(GERYON_ETCD,),
        reset_each_round=True,
        timeout=120.0,
    )


def leader_workload(sizes: Sizes) -> Workload:
    row = Row(
        "failover.leader",
        "failover: etcd leader kill -9 until a write is acked (etcd store)",
        "ms",
        better="lower",
    )
    warm = 5 if sizes.quick else 50

    async def measure(bench: Bench, side: Side) -> dict[str, float]:
        writer = await two_fronts(bench, side, warm)
        try:
            cluster = side.cluster  # type: ignore[attr-defined]
            leader = await asyncio.to_thread(cluster.leader, 10.0)
            killed = time.perf_counter()
            side.kill_member(leader)  # type: ignore[attr-defined]
            ack = await bounded(
                writer.first(lambda a: a[0] > killed), DEADLINE_S, "a write after the leader died"
            )
            took = (ack[1] - killed) * 1000
            say(
                f"failover-leader: killed {leader.name} (leader of "
                f"{', '.join(m.name for m in cluster.members)}); acked via front {ack[2] + 1} "
                f"after {took:,.0f} ms"
            )
            return {"failover.leader": took}
        finally:
            await writer.close()

    return Workload(
        "failover-leader",
        (row,),
        measure,
        sides=(GERYON_ETCD,),
        reset_each_round=True,
        timeout=120.0,
    )
