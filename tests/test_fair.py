"""Fair queuing between identities: geryon.fair without a network, and a
real registry beside real flooding processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Registry

from geryon import errors
from geryon.fair import FairQueue


async def hold(q: FairQueue, who: str, log: list[str], release: asyncio.Event) -> None:
    async with q.turn(who, "write"):
        log.append(who)
        await release.wait()


async def test_without_a_sparse_identity_nothing_waits() -> None:
    q, log, release = FairQueue(), [], asyncio.Event()
    tasks = [asyncio.create_task(hold(q, "bulk", log, release)) for i in range(100)]
    await asyncio.sleep(0)
    assert len(log) == 100  # a bulk load, nobody to protect: flat out
    release.set()
    await asyncio.gather(*tasks)
    assert q.flows == {}


async def test_a_sparse_identity_is_served_at_once_and_busy_ones_in_turn() -> None:
    q, log, release = FairQueue(), [], asyncio.Event()
    first = [asyncio.create_task(hold(q, who, log, release)) for who in ("a", "b")]
    await asyncio.sleep(0)
    sparse = asyncio.create_task(hold(q, "polite", log, release))  # beside others
    await asyncio.sleep(0)
    assert log == ["a", "b", "polite"]
    # From now on the busy identities wait their turns, in turn.
    more = [asyncio.create_task(hold(q, who, log, release)) for who in "aaaabb"]
    await asyncio.sleep(0)
    assert log == ["a", "b", "polite"] and list(q.turns) == ["a", "b"]
    again = asyncio.create_task(hold(q, "polite2", log, release))
    await asyncio.sleep(0)
    assert log[-1] == "polite2"  # a sparse one never waits behind them
    async with asyncio.timeout(10):  # paced, never starved
        while len(log) < 10:
            await asyncio.sleep(0.01)
    assert log[4:] == ["a", "b", "a", "b", "a", "a"]
    release.set()
    await asyncio.gather(*first, sparse, *more, again)
    assert q.flows == {} and not q.turns


async def test_too_many_waiting_is_refused_and_a_cancelled_wait_leaves_nothing() -> None:
    q, log, release = FairQueue(max_waiting=3), [], asyncio.Event()
    busy = asyncio.create_task(hold(q, "a", log, release))
    await asyncio.sleep(0)
    polite = asyncio.create_task(hold(q, "polite", log, release))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(hold(q, "a", log, release)) for _ in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(errors.ResourceExhausted, match="a has 3 writes waiting"):
        await hold(q, "a", log, release)
    for t in waiting:
        t.cancel()
    await asyncio.sleep(0)  # their futures are cancelled; their handlers have not run
    assert not q._admit_next()  # the pacer passes over them first
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results), results
    assert len(q.flows["a"].waiting) == 0 and "a" not in q.turns
    release.set()
    await asyncio.gather(busy, polite)
    assert q.flows == {}


def flooder(registry: Registry, name: str, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.flood", "--flooder", registry.address, "", name,
         str(seconds)],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip


async def test_a_polite_node_keeps_writing_beside_flooders(registry: Registry) -> None:
    """Two processes keep 64 writes each in flight; a node writing one at a
    time beside them gets every write through, and at least a fair share."""
    floods = [flooder(registry, f"flood{i}", 6) for i in range(2)]
    try:
        for f in floods:
            assert f.stdout is not None and f.stdout.readline().strip() == "flooding"
        await asyncio.sleep(1)
        from bench.flood import write_loop

        polite = await write_loop(registry.address, None, "polite", 3, 1)
        results = [json.loads(f.communicate(timeout=60)[0].splitlines()[-1]) for f in floods]
    finally:
        for f in floods:
            f.kill()
    assert polite["failed"] == 0 and polite["refused_s"] == 0
    for r in results:
        assert r["ok_s"] > 0 and r["failed"] == 0  # paced, not starved nor timed out
        # One write at a time against 64: before fair queuing it got a tenth
        # of a flooder's; now at least as many as half of one.
        assert polite["ok_s"] >= 0.5 * r["ok_s"], (polite, results)
