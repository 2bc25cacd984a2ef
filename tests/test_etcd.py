"""The etcd store with several fronts: real geryon-registryd processes over a
real three-member etcd cluster on loopback.

What a user of several fronts counts on: a write acknowledged by one front is
read through any other at once; fenced updates through both lose nothing; a
client whose front is killed moves to another with its lease and its watch,
losing and repeating nothing; the etcd leader's death loses no acknowledged
write and no lease; a front that loses etcd says so (UNAVAILABLE,
NOT_SERVING) and comes back by itself; fronts compact etcd's history
together, one at a time.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from conftest import (
    BIN,
    Registry,
    events_of,
    eventually,
    gone,
    progressed,
    watching,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from geryon import errors, localetcd, tls
from geryon.client import Client
from geryon.convert import pb, pb_grpc
from geryon.model import EventType
from geryon.store.etcd_rpc import Etcd, epb


@pytest.fixture
def backend() -> str:
    return "etcd"


@pytest.fixture
def cluster(etcd_cluster_factory: Callable[..., localetcd.Cluster]) -> localetcd.Cluster:
    """A three-member cluster of this test's own, for tests that kill its
    members or compact its history."""
    return etcd_cluster_factory()


def fronts(start_registry: Callable[..., Registry], n: int = 2, **kw: object) -> list[Registry]:
    return [start_registry(f"front{i}", **kw) for i in range(n)]


def both(a: Registry, b: Registry) -> str:
    return f"{a.address},{b.address}"


def using(c: Client) -> str:
    """The address of the endpoint ``c`` uses now."""
    return c.targets[c.endpoint()[0]]


async def test_a_write_through_one_front_is_read_through_the_other_at_once(
    start_registry: Callable[..., Registry],
) -> None:
    a, b = fronts(start_registry)
    async with a.client() as ca, b.client() as cb:
        for i in range(60):
            writer, reader = (ca, cb) if i % 2 else (cb, ca)
            s = await writer.register(f"svc{i}", {"i": str(i), "k": "v"}, persist=True)
            # No wait, no retry: the other front's answer already shows it.
            assert await reader.get(f"svc{i}") == s
            found, revision = await reader.find({"i": str(i)})
            assert found == [s] and revision >= s.mod_revision
            u = await reader.update(f"svc{i}", {"k": f"w{i}"})
            assert (await writer.get(f"svc{i}")).attrs["k"] == f"w{i}"
            assert u.mod_revision > s.mod_revision
            if i % 3 == 0:
                await writer.unregister(f"svc{i}")
                with pytest.raises(errors.NotFound):
                    await reader.get(f"svc{i}")
        lease = await ca.grant(60_000)
        assert [x.id for x in await cb.leases()] == [lease]
        await cb.register("tcp!l!1", {}, lease=lease)  # a lease granted through the other
        assert await cb.revoke(lease) == 1
        assert (await ca.find(prefix="tcp!l!"))[0] == []


async def test_writes_outside_the_prefix_do_not_hold_reads_back(
    start_registry: Callable[..., Registry], etcd_cluster: localetcd.Cluster
) -> None:
    # Other users of the same etcd move its revision; no event of theirs
    # ever reaches this front's watch, and its reads must not wait for one.
    front = start_registry(extra=["--etcd-timeout", "3"])
    other = Etcd(etcd_cluster.endpoints.split(","))
    try:
        async with front.client(retry_for=1) as c:
            s = await c.register("d0", {"a": "1"}, persist=True)
            for i in range(5):
                r = await other.txn(
                    success=[
                        epb.RequestOp(
                            request_put=epb.PutRequest(key=b"/elsewhere/x", value=b"%d" % i)
                        )
                    ]
                )
                assert r.succeeded
                assert await c.get("d0") == s
                found, revision = await c.find({"a": "1"})
                assert found == [s] and revision >= r.header.revision
    finally:
        await other.close()


async def test_fenced_updates_through_both_fronts_lose_nothing(
    start_registry: Callable[..., Registry],
) -> None:
    a, b = fronts(start_registry)
    workers, rounds = 8, 15
    async with a.client() as ca, b.client() as cb:
        await ca.register("counter", {"n": "0"}, persist=True)

        async def increment(c: Client, who: int) -> int:
            conflicts = 0
            for _ in range(rounds):
                while True:
                    s = await c.get("counter")
                    n = int(s.attrs["n"])
                    try:
                        await c.update(
                            "counter", {"n": str(n + 1)}, expected_mod_revision=s.mod_revision
                        )
                        break
                    except errors.FailedPrecondition:
                        conflicts += 1
            # And one entry each, registered concurrently through both.
            await c.register(f"worker{who}", {"w": "1"}, persist=True)
            return conflicts

        conflicts = await asyncio.gather(
            *(increment(ca if i % 2 else cb, i) for i in range(workers))
        )
        assert (await ca.get("counter")).attrs["n"] == str(workers * rounds)
        assert (await cb.get("counter")).attrs["n"] == str(workers * rounds)
        assert len((await cb.find({"w": "1"}))[0]) == workers
        # Each front refused stale updates (by the hundred in practice, so
        # this is no gamble), and yet none of the increments was lost.
        through_a, through_b = sum(conflicts[1::2]), sum(conflicts[0::2])
        assert through_a > 0 and through_b > 0, conflicts


async def test_a_client_moves_from_a_killed_front_losing_and_repeating_nothing(
    start_registry: Callable[..., Registry],
) -> None:
    a, b = fronts(start_registry)
    # The holder and the watcher prefer front a; the writer uses b.
    async with (
        Client(both(a, b)) as holder,
        b.client() as writer,
        holder.lease(15_000) as lease,
    ):
        for i in range(3):
            await holder.register(f"tcp!held!{i}", {"svc": "held"}, lease=lease.id)
        _, start = await writer.find()
        watch = holder.watch(start_revision=start + 1, progress_interval_ms=100)
        async with watching(watch) as got:
            written = []
            for i in range(10):
                written.append(await writer.register(f"w{i}", {"i": str(i)}, persist=True))
            await eventually(lambda: len(events_of(got)) >= 10)
            assert using(holder) == a.address

            a.kill9()  # no goodbye: the front cannot end anything
            for i in range(10, 30):
                written.append(await writer.register(f"w{i}", {"i": str(i)}, persist=True))
                await asyncio.sleep(0.02)  # spread the writes over the move
            # Nothing spurious either: the watch vouches for every revision
            # up to the present one (a progress notice) before we compare.
            _, now = await writer.find()
            await eventually(lambda: progressed(got) >= now, timeout=20)
            await eventually(lambda: lease.connected.is_set(), timeout=20)

            # Every write exactly once, in order; nothing about the held entries.
            events = events_of(got)
            assert [(e.type, e.service) for e in events] == [(EventType.PUT, s) for s in written]
            assert using(holder) == b.address
            assert not lease.lost.is_set() and lease.breaks >= 1
            held, _ = await writer.find({"svc": "held"})
            assert [s.name for s in held] == [f"tcp!held!{i}" for i in range(3)]
        # The lease's stream is now on b: its end there ends the lease.
        await lease.close(revoke=False)
        await eventually(lambda: gone(writer, "held"), timeout=10)


async def test_a_lease_holder_leaves_a_frozen_front_in_time(
    start_registry: Callable[..., Registry],
) -> None:
    # SIGSTOP: a frozen host, a partition with no reset; its connections stay
    # open. The client must not wait for them to time out (a minute) but
    # renew through the other front while the lease lives.
    a, b = fronts(start_registry)
    async with (
        Client(both(a, b)) as holder,
        b.client() as other,
        holder.lease(10_000) as lease,
    ):
        await holder.register("tcp!held!1", {"svc": "held"}, lease=lease.id)
        assert using(holder) == a.address  # it renews through a until a freezes
        a.signal(signal.SIGSTOP)
        try:
            await eventually(lambda: using(holder) == b.address, timeout=15)
            await eventually(lambda: lease.connected.is_set(), timeout=15)
            # Past the TTL, measured by the lease itself: its remaining time,
            # read through b, rises at each renewal. The client renews every
            # TTL/3, so three rises seen after the first renewal through b
            # come at least a TTL after it, and so after the freeze: without
            # them the lease would have expired.
            remaining: list[int] = []

            async def renewed_three_times() -> bool:
                mine = [x for x in await other.leases() if x.id == lease.id]
                assert mine and mine[0].remaining_ms > 0, f"the lease ended: {remaining}"
                remaining.append(mine[0].remaining_ms)
                return sum(y > x for x, y in itertools.pairwise(remaining)) >= 3

            await eventually(renewed_three_times, timeout=30, interval=0.2)
            assert not lease.lost.is_set()
            assert [s.name for s in (await other.find({"svc": "held"}))[0]] == ["tcp!held!1"]
        finally:
            a.signal(signal.SIGCONT)


async def test_the_etcd_leader_killed_under_writes_loses_nothing(
    start_registry: Callable[..., Registry], cluster: localetcd.Cluster
) -> None:
    front = start_registry("front", etcd=cluster.endpoints, prefix="/ha/")
    async with front.client(retry_for=30) as c, c.lease(10_000) as lease:
        await c.register("tcp!kept!1", {"svc": "kept"}, lease=lease.id)
        acked: list[str] = []
        stop = asyncio.Event()

        async def write(w: int) -> None:
            i = 0
            while not stop.is_set():
                name = f"w{w}-{i}"
                await c.register(name, {"w": str(w)}, persist=True)
                acked.append(name)
                i += 1

        writers = [asyncio.create_task(write(w)) for w in range(4)]
        try:
            await eventually(lambda: len(acked) >= 40, timeout=20)
            cluster.leader().kill9()
            before = len(acked)
            # Writes resume once the others elect a leader.
            await eventually(lambda: len(acked) >= before + 40, timeout=30)
            stop.set()
            await asyncio.gather(*writers)
        finally:
            for w in writers:
                w.cancel()
            await asyncio.gather(*writers, return_exceptions=True)

        found = {s.name for s in (await c.find(prefix="w"))[0]}
        assert set(acked) <= found, f"lost: {sorted(set(acked) - found)[:5]}"
        assert not lease.lost.is_set()
        assert [s.name for s in (await c.find({"svc": "kept"}))[0]] == ["tcp!kept!1"]


async def test_a_front_that_loses_etcd_is_unavailable_and_comes_back(
    start_registry: Callable[..., Registry], cluster: localetcd.Cluster
) -> None:
    front = start_registry(
        "front", etcd=cluster.endpoints, prefix="/lost/", extra=["--etcd-timeout", "1"]
    )
    async with (
        grpc.aio.insecure_channel(front.address) as channel,
        # Longer than the front's --etcd-timeout, so its answer comes in time.
        front.client(retry_for=3) as c,
    ):
        health = health_pb2_grpc.HealthStub(channel)

        async def status() -> int:
            r = await health.Check(health_pb2.HealthCheckRequest(service="geryon.v1.Registry"))
            return r.status

        await c.register("d0", {"a": "1"}, persist=True)
        raw = pb_grpc.RegistryStub(channel).Watch()
        try:
            async with watching(c.watch()) as got:
                assert (await eventually(lambda: got))[0].kind == "progress"
                await raw.write(pb.WatchRequest(create_request=pb.WatchCreateRequest()))
                assert (await raw.read()).type == pb.WatchResponse.TYPE_PROGRESS
                assert await status() == health_pb2.HealthCheckResponse.SERVING

                for m in cluster.members:
                    m.kill9()
                with pytest.raises(errors.Unavailable):
                    await c.get("d0")
                with pytest.raises(errors.Unavailable):
                    await c.register("d1", {}, persist=True)
                await eventually(
                    lambda: _is(status, health_pb2.HealthCheckResponse.NOT_SERVING), timeout=15
                )
                # Its watch streams end, so their clients try elsewhere.
                with pytest.raises(grpc.aio.AioRpcError) as cut:
                    await asyncio.wait_for(raw.read(), 15)
                assert cut.value.code() == grpc.StatusCode.UNAVAILABLE

                for m in cluster.members:
                    cluster.restart(m)
                cluster.wait_ready()
                await eventually(
                    lambda: _is(status, health_pb2.HealthCheckResponse.SERVING), timeout=30
                )
                async with front.client(retry_for=10) as again:
                    assert (await again.get("d0")).attrs == {"a": "1"}
                    d1 = await again.register("d1", {}, persist=True)
                # The client library's watch came back by itself, up to d1.
                await eventually(lambda: got[-1].revision >= d1.mod_revision, timeout=30)
        finally:
            raw.cancel()


async def _is(status: Callable, want: int) -> bool:
    try:
        return await status() == want
    except grpc.aio.AioRpcError:
        return False


async def test_fronts_compact_etcds_history_together_one_at_a_time(
    start_registry: Callable[..., Registry], cluster: localetcd.Cluster
) -> None:
    # A cluster of its own: compaction is etcd-wide, not per prefix.
    extra = ["--history", "10", "--etcd-compact-interval", "0.3"]
    a, b = fronts(start_registry, etcd=cluster.endpoints, extra=extra)
    async with a.client() as ca, b.client() as cb:
        first = await ca.register("s", {"n": "0"}, persist=True)
        revisions = [first.mod_revision]
        for i in range(1, 60):
            s = await random.choice((ca, cb)).update("s", {"n": str(i)})
            revisions.append(s.mod_revision)

        # Every front refuses the compacted past alike, naming the same
        # oldest: the 10th newest event's revision (--history 10).
        keep = revisions[-10]
        await eventually(lambda: _out_of_range_at((a, b), first.mod_revision, keep), timeout=15)
        # A front started now, on compacted history, says the same (once its
        # history window has filled, which it may serve before).
        c = start_registry("front2", etcd=cluster.endpoints, extra=extra)
        await eventually(lambda: _out_of_range_at((c,), first.mod_revision, keep), timeout=15)
        # A watch from the oldest held works on every front, and replays the rest.
        for front in (a, b, c):
            async with front.client() as client:
                _, now = await client.find()
                w = client.watch({"n": "*"}, start_revision=keep, progress_interval_ms=100)
                async with watching(w) as got:
                    await eventually(lambda got=got, now=now: got and got[-1].revision >= now)
                assert [e.revision for e in events_of(got)] == revisions[-10:], front.address
    # Each compaction was done by exactly one front.
    done = re.findall(r"compacted etcd's history to revision (\d+)", a.log() + b.log())
    assert done and len(done) == len(set(done))


async def _oldest(front: Registry, start: int) -> int:
    """The resume revision a watch from ``start`` is refused with (0: not refused)."""
    async with front.client() as client:
        call = pb_grpc.RegistryStub(client.channel).Watch()
        create = pb.WatchCreateRequest(start_revision=start)
        await call.write(pb.WatchRequest(create_request=create))
        try:
            await call.read()
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.OUT_OF_RANGE:
                return int(dict(exc.trailing_metadata())["geryon-resume-revision"])
        finally:
            call.cancel()
    return 0


async def _out_of_range_at(fronts: tuple[Registry, ...], start: int, want: int) -> bool:
    return all([await _oldest(r, start) == want for r in fronts])


async def test_etcd_over_mutual_tls(
    tmp_path: Path,
    start_registry: Callable[..., Registry],
    etcd_cluster_factory: Callable[..., localetcd.Cluster],
) -> None:
    """--etcd-tls-dir: the front proves itself to every member of etcd with a
    certificate from the cluster CA, and checks theirs."""
    tls.init_ca(tmp_path / "ca")
    etcd_id = tls.issue(tmp_path / "ca", "etcd", role="server", out=tmp_path / "etcd-id")
    front_id = tls.issue(tmp_path / "ca", "front", role="server", out=tmp_path / "front-id")
    cluster = etcd_cluster_factory(tls_dir=etcd_id)
    front = start_registry(
        "front",
        etcd=cluster.endpoints,
        prefix="/tls/",
        extra=["--etcd-tls-dir", str(front_id)],
    )
    async with front.client() as c:
        await c.register("d0", {"a": "1"}, persist=True)
        assert (await c.get("d0")).attrs == {"a": "1"}
    # Without a certificate etcd refuses the front: a one-line error.
    with pytest.raises(AssertionError, match="exited 1"):
        start_registry(
            "plain", etcd=cluster.endpoints, prefix="/tls/", extra=["--log-level", "error"]
        )
    log = (tmp_path / "plain.log").read_text()
    assert log.strip().splitlines()[-1].startswith("geryon-registryd: etcd ")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--etcd", "nope"], "--etcd: bad address 'nope'"),
        (["--etcd", "127.0.0.1:1", "--data-dir", "x"], "--data-dir is for the embedded store"),
        (["--etcd", "127.0.0.1:1", "--etcd-prefix", "geryon"], "--etcd-prefix: want /PATH/"),
        (["--etcd-tls-dir", "x"], "--etcd-tls-dir: needs --etcd"),
        (["--etcd", "127.0.0.1:1,127.0.0.1:1"], "names an address twice"),
    ],
)
def test_bad_etcd_flags_are_one_line_usage_errors(args: list[str], says: str) -> None:
    r = subprocess.run(
        [str(BIN / "geryon-registryd"), "--listen", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 2
    assert says in r.stderr.splitlines()[-1] and "Traceback" not in r.stderr
