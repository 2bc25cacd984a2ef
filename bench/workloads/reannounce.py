"""Re-announce (issue 5): node agents holding many services while the registry
is killed with kill -9 and started again on its data, and the death of one
agent. Geryon only.

A agents announce S services each (A x S entries), each agent a real
``geryon.node_agent.Agent`` with its own client and TCP connection to the
real geryon-registryd. Twenty agent processes would crowd a 2-core machine,
so they run in-process in a few helper subprocesses (this module's ``main``);
their services are listeners (``[[listener]]``), which spawn no process until
a connection arrives, so a thousand entries cost a thousand sockets and
nothing else. Each round:

1. The registry gets kill -9 and is started again at once. Timed from the
   kill: until a Find (polled every few milliseconds on fresh connections)
   returns all A x S entries, and until every agent's lease keepalive is
   answered again (each helper prints the monotonic time at which all its
   agents' keepalive streams are back; its poll adds at most POLL_S).
2. A watcher started from the revision read before the kill counts the
   events for those entries up to a revision read SETTLE_S after every lease
   was renewed: a resumed lease means nothing is re-sent, so the goal is 0.
3. A real ``geryon-agent`` process announcing S services gets kill -9; timed
   until a watcher (started before the kill) has seen all S deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import signal
import sys
import time
from pathlib import Path

import grpc

from bench import procs
from bench.core import GERYON, Bench, Row, Side, Sizes, Workload, bounded
from geryon.client import Client
from geryon.convert import pb
from geryon.model import EventType

ATTR, VALUE = "bench", "reannounce"  # on every re-announced entry
DEATH_VALUE = "death"  # on the killed agent's entries
POLL_S = 0.005  # Find polls; the helpers' keepalive-state polls
DEADLINE_S = 30.0  # for each wait in a round
SETTLE_S = 1.0  # watched for events this long after every lease is renewed
READY_TIMEOUT = 60.0  # helpers announcing every service

_CONNECTED = re.compile(r"^connected (\d+) (\S+)$", re.M)


def agent_config_data(registry: str, host: str, services: int, attrs: dict[str, str]) -> dict:
    """An agent config (as TOML would parse it) with ``services`` listeners."""
    return {
        "registry": registry,
        "host": host,
        "advertise": "127.0.0.1",
        "listener": [
            {"addr": "tcp!127.0.0.1!0", "command": ["cat"], "attrs": attrs} for _ in range(services)
        ],
    }


def toml_text(data: dict) -> str:
    """``agent_config_data`` as TOML (for the real geryon-agent)."""
    lines = [f"{k} = {json.dumps(v)}" for k, v in data.items() if k != "listener"]
    for li in data["listener"]:
        attrs = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in li["attrs"].items())
        lines += [
            "",
            "[[listener]]",
            f"addr = {json.dumps(li['addr'])}",
            f"command = {json.dumps(li['command'])}",
            f"attrs = {{ {attrs} }}",
        ]
    return "\n".join(lines) + "\n"


def workload(sizes: Sizes) -> Workload:
    a, s, helpers = sizes.agents, sizes.agent_services, sizes.agent_helpers
    n = a * s
    rows = (
        Row(
            "reannounce.find",
            f"re-announce: {a} agents x {s} services, registry kill -9 until Find has all {n:,}",
            "ms",
            better="lower",
        ),
        Row(
            "reannounce.leases",
            f"re-announce: registry kill -9 until all {a} agents' leases renewed",
            "ms",
            better="lower",
        ),
        Row(
            "reannounce.events",
            f"re-announce: watch events for the {n:,} entries (goal 0)",
            "events",
            better="lower",
        ),
        Row(
            "reannounce.death",
            f"agent with {s} services kill -9 until watcher sees all deleted",
            "ms",
            better="lower",
        ),
    )

    async def prepare(bench: Bench, side: Side) -> None:
        address = side.address  # type: ignore[attr-defined]
        per = -(-a // helpers)
        started: list[procs.Proc] = []
        bench.state["helpers"] = started

        async def stop_helpers() -> None:
            # SIGTERM: each agent revokes its lease and stops, as in production.
            await asyncio.gather(*(asyncio.to_thread(h.stop, 10.0) for h in started))

        bench.cleanups.append(stop_helpers)
        for first in range(0, a, per):
            count = min(per, a - first)
            argv = [
                sys.executable,
                "-c",
                "import sys; from bench.workloads.reannounce import main; main(sys.argv[1:])",
                address,
                str(first),
                str(count),
                str(s),
            ]
            h = procs.Proc(argv, bench.tmp / f"agents-{first}.log", ready=None)
            h.spawn()
            started.append(h)
        for h in started:
            await h.wait_for("agents ready", timeout=READY_TIMEOUT)
        async with Client(address, own_connection=True) as c:
            got, _ = await c.find({ATTR: VALUE})
        if len(got) != n:
            raise AssertionError(f"bench: reannounce: {len(got)} entries announced, want {n}")

    async def find_all(side: Side, deadline: float) -> None:
        while True:
            conn = side.connect()
            try:
                r = await conn.stub.Find(pb.FindRequest(attrs={ATTR: VALUE}), timeout=0.5)
                if len(r.services) == n:
                    return
            except (grpc.aio.AioRpcError, TimeoutError):
                pass
            finally:
                await conn.close()
            if time.perf_counter() > deadline:
                raise TimeoutError(f"bench: Find lacks entries {DEADLINE_S}s after the restart")
            await asyncio.sleep(POLL_S)

    async def leases_back(helpers: list[tuple[procs.Proc, int, int]], deadline: float) -> float:
        """The monotonic time by which every helper's agents were all
        connected again, having first seen the break."""
        while True:
            times = []
            for h, offset, count in helpers:
                seen = [(int(x), float(t)) for x, t in _CONNECTED.findall(h.output(offset))]
                broke = next((i for i, (x, _) in enumerate(seen) if x < count), None)
                if broke is None or seen[-1][0] != count:
                    break
                times.append(seen[-1][1])
            else:
                return max(times)
            if time.perf_counter() > deadline:
                raise TimeoutError(f"bench: agents' leases not renewed {DEADLINE_S}s after restart")
            await asyncio.sleep(POLL_S)

    async def count_events(address: str, since: int) -> int:
        """Events for the entries after revision ``since``, up to now."""
        async with Client(address, own_connection=True) as c:
            _, now = await c.find({ATTR: VALUE})
            watch = c.watch({ATTR: VALUE}, start_revision=since + 1)
            events = 0
            watch.request_progress()
            try:
                async for m in watch:
                    events += len(m.events)
                    if m.revision >= now:
                        return events
                    if m.kind == "progress":
                        await asyncio.sleep(POLL_S)
                        watch.request_progress()
            finally:
                await watch.close()
        raise AssertionError("bench: reannounce watch ended")

    async def agent_death(bench: Bench, side: Side, address: str, r: int) -> float:
        host = f"victim{r}"
        cfg = bench.tmp / f"{host}.toml"
        cfg.write_text(toml_text(agent_config_data(address, host, s, {ATTR: DEATH_VALUE})))
        agent = procs.Proc(
            [str(Path(sys.executable).parent / "geryon-agent"), "--config", str(cfg)],
            bench.tmp / f"{host}.log",
            ready=f"agent {host}: {s} services announced",
        )
        async with Client(address, own_connection=True) as c:
            try:
                await agent.start()
                got, _ = await c.find({"host": host})
                if len(got) != s:
                    raise AssertionError(f"bench: {host}: {len(got)} entries, want {s}")
                watch = c.watch({"host": host})
                it = aiter(watch)
                first = await bounded(anext(it), 10, f"{host} watch start")
                if first.kind != "progress":
                    raise AssertionError(f"bench: {host} watch began with {first.kind}")

                async def deleted() -> float:
                    gone: set[str] = set()
                    async for m in it:
                        gone.update(e.service.name for e in m.events if e.type is EventType.DELETE)
                        if len(gone) >= s:
                            return time.perf_counter()
                    raise AssertionError(f"bench: {host} watch ended")

                started = time.perf_counter()
                agent.kill9()
                seen = await bounded(deleted(), DEADLINE_S, f"{host}'s entries deleted")
                await watch.close()
                return (seen - started) * 1000
            finally:
                agent.kill9()

    async def measure(bench: Bench, side: Side) -> dict[str, float]:
        address = side.address  # type: ignore[attr-defined]
        r = bench.state["round"] = bench.state.get("round", 0) + 1
        per = -(-a // helpers)
        hs = [
            (h, h.log_path.stat().st_size, min(per, a - i * per))
            for i, h in enumerate(bench.state["helpers"])
        ]
        async with Client(address, own_connection=True) as c:
            got, before = await c.find({ATTR: VALUE})
        if len(got) != n:
            raise AssertionError(f"bench: reannounce: {len(got)} entries before the kill")
        started = time.perf_counter()
        started_mono = time.monotonic()  # the helpers' clock
        deadline = started + DEADLINE_S
        side.kill9()
        side.respawn()
        await find_all(side, deadline)
        found = time.perf_counter()
        renewed = await leases_back(hs, deadline)
        await asyncio.sleep(SETTLE_S if not bench.sizes.quick else 0.2)
        events = await bounded(count_events(address, before), DEADLINE_S, "reannounce events")
        death = await agent_death(bench, side, address, r)
        return {
            "reannounce.find": (found - started) * 1000,
            "reannounce.leases": (renewed - started_mono) * 1000,
            "reannounce.events": float(events),
            "reannounce.death": death,
        }

    return Workload("reannounce", rows, measure, prepare=prepare, sides=(GERYON,), timeout=120.0)


# ---- the helper process: COUNT agents in one event loop -----------------------


async def serve(registry: str, first: int, count: int, services: int) -> None:
    from geryon import agent_config, procs
    from geryon.node_agent import Agent

    keeper = procs.Keeper()
    keeper.ensure()
    agents = [
        Agent(
            agent_config.parse(
                agent_config_data(registry, f"agent{i:03d}", services, {ATTR: VALUE}),
                Path(f"agent{i:03d}.toml"),
            ),
            keeper=keeper,
        )
        for i in range(first, first + count)
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for agent in agents:
            await agent.start()
        await asyncio.gather(*(agent.ready.wait() for agent in agents))
        print("agents ready", flush=True)

        def connected() -> int:
            return sum(
                1
                for agent in agents
                if (lease := agent.announcer.lease) is not None and lease.connected.is_set()
            )

        last = -1
        while not stop.is_set():
            now = connected()
            if now != last:
                print(f"connected {now} {time.monotonic():.6f}", flush=True)
                last = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_S)
    finally:
        await asyncio.gather(*(agent.stop() for agent in agents), return_exceptions=True)
        keeper.close()


def main(argv: list[str]) -> None:
    """``REGISTRY FIRST COUNT SERVICES``: run agents FIRST.. FIRST+COUNT-1."""
    logging.basicConfig(format="%(message)s", level=logging.INFO, stream=sys.stderr)
    registry, first, count, services = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    asyncio.run(serve(registry, first, count, services))
