"""The etcd store in-process, and its etcd client (geryon.store.etcd_rpc),
against the session's real three-member etcd cluster."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from conftest import eventually, free_port

from geryon import localetcd
from geryon.errors import GeryonError, OutOfRange
from geryon.model import Caller
from geryon.store import Limits
from geryon.store.etcd import EtcdStore
from geryon.store.etcd_rpc import Etcd


async def test_many_leases_renew_at_once_on_one_stream(etcd_cluster: localetcd.Cluster) -> None:
    """Every front renews all its clients' leases over one KeepAlive stream:
    renewals asked for at the same moment all get their answer, and one
    given up half-way (its client went away) costs the others nothing."""
    etcd = Etcd(etcd_cluster.endpoints.split(","))
    try:
        leases = [lid for lid, _ in await asyncio.gather(*(etcd.grant(10) for _ in range(40)))]
        for _ in range(3):
            ttls = await asyncio.gather(*(etcd.keepalive(lid) for lid in leases))
            assert all(ttl > 0 for ttl in ttls)
        gone = asyncio.create_task(etcd.keepalive(leases[0]))
        others = asyncio.gather(*(etcd.keepalive(lid) for lid in leases[1:]))
        await asyncio.sleep(0)
        gone.cancel()
        assert all(ttl > 0 for ttl in await others)
        assert await etcd.keepalive(leases[0]) > 0
        for lid in leases:
            await etcd.revoke(lid)
        assert await etcd.keepalive(leases[0]) == 0  # gone: etcd answers TTL 0
    finally:
        await etcd.close()


async def test_a_front_whose_watch_fell_behind_compaction_relists(
    etcd_cluster_factory: Callable[..., localetcd.Cluster],
) -> None:
    """A front cut off from etcd while another writes and compacts cannot
    resume its watch: it lists afresh, serves the new state, and tells its
    watchers to re-list (OUT_OF_RANGE)."""
    cluster = etcd_cluster_factory()
    only, *others = cluster.members
    limits = Limits(history_events=5)
    # a knows one member, which goes away while b, over the others, writes
    # and compacts; it comes back having applied the compaction.
    a = await EtcdStore.open([only.address], prefix="/relist/", limits=limits, compact_interval=0)
    b = await EtcdStore.open(
        [m.address for m in others], prefix="/relist/", limits=limits, compact_interval=0
    )
    told: list[GeryonError] = []
    a.on_lost.append(told.append)
    admin = Caller("admin")
    try:
        await a.register("before", {"k": "v"}, lease=0, persist=True, caller=admin)
        only.kill9()
        for i in range(20):
            await b.register(f"after{i}", {"k": "v"}, lease=0, persist=True, caller=admin)
        await b.unregister("before", expected_mod_revision=0, caller=admin)
        assert await eventually(b.compact, timeout=20)
        await eventually(lambda: a.unavailable() is not None, timeout=30)  # a says so
        await asyncio.to_thread(cluster.restart, only)
        await eventually(lambda: any(isinstance(e, OutOfRange) for e in told), timeout=30)
        names, _ = await a.read(lambda: sorted(a.services))
        assert names == sorted(f"after{i}" for i in range(20))
    finally:
        await a.close()
        await b.close()


async def test_a_front_that_reaches_no_etcd_fails_to_start() -> None:
    """The start's deadline moves only as pages of the list arrive: with no
    etcd answering, opening still fails, naming what it could not reach."""
    port = free_port()
    try:
        await EtcdStore.open([f"127.0.0.1:{port}"], give_up_after=0.5, start_timeout=1.0)
    except GeryonError as exc:
        assert exc.code == "UNAVAILABLE" and "not reachable in 1s" in exc.message
    else:
        raise AssertionError("a front started with no etcd")
