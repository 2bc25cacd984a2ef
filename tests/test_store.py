"""Unit tests of geryon.store's SQLite backend (and the lease keeper)
without a network.

Time never passes by itself here: geryon.store.sqlite's ``time`` module is replaced
by a clock the tests move by hand, so lease expiry is tested with explicit
monotonic times and no test sleeps or asserts on the wall clock.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import eventually
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import geryon.leases as leases_mod
import geryon.store.sqlite as store_mod
from geryon.errors import (
    AlreadyExists,
    FailedPrecondition,
    GeryonError,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from geryon.model import Caller, Event, EventType, Filter, Registration, Service
from geryon.store import Limits, Written
from geryon.store.sqlite import SQLiteStore

T = TypeVar("T")

ALICE = Caller("alice", "server")
BOB = Caller("bob", "server")
ROOT = Caller("root", "admin")


class Clock:
    """Stands in for the ``time`` module inside geryon.store.sqlite (and leases)."""

    def __init__(self) -> None:
        self.now = 1000.0  # monotonic
        self.wall = 1_700_000_000.0  # time.time(): event timestamps, history age

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.wall

    def perf_counter(self) -> float:
        return time.perf_counter()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(store_mod, "time", c)
    return c


Opener = Callable[..., Awaitable[SQLiteStore]]


@pytest.fixture
async def open_store(tmp_path: Path, clock: Clock) -> AsyncIterator[Opener]:
    """Open (and reopen) the store in one data dir; every one is closed after."""
    opened: list[SQLiteStore] = []

    async def open_(limits: Limits | None = None) -> SQLiteStore:
        s = await SQLiteStore.open(tmp_path / "data", limits=limits)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        await s.close()  # closing twice is harmless


@pytest.fixture
async def store(open_store: Opener) -> SQLiteStore:
    return await open_store()


async def done(write: Awaitable[Written[T]]) -> T:
    """Run a write: wait until it is durable, return the value."""
    return (await write).value


async def reg(
    store: SQLiteStore,
    name: str,
    attrs: dict[str, str] | None = None,
    *,
    lease: int = 0,
    caller: Caller = ALICE,
) -> Service:
    return await done(
        store.register(name, attrs or {}, lease=lease, persist=not lease, caller=caller)
    )


def names(services: list[Service]) -> list[str]:
    return [s.name for s in services]


# ---- register, get, find ------------------------------------------------------


async def test_create_only_refuses_an_existing_name(store: SQLiteStore) -> None:
    first = await done(
        store.register("d0", {"a": "1"}, lease=0, persist=True, caller=ALICE, create_only=True)
    )
    with pytest.raises(FailedPrecondition, match="created at revision 1"):
        await store.register(
            "d0", {"a": "2"}, lease=0, persist=True, caller=ALICE, create_only=True
        )
    assert store.get("d0") == first and store.revision == 1


async def test_register_and_get(store: SQLiteStore) -> None:
    s = await reg(store, "tcp!h0!6701", {"proto": "tcp"})
    assert s == Service("tcp!h0!6701", {"proto": "tcp"}, 0, "alice", 1, 1)
    assert s.persistent
    assert store.get("tcp!h0!6701") == s
    assert store.revision == store.durable_revision == 1
    assert await store.sync() == 1
    with pytest.raises(NotFound, match="no service 'nope'"):
        store.get("nope")


async def test_find_every_filter_form(store: SQLiteStore) -> None:
    await reg(store, "udp!h0!3", {"proto": "udp", "sys": "h0"})
    await reg(store, "tcp!h1!2", {"proto": "tcp", "sys": "h1", "port": ""})
    await reg(store, "tcp!h0!1", {"proto": "tcp", "sys": "h0", "port": "1"})
    await reg(store, "il!h2!4", {})
    await reg(store, "tcp!h2!5", {"proto": "tcp", "sys": "h2", "port": "*"})

    def find(attrs: dict[str, str] | None = None, prefix: str = "") -> list[str]:
        return names(store.find(Filter(attrs or {}, prefix)))

    everything = ["il!h2!4", "tcp!h0!1", "tcp!h1!2", "tcp!h2!5", "udp!h0!3"]
    assert find() == everything  # empty filter: all, sorted by name
    assert find({"proto": "tcp"}) == ["tcp!h0!1", "tcp!h1!2", "tcp!h2!5"]
    assert find({"proto": "udp"}) == ["udp!h0!3"]
    assert find({"proto": "il"}) == []
    assert find({"nosuch": "x"}) == []
    assert find({"nosuch": "*"}) == []
    # '*' matches any value, the empty one included, but needs the attribute.
    assert find({"port": "*"}) == ["tcp!h0!1", "tcp!h1!2", "tcp!h2!5"]
    assert find({"port": ""}) == ["tcp!h1!2"]
    assert find({"port": "1"}) == ["tcp!h0!1"]
    # Several attributes: every one must match.
    assert find({"proto": "tcp", "sys": "h0"}) == ["tcp!h0!1"]
    assert find({"sys": "h0", "proto": "*"}) == ["tcp!h0!1", "udp!h0!3"]
    assert find({"proto": "tcp", "sys": "h0", "port": "*"}) == ["tcp!h0!1"]
    assert find({"proto": "tcp", "sys": "h3"}) == []
    assert find({"proto": "*", "port": "*"}) == ["tcp!h0!1", "tcp!h1!2", "tcp!h2!5"]
    # Prefix, alone and with attributes.
    assert find(prefix="tcp!") == ["tcp!h0!1", "tcp!h1!2", "tcp!h2!5"]
    assert find(prefix="tcp!h1") == ["tcp!h1!2"]
    assert find(prefix="t") == ["tcp!h0!1", "tcp!h1!2", "tcp!h2!5"]
    assert find(prefix="x") == []
    assert find(prefix="il!h2!4") == ["il!h2!4"]
    assert find({"sys": "h0"}, prefix="udp") == ["udp!h0!3"]
    assert find({"sys": "*"}, prefix="tcp!h2") == ["tcp!h2!5"]
    assert find({"proto": "tcp"}, prefix="udp") == []


async def test_find_by_value_is_sorted_by_name(store: SQLiteStore) -> None:
    for n in ["z", "m", "a", "q", "b"]:
        await reg(store, n, {"k": "v"})
    assert names(store.find(Filter({"k": "v"}))) == ["a", "b", "m", "q", "z"]
    assert names(store.find(Filter({"k": "*"}))) == ["a", "b", "m", "q", "z"]


async def test_find_prefix_reaches_the_highest_code_point(store: SQLiteStore) -> None:
    top = "a\U0010ffff"
    for n in ["a", top, top + "b", "b"]:
        await reg(store, n)
    assert names(store.find(Filter(prefix="a"))) == ["a", top, top + "b"]
    assert names(store.find(Filter(prefix=top))) == [top, top + "b"]


async def test_index_follows_updates_and_unregister(store: SQLiteStore) -> None:
    s = await reg(store, "svc", {"a": "1", "b": "2", "c": "3"})
    await reg(store, "other", {"a": "1"})
    s = await done(
        store.update("svc", {"a": "9", "d": "4"}, ["b"], expected_mod_revision=0, caller=ALICE)
    )
    assert s.attrs == {"a": "9", "c": "3", "d": "4"}
    assert s.create_revision == 1 and s.mod_revision == 3
    assert names(store.find(Filter({"a": "1"}))) == ["other"]
    assert names(store.find(Filter({"a": "9"}))) == ["svc"]
    assert names(store.find(Filter({"b": "2"}))) == []
    assert names(store.find(Filter({"b": "*"}))) == []
    assert names(store.find(Filter({"d": "4"}))) == ["svc"]
    assert names(store.find(Filter({"a": "*"}))) == ["other", "svc"]
    # An upsert that drops attributes unindexes them too.
    await reg(store, "svc", {"e": "5"})
    assert names(store.find(Filter({"a": "9"}))) == []
    assert names(store.find(Filter({"c": "*"}))) == []
    assert names(store.find(Filter({"e": "5"}))) == ["svc"]
    gone = await done(store.unregister("svc", expected_mod_revision=0, caller=ALICE))
    assert gone.attrs == {"e": "5"}
    assert names(store.find(Filter({"e": "5"}))) == []
    assert names(store.find(Filter({"e": "*"}))) == []
    assert names(store.find(Filter())) == ["other"]
    with pytest.raises(NotFound):
        store.get("svc")
    await done(store.unregister("other", expected_mod_revision=0, caller=ALICE))
    assert store.index == {} and list(store.names) == [] and store.services == {}


async def test_update_merges(store: SQLiteStore) -> None:
    await reg(store, "svc", {"a": "1", "b": "2"})
    s = await done(
        store.update("svc", {"b": "3", "c": ""}, ["a", "zz"], expected_mod_revision=0, caller=ALICE)
    )
    assert s.attrs == {"b": "3", "c": ""}
    # Nothing changes: no new revision, the same entry.
    again = await done(
        store.update("svc", {"b": "3"}, ["a"], expected_mod_revision=0, caller=ALICE)
    )
    assert again == s and store.revision == 2
    # The merge may not pass the attribute limit.
    await reg(store, "full", {f"a{i}": "" for i in range(64)})
    with pytest.raises(InvalidArgument, match="attrs: more than 64"):
        await store.update("full", {"one-more": ""}, [], expected_mod_revision=0, caller=ALICE)


# ---- ownership, upsert, preconditions ----------------------------------------


async def test_upsert_by_same_owner_is_idempotent(store: SQLiteStore) -> None:
    first = await reg(store, "svc", {"a": "1"})
    history = list(store.history)
    again = await reg(store, "svc", {"a": "1"})
    assert again == first and again.mod_revision == 1
    assert store.revision == 1 and list(store.history) == history
    changed = await reg(store, "svc", {"a": "2"})
    assert (changed.create_revision, changed.mod_revision) == (1, 2)
    (rev, (event,), _ts) = store.history[-1]
    assert rev == 2 and event == Event(EventType.PUT, changed, first, 2)


async def test_upsert_moves_to_a_new_lease_in_one_revision(store: SQLiteStore) -> None:
    l1 = await done(store.grant(1000, caller=ALICE))
    l2 = await done(store.grant(1000, caller=ALICE))
    before = await reg(store, "svc", {"a": "1"}, lease=l1.id)
    assert before.lease == l1.id and l1.services == {"svc"}
    rev = store.revision
    moved = await reg(store, "svc", {"a": "1"}, lease=l2.id)
    assert store.revision == rev + 1
    assert moved.lease == l2.id and moved.create_revision == before.create_revision
    assert l1.services == set() and l2.services == {"svc"}
    (r, events, _) = store.history[-1]
    assert r == rev + 1 and events == (Event(EventType.PUT, moved, before, rev + 1),)
    # The old lease ending takes nothing with it.
    assert await done(store.revoke(l1.id, caller=ALICE)) == 0
    assert store.revision == rev + 1 and store.get("svc") == moved
    # And a leased entry can become persistent the same way.
    kept = await reg(store, "svc", {"a": "1"})
    assert kept.persistent and l2.services == set()
    assert await done(store.revoke(l2.id, caller=ALICE)) == 0
    assert store.get("svc") == kept


async def test_another_owners_name_already_exists(store: SQLiteStore) -> None:
    await reg(store, "svc", {"a": "1"})
    for caller in (BOB, ROOT):
        with pytest.raises(AlreadyExists, match="svc is registered by alice"):
            await store.register("svc", {"a": "1"}, lease=0, persist=True, caller=caller)
    assert store.get("svc").owner == "alice" and store.revision == 1


async def test_only_the_owner_or_an_admin_may_change(store: SQLiteStore) -> None:
    await reg(store, "a", {"x": "1"})
    await reg(store, "b", {"x": "1"})
    with pytest.raises(PermissionDenied, match="a belongs to alice, not bob"):
        await store.update("a", {"x": "2"}, [], expected_mod_revision=0, caller=BOB)
    with pytest.raises(PermissionDenied):
        await store.unregister("a", expected_mod_revision=0, caller=BOB)
    with pytest.raises(PermissionDenied):
        await store.unregister("a", expected_mod_revision=0, caller=Caller("alice2", "node"))
    assert store.revision == 2
    s = await done(store.update("a", {"x": "2"}, [], expected_mod_revision=0, caller=ROOT))
    assert s.attrs == {"x": "2"} and s.owner == "alice"  # an admin does not take it over
    await done(store.unregister("b", expected_mod_revision=0, caller=ROOT))
    assert names(store.find(Filter())) == ["a"]


async def test_stale_expected_mod_revision_fails(store: SQLiteStore) -> None:
    await reg(store, "svc", {"a": "1"})
    s = await done(store.update("svc", {"a": "2"}, [], expected_mod_revision=1, caller=ALICE))
    assert s.mod_revision == 2
    with pytest.raises(FailedPrecondition, match="mod_revision is 2, expected 1"):
        await store.update("svc", {"a": "3"}, [], expected_mod_revision=1, caller=ALICE)
    with pytest.raises(FailedPrecondition):
        await store.unregister("svc", expected_mod_revision=1, caller=ALICE)
    with pytest.raises(FailedPrecondition):
        await store.unregister("svc", expected_mod_revision=99, caller=ROOT)
    assert store.get("svc") == s and store.revision == 2
    await done(store.unregister("svc", expected_mod_revision=2, caller=ALICE))
    assert store.find(Filter()) == []


# ---- bad input ---------------------------------------------------------------

LEASE = -100  # stands for "a lease alice holds"


@pytest.mark.parametrize(
    ("name", "attrs", "lease", "persist", "field"),
    [
        ("", {}, 0, True, "name"),
        ("a" * 256, {}, 0, True, "name"),
        ("a" * 255, {"": "x"}, 0, True, "attrs"),  # 255 bytes is fine: the attr is not
        ("a b", {}, 0, True, "name"),
        ("a/b", {}, 0, True, "name"),
        ("a\x01b", {}, 0, True, "name"),
        ("new", {}, 0, True, "name"),
        ("find", {}, 0, True, "name"),
        ("index", {}, 0, True, "name"),
        ("event", {}, 0, True, "name"),
        ("svc", {"a b": "1"}, 0, True, "attrs"),
        ("svc", {"": "1"}, 0, True, "attrs"),
        ("svc", {"a/b": "1"}, 0, True, "attrs"),
        ("svc", {"x" * 65: "1"}, 0, True, "attrs"),
        ("svc", {"v": "x" * 1025}, 0, True, "attrs"),
        ("svc", {f"a{i}": "" for i in range(65)}, 0, True, "attrs"),
        ("svc", {}, LEASE, True, "lease, persist"),
        ("svc", {}, 0, False, "lease, persist"),
        ("svc", {}, -1, False, "lease"),
        ("svc", {}, -1, True, "lease, persist"),
    ],
)
async def test_register_rejects_bad_input(
    store: SQLiteStore, name: str, attrs: dict[str, str], lease: int, persist: bool, field: str
) -> None:
    held = await done(store.grant(1000, caller=ALICE))
    if lease == LEASE:
        lease = held.id
    with pytest.raises(InvalidArgument) as info:
        await store.register(name, attrs, lease=lease, persist=persist, caller=ALICE)
    assert str(info.value).startswith(field + ": ")
    assert store.revision == 0 and store.services == {} and held.services == set()


@pytest.mark.parametrize(
    ("name", "set_attrs", "remove", "expected", "field"),
    [
        ("", {}, [], 0, "name"),
        ("a/b", {}, [], 0, "name"),
        ("event", {}, [], 0, "name"),
        ("svc", {"a b": "1"}, [], 0, "set_attrs"),
        ("svc", {"v": "x" * 1025}, [], 0, "set_attrs"),
        ("svc", {f"a{i}": "" for i in range(65)}, [], 0, "set_attrs"),
        ("svc", {}, ["a b"], 0, "remove_attrs"),
        ("svc", {"a": "2"}, ["a"], 0, "remove_attrs"),  # set and remove the same attr
        ("svc", {}, [], -1, "expected_mod_revision"),
    ],
)
async def test_update_rejects_bad_input(
    store: SQLiteStore,
    name: str,
    set_attrs: dict[str, str],
    remove: list[str],
    expected: int,
    field: str,
) -> None:
    before = await reg(store, "svc", {"a": "1"})
    with pytest.raises(InvalidArgument) as info:
        await store.update(name, set_attrs, remove, expected_mod_revision=expected, caller=ALICE)
    assert str(info.value).startswith(field + ": ")
    assert store.get("svc") == before and store.revision == 1


async def test_unregister_rejects_bad_input(store: SQLiteStore) -> None:
    with pytest.raises(InvalidArgument, match=r"^name: "):
        await store.unregister("a b", expected_mod_revision=0, caller=ALICE)
    with pytest.raises(InvalidArgument, match=r"^expected_mod_revision: "):
        await store.unregister("svc", expected_mod_revision=-1, caller=ALICE)


@pytest.mark.parametrize("ttl", [-1, 0, 499, 86_400_001])
async def test_grant_rejects_bad_ttl(store: SQLiteStore, ttl: int) -> None:
    with pytest.raises(InvalidArgument, match=r"^ttl_ms: "):
        await store.grant(ttl, caller=ALICE)
    assert store.leases == {} and store.next_lease == 1


async def test_grant_accepts_the_ttl_bounds(store: SQLiteStore) -> None:
    low = await done(store.grant(500, caller=ALICE))
    high = await done(store.grant(86_400_000, caller=ALICE))
    assert (low.ttl_ms, high.ttl_ms) == (500, 86_400_000)


async def test_unknown_names_and_leases_are_not_found(store: SQLiteStore) -> None:
    with pytest.raises(NotFound):
        store.get("nope")
    with pytest.raises(NotFound):
        await store.update("nope", {"a": "1"}, [], expected_mod_revision=0, caller=ALICE)
    with pytest.raises(NotFound):
        await store.unregister("nope", expected_mod_revision=0, caller=ROOT)
    with pytest.raises(NotFound, match="lease 7 not found or expired"):
        await store.register("svc", {}, lease=7, persist=False, caller=ALICE)
    for caller in (ALICE, ROOT):
        with pytest.raises(NotFound):
            await store.revoke(7, caller=caller)
    with pytest.raises(NotFound):  # the registry itself
        store._revoke(7, caller=None)
    assert await store.keepalive(7, caller=ALICE, holder="t") == 0
    lease = await done(store.grant(1000, caller=ALICE))
    await done(store.revoke(lease.id, caller=ALICE))
    with pytest.raises(NotFound):
        await store.register("svc", {}, lease=lease.id, persist=False, caller=ALICE)
    assert await store.keepalive(lease.id, caller=ALICE, holder="t") == 0
    assert store.revision == 0


async def test_another_owners_lease_is_not_found(store: SQLiteStore) -> None:
    lease = await done(store.grant(1000, caller=ALICE))
    # The same answer as for a lease that never existed: nothing is told.
    for caller in (BOB, ROOT):  # registering under a lease needs its owner
        with pytest.raises(NotFound, match=f"lease {lease.id} not found or expired"):
            await store.register("svc", {}, lease=lease.id, persist=False, caller=caller)
    assert await store.keepalive(lease.id, caller=BOB, holder="t") == 0
    with pytest.raises(NotFound, match=f"lease {lease.id} not found or expired"):
        await store.revoke(lease.id, caller=BOB)
    assert store.lease_list(BOB) == [] and store.lease_list(ROOT) == [lease]
    assert store.lease_list(ALICE) == [lease]
    assert lease.id in store.leases


# ---- leases ------------------------------------------------------------------


async def test_grant(store: SQLiteStore, clock: Clock) -> None:
    a = await done(store.grant(1000, caller=ALICE))
    clock.now += 1
    b = await done(store.grant(2500, caller=BOB))
    assert (a.id, a.ttl_ms, a.owner, a.deadline) == (1, 1000, "alice", 1001.0)
    assert (b.id, b.ttl_ms, b.owner, b.deadline) == (2, 2500, "bob", 1003.5)
    assert store.lease_list(ROOT) == [a, b] and store.next_lease == 3
    assert store.next_deadline() == 1001.0
    assert store.revision == 0  # leases alone are not revisions of the service set


async def test_keepalive_renews(store: SQLiteStore, clock: Clock) -> None:
    lease = await done(store.grant(1000, caller=ALICE))
    await reg(store, "svc", lease=lease.id)
    clock.now += 0.9
    assert await store.keepalive(lease.id, caller=ALICE, holder="t") == 1000
    assert lease.deadline == clock.now + 1.0
    assert store.expire(now=1001.5) == []  # past the first deadline, not the renewed one
    assert store.get("svc").lease == lease.id
    assert store.expire(now=lease.deadline) == [lease.id]
    await store.sync()
    assert store.find(Filter()) == [] and store.leases == {}
    assert await store.keepalive(lease.id, caller=ALICE, holder="t") == 0


async def test_expiry_deletes_every_service_of_the_lease_in_one_revision(
    store: SQLiteStore, clock: Clock
) -> None:
    short = await done(store.grant(1000, caller=ALICE))
    long = await done(store.grant(5000, caller=ALICE))
    on_short = [await reg(store, n, {"i": n}, lease=short.id) for n in ("c", "a", "b")]
    await reg(store, "p", {"i": "p"})
    await reg(store, "l", {"i": "l"}, lease=long.id)
    rev = store.revision
    seen: list[tuple[int, tuple[Event, ...]]] = []
    store.on_commit.append(lambda r, ev: seen.append((r, ev)))
    assert store.expire(now=short.deadline - 0.001) == []
    assert store.expire(now=short.deadline) == [short.id]
    assert store.revision == rev + 1
    await store.sync()
    expected = tuple(
        Event(EventType.DELETE, s, s, rev + 1) for s in sorted(on_short, key=lambda s: s.name)
    )
    assert seen == [(rev + 1, expected)]
    assert store.history[-1][:2] == (rev + 1, expected)
    assert names(store.find(Filter())) == ["l", "p"]
    assert list(store.leases) == [long.id]
    assert store.expire(now=short.deadline + 1) == []
    assert store.expire(now=long.deadline) == [long.id]
    await store.sync()
    assert names(store.find(Filter())) == ["p"] and store.revision == rev + 2


async def test_an_empty_lease_expires_without_a_revision(store: SQLiteStore) -> None:
    lease = await done(store.grant(1000, caller=ALICE))
    assert store.expire(now=lease.deadline) == [lease.id]
    await store.sync()
    assert store.revision == 0 and store.leases == {} and list(store.history) == []


async def test_revoke_deletes_every_service_in_one_revision(store: SQLiteStore) -> None:
    lease = await done(store.grant(1000, caller=ALICE))
    for n in ("x", "y", "z"):
        await reg(store, n, lease=lease.id)
    assert await done(store.revoke(lease.id, caller=ALICE)) == 3
    rev, events, _ = store.history[-1]
    assert rev == 4 and store.revision == 4
    assert [(e.type, e.service.name, e.revision) for e in events] == [
        (EventType.DELETE, n, 4) for n in ("x", "y", "z")
    ]
    assert store.find(Filter()) == [] and store.leases == {}
    # An admin may revoke anyone's lease; the registry itself (None) too.
    other = await done(store.grant(1000, caller=BOB))
    await reg(store, "w", lease=other.id, caller=BOB)
    assert await done(store.revoke(other.id, caller=ROOT)) == 1
    third = await done(store.grant(1000, caller=BOB))
    deleted, durable = store._revoke(third.id, caller=None)
    await durable
    assert deleted == 0
    assert store.leases == {} and store.revision == 6


async def test_services_per_lease_limit(open_store: Opener) -> None:
    store = await open_store(Limits(services_per_lease=2))
    lease = await done(store.grant(1000, caller=ALICE))
    other = await done(store.grant(1000, caller=ALICE))
    await reg(store, "a", lease=lease.id)
    await reg(store, "b", lease=lease.id)
    with pytest.raises(ResourceExhausted, match="holds 2 services"):
        await store.register("c", {}, lease=lease.id, persist=False, caller=ALICE)
    await reg(store, "c", lease=other.id)
    with pytest.raises(ResourceExhausted):  # moving into a full lease
        await store.register("c", {}, lease=lease.id, persist=False, caller=ALICE)
    # Re-registering what the lease already holds is fine.
    assert (await reg(store, "a", {"k": "v"}, lease=lease.id)).attrs == {"k": "v"}
    assert lease.services == {"a", "b"} and other.services == {"c"}


# ---- register_batch ------------------------------------------------------------


async def test_a_batch_is_one_revision_and_durable(open_store: Opener) -> None:
    store = await open_store()
    heard: list[tuple[int, tuple[Event, ...]]] = []
    store.on_commit.append(lambda rev, events: heard.append((rev, events)))
    lease = await done(store.grant(1000, caller=ALICE))
    await reg(store, "b", {"k": "old"})  # persistent: the batch moves it under the lease
    written = await store.register_batch(
        [
            Registration("a", {"k": "1"}, lease=lease.id),
            Registration("b", {"k": "2"}, lease=lease.id),
            Registration("c", {}, persist=True),
        ],
        caller=ALICE,
    )
    rev = written.revision
    assert [(s.name, s.mod_revision, s.lease) for s in written.value] == [
        ("a", rev, lease.id),
        ("b", rev, lease.id),
        ("c", rev, 0),
    ]
    assert written.value[1].create_revision < rev  # b was replaced, not created
    # One revision, every event in it, in the batch's order; b's PUT shows its past.
    assert heard[-1][0] == rev and [e.service.name for e in heard[-1][1]] == ["a", "b", "c"]
    assert heard[-1][1][1].prev is not None and heard[-1][1][1].prev.attrs == {"k": "old"}
    assert lease.services == {"a", "b"}
    assert names(store.find(Filter({"k": "*"}))) == ["a", "b"]
    # The same batch again changes nothing and makes no revision.
    again = await store.register_batch(
        [Registration("a", {"k": "1"}, lease=lease.id), Registration("c", {}, persist=True)],
        caller=ALICE,
    )
    assert store.revision == rev and again.revision == rev
    assert [s.mod_revision for s in again.value] == [rev, rev]
    await store.close()
    store = await open_store()
    assert {s.name: s.mod_revision for s in store.find(Filter())} == {"a": rev, "b": rev, "c": rev}


async def test_a_refused_batch_changes_nothing_and_names_every_refusal(
    open_store: Opener,
) -> None:
    store = await open_store(Limits(services_per_lease=3))
    lease = await done(store.grant(1000, caller=ALICE))
    await reg(store, "bobs", caller=BOB)
    await reg(store, "held", lease=lease.id)
    before = (store.revision, dict(store.services))
    batch = [
        Registration("x", {}, lease=lease.id),
        Registration("bobs", {}, lease=lease.id),
        Registration("y", {}, lease=lease.id),
        Registration("z", {}, lease=lease.id),
    ]
    # bobs is another owner's; the lease holds 1 and may take 2 more, so z
    # (the third new one) is past the limit: every entry after it counts.
    with pytest.raises(AlreadyExists) as err:
        await store.register_batch(batch, caller=ALICE)
    assert str(err.value) == (
        "2 of 4 entries refused, nothing registered: "
        "services[1] 'bobs': bobs is registered by bob; "
        "services[3] 'z': lease 1 holds 3 services, the limit"
    )
    assert (store.revision, dict(store.services)) == before
    assert lease.services == {"held"}
    # Each entry is checked as Register checks it, and names must be distinct.
    with pytest.raises(InvalidArgument) as err:
        await store.register_batch(
            [
                Registration("ok", {}, persist=True),
                Registration("bad name", {}, persist=True),
                Registration("ok", {}, persist=True),
                Registration("neither", {}),
            ],
            caller=ALICE,
        )
    assert str(err.value).startswith("3 of 4 entries refused, nothing registered: services[1] ")
    assert "services[2] 'ok': name: also services[0]" in str(err.value)
    assert "services[3] 'neither': lease, persist" in str(err.value)
    with pytest.raises(InvalidArgument, match="services: empty"):
        await store.register_batch([], caller=ALICE)
    many = [Registration(f"n{i}", {}, persist=True) for i in range(101)]
    with pytest.raises(InvalidArgument, match="101 entries, more than 100"):
        await store.register_batch(many, caller=ALICE)
    unknown = [Registration(f"n{i}", {}, lease=99) for i in range(12)]
    with pytest.raises(NotFound) as err:
        await store.register_batch(unknown, caller=ALICE)
    assert str(err.value).endswith("; and 2 more")
    assert (store.revision, dict(store.services)) == before
    await store.sync()


async def test_refresh_all_leases_extends_deadlines(store: SQLiteStore, clock: Clock) -> None:
    short = await done(store.grant(1000, caller=ALICE))
    long = await done(store.grant(60_000, caller=ALICE))
    clock.now += 5  # past short's deadline: the registry itself stood still
    store.refresh_all_leases()
    assert short.deadline == clock.now + 1
    assert long.deadline == clock.now + 60
    assert store.next_deadline() == clock.now + 1
    assert store.expire(now=clock.now) == []
    assert store.expire(now=clock.now + 1) == [short.id]


async def test_release_ends_a_lease_only_for_the_stream_holding_it(store: SQLiteStore) -> None:
    lease = await done(store.grant(1000, caller=ALICE))
    await reg(store, "svc", lease=lease.id)
    assert await store.release(lease.id, holder="old") is None  # nobody holds it yet
    assert await store.keepalive(lease.id, caller=ALICE, holder="old") == 1000
    assert await store.keepalive(lease.id, caller=ALICE, holder="new") == 1000
    assert await store.release(lease.id, holder="old") is None  # renewed on a newer stream
    assert lease.id in store.leases and store.revision == 1
    assert await store.release(lease.id, holder="new") == 1
    await store.sync()
    assert store.leases == {} and store.find(Filter()) == [] and store.revision == 2
    assert await store.release(lease.id, holder="new") is None  # gone already


async def test_writes_report_the_revision_they_were_decided_at(store: SQLiteStore) -> None:
    lease = await store.grant(1000, caller=ALICE)
    assert lease.revision == 0  # leases alone are not revisions
    first = await store.register("a", {}, lease=0, persist=True, caller=ALICE)
    assert first == Written(store.get("a"), 1)
    again = await store.register("a", {}, lease=0, persist=True, caller=ALICE)
    assert again == Written(first.value, 1)  # a no-op: the revision it was checked against
    await reg(store, "b", lease=lease.value.id)
    same = await store.update("a", {}, [], expected_mod_revision=0, caller=ALICE)
    assert same == Written(first.value, 2)
    changed = await store.update("a", {"k": "v"}, [], expected_mod_revision=0, caller=ALICE)
    assert changed.revision == changed.value.mod_revision == 3
    gone = await store.unregister("a", expected_mod_revision=3, caller=ALICE)
    assert gone == Written(changed.value, 4)
    assert await store.revoke(lease.value.id, caller=ALICE) == Written(1, 5)


# ---- durability and restart ----------------------------------------------------


def state(store: SQLiteStore) -> dict[str, Any]:
    return {
        "services": store.find(Filter()),
        "leases": [
            (lz.id, lz.ttl_ms, lz.owner, sorted(lz.services)) for lz in store.lease_list(ROOT)
        ],
        "revision": store.revision,
        "durable": store.durable_revision,
        "next_lease": store.next_lease,
        "oldest": store.oldest_revision,
        # Read back: a restarted store leaves its history in the database.
        "history": store.history_since(store.oldest_revision),
        "history_bytes": store.history_bytes,
    }


async def test_restart_brings_everything_back(open_store: Opener, clock: Clock) -> None:
    store = await open_store()
    l1 = await done(store.grant(1000, caller=ALICE))
    l2 = await done(store.grant(3000, caller=BOB))
    l3 = await done(store.grant(1000, caller=BOB))
    await reg(store, "p", {"a": "1"})
    await reg(store, "x", {"a": "2", "b": ""}, lease=l1.id)
    await reg(store, "y", {"b": "3"}, lease=l2.id, caller=BOB)
    await reg(store, "gone", {"a": "1"})
    await done(store.update("x", {"c": "4"}, ["b"], expected_mod_revision=0, caller=ALICE))
    await done(store.unregister("gone", expected_mod_revision=0, caller=ALICE))
    await done(store.revoke(l3.id, caller=BOB))
    before = state(store)
    assert before["revision"] == 6 and before["next_lease"] == 4
    await store.close()

    clock.now += 10_000  # far past every deadline the leases had
    store = await open_store()
    assert state(store) == before
    assert names(store.find(Filter({"a": "1"}))) == ["p"]
    assert names(store.find(Filter({"c": "*"}))) == ["x"]
    assert names(store.find(Filter({"b": "*"}))) == ["y"]
    # Fresh deadlines: nothing expires within one TTL of starting.
    assert [lz.deadline for lz in store.lease_list(ROOT)] == [clock.now + 1, clock.now + 3]
    assert store.expire(now=clock.now + 0.999) == []
    # The revision and lease ids carry on; nothing is reused.
    assert (await done(store.grant(2000, caller=ALICE))).id == 4
    assert (await reg(store, "q")).mod_revision == 7
    assert store.expire(now=clock.now + 1) == [l1.id]
    await store.sync()
    assert names(store.find(Filter())) == ["p", "q", "y"] and store.revision == 8


async def test_get_is_answered_from_the_database_while_the_state_loads(
    open_store: Opener, tmp_path: Path
) -> None:
    store = await open_store()
    s = await reg(store, "a", {"k": "v"})
    await reg(store, "b")
    await reg(store, "tcp!ü!1", {"x.y-z": "", "k": "w"})
    await reg(store, "tcp!ü!2", {"x.y-z": "1", "k": "v"})
    await reg(store, "tcp!z", {"k": "u"})
    await store.close()
    early = await SQLiteStore.open(tmp_path / "data", wait=False)
    try:
        # Before ready(): the entry as stored, at the revision the store is at.
        assert await early.lookup("a") == (s, 5)
        with pytest.raises(NotFound, match="no service 'nosuch'"):
            await early.lookup("nosuch")
        with pytest.raises(InvalidArgument):
            await early.lookup("")
        filters = [
            Filter(),
            Filter({"k": "v"}),
            Filter({"k": "*"}),
            Filter({"x.y-z": "*"}),
            Filter({"x.y-z": ""}),
            Filter({"k": "v", "x.y-z": "1"}),
            Filter({"k": "nope"}),
            Filter(prefix="b"),
            Filter(prefix="tcp!ü"),
            Filter({"k": "*"}, prefix="tcp!"),
        ]
        early_found = [await early.search(f) for f in filters]
        await early.ready()
        assert await early.lookup("a") == (s, 2 + 3)
        # The database's answers are memory's, in the same order.
        assert early_found == [(early.find(f), 5) for f in filters]
        assert [len(found) for found, _ in early_found] == [5, 2, 4, 2, 1, 1, 0, 1, 2, 3]
    finally:
        await early.close()


async def test_a_damaged_history_row_drops_the_history_up_to_it(
    open_store: Opener, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = await open_store()
    for i in range(5):
        await reg(store, f"s{i}", {"i": str(i)})
    await store.close()
    with sqlite3.connect(tmp_path / "data" / "registry.db") as db:
        db.execute("UPDATE events SET ts = ts + 1 WHERE revision = 3")
    store = await open_store()  # the history's rows are not checked at start
    assert [rev for rev, _, _ in store.history] == [1, 2, 3, 4, 5]
    await store.scrub()
    assert "event 3.0: checksum does not match" in caplog.text
    with pytest.raises(OutOfRange) as err:
        store.history_since(1)
    assert err.value.resume_revision == 4
    assert [rev for rev, _ in store.history_since(4)] == [4, 5]
    assert names(store.find(Filter())) == [f"s{i}" for i in range(5)]
    await store.close()
    # Read back before the scrub got there: the watch is told to re-list.
    with sqlite3.connect(tmp_path / "data" / "registry.db") as db:
        db.execute("UPDATE events SET ts = ts + 1 WHERE revision = 5")
    store = await open_store()
    with pytest.raises(OutOfRange):
        store.history_since(5)


async def test_revision_and_lease_ids_never_go_back(open_store: Opener) -> None:
    store = await open_store()
    top = 0
    for round_ in range(3):
        rev = store.revision
        a = await done(store.grant(1000, caller=ALICE))
        b = await done(store.grant(1000, caller=ALICE))
        assert a.id > top and b.id == a.id + 1
        top = b.id
        await reg(store, f"s{round_}", lease=a.id)
        await done(store.revoke(a.id, caller=ALICE))
        rev += 2
        # The last write before the restart changes only leases (and revokes
        # the newest id): the stored revision must still be the newest one.
        await done(store.revoke(b.id, caller=ALICE))
        assert store.revision == rev
        await store.close()
        store = await open_store()
        assert store.revision == store.durable_revision == rev
        assert store.next_lease == top + 1 and store.leases == {}


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE services (
    name TEXT PRIMARY KEY, attrs TEXT NOT NULL, lease INTEGER NOT NULL,
    owner TEXT NOT NULL, create_revision INTEGER NOT NULL, mod_revision INTEGER NOT NULL);
CREATE TABLE leases (id INTEGER PRIMARY KEY, ttl_ms INTEGER NOT NULL, owner TEXT NOT NULL);
CREATE TABLE events (
    revision INTEGER NOT NULL, idx INTEGER NOT NULL, type INTEGER NOT NULL,
    service TEXT NOT NULL, prev TEXT, ts REAL NOT NULL, PRIMARY KEY (revision, idx));
"""


async def test_a_store_from_before_checksums_is_upgraded(tmp_path: Path) -> None:
    """A database written before rows carried checksums opens, gets them,
    and is checked from then on."""
    svc = '["a",{"x":"1"},0,"alice",1,1]'
    with sqlite3.connect(tmp_path / "registry.db") as db:
        db.executescript(V1_SCHEMA)
        db.execute("INSERT INTO services VALUES ('a', '{\"x\":\"1\"}', 0, 'alice', 1, 1)")
        db.execute("INSERT INTO leases VALUES (1, 1000, 'alice')")
        db.execute("INSERT INTO events VALUES (1, 0, 1, ?, NULL, 1.5)", (svc,))
        db.executemany(
            "INSERT INTO meta VALUES (?, ?)", [("revision", 1), ("next_lease", 2), ("oldest", 1)]
        )
    store = await SQLiteStore.open(tmp_path)
    assert store.get("a").attrs == {"x": "1"} and list(store.leases) == [1]
    assert [r for r, _, _ in store.history] == [1]
    await reg(store, "b")
    await store.close()
    with sqlite3.connect(tmp_path / "registry.db") as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == (2,)
        db.execute("UPDATE services SET attrs = '{\"x\":\"2\"}' WHERE name = 'a'")
    with pytest.raises(FailedPrecondition, match="service 'a': checksum does not match"):
        await SQLiteStore.open(tmp_path)
    with sqlite3.connect(tmp_path / "registry.db") as db:
        db.execute("UPDATE meta SET value = 3 WHERE key = 'schema'")
    with pytest.raises(FailedPrecondition, match=r"written by a newer registry \(schema 3"):
        await SQLiteStore.open(tmp_path)


async def test_an_unsynced_change_is_flushed_by_close(open_store: Opener) -> None:
    store = await open_store()
    writes = [
        asyncio.ensure_future(
            store.register("svc", {"a": "1"}, lease=0, persist=True, caller=ALICE)
        ),
        asyncio.ensure_future(store.grant(1000, caller=ALICE)),
    ]
    await asyncio.sleep(0)  # both applied, neither durable yet
    assert store.revision == 1 and store.durable_revision == 0 and list(store.leases) == [1]
    await store.close()
    await asyncio.gather(*writes)
    store = await open_store()
    assert names(store.find(Filter())) == ["svc"] and list(store.leases) == [1]


async def test_group_commit_shares_transactions(store: SQLiteStore) -> None:
    n = 20
    writes = 0
    real_write = store._write

    def counting_write(*args: Any) -> None:
        nonlocal writes
        writes += 1
        real_write(*args)

    store._write = counting_write  # type: ignore[method-assign]

    async def one(i: int) -> Service:
        return await done(
            store.register(f"s{i:02}", {"i": str(i)}, lease=0, persist=True, caller=ALICE)
        )

    got = await asyncio.gather(*(one(i) for i in range(n)))
    assert sorted(s.mod_revision for s in got) == list(range(1, n + 1))
    assert store.durable_revision == n
    assert 1 <= writes < n


async def test_on_commit_in_revision_order_after_durability(store: SQLiteStore) -> None:
    db = sqlite3.connect(store.path, isolation_level=None)
    calls: list[tuple[int, int, int]] = []

    def on_commit(revision: int, events: tuple[Event, ...]) -> None:
        ((stored,),) = db.execute("SELECT value FROM meta WHERE key = 'revision'")
        ((rows,),) = db.execute("SELECT count(*) FROM events WHERE revision = ?", (revision,))
        assert all(e.revision == revision for e in events)
        calls.append((revision, stored, rows - len(events)))

    store.on_commit.append(on_commit)
    try:
        lease = await done(store.grant(1000, caller=ALICE))
        writes: list[Awaitable[Any]] = [
            store.register(f"s{i}", {}, lease=lease.id, persist=False, caller=ALICE)
            for i in range(5)
        ]
        writes.append(store.update("s0", {"a": "1"}, [], expected_mod_revision=0, caller=ALICE))
        writes.append(store.revoke(lease.id, caller=ALICE))
        results = [asyncio.ensure_future(w) for w in writes]
        await asyncio.sleep(0)  # every write applied, in order
        assert store.revision == 7
        assert calls == []  # nothing is heard of before it is durable
        await asyncio.gather(*results)
        await reg(store, "late")
    finally:
        db.close()
    assert [r for r, _, _ in calls] == list(range(1, 9))
    for revision, stored, missing in calls:
        assert stored >= revision and missing == 0


async def test_a_failed_commit_refuses_writes_until_the_disk_heals(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(store_mod, "RETRY_S", 0.01)
    health: list[str | None] = []
    store.on_health.append(health.append)
    await reg(store, "durable")
    started, release, healed = threading.Event(), threading.Event(), threading.Event()
    real_write = store._write

    def full_disk(ops: Any, revision: int) -> None:
        if healed.is_set():
            return real_write(ops, revision)
        started.set()
        release.wait(30)
        raise sqlite3.OperationalError("database or disk is full")

    store._write = full_disk  # type: ignore[method-assign]
    first = asyncio.ensure_future(store.register("a", {}, lease=0, persist=True, caller=ALICE))
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)
    # Queued behind the first, and a read that saw both.
    second = asyncio.ensure_future(store.register("b", {}, lease=0, persist=True, caller=ALICE))
    await asyncio.sleep(0)
    saw = asyncio.ensure_future(store.read(lambda: names(store.find(Filter()))))
    await asyncio.sleep(0)
    assert store.revision == 3 and not second.done()
    release.set()
    for pending in (first, second, saw):
        with pytest.raises(Unavailable, match="database or disk is full"):
            await pending
    # Nothing that was refused is served, and what is durable still is.
    await eventually(lambda: not store._stale)
    assert health == ["the store cannot write: database or disk is full"]
    found, revision = await store.read(lambda: names(store.find(Filter())))
    assert found == ["durable"] and revision == 1
    for _ in range(100):
        with pytest.raises(Unavailable, match="database or disk is full"):
            await store.register("c", {}, lease=0, persist=True, caller=ALICE)
    # Said once, with the real cause.
    said = [r.getMessage() for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(said) == 1 and "database or disk is full" in said[0]
    healed.set()
    await eventually(lambda: health[-1] is None)
    assert (await store.register("c", {}, lease=0, persist=True, caller=ALICE)).revision == 2
    await store.close()
    reopened = await SQLiteStore.open(store.path.parent)
    assert names(reopened.find(Filter())) == ["c", "durable"] and reopened.revision == 2
    await reopened.close()


# ---- history and compaction ------------------------------------------------------


def db_oldest_event(store: SQLiteStore) -> int | None:
    with sqlite3.connect(store.path) as db:
        ((oldest,),) = db.execute("SELECT min(revision) FROM events")
    return oldest


async def test_history_is_compacted_by_whole_revisions(open_store: Opener) -> None:
    limit = 3
    store = await open_store(Limits(history_events=limit))
    log: dict[int, tuple[Event, ...]] = {}
    store.on_commit.append(lambda r, ev: log.__setitem__(r, ev))

    def check() -> None:
        held = store.history_since(store.oldest_revision)
        # Contiguous whole revisions from the oldest held to the newest.
        assert [r for r, _ in held] == list(range(store.oldest_revision, store.revision + 1))
        assert all(log[r] == ev for r, ev in held)
        assert store.history_events == sum(len(ev) for _, ev in held)
        # Bounded: past the limit by at most the newest commit.
        assert store.history_events - len(held[-1][1]) <= limit
        assert db_oldest_event(store) == store.oldest_revision

    for i in range(5):
        await reg(store, f"s{i}")
        check()
    assert store.oldest_revision == 2
    lease = await done(store.grant(1000, caller=ALICE))
    for n in ("x", "y", "z"):
        await reg(store, n, lease=lease.id)
        check()
    await done(store.revoke(lease.id, caller=ALICE))  # revision 9: three events
    check()
    await reg(store, "e")  # 10
    check()
    assert [r for r, _, _ in store.history] == [9, 10]
    await reg(store, "f")  # 11: revision 9 goes whole, never split
    check()
    assert [r for r, _, _ in store.history] == [10, 11] and store.oldest_revision == 10

    with pytest.raises(OutOfRange) as info:
        store.history_since(9)
    assert info.value.resume_revision == 10 and "compacted" in str(info.value)
    with pytest.raises(OutOfRange):
        store.history_since(1)
    assert store.history_since(10) == [(10, log[10]), (11, log[11])]
    assert store.history_since(11) == [(11, log[11])]
    assert store.history_since(12) == []

    before = state(store)
    await store.close()
    store = await open_store(Limits(history_events=limit))
    assert state(store) == before
    with pytest.raises(OutOfRange) as info:
        store.history_since(9)
    assert info.value.resume_revision == 10
    assert store.history_since(11) == [(11, log[11])]
    store.on_commit.append(lambda r, ev: log.__setitem__(r, ev))
    for n in "ghi":  # compaction carries on after the restart
        await reg(store, n)
        check()
    assert [r for r, _, _ in store.history] == [11, 12, 13, 14] and store.oldest_revision == 11


async def test_history_is_compacted_by_age(open_store: Opener, clock: Clock) -> None:
    store = await open_store(Limits(history_age_s=60))
    await reg(store, "a")
    await reg(store, "b")
    clock.wall += 61
    await reg(store, "c")
    assert store.oldest_revision == 3 and [r for r, _, _ in store.history] == [3]
    with pytest.raises(OutOfRange) as info:
        store.history_since(2)
    assert info.value.resume_revision == 3


async def test_history_is_bounded_in_bytes(open_store: Opener) -> None:
    """Maximum-size entries fill a window counted in events alone: the
    byte bound drops them by their stored size, and counts the same after a
    restart (which holds them only in the database)."""
    limit = 20_000
    store = await open_store(Limits(history_bytes=limit))
    big = {f"a{i}": "x" * 1000 for i in range(4)}  # about 4 KB stored a PUT
    for i in range(20):
        await reg(store, f"s{i:02}", big)
    held = store.history_since(store.oldest_revision)
    sizes = list(store.history_sizes)
    assert store.history_bytes == sum(sizes)
    # Past the bound by at most the newest commit (trimmed before the next).
    assert 0 < store.history_bytes - sizes[-1] <= limit < store.history_bytes + sizes[0]
    assert store.oldest_revision > 1 and db_oldest_event(store) == store.oldest_revision
    assert [r for r, _ in held] == list(range(store.oldest_revision, 21))
    before = (store.oldest_revision, store.history_bytes, held)
    await store.close()
    store = await open_store(Limits(history_bytes=limit))
    assert (store.oldest_revision, store.history_bytes) == before[:2]
    assert store.history_since(store.oldest_revision) == before[2]
    await reg(store, "s20", big)  # and trimming carries on after the restart
    assert store.history_bytes - store.history_sizes[-1] <= limit


async def test_history_since_without_compaction(store: SQLiteStore) -> None:
    for n in "abc":
        await reg(store, n)
    assert [r for r, _ in store.history_since(1)] == [1, 2, 3]
    assert [r for r, _ in store.history_since(2)] == [2, 3]
    assert store.history_since(4) == []
    with pytest.raises(OutOfRange):
        store.history_since(0)


# ---- the lease keeper ------------------------------------------------------------


class KeeperTime:
    """asyncio for geryon.leases: sleep moves the clock, plus any stall queued."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.stalls: list[float] = []
        self.ticks = 0

    async def sleep(self, delay: float) -> None:
        self.clock.now += delay + (self.stalls.pop(0) if self.stalls else 0.0)
        self.ticks += 1
        await asyncio.sleep(0)


async def run_keeper_until(store: SQLiteStore, fake: KeeperTime, done_: Callable[[], bool]) -> None:
    keeper = asyncio.create_task(leases_mod.keep(store, tick=0.05, stall=0.5))
    try:
        for _ in range(10_000):
            if done_():
                return
            await asyncio.sleep(0)
        raise AssertionError("keeper did not get there")
    finally:
        keeper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await keeper


@pytest.fixture
def keeper_time(monkeypatch: pytest.MonkeyPatch, clock: Clock) -> KeeperTime:
    fake = KeeperTime(clock)
    monkeypatch.setattr(leases_mod, "time", clock)
    monkeypatch.setattr(leases_mod, "asyncio", fake)
    return fake


async def test_keeper_expires_a_lease_nobody_renews(
    store: SQLiteStore, keeper_time: KeeperTime
) -> None:
    lease = await done(store.grant(1000, caller=ALICE))
    await reg(store, "svc", lease=lease.id)
    start = keeper_time.clock.now
    await run_keeper_until(store, keeper_time, lambda: not store.leases)
    assert keeper_time.clock.now >= start + 1
    await store.sync()
    assert store.find(Filter()) == []


async def test_keeper_forgives_its_own_stall(store: SQLiteStore, keeper_time: KeeperTime) -> None:
    lease = await done(store.grant(1000, caller=ALICE))
    await reg(store, "svc", lease=lease.id)
    keeper_time.stalls = [0.0, 30.0]  # the second sleep overruns by 30 s
    await run_keeper_until(store, keeper_time, lambda: keeper_time.ticks >= 3)
    # Far past its first deadline (1001), yet renewed rather than ended.
    assert keeper_time.clock.now > 1030
    assert lease.id in store.leases and lease.deadline > keeper_time.clock.now
    assert store.get("svc").lease == lease.id
    # Unrenewed, it still ends one TTL later.
    renewed = lease.deadline
    await run_keeper_until(store, keeper_time, lambda: not store.leases)
    assert keeper_time.clock.now >= renewed


# ---- a stateful property test against a dict model -------------------------------

EXAMPLES = int(os.environ.get("GERYON_PROPERTY_EXAMPLES", "50"))
GOOD_NAMES = ["a", "b", "tcp!h0!1", "tcp!h1!2"]
BAD_NAMES = ["", "new", "a b", "x/y", "c\x00"]
GOOD_ATTRS = ["proto", "sys", "port"]
VALUES = st.sampled_from(["", "tcp", "h0", "1"])
ATTRS = st.dictionaries(st.sampled_from(GOOD_ATTRS), VALUES, max_size=3)
CALLERS = st.sampled_from([ALICE, BOB, ROOT])
OWNERS = {c.name: c for c in (ALICE, BOB, ROOT)}
TTLS = st.sampled_from([1000, 5000, 60_000, 100])  # 100 is below the floor
PER_LEASE = 2
HISTORY = 2


class StoreMachine(RuleBasedStateMachine):
    """The store against a plain model: services by name, leases by id."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="geryon-store-"))
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        self.saved_time = store_mod.time
        store_mod.time = self.clock  # type: ignore[assignment]
        self.store: SQLiteStore | None = None
        # The model.
        self.services: dict[str, Service] = {}
        self.leases: dict[int, tuple[str, int, float]] = {}  # id -> owner, ttl, deadline
        self.revision = 0
        self.next_lease = 1
        self.oldest = 1
        # Every durable revision heard through on_commit, in order.
        self.log: list[tuple[int, tuple[Event, ...]]] = []

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Call a store method on the loop (its writes need a running loop)
        and, when it is a coroutine, run it to the end: a write returns once
        durable."""

        async def inside() -> Any:
            result = fn()
            if inspect.isawaitable(result):
                result = await result
            return result

        return self.run(inside())

    def teardown(self) -> None:
        try:
            if self.store is not None:
                self.run(self.store.close())
        finally:
            self.loop.close()
            store_mod.time = self.saved_time  # type: ignore[assignment]
            shutil.rmtree(self.dir, ignore_errors=True)

    def open(self) -> None:
        self.store = self.run(SQLiteStore.open(self.dir, limits=Limits(PER_LEASE, HISTORY)))
        self.store.on_commit.append(lambda r, ev: self.log.append((r, ev)))

    @initialize()
    def start(self) -> None:
        self.open()

    # -- helpers --

    def attempt(self, expected: type[GeryonError] | None, call: Callable[[], Any]) -> Any:
        """Run one store call; it must raise ``expected`` and change nothing,
        or succeed and be durable."""
        assert self.store is not None
        if expected is not None:
            before = (self.store.revision, dict(self.store.services), set(self.store.leases))
            try:
                self.call(call)
            except expected:
                pass
            else:
                raise AssertionError(f"expected {expected.__name__}")
            assert (
                self.store.revision,
                dict(self.store.services),
                set(self.store.leases),
            ) == before
            return None
        got = self.call(call)
        return got.value if isinstance(got, Written) else got

    def lease_of(self, pick: int) -> int:
        """An id the model holds (0 when it holds none), or for a negative
        pick one it never held (-1) or may no longer hold (-2)."""
        held = sorted(self.leases)
        if pick >= 0:
            return held[pick % len(held)] if held else 0
        return self.next_lease + 3 if pick == -1 else max(1, self.next_lease - 1)

    def bump(self) -> int:
        self.revision += 1
        return self.revision

    # -- rules --

    def expect_register(self, name: str, lease: int, caller: Caller) -> type[GeryonError] | None:
        """The error a well-formed Register must meet, in the store's order."""
        prev = self.services.get(name)
        if lease and (lease not in self.leases or self.leases[lease][0] != caller.name):
            return NotFound  # another's lease is not found, as one that never was
        if (
            lease
            and sum(s.lease == lease for s in self.services.values()) >= PER_LEASE
            and not (prev and prev.lease == lease)
        ):
            return ResourceExhausted
        if prev is not None and prev.owner != caller.name:
            return AlreadyExists
        return None

    def do_register(self, name: str, attrs: dict[str, str], lease: int, caller: Caller) -> None:
        err = self.expect_register(name, lease, caller)
        got = self.attempt(
            err,
            lambda: self.store.register(name, attrs, lease=lease, persist=not lease, caller=caller),
        )
        if err is not None:
            return
        prev = self.services.get(name)
        if prev is not None and prev.attrs == attrs and prev.lease == lease:
            assert got == prev  # an idempotent upsert: no new revision
            return
        rev = self.bump()
        want = Service(name, attrs, lease, caller.name, prev.create_revision if prev else rev, rev)
        assert got == want
        self.services[name] = want

    @rule(
        name=st.sampled_from(GOOD_NAMES),
        attrs=ATTRS,
        leased=st.booleans(),
        pick=st.integers(-1, 4),
        caller=CALLERS,
    )
    def register(
        self, name: str, attrs: dict[str, str], leased: bool, pick: int, caller: Caller
    ) -> None:
        self.do_register(name, attrs, self.lease_of(pick) if leased else 0, caller)

    @precondition(lambda self: self.leases)
    @rule(name=st.sampled_from(GOOD_NAMES), attrs=ATTRS, pick=st.integers(0, 3))
    def register_on_lease(self, name: str, attrs: dict[str, str], pick: int) -> None:
        """The lease's owner puts an entry under it (up to the per-lease limit)."""
        lease = self.lease_of(pick)
        self.do_register(name, attrs, lease, OWNERS[self.leases[lease][0]])

    @precondition(lambda self: self.services)
    @rule(pick=st.integers(0, 7), attrs=ATTRS, lease_pick=st.integers(-2, 3), same=st.booleans())
    def reregister(self, pick: int, attrs: dict[str, str], lease_pick: int, same: bool) -> None:
        """The owner announces again: the same entry (idempotent) or a moved one."""
        prev = self.services[sorted(self.services)[pick % len(self.services)]]
        caller = OWNERS[prev.owner]
        if same:
            self.do_register(prev.name, dict(prev.attrs), prev.lease, caller)
        else:
            lease = self.lease_of(lease_pick) if lease_pick >= -1 else 0
            self.do_register(prev.name, attrs, lease, caller)

    @rule(
        bad=st.sampled_from(
            [
                ("", {}, 0, True),
                ("new", {}, 0, True),
                ("a b", {}, 0, True),
                ("x/y", {}, 0, True),
                ("c\x00", {}, 0, True),
                ("a", {"bad name": "1"}, 0, True),
                ("a", {"v": "x" * 1025}, 0, True),
                ("a", {}, 0, False),  # neither lease nor persist
                ("a", {}, -1, False),
                ("a", {}, -2, True),  # both: -2 stands for a held lease
            ]
        ),
        caller=CALLERS,
    )
    def register_bad(self, bad: tuple[str, dict[str, str], int, bool], caller: Caller) -> None:
        name, attrs, lease, persist = bad
        if lease == -2:
            lease = self.lease_of(0) or self.next_lease
        self.attempt(
            InvalidArgument,
            lambda: self.store.register(name, attrs, lease=lease, persist=persist, caller=caller),
        )

    def expect_change(self, name: str, expected: int, caller: Caller) -> type[GeryonError] | None:
        prev = self.services.get(name)
        if prev is None:
            return NotFound
        if prev.owner != caller.name and not caller.admin:
            return PermissionDenied
        if expected and expected != prev.mod_revision:
            return FailedPrecondition
        return None

    def target(self, pick: int, fence: str, as_owner: bool) -> tuple[str, int, Caller | None]:
        """A name (held, or not when pick < 0), a fence and maybe its owner."""
        held = sorted(self.services)
        name = held[pick % len(held)] if held and pick >= 0 else GOOD_NAMES[pick % 4]
        prev = self.services.get(name)
        mod = prev.mod_revision if prev else 0
        expected = {"none": 0, "current": mod, "stale": mod + 1}[fence]
        return name, expected, OWNERS[prev.owner] if prev and as_owner else None

    @precondition(lambda self: self.services)
    @rule(
        pick=st.integers(-1, 7),
        set_attrs=st.dictionaries(st.sampled_from(GOOD_ATTRS), VALUES, max_size=2),
        remove=st.lists(st.sampled_from(GOOD_ATTRS), max_size=2),
        fence=st.sampled_from(["none", "current", "stale"]),
        as_owner=st.booleans(),
        caller=CALLERS,
    )
    def update(
        self,
        pick: int,
        set_attrs: dict[str, str],
        remove: list[str],
        fence: str,
        as_owner: bool,
        caller: Caller,
    ) -> None:
        name, expected, owner = self.target(pick, fence, as_owner)
        caller = owner or caller
        remove = [a for a in remove if a not in set_attrs]
        err = self.expect_change(name, expected, caller)
        got = self.attempt(
            err,
            lambda: self.store.update(
                name, set_attrs, remove, expected_mod_revision=expected, caller=caller
            ),
        )
        if err is not None:
            return
        prev = self.services[name]
        attrs = {k: v for k, v in prev.attrs.items() if k not in remove} | set_attrs
        if attrs == prev.attrs:
            assert got == prev
            return
        rev = self.bump()
        want = Service(name, attrs, prev.lease, prev.owner, prev.create_revision, rev)
        assert got == want
        self.services[name] = want

    @rule(
        bad=st.sampled_from(
            [
                ("a b", {}, [], 0),
                ("index", {}, [], 0),
                ("a", {"bad name": "1"}, [], 0),
                ("a", {}, ["a*"], 0),
                ("a", {"proto": "1"}, ["proto"], 0),  # set and remove the same attr
                ("a", {}, [], -1),
            ]
        ),
        caller=CALLERS,
    )
    def update_bad(self, bad: tuple[str, dict[str, str], list[str], int], caller: Caller) -> None:
        name, set_attrs, remove, expected = bad
        self.attempt(
            InvalidArgument,
            lambda: self.store.update(
                name, set_attrs, remove, expected_mod_revision=expected, caller=caller
            ),
        )

    @precondition(lambda self: self.services)
    @rule(
        pick=st.integers(-1, 7),
        fence=st.sampled_from(["none", "current", "stale"]),
        as_owner=st.booleans(),
        caller=CALLERS,
    )
    def unregister(self, pick: int, fence: str, as_owner: bool, caller: Caller) -> None:
        name, expected, owner = self.target(pick, fence, as_owner)
        caller = owner or caller
        err = self.expect_change(name, expected, caller)
        got = self.attempt(
            err, lambda: self.store.unregister(name, expected_mod_revision=expected, caller=caller)
        )
        if err is None:
            assert got == self.services.pop(name)
            self.bump()

    @rule(ttl=TTLS, caller=CALLERS)
    def grant(self, ttl: int, caller: Caller) -> None:
        if ttl < 500:
            self.attempt(InvalidArgument, lambda: self.store.grant(ttl, caller=caller))
            return
        lease = self.attempt(None, lambda: self.store.grant(ttl, caller=caller))
        assert (lease.id, lease.ttl_ms, lease.owner) == (self.next_lease, ttl, caller.name)
        self.leases[lease.id] = (caller.name, ttl, self.clock.now + ttl / 1000)
        self.next_lease += 1

    @rule(pick=st.integers(-2, 3), caller=CALLERS)
    def keepalive(self, pick: int, caller: Caller) -> None:
        assert self.store is not None
        lid = self.lease_of(pick)
        store = self.store
        if lid not in self.leases:
            assert self.call(lambda: store.keepalive(lid, caller=caller, holder="t")) == 0
            return
        owner, ttl, _ = self.leases[lid]
        if owner != caller.name:  # as if it were not there
            assert self.call(lambda: store.keepalive(lid, caller=caller, holder="t")) == 0
            return
        assert self.call(lambda: store.keepalive(lid, caller=caller, holder="t")) == ttl
        self.leases[lid] = (owner, ttl, self.clock.now + ttl / 1000)

    def end_lease(self, lid: int) -> int:
        gone = sorted(n for n, s in self.services.items() if s.lease == lid)
        del self.leases[lid]
        if gone:
            self.bump()
            for n in gone:
                del self.services[n]
        return len(gone)

    @rule(pick=st.integers(-2, 3), caller=st.one_of(CALLERS, st.none()))
    def revoke(self, pick: int, caller: Caller | None) -> None:
        lid = self.lease_of(pick)
        err: type[GeryonError] | None = None
        if lid not in self.leases:
            err = NotFound
        elif caller is not None and not caller.admin and self.leases[lid][0] != caller.name:
            err = NotFound
        store = self.store
        assert store is not None

        async def revoke() -> int:
            if caller is None:  # the registry itself (expiry, a closed stream)
                deleted, durable = store._revoke(lid, caller=None)
                await durable
                return deleted
            return await done(store.revoke(lid, caller=caller))

        got = self.attempt(err, revoke)
        if err is None:
            assert got == self.end_lease(lid)

    @rule(dt=st.sampled_from([0.0, 0.4, 1.0, 2.5]))
    def expire(self, dt: float) -> None:
        assert self.store is not None
        self.clock.now += dt
        due = sorted(
            lid for lid, (_, _, deadline) in self.leases.items() if deadline <= self.clock.now
        )
        ended = self.call(lambda: self.store.expire(now=self.clock.now))
        assert sorted(ended) == due
        # One revision per lease that held services, in the order they ended.
        for lid in ended:
            self.end_lease(lid)
        self.run(self.store.sync())

    @rule(dt=st.sampled_from([0.0, 100.0]))
    def restart(self, dt: float) -> None:
        assert self.store is not None
        self.run(self.store.close())
        self.clock.now += dt
        self.open()
        self.leases = {
            lid: (owner, ttl, self.clock.now + ttl / 1000)
            for lid, (owner, ttl, _) in self.leases.items()
        }
        assert self.store.revision == self.revision
        assert self.store.next_lease == self.next_lease

    @rule(
        want=st.dictionaries(st.sampled_from(GOOD_ATTRS), st.sampled_from(["", "tcp", "1", "*"])),
        prefix=st.sampled_from(["", "t", "tcp!h0", "a", "z"]),
    )
    def find(self, want: dict[str, str], prefix: str) -> None:
        assert self.store is not None
        flt = Filter(want, prefix)
        expected = [
            s
            for n, s in sorted(self.services.items())
            if n.startswith(prefix)
            and all(a in s.attrs and v in ("*", s.attrs[a]) for a, v in want.items())
        ]
        assert self.store.find(flt) == expected

    @precondition(lambda self: self.log)
    @rule(back=st.integers(0, 8))
    def history(self, back: int) -> None:
        assert self.store is not None
        start = max(1, self.revision - back)
        if start < self.store.oldest_revision:
            try:
                self.store.history_since(start)
            except OutOfRange as exc:
                assert exc.resume_revision == self.store.oldest_revision
            else:
                raise AssertionError("expected OutOfRange")
        else:
            assert self.store.history_since(start) == [(r, ev) for r, ev in self.log if r >= start]

    # -- invariants --

    @invariant()
    def matches_the_model(self) -> None:
        assert self.store is not None
        assert {s.name: s for s in self.store.find(Filter())} == self.services
        assert self.store.revision == self.store.durable_revision == self.revision
        held = {
            lid: (lz.owner, lz.ttl_ms, lz.deadline, lz.services)
            for lid, lz in self.store.leases.items()
        }
        assert held == {
            lid: (owner, ttl, deadline, {n for n, s in self.services.items() if s.lease == lid})
            for lid, (owner, ttl, deadline) in self.leases.items()
        }

    @invariant()
    def events_rebuild_the_model(self) -> None:
        rebuilt: dict[str, Service] = {}
        last = 0
        for revision, events in self.log:
            assert revision > last  # strictly increasing, across restarts too
            last = revision
            for e in events:
                assert e.revision == revision
                if e.type is EventType.PUT:
                    assert rebuilt.get(e.service.name) == e.prev
                    rebuilt[e.service.name] = e.service
                else:
                    assert rebuilt.pop(e.service.name) == e.service
        assert rebuilt == self.services
        assert last == self.revision

    @invariant()
    def history_is_the_tail_of_the_log(self) -> None:
        assert self.store is not None
        oldest = self.store.oldest_revision
        assert oldest >= self.oldest  # compaction never comes undone
        self.oldest = oldest
        held = self.store.history_since(oldest)
        assert held == [(r, ev) for r, ev in self.log if r >= oldest]

    @invariant()
    def index_is_exact(self) -> None:
        assert self.store is not None
        index: dict[str, dict[str, set[str]]] = {}
        for s in self.services.values():
            for a, v in s.attrs.items():
                index.setdefault(a, {}).setdefault(v, set()).add(s.name)
        assert self.store.index == index
        assert list(self.store.names) == sorted(self.services)


def test_store_against_a_model() -> None:
    run_state_machine_as_test(
        StoreMachine,
        settings=settings(max_examples=EXAMPLES, stateful_step_count=30, deadline=None),
    )
