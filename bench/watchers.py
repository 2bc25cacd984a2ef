"""A client process holding watchers, for the fan-out workload.

    python -m bench.watchers geryon|etcd HOST:PORT PREFIX WATCHERS EVENTS

It opens WATCHERS watches of PREFIX, each on its own TCP connection and its
own Watch stream, prints "watching" once the server has confirmed them all,
and then reads until every watcher holds EVENTS events. It prints

    done LAST_S MESSAGES

where LAST_S is ``time.monotonic()`` when its last watcher finished (the
clock is the system's, so the benchmark compares it with its own) and
MESSAGES how many event messages its watchers read in all. The fan-out
workload runs several, so that 1,000 watchers are not read by one Python
event loop slower than the server under test.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.core import Conn, Watch, bounded, close_all, connections

LIFETIME_S = 300.0


class _Address:
    """What ``connections`` needs of a Side: a fresh Conn per call."""

    def __init__(self, server: str, address: str) -> None:
        if server == "etcd":
            from bench.etcd_side import EtcdConn as conn
        else:
            from bench.geryon_side import GeryonConn as conn  # type: ignore[assignment]
        self.conn, self.address = conn, address

    def connect(self) -> Conn:
        return self.conn(self.address)


async def watch(server: str, address: str, prefix: str, n: int, events: int) -> None:
    conns = await connections(_Address(server, address), n)  # type: ignore[arg-type]
    watches: list[Watch] = [c.watch(prefix) for c in conns]
    messages = 0
    last = 0.0

    async def consume(w: Watch) -> None:
        nonlocal messages, last
        got = 0
        async for batch in w.batches():
            got += len(batch)
            messages += 1
            if got >= events:
                break
        if got != events:
            raise AssertionError(f"bench.watchers: a watcher got {got} of {events} events")
        last = max(last, time.monotonic())

    try:
        await bounded(asyncio.gather(*(w.started() for w in watches)), 30, "watches start")
        print("watching", flush=True)
        await bounded(asyncio.gather(*(consume(w) for w in watches)), LIFETIME_S, "events")
        print(f"done {last:.6f} {messages}", flush=True)
    finally:
        for w in watches:
            w.close()
        await close_all(conns)


def main() -> None:
    p = argparse.ArgumentParser(prog="bench.watchers", description=__doc__)
    p.add_argument("server", choices=["geryon", "etcd"])
    p.add_argument("address")
    p.add_argument("prefix")
    p.add_argument("watchers", type=int)
    p.add_argument("events", type=int)
    args = p.parse_args()
    asyncio.run(watch(args.server, args.address, args.prefix, args.watchers, args.events))


if __name__ == "__main__":
    main()
