"""Property tests: random valid and invalid requests against a real registry,
held against a simple model, on both stores.

A hypothesis state machine drives one real ``geryon-registryd`` (plain text,
loopback) as three owners (``geryon-user`` metadata; over plain text each is
an admin by role, so leases are where owners meet: registering under another
owner's lease is NOT_FOUND, as one that never existed, and keeping it alive
answers a ttl of 0). The test runs twice: on the embedded
SQLite store (its own data dir), and as a front of a real three-member etcd
cluster (its own key prefix). The daemon is started once per test and shared
by every example: each example works in its own name prefix and cleans up
after itself, so thousands of examples (``make test-long``) cost no process
starts beyond the restarts they ask for.

The model is exact, not approximate: it predicts each reply in full (service,
owner, lease, create/mod revision, header revision), the status of every
rejection (validation first, INVALID_ARGUMENT; then NOT_FOUND,
PERMISSION_DENIED, ALREADY_EXISTS, FAILED_PRECONDITION from the state), keeps
every change's events and the state after it, and after every step compares
Find and Leases with itself. (Registering an entry exactly as it is, like an
Update that changes nothing, makes no revision and answers with the entry as
it was.) Nothing acknowledged may be lost, across kill -9 and SIGTERM
restarts too. UNKNOWN and INTERNAL are never acceptable answers.

Revisions. On SQLite nothing else writes within an example, so every change
must get exactly the next revision, and reads answer at exactly the last
change's. On etcd the revision is etcd's: leases, lease holders, a front's
start take revisions too, without events. There every change must get a
revision above the last change's and above every header a reply showed
before it was asked for, the model learns it from the reply (the service's
mod_revision; Unregister's and Revoke's header) or, for what the registry
ends by itself (a lease's TTL, a KeepAlive stream's end), from a raw watch on
the example's namespace (the oracle, itself checked like every watcher), and
headers of reads and no-ops may be above the last change. One rule sends
concurrent writes to distinct names: their revisions must be distinct and
above the model's (on SQLite exactly the next ones), each reply matching its
own. Each example starts with a watcher and a few services (some sharing a
lease), and the request mix leans towards what changes state and moves
entries in and out of watchers' filters; reads and requests that must be
refused share one rule.

Leases, and why the model stays deterministic. A lease ends only where the
model says so:
- kept leases (``Client.lease``, a 15 s TTL renewed in the background) and idle
  leases (the 1-day TTL ceiling, never renewed) cannot expire during a run;
  a restart of the SQLite registry gives them a fresh TTL, while etcd keeps
  counting (the client library's Lease reconnects and renews);
- Revoke ends one at once;
- closing the KeepAlive stream that holds one (the client process "exited")
  ends it: the rule waits until Leases no longer lists it, then applies the
  deletion of its services as one revision;
- one rule per example grants a 500 ms lease (etcd makes it 2 s, its minimum)
  nobody renews and registers under it. A registration may race the expiry:
  NOT_FOUND is accepted only once Leases confirms the lease is gone. The rule
  then waits for the lease to go and applies its deletion. Only the eventual
  state is asserted, never how long anything took.
Lease ids must be new (on SQLite, increasing); a Grant answers the TTL the
store grants (etcd's: whole seconds, at least 2 s), and KeepAlive and Leases
report it.

Watchers (1-3 at a time, raw ``RegistryStub`` streams that show message
boundaries and client-library ``Watch`` iterators; from now, from a snapshot,
or from a past revision; filtered by attributes and prefix) are checked
against the model's history: ordered, unique, atomic (each revision whole in
one message), reliable (exactly the model's filtered events, no gap),
resumable (a watch from R starts at the first matching event at or after R,
and raw watches resume from their last revision after a restart), and
bookmarkable (after a progress notice for R nothing at or below R arrives,
and everything up to R has). Caught up, each watcher's replay (from its
snapshot, or from the model's state where it started) equals Find's answer.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import itertools
import os
import re
import unicodedata
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from conftest import Registry, both_stores, eventually
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from geryon import errors
from geryon.client import Client, Lease, error_from_rpc
from geryon.convert import event_from_pb, pb, pb_grpc, service_from_pb
from geryon.model import Event, EventType, Service

EXAMPLES = int(os.environ.get("GERYON_PROPERTY_EXAMPLES", "15"))
STEPS = int(os.environ.get("GERYON_PROPERTY_STEPS", "25"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)

OWNERS = ("alice", "bob", "carol")
KEEP_TTL_MS = 15_000  # kept alive by a client-library Lease; outlasts a restart's backoff
IDLE_TTL_MS = 86_400_000  # the ceiling: an idle lease outlives any run
SHORT_TTL_MS = 500  # the floor: the one lease allowed to expire
ETCD_MIN_TTL_MS = 2_000  # etcd's minimum lease TTL with its default timings
UNKNOWN_LEASE = 10**12  # never granted
STEP_TIMEOUT = 60.0
SETTLE_TIMEOUT = 20.0
MAX_LEASES, MAX_WATCHERS, MAX_RESTARTS, MAX_EXPIRIES = 4, 3, 2, 1

# ---- what valid means (written from the proto's comments, not from geryon) --

RESERVED = ("new", "find", "index", "event")
ATTR_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
KEYS = ("role", "zone", "v", "A.b-c_9", "k" * 64)
VALUES = ("", "x", "y", "*", "a b", "ü", "v" * 1024, "é" * 512)
# Mostly the attributes and values filters ask for, so that entries enter
# and leave watchers' filters often.
COMMON_KEYS = ("role", "zone") * 3 + KEYS
COMMON_VALUES = ("x", "y") * 3 + VALUES
BAD_KEYS = ("", "bad key", "k" * 65, "ä", "a=b", "x/y")
BAD_VALUES = ("é" * 513, "v" * 1025)
FULL = {f"f{i}": "" for i in range(64)}  # the most attributes an entry may have
FILTER_KEYS = ("role", "zone", "role", "zone", "v")
FILTER_VALUES = ("x", "x", "y", "*", "*", "*", "")
SUFFIXES = ("a", "b", "c", "tcp!h0!6701", "ü.x")

ErrorSet = frozenset[type[errors.GeryonError]]
OK: ErrorSet = frozenset()
INVALID: ErrorSet = frozenset({errors.InvalidArgument})
# What the runs reached (printed at the end; see it with pytest -s).
REACHED: collections.Counter[str] = collections.Counter()


def valid_name(name: str) -> bool:
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        return False
    return (
        1 <= size <= 255
        and name not in RESERVED
        and not any(c in " /" or unicodedata.category(c) == "Cc" for c in name)
    )


def valid_attrs(attrs: dict[str, str]) -> bool:
    return len(attrs) <= 64 and all(
        ATTR_NAME.fullmatch(k) and len(v.encode()) <= 1024 for k, v in attrs.items()
    )


def matches(attrs: dict[str, str], prefix: str, s: Service | None) -> bool:
    return (
        s is not None
        and s.name.startswith(prefix)
        and all(k in s.attrs and v in ("*", s.attrs[k]) for k, v in attrs.items())
    )


def by_name(e: Event) -> str:
    return e.service.name


def translate(attrs: dict[str, str], prefix: str, events: list[Event]) -> list[Event]:
    """One revision's events as a filtered watcher must see them."""
    out = []
    for e in events:
        if matches(attrs, prefix, e.service):
            out.append(e)
        elif e.type is EventType.PUT and matches(attrs, prefix, e.prev):
            out.append(Event(EventType.DELETE, e.service, e.prev, e.revision))
    return sorted(out, key=by_name)


async def rpc(client: Client, method: str, request: Any) -> Any:
    """One unary call, no retries (a retried write is not the same write);
    wait_for_ready rides out a restarting registry instead."""
    call = getattr(pb_grpc.RegistryStub(client.channel), method)
    try:
        return await call(request, metadata=client.metadata, timeout=30, wait_for_ready=True)
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc) from exc


class Requests:
    """The request side of a stream, fed by ``put``; None ends it. A class
    rather than an async generator: a call cancelled while the generator
    waits leaves grpc finalizing a generator that is still running."""

    def __init__(self, *first: Any) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        for m in first:
            self.put(m)

    def put(self, message: Any) -> None:
        self.queue.put_nowait(message)

    def __aiter__(self) -> Requests:
        return self

    async def __anext__(self) -> Any:
        message = await self.queue.get()
        if message is None:
            raise StopAsyncIteration
        return message


async def keepalive_once(client: Client, lease: int) -> pb.KeepAliveResponse:
    """Renew ``lease`` on a fresh stream, read the answer, then cancel the
    stream (a client that went away)."""
    stub = pb_grpc.RegistryStub(client.channel)
    call = stub.KeepAlive(Requests(pb.KeepAliveRequest(lease=lease)), metadata=client.metadata)
    try:
        return await asyncio.wait_for(call.read(), 10)
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc) from exc
    finally:
        call.cancel()


def describe(codes: ErrorSet) -> str:
    return "/".join(sorted(c.code for c in codes)) or "success"


# ---- watchers ---------------------------------------------------------------


@dataclass
class Item:
    """One thing a watcher delivered: ``events`` (one message), ``progress``,
    ``snapshot`` (the whole initial state), or ``break`` (the stream ended)."""

    kind: str
    revision: int = 0
    events: list[Event] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)
    header: int = 0
    code: str = ""


class Recorder:
    """One watch and everything it delivered, in order."""

    def __init__(
        self,
        client: Client,
        attrs: dict[str, str],
        prefix: str,
        *,
        mode: str,
        start: int,
        opened_at: int,
        interval: int,
    ) -> None:
        self.client = client
        self.attrs, self.prefix = attrs, prefix
        self.mode, self.start_revision, self.opened_at = mode, start, opened_at
        self.interval = interval
        self.items: list[Item] = []
        self.anomalies: list[str] = []
        self.task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        kind = "raw" if isinstance(self, RawRecorder) else "client"
        return (
            f"<{kind} watch {self.mode} from {self.start_revision or self.opened_at} "
            f"attrs={self.attrs} prefix={self.prefix!r}>"
        )

    def add(self, item: Item) -> None:
        self.items.append(item)

    def reached(self) -> int:
        """The newest revision this watcher is known to have everything up to."""
        r = 0
        for it in self.items:
            if it.kind in ("progress", "snapshot"):
                r = max(r, it.revision)
            elif it.kind == "events" and it.events:
                r = max(r, it.events[-1].revision)
        return r

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=repr(self))

    async def _run(self) -> None:
        raise NotImplementedError

    def request_progress(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class RawRecorder(Recorder):
    """A bare RegistryStub stream: message boundaries are visible. After a
    break (a registry restart) it resumes from the revision after the last
    one it has everything up to."""

    requests: Requests | None = None

    def request_progress(self) -> None:
        if self.requests is not None:
            self.requests.put(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))

    async def _run(self) -> None:
        stub = pb_grpc.RegistryStub(self.client.channel)
        snapshot = self.mode == "snapshot"
        next_revision = self.start_revision
        while True:
            create = pb.WatchCreateRequest(
                attrs=self.attrs,
                prefix=self.prefix,
                start_revision=0 if snapshot else next_revision,
                snapshot=snapshot,
                progress_interval_ms=self.interval,
            )
            self.requests = Requests(pb.WatchRequest(create_request=create))
            call = stub.Watch(self.requests, metadata=self.client.metadata)
            listed: list[Service] = []
            try:
                async for r in call:
                    if r.type == pb.WatchResponse.TYPE_SNAPSHOT:
                        for e in r.events:
                            if e.type != pb.Event.TYPE_PUT or e.revision != e.service.mod_revision:
                                self.anomalies.append(f"odd snapshot event {e}")
                            listed.append(service_from_pb(e.service))
                    elif r.type == pb.WatchResponse.TYPE_SNAPSHOT_COMPLETE:
                        self.add(
                            Item("snapshot", r.revision, services=listed, header=r.header.revision)
                        )
                        snapshot, next_revision = False, r.revision + 1
                    elif r.type == pb.WatchResponse.TYPE_PROGRESS:
                        self.add(Item("progress", r.revision, header=r.header.revision))
                        next_revision = r.revision + 1
                    elif r.type == pb.WatchResponse.TYPE_EVENTS:
                        events = [event_from_pb(e) for e in r.events]
                        self.add(Item("events", events=events, header=r.header.revision))
                        if events:
                            next_revision = events[-1].revision + 1
                    else:
                        self.anomalies.append(f"message of type {r.type}")
            except grpc.aio.AioRpcError as exc:
                self.add(Item("break", code=exc.code().name))
            finally:
                call.cancel()
            if snapshot:
                self.anomalies.append("the stream broke before the snapshot completed")
                return
            await asyncio.sleep(0.05)


class ClientRecorder(Recorder):
    """The client library's Watch (List+Watch); it resumes by itself."""

    watch: Any = None

    def request_progress(self) -> None:
        if self.watch is not None:
            self.watch.request_progress()

    async def _run(self) -> None:
        self.watch = self.client.watch(
            self.attrs,
            prefix=self.prefix,
            start_revision=self.start_revision,
            snapshot=self.mode == "snapshot",
            progress_interval_ms=self.interval,
        )
        try:
            async for m in self.watch:
                if m.kind == "snapshot":
                    self.add(Item("snapshot", m.revision, services=list(m.services)))
                elif m.kind == "progress":
                    self.add(Item("progress", m.revision))
                else:
                    self.add(Item("events", m.revision, events=list(m.events)))
        except errors.GeryonError as exc:
            self.add(Item("break", code=exc.code))

    async def close(self) -> None:
        if self.watch is not None:
            await self.watch.close()
        await super().close()


# ---- the model --------------------------------------------------------------


@dataclass
class LeaseModel:
    owner: str
    ttl_ms: int
    keeper: Lease | None = None  # renews it in the background; None: nobody does


@dataclass
class Plan:
    """A write the model has predicted: the errors it may fail with (none:
    it must succeed), and on success either ``noop`` (the reply is ``prev``,
    no revision) or ``make(revision)`` giving the reply and the events."""

    what: str
    faults: ErrorSet
    call: Callable[[], Awaitable[Any]]
    prev: Service | None = None
    noop: bool = False
    make: Callable[[int], tuple[Service, list[Event]]] | None = None
    unregister: bool = False


# Preconditions are plain functions: hypothesis describes lambdas by parsing
# this file's source, which is slow and has tripped a CPython AST bug.
def lease_room(m: RegistryMachine) -> bool:
    return len(m.leases) < MAX_LEASES


def has_leases(m: RegistryMachine) -> bool:
    return bool(m.leases)


def expiry_room(m: RegistryMachine) -> bool:
    return m.expiries < MAX_EXPIRIES


def restart_room(m: RegistryMachine) -> bool:
    return m.restarts < MAX_RESTARTS


def watcher_room(m: RegistryMachine) -> bool:
    return len(m.watchers) < MAX_WATCHERS


def has_entries(m: RegistryMachine) -> bool:
    return bool(m.entries)


def has_watchers(m: RegistryMachine) -> bool:
    return bool(m.watchers)


@dataclass
class Env:
    """What every example of one test shares: the registry, one client per
    owner, and every lease id granted so far. ``strict``: the store's
    revisions are contiguous and its TTLs exact (SQLite); else they are
    etcd's."""

    registry: Registry
    loop: asyncio.AbstractEventLoop
    strict: bool = True
    clients: dict[str, Client] = field(default_factory=dict)
    examples: Iterator[int] = field(default_factory=itertools.count)
    max_lease: int = 0
    lease_ids: set[int] = field(default_factory=set)


class RegistryMachine(RuleBasedStateMachine):
    env: Env  # bound by the test

    def __init__(self) -> None:
        super().__init__()
        self.broken = False
        self.ns = f"p{next(self.env.examples)}."
        rest = 255 - len(self.ns)
        # Exactly 255 bytes, two to a character: valid.
        edge = self.ns + "é" * (rest // 2) + "n" * (rest % 2)
        self.names = [self.ns + s for s in SUFFIXES] + [edge]
        self.bad_names = [
            "",
            *RESERVED,
            self.ns + "a b",
            self.ns + "a/b",
            self.ns + "a\x00b",
            self.ns + "\t",
            self.ns + "\x7f",
            self.ns + "\x85",
            self.ns + "n" * (256 - len(self.ns)),
            self.ns + "é" * ((256 - len(self.ns)) // 2 + 1),
        ]
        self.prefixes = [self.ns, self.ns + "a", self.ns + "t", self.ns + "ü"]
        self.entries: dict[str, Service] = {}
        self.leases: dict[int, LeaseModel] = {}
        self.dead: set[int] = set()
        self.watchers: list[Recorder] = []
        self.restarts = self.expiries = 0
        self.strict = self.env.strict
        found, self.base = self.run(self.c(OWNERS[0]).find(prefix=self.ns))
        assert found == [], f"namespace {self.ns} not empty: {found}"
        # The revision of the last change to the namespace (before any, the
        # first read's); every change's revision, oldest first, its events
        # and the state after it.
        self.revision = self.base
        self.revs: list[int] = []
        self.history: dict[int, list[Event]] = {}
        self.states: dict[int, dict[str, Service]] = {}
        # The highest header revision any reply has shown: every later change
        # must be above it (a reply reflects every change up to its header).
        self.heard = self.base
        # A raw watch on the whole namespace, from now: how the model learns
        # the revisions of what the registry ends by itself; checked like
        # every other watcher.
        self.oracle = RawRecorder(
            self.c(OWNERS[0]),
            {},
            self.ns,
            mode="now",
            start=0,
            opened_at=self.revision,
            interval=1000,
        )
        self.run(self._open(self.oracle))

    # ---- plumbing -----------------------------------------------------------

    def run(self, coro: Awaitable[Any]) -> Any:
        try:
            return self.env.loop.run_until_complete(asyncio.wait_for(coro, STEP_TIMEOUT))
        except BaseException:
            self.broken = True
            raise

    def c(self, owner: str) -> Client:
        return self.env.clients[owner]

    async def expect(self, what: str, call: Awaitable[Any], faults: ErrorSet) -> Any:
        """Await a call the model predicted: success when ``faults`` is empty,
        else a rejection with one of them. None when it was rejected."""
        try:
            result = await call
        except errors.GeryonError as exc:
            result = exc
        return self.judge(what, result, faults)

    def judge(self, what: str, result: Any, faults: ErrorSet) -> Any:
        outcome = result.code if isinstance(result, errors.GeryonError) else "OK"
        REACHED[f"{what.split()[0]} {outcome}"] += 1
        if isinstance(result, errors.GeryonError):
            # error_from_rpc maps UNKNOWN and anything unexpected to Internal.
            assert not isinstance(result, errors.Internal), (
                f"{what}: the server answered {result!r}"
            )
            assert faults, f"{what}: rejected with {result.code} ({result}); the model says success"
            assert type(result) in faults, (
                f"{what}: rejected with {result.code} ({result}); the model says {describe(faults)}"
            )
            return None
        assert not faults, f"{what}: accepted; the model says {describe(faults)}"
        return result

    def commit(self, rev: int, events: list[Event], *, floor: int | None = None) -> None:
        """Apply a change (the events of revision ``rev``) to the model. It
        must be above the last change and above ``floor`` (by default every
        header heard so far: what was answered before the change was asked
        for); on SQLite it must be exactly the next revision."""
        floor = self.heard if floor is None else floor
        what = ", ".join(f"{e.type.name} {e.service.name!r}" for e in events)
        assert rev > self.revision, f"{what}: revision {rev}, the last change was {self.revision}"
        assert rev > floor, f"{what}: revision {rev}, a reply had already said {floor}"
        if self.strict:
            assert rev == self.revision + 1, f"{what}: revision {rev}, want {self.revision + 1}"
        assert events and all(e.revision == rev for e in events)
        for e in events:
            if e.type is EventType.PUT:
                self.entries[e.service.name] = e.service
            else:
                del self.entries[e.service.name]
        self.revision = rev
        self.revs.append(rev)
        self.history[rev] = sorted(events, key=by_name)
        self.states[rev] = dict(self.entries)

    def state_at(self, revision: int) -> dict[str, Service]:
        """The namespace as of ``revision`` (empty before its first change)."""
        i = bisect.bisect_right(self.revs, revision)
        return self.states[self.revs[i - 1]] if i else {}

    def last_change(self) -> int:
        """What a caught-up watcher must have reached: on SQLite the
        registry's revision; on etcd the namespace's last change (the front
        may not follow revisions made outside its prefix)."""
        if self.strict:
            return self.revision
        return self.revs[-1] if self.revs else 0

    def hear(self, revision: int) -> None:
        self.heard = max(self.heard, revision)

    def check_read(self, what: str, revision: int) -> None:
        """A read's (or a no-op's) header: on SQLite exactly the last
        change's revision; on etcd at least that."""
        if self.strict:
            assert revision == self.revision, f"{what}: at {revision}, the model at {self.revision}"
        else:
            assert revision >= self.revision, f"{what}: at {revision}, the model at {self.revision}"
        self.hear(revision)

    def granted(self, ttl_ms: int) -> int:
        """The TTL the store grants for ``ttl_ms``: etcd's are whole
        seconds, and at least its minimum."""
        if self.strict:
            return ttl_ms
        return max(ETCD_MIN_TTL_MS, -(-ttl_ms // 1000) * 1000)

    def under(self, lease: int) -> list[Service]:
        return sorted((s for s in self.entries.values() if s.lease == lease), key=lambda s: s.name)

    def forget_lease(self, lease: int) -> None:
        del self.leases[lease]
        self.dead.add(lease)

    async def ended_by_registry(self, lease: int, floor: int) -> None:
        """The registry ended ``lease`` by itself (its TTL, its stream's end):
        its services went in one revision, above ``floor`` (what was heard
        before the lease could end), which the oracle tells."""
        gone = self.under(lease)
        if gone:
            rev = await self.learn(lease, gone)
            self.commit(rev, [Event(EventType.DELETE, s, s, rev) for s in gone], floor=floor)
        self.forget_lease(lease)

    async def learn(self, lease: int, gone: list[Service]) -> int:
        """The revision that deleted ``gone``: the first the oracle delivers
        after the model's last change. It must delete exactly ``gone``."""
        o = self.oracle

        def delivered() -> list[Event]:
            return [
                e
                for it in o.items
                if it.kind == "events"
                for e in it.events
                if e.revision > self.revision
            ]

        try:
            await eventually(delivered, timeout=SETTLE_TIMEOUT)
        except AssertionError:
            raise AssertionError(
                f"lease {lease} ended, but the oracle {o} heard nothing after "
                f"{self.revision}: {o.items[-5:]}"
            ) from None
        new = delivered()
        rev = min(e.revision for e in new)
        group = sorted((e for e in new if e.revision == rev), key=by_name)
        want = [Event(EventType.DELETE, s, s, rev) for s in gone]
        assert group == want, f"lease {lease} ended: revision {rev} is {group}, want {want}"
        return rev

    def new_lease(self, lease: int) -> None:
        env = self.env
        assert lease > 0 and lease not in env.lease_ids, f"lease id {lease} reused"
        if self.strict:
            assert lease > env.max_lease, f"lease id {lease} after {env.max_lease}"
        env.max_lease = max(env.max_lease, lease)
        env.lease_ids.add(lease)

    async def live_leases(self, *, settled: bool = False) -> dict[int, pb.LeaseInfo]:
        """The registry's leases; ``settled``: nothing is changing, so the
        header is checked as a read's."""
        r = await rpc(self.c(OWNERS[0]), "Leases", pb.LeasesRequest())
        ids = [x.lease for x in r.leases]
        assert ids == sorted(ids), f"Leases not sorted by id: {ids}"
        if settled:
            self.check_read("leases", r.header.revision)
        self.hear(r.header.revision)
        return {x.lease: x for x in r.leases}

    async def wait_gone(self, lease: int) -> None:
        async def gone() -> bool:
            return lease not in await self.live_leases()

        await eventually(gone, timeout=SETTLE_TIMEOUT, interval=0.05)

    # ---- drawing requests ---------------------------------------------------

    def draw_owner(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(OWNERS), label="owner")

    def draw_name(self, data: st.DataObject) -> str:
        """Mostly a name in use (so updates and removals find something),
        else any valid name, sometimes an invalid one."""
        kind = data.draw(st.integers(0, 19), label="name kind")
        if kind < 12 and self.entries:
            return data.draw(st.sampled_from(sorted(self.entries)), label="name in use")
        if kind < 19:
            return data.draw(st.sampled_from(self.names), label="name")
        return data.draw(st.sampled_from(self.bad_names), label="bad name")

    def draw_attrs(self, data: st.DataObject, label: str = "attrs") -> dict[str, str]:
        kind = data.draw(
            st.sampled_from(["small"] * 16 + ["full", "too many", "bad key", "bad value"]),
            label=f"{label} kind",
        )
        attrs = data.draw(
            st.dictionaries(
                st.sampled_from(COMMON_KEYS), st.sampled_from(COMMON_VALUES), max_size=3
            ),
            label=label,
        )
        if kind == "full":
            return dict(FULL)
        if kind == "too many":
            return {**FULL, "role": "x"}
        if kind == "bad key":
            attrs[data.draw(st.sampled_from(BAD_KEYS), label="bad key")] = "x"
        elif kind == "bad value":
            attrs["role"] = data.draw(st.sampled_from(BAD_VALUES), label="bad value")
        return attrs

    def draw_filter(self, data: st.DataObject) -> tuple[dict[str, str], str]:
        """Mostly broad filters (the whole namespace, one attribute), so
        watchers see plenty; sometimes narrow ones."""
        size = data.draw(st.sampled_from([0, 0, 1, 1, 1, 2]), label="filter size")
        attrs = data.draw(
            st.dictionaries(
                st.sampled_from(FILTER_KEYS),
                st.sampled_from(FILTER_VALUES),
                min_size=size,
                max_size=size,
            ),
            label="filter",
        )
        prefixes = [self.ns] * 5 + self.prefixes[1:]
        return attrs, data.draw(st.sampled_from(prefixes), label="prefix")

    def draw_lease_use(self, data: st.DataObject, owner: str) -> tuple[int, bool]:
        alive = sorted(self.leases)
        own = [lid for lid in alive if self.leases[lid].owner == owner]
        kinds = ["persist"] * 6 + ["neither", "both", "negative", "unknown"]
        kinds += ["own"] * 4 if own else []
        kinds += ["any"] if alive else []
        kinds += ["dead"] if self.dead else []
        kind = data.draw(st.sampled_from(kinds), label="lease use")
        if kind == "persist":
            return 0, True
        if kind == "own":
            return data.draw(st.sampled_from(own), label="lease"), False
        if kind == "any":
            return data.draw(st.sampled_from(alive), label="lease"), False
        if kind == "dead":
            return data.draw(st.sampled_from(sorted(self.dead)), label="lease"), False
        if kind == "unknown":
            return UNKNOWN_LEASE, False
        if kind == "neither":
            return 0, False
        if kind == "both":
            return (alive[0] if alive else 1), True
        return -1, data.draw(st.booleans(), label="persist")

    def draw_expected(self, data: st.DataObject, name: str) -> int:
        prev = self.entries.get(name)
        choices = [0] * 4 + [self.revision + 5, -1]
        if prev is not None:
            choices += [prev.mod_revision] * 4 + [prev.mod_revision - 1]
        return data.draw(st.sampled_from(choices), label="expected_mod_revision")

    # ---- predicting writes --------------------------------------------------

    def plan_register(
        self,
        owner: str,
        name: str,
        attrs: dict[str, str],
        lease: int,
        persist: bool,
        create_only: bool = False,
    ) -> Plan:
        request = pb.RegisterRequest(
            name=name, attrs=attrs, lease=lease, persist=persist, create_only=create_only
        )
        plan = Plan(
            f"register {name!r} by {owner} lease {lease} persist {persist}"
            + (" create_only" if create_only else ""),
            OK,
            lambda: rpc(self.c(owner), "Register", request),
        )
        if not valid_name(name) or not valid_attrs(attrs) or bool(lease) == persist or lease < 0:
            plan.faults = INVALID
            return plan
        faults: set[type[errors.GeryonError]] = set()
        if lease:
            held = self.leases.get(lease)
            if held is None or held.owner != owner:  # another's lease is not found
                faults.add(errors.NotFound)
        prev = plan.prev = self.entries.get(name)
        if prev is not None and prev.owner != owner:
            faults.add(errors.AlreadyExists)
        elif prev is not None and create_only:
            faults.add(errors.FailedPrecondition)  # a fence, checked before the no-op
        plan.faults = frozenset(faults)
        if prev is not None and prev.attrs == attrs and prev.lease == lease:
            plan.noop = True

        def make(rev: int) -> tuple[Service, list[Event]]:
            create = prev.create_revision if prev is not None else rev
            new = Service(name, dict(attrs), lease, owner, create, rev)
            return new, [Event(EventType.PUT, new, prev, rev)]

        plan.make = make
        return plan

    def plan_update(
        self,
        owner: str,
        name: str,
        set_attrs: dict[str, str],
        remove: list[str],
        expected: int,
    ) -> Plan:
        request = pb.UpdateRequest(
            name=name, set_attrs=set_attrs, remove_attrs=remove, expected_mod_revision=expected
        )
        plan = Plan(
            f"update {name!r} by {owner} set {sorted(set_attrs)} remove {remove} "
            f"expecting {expected}",
            OK,
            lambda: rpc(self.c(owner), "Update", request),
        )
        if (
            not valid_name(name)
            or not valid_attrs(set_attrs)
            or not all(ATTR_NAME.fullmatch(a) for a in remove)
            or set(remove) & set(set_attrs)
            or expected < 0
        ):
            plan.faults = INVALID
            return plan
        prev = plan.prev = self.entries.get(name)
        if prev is None:
            plan.faults = frozenset({errors.NotFound})
            return plan
        if expected and expected != prev.mod_revision:
            plan.faults = frozenset({errors.FailedPrecondition})
            return plan
        attrs = {k: v for k, v in prev.attrs.items() if k not in remove} | set_attrs
        if len(attrs) > 64:
            plan.faults = INVALID
            return plan
        plan.noop = attrs == prev.attrs

        def make(rev: int) -> tuple[Service, list[Event]]:
            new = Service(name, attrs, prev.lease, prev.owner, prev.create_revision, rev)
            return new, [Event(EventType.PUT, new, prev, rev)]

        plan.make = make
        return plan

    def plan_unregister(self, owner: str, name: str, expected: int) -> Plan:
        request = pb.UnregisterRequest(name=name, expected_mod_revision=expected)
        plan = Plan(
            f"unregister {name!r} by {owner} expecting {expected}",
            OK,
            lambda: rpc(self.c(owner), "Unregister", request),
            unregister=True,
        )
        if not valid_name(name) or expected < 0:
            plan.faults = INVALID
            return plan
        prev = plan.prev = self.entries.get(name)
        if prev is None:
            plan.faults = frozenset({errors.NotFound})
        elif expected and expected != prev.mod_revision:
            plan.faults = frozenset({errors.FailedPrecondition})
        else:
            plan.make = lambda rev: (prev, [Event(EventType.DELETE, prev, prev, rev)])
        return plan

    def draw_write(self, data: st.DataObject, name: str, kinds: list[str]) -> Plan:
        kind = data.draw(st.sampled_from(kinds), label="write")
        owner = self.draw_owner(data)
        if kind == "register":
            attrs = self.draw_attrs(data)
            lease, persist = self.draw_lease_use(data, owner)
            create_only = data.draw(st.sampled_from([False] * 3 + [True]), label="create_only")
            return self.plan_register(owner, name, attrs, lease, persist, create_only)
        if kind == "update":
            set_attrs = self.draw_attrs(data, "set_attrs")
            remove = data.draw(
                st.lists(st.sampled_from((*KEYS, "f1") * 3 + ("bad key",)), max_size=2),
                label="remove_attrs",
            )
            if data.draw(st.integers(0, 4), label="may overlap") > 0:
                remove = [a for a in remove if a not in set_attrs]
            return self.plan_update(owner, name, set_attrs, remove, self.draw_expected(data, name))
        return self.plan_unregister(owner, name, self.draw_expected(data, name))

    async def write(self, plan: Plan) -> None:
        """Run one write alone: its revision must be the next one (on etcd,
        above every earlier one)."""
        self.settle(plan, await self.expect(plan.what, plan.call(), plan.faults))

    @staticmethod
    def revision_of(plan: Plan, r: Any) -> int:
        """The revision a write's reply says it made: the service's
        mod_revision, or for Unregister the header (the revision that removed
        it). Its header must be that revision."""
        rev = r.header.revision if plan.unregister else r.service.mod_revision
        assert r.header.revision == rev, (
            f"{plan.what}: header {r.header.revision}, the change's revision {rev}"
        )
        return rev

    def settle(self, plan: Plan, r: Any) -> None:
        if r is None:
            return
        got = service_from_pb(r.service)
        if plan.noop:
            assert got == plan.prev, f"{plan.what}: answered {got}, unchanged is {plan.prev}"
            self.check_read(plan.what, r.header.revision)
            return
        assert plan.make is not None
        rev = self.revision_of(plan, r)
        want, events = plan.make(rev)
        assert got == want, f"{plan.what}: answered {got}, the model says {want}"
        self.commit(rev, events)
        self.hear(rev)

    # ---- rules: services ----------------------------------------------------

    @initialize(data=st.data())
    def populate(self, data: st.DataObject) -> None:
        """Start with a watcher and a few services (some under one lease per
        owner, so a lease's end deletes several in one revision): updates,
        removals and watchers have something to work on from the first step."""
        self.open_watch(data)
        names = data.draw(
            st.lists(st.sampled_from(self.names), max_size=5, unique=True), label="names"
        )
        holder = self.draw_owner(data)  # the leased ones share one lease
        for name in names:
            attrs = data.draw(
                st.dictionaries(
                    st.sampled_from(COMMON_KEYS), st.sampled_from(COMMON_VALUES), max_size=3
                ),
                label="attrs",
            )
            if data.draw(st.booleans(), label="under the lease"):
                if not self.leases:
                    self.run(self._grant(holder, kept=data.draw(st.booleans(), label="kept")))
                plan = self.plan_register(holder, name, attrs, max(self.leases), False)
            else:
                plan = self.plan_register(self.draw_owner(data), name, attrs, 0, True)
            self.run(self.write(plan))

    @rule(data=st.data())
    def register(self, data: st.DataObject) -> None:
        plan = self.draw_write(data, self.draw_name(data), ["register"])
        self.run(self.write(plan))

    @rule(data=st.data())
    def update(self, data: st.DataObject) -> None:
        plan = self.draw_write(data, self.draw_name(data), ["update"])
        self.run(self.write(plan))

    @rule(data=st.data())
    def unregister(self, data: st.DataObject) -> None:
        plan = self.draw_write(data, self.draw_name(data), ["unregister"])
        self.run(self.write(plan))

    @precondition(has_entries)
    @rule(data=st.data())
    def churn(self, data: st.DataObject) -> None:
        """Updates in a row that move entries in and out of watchers' filters."""
        for _ in range(data.draw(st.integers(1, 5), label="updates")):
            name = data.draw(st.sampled_from(sorted(self.entries)), label="name")
            key = data.draw(st.sampled_from(FILTER_KEYS), label="attr")
            if data.draw(st.booleans(), label="set"):
                value = data.draw(st.sampled_from(["x", "y", ""]), label="value")
                plan = self.plan_update(self.draw_owner(data), name, {key: value}, [], 0)
            else:
                plan = self.plan_update(self.draw_owner(data), name, {}, [key], 0)
            self.run(self.write(plan))

    @rule(data=st.data())
    def concurrent_writes(self, data: st.DataObject) -> None:
        """Writes to distinct names at once (one group commit, likely): each
        is predicted from the state before, and their revisions must be
        distinct and above every earlier one (on SQLite, exactly the next
        ones)."""
        names = data.draw(
            st.lists(st.sampled_from(self.names), min_size=2, max_size=4, unique=True),
            label="names",
        )
        plans = [
            self.draw_write(data, name, ["register", "update", "unregister"]) for name in names
        ]
        self.run(self._concurrent(plans))

    async def _concurrent(self, plans: list[Plan]) -> None:
        before, floor = self.revision, self.heard
        results = await asyncio.gather(
            *(self.expect(p.what, p.call(), p.faults) for p in plans), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r
        # Each reply names its own revision (Unregister's header is the
        # revision that removed the entry), so every change is placed.
        changes: list[tuple[int, Plan, Any]] = []
        noops: list[tuple[Plan, int]] = []
        for plan, r in zip(plans, results, strict=True):
            if r is None:
                continue
            got = service_from_pb(r.service)
            if plan.noop:
                assert got == plan.prev, f"{plan.what}: answered {got}, unchanged is {plan.prev}"
                noops.append((plan, r.header.revision))
                continue
            changes.append((self.revision_of(plan, r), plan, r))
        taken = sorted(rev for rev, _, _ in changes)
        top = before + len(changes)
        assert len(set(taken)) == len(taken) and all(rev > before for rev in taken), (
            f"concurrent writes got revisions {taken}, want distinct ones above {before}"
        )
        if self.strict:
            assert taken == list(range(before + 1, top + 1)), (
                f"concurrent writes got revisions {taken}, want {before + 1}..{top}"
            )
        for plan, header in noops:
            # Decided somewhere among the batch's changes.
            assert header >= before and (header <= top or not self.strict), (
                f"{plan.what}: a no-op at {header}, the batch started at {before}"
            )
        for rev, plan, r in sorted(changes, key=lambda c: c[0]):
            assert plan.make is not None
            want, events = plan.make(rev)
            got = service_from_pb(r.service)
            assert got == want, f"{plan.what}: answered {got}, the model says {want}"
            self.commit(rev, events, floor=floor)
        for _, header in noops:
            self.hear(header)
        for rev in taken:
            self.hear(rev)

    @rule(data=st.data())
    def probe(self, data: st.DataObject) -> None:
        """A read, or a request that must be refused: nothing changes. (One
        rule for several, so that most steps change something.)"""
        kind = data.draw(
            st.sampled_from(["get", "find", "keepalive_refused", "bad_watch", "sync_watches"]),
            label="probe",
        )
        getattr(self, f"probe_{kind}")(data)

    def probe_get(self, data: st.DataObject) -> None:
        self.run(self._get(self.draw_name(data)))

    async def _get(self, name: str) -> None:
        if not valid_name(name):
            faults = frozenset({errors.NotFound, errors.InvalidArgument})
        else:
            faults = OK if name in self.entries else frozenset({errors.NotFound})
        r = await self.expect(
            f"get {name!r}", rpc(self.c(OWNERS[1]), "Get", pb.GetRequest(name=name)), faults
        )
        if r is not None:
            assert service_from_pb(r.service) == self.entries[name]
            self.check_read(f"get {name!r}", r.header.revision)

    def probe_find(self, data: st.DataObject) -> None:
        attrs, prefix = self.draw_filter(data)
        if data.draw(st.integers(0, 9), label="bad filter") == 0:
            attrs[data.draw(st.sampled_from(BAD_KEYS), label="bad key")] = "*"
        self.run(self._find(attrs, prefix))

    async def _find(self, attrs: dict[str, str], prefix: str) -> None:
        faults = OK if all(ATTR_NAME.fullmatch(k) for k in attrs) else INVALID
        r = await self.expect(
            f"find {attrs} prefix {prefix!r}",
            self.c(OWNERS[2]).find(attrs, prefix=prefix),
            faults,
        )
        if r is not None:
            found, revision = r
            want = sorted(
                (s for s in self.entries.values() if matches(attrs, prefix, s)),
                key=lambda s: s.name,
            )
            assert found == want, f"find {attrs} {prefix!r}: {found}, the model says {want}"
            self.check_read(f"find {attrs} {prefix!r}", revision)

    # ---- rules: leases ------------------------------------------------------

    @precondition(lease_room)
    @rule(data=st.data())
    def grant(self, data: st.DataObject) -> None:
        owner = self.draw_owner(data)
        kind = data.draw(st.sampled_from(["kept", "idle", "kept", "idle", "bad"]), label="lease")
        if kind == "bad":
            ttl = data.draw(
                st.sampled_from([0, -1, 1, SHORT_TTL_MS - 1, IDLE_TTL_MS + 1, 2**62]), label="ttl"
            )
            request = pb.GrantRequest(ttl_ms=ttl)
            self.run(self.expect(f"grant {ttl}", rpc(self.c(owner), "Grant", request), INVALID))
            return
        self.run(self._grant(owner, kind == "kept"))

    async def _grant(self, owner: str, kept: bool) -> None:
        if kept:
            keeper = self.c(owner).lease(KEEP_TTL_MS)
            await keeper.start()
            assert keeper.connected.is_set() and not keeper.lost.is_set()
            self.new_lease(keeper.id)
            self.leases[keeper.id] = LeaseModel(owner, self.granted(KEEP_TTL_MS), keeper)
            return
        r = await rpc(self.c(owner), "Grant", pb.GrantRequest(ttl_ms=IDLE_TTL_MS))
        self.granted_lease(owner, r, IDLE_TTL_MS)

    def granted_lease(self, owner: str, r: pb.GrantResponse, ttl_ms: int) -> None:
        """A Grant's reply: a new id, the TTL the store grants, a header as a
        read's (no service changes; on etcd its own writes take revisions)."""
        assert r.ttl_ms == self.granted(ttl_ms), f"grant {ttl_ms}: granted {r.ttl_ms}"
        self.check_read(f"grant {ttl_ms}", r.header.revision)
        self.new_lease(r.lease)
        self.leases[r.lease] = LeaseModel(owner, r.ttl_ms)

    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        owner = self.draw_owner(data)
        choices = sorted(self.leases) * 3 + sorted(self.dead) + [UNKNOWN_LEASE, 0, -3]
        lease = data.draw(st.sampled_from(choices), label="lease")
        self.run(self._revoke(owner, lease))

    async def _revoke(self, owner: str, lease: int) -> None:
        # Over plain text every caller is an admin, and an admin may revoke any lease.
        faults = OK if lease in self.leases else frozenset({errors.NotFound})
        if lease <= 0:
            faults = frozenset({errors.NotFound, errors.InvalidArgument})
        r = await self.expect(
            f"revoke {lease} by {owner}",
            rpc(self.c(owner), "Revoke", pb.RevokeRequest(lease=lease)),
            faults,
        )
        if r is None:
            return
        keeper = self.leases[lease].keeper
        gone = self.under(lease)
        assert r.deleted == len(gone), f"revoke {lease}: deleted {r.deleted}"
        if gone:  # the header is the revision that deleted them, in one
            rev = r.header.revision
            self.commit(rev, [Event(EventType.DELETE, s, s, rev) for s in gone])
        self.check_read(f"revoke {lease}", r.header.revision)
        self.forget_lease(lease)
        if keeper is not None:
            await keeper.close(revoke=False)

    @precondition(has_leases)
    @rule(data=st.data())
    def drop_lease_holder(self, data: st.DataObject) -> None:
        """The client holding a lease goes away: the lease ends at once."""
        self.run(self._drop(data.draw(st.sampled_from(sorted(self.leases)), label="lease")))

    async def _drop(self, lease: int) -> None:
        held = self.leases[lease]
        floor = self.heard  # the lease ends after this
        if held.keeper is not None:
            await held.keeper.close(revoke=False)
        else:
            # Renewing on a new stream makes it the holder; its end ends the lease.
            r = await keepalive_once(self.c(held.owner), lease)
            assert (r.lease, r.ttl_ms) == (lease, held.ttl_ms), f"keepalive answered {r}"
        await self.wait_gone(lease)
        await self.ended_by_registry(lease, floor)

    def probe_keepalive_refused(self, data: st.DataObject) -> None:
        """KeepAlive of another owner's lease, an ended or an unknown one: a
        ttl of 0 on a stream that stays open (whether another's exists is not
        told)."""
        owner = self.draw_owner(data)
        foreign = [lid for lid in sorted(self.leases) if self.leases[lid].owner != owner]
        lease = data.draw(st.sampled_from(foreign + sorted(self.dead) + [UNKNOWN_LEASE, 0]))
        self.run(self._keepalive_refused(owner, lease))

    async def _keepalive_refused(self, owner: str, lease: int) -> None:
        r = await self.expect(
            f"keepalive {lease} by {owner}", keepalive_once(self.c(owner), lease), OK
        )
        if r is not None:
            assert (r.lease, r.ttl_ms) == (lease, 0), f"keepalive of ended {lease}: {r}"

    @precondition(expiry_room)
    @rule(data=st.data())
    def lease_expires(self, data: st.DataObject) -> None:
        """A 500 ms lease (2 s on etcd) nobody renews: what was registered
        under it goes."""
        self.expiries += 1
        owner = self.draw_owner(data)
        names = data.draw(
            st.lists(st.sampled_from(self.names), min_size=1, max_size=3, unique=True),
            label="names",
        )
        attrs = [
            data.draw(
                st.dictionaries(
                    st.sampled_from(COMMON_KEYS), st.sampled_from(COMMON_VALUES), max_size=2
                ),
                label="attrs",
            )
            for _ in names
        ]
        self.run(self._expire(owner, names, attrs))

    async def _expire(self, owner: str, names: list[str], attrs: list[dict[str, str]]) -> None:
        r = await rpc(self.c(owner), "Grant", pb.GrantRequest(ttl_ms=SHORT_TTL_MS))
        lease = r.lease
        self.granted_lease(owner, r, SHORT_TTL_MS)
        floor = self.heard  # it may end from here on
        for name, a in zip(names, attrs, strict=True):
            plan = self.plan_register(owner, name, a, lease, False)
            try:
                r = await plan.call()
            except errors.GeryonError as exc:
                if isinstance(exc, errors.NotFound) and lease in self.leases:
                    # Only a lease that really ended may turn a registration down.
                    assert lease not in await self.live_leases(), f"{plan.what}: {exc}"
                    await self.ended_by_registry(lease, floor)
                    continue
                r = exc
            self.settle(plan, self.judge(plan.what, r, plan.faults))
        await self.wait_gone(lease)
        if lease in self.leases:
            await self.ended_by_registry(lease, floor)

    # ---- rules: restarts ----------------------------------------------------

    @precondition(restart_room)
    @rule(graceful=st.sampled_from([False, False, True]))
    def restart(self, graceful: bool) -> None:
        """kill -9 (or SIGTERM) and start again: nothing acknowledged is lost."""
        self.restarts += 1
        self.run(asyncio.to_thread(self._restart, graceful))

    def _restart(self, graceful: bool) -> None:
        registry = self.env.registry
        if graceful:
            assert registry.stop() == 0, "registryd did not exit 0 on SIGTERM"
            registry.start()
        else:
            registry.restart()

    # ---- rules: watchers ----------------------------------------------------

    @precondition(watcher_room)
    @rule(data=st.data())
    def open_watch(self, data: st.DataObject) -> None:
        raw = data.draw(st.booleans(), label="raw stream")
        attrs, prefix = self.draw_filter(data)
        mode = data.draw(st.sampled_from(["now", "snapshot", "past"]), label="from")
        start = 0
        if mode == "past":
            # Drawn among this example's changes: strategies must not depend
            # on what earlier examples (or etcd's other writes) did to the
            # revision. From one of them, from just after the one before it
            # (on etcd, maybe a revision without a change), or from the next.
            back = data.draw(st.integers(0, len(self.revs)), label="changes back")
            start = self.revision + 1
            if back:
                start = self.revs[-back]
                if data.draw(st.booleans(), label="just after the change before"):
                    start = (self.revs[-back - 1] if back < len(self.revs) else self.base) + 1
        interval = data.draw(st.sampled_from([0, 100, 1000]), label="progress_interval_ms")
        cls = RawRecorder if raw else ClientRecorder
        owner = self.draw_owner(data)
        w = cls(
            self.c(owner),
            attrs,
            prefix,
            mode=mode,
            start=start,
            opened_at=self.revision,
            interval=interval,
        )
        self.watchers.append(w)
        self.run(self._open(w))

    async def _open(self, w: Recorder) -> None:
        w.start()
        if w.mode != "past":
            # From now or a snapshot: the opening message says where it starts.
            await eventually(lambda: w.items, timeout=SETTLE_TIMEOUT)
        self.verify(w)

    @precondition(has_watchers)
    @rule(data=st.data())
    def close_watch(self, data: st.DataObject) -> None:
        w = data.draw(st.sampled_from(self.watchers), label="watcher")
        self.run(self._close(w))

    async def _close(self, w: Recorder) -> None:
        await self.sync(w)
        await w.close()
        self.watchers.remove(w)

    def probe_sync_watches(self, data: st.DataObject) -> None:
        """Ask every watcher for progress; caught up, each replays to Find."""
        self.run(self._sync_all())

    async def _sync_all(self) -> None:
        for w in [self.oracle, *self.watchers]:
            await self.sync(w)

    def probe_bad_watch(self, data: st.DataObject) -> None:
        kind = data.draw(
            st.sampled_from(
                [
                    "bad attr",
                    "negative start",
                    "snapshot and start",
                    "interval 50",
                    "progress first",
                    "two creates",
                    "nothing",
                ]
            ),
            label="bad watch",
        )
        self.run(self._bad_watch(kind, self.c(self.draw_owner(data))))

    async def _bad_watch(self, kind: str, client: Client) -> None:
        create = pb.WatchCreateRequest(prefix=self.ns)
        if kind == "bad attr":
            create.attrs["bad key"] = "x"
        elif kind == "negative start":
            create.start_revision = -1
        elif kind == "snapshot and start":
            create.snapshot, create.start_revision = True, self.base + 1
        elif kind == "interval 50":
            create.progress_interval_ms = 50
        first = pb.WatchRequest(create_request=create)
        messages = {
            "progress first": [pb.WatchRequest(progress_request=pb.WatchProgressRequest())],
            "two creates": [first, first],
            "nothing": [],
        }.get(kind, [first])
        requests = Requests(*messages)
        if not messages:
            requests.put(None)  # close the request side at once
        call = pb_grpc.RegistryStub(client.channel).Watch(requests, metadata=client.metadata)
        try:
            async with asyncio.timeout(10):
                async for r in call:
                    assert kind == "two creates" and r.type == pb.WatchResponse.TYPE_PROGRESS
            raise AssertionError(f"watch with {kind}: the stream ended without an error")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (
                f"watch with {kind}: {exc.code().name} {exc.details()}"
            )
        finally:
            call.cancel()

    # ---- checking watchers --------------------------------------------------

    def verify(self, w: Recorder) -> dict[str, Service]:
        """Check everything ``w`` delivered so far against the model's
        history; return the state its replay gives."""
        assert not w.anomalies, f"{w}: {w.anomalies}"
        items = w.items
        if w.mode == "past":
            pos, k = w.start_revision - 1, 0
            state = {n: s for n, s in self.state_at(pos).items() if matches(w.attrs, w.prefix, s)}
        else:
            if not items:
                return {}
            first = items[0]
            want_kind = "progress" if w.mode == "now" else "snapshot"
            assert first.kind == want_kind, f"{w}: opened with {first}, want {want_kind}"
            if self.strict:
                assert first.revision == w.opened_at, (
                    f"{w}: opened with {first}, want {want_kind} at {w.opened_at}"
                )
            else:
                # etcd: any revision with the same state as where the model
                # was (the front's own, or one without changes to services).
                lo, hi = sorted((first.revision, w.opened_at))
                between = [rev for rev in self.revs if lo < rev <= hi]
                assert not between, (
                    f"{w}: opened with {first}; the model was at {w.opened_at}, "
                    f"with changes {between} between"
                )
            pos, k = first.revision, 1
            want = sorted(
                (s for s in self.state_at(pos).values() if matches(w.attrs, w.prefix, s)),
                key=lambda s: s.name,
            )
            if w.mode == "snapshot":
                got = sorted(first.services, key=lambda s: s.name)
                assert got == want, f"{w}: snapshot {got}, the model says {want}"
            state = {s.name: s for s in want}
        expected = [
            (rev, events)
            for rev in self.revs
            if rev > pos and (events := translate(w.attrs, w.prefix, self.history[rev]))
        ]
        i = 0  # the next expected revision
        last_event = last_progress = pos
        for n, item in enumerate(items[k:], k):
            where = f"{w} item {n} ({item.kind})"
            if item.kind == "events":
                assert item.events, f"{where}: an events message without events"
                revs = [e.revision for e in item.events]
                assert revs == sorted(revs), f"{where}: revisions out of order: {revs}"
                assert revs[0] > last_event, f"{where}: revision {revs[0]} after {last_event}"
                assert revs[0] > last_progress, (
                    f"{where}: revision {revs[0]} after a progress notice for {last_progress}"
                )
                if item.header:
                    assert item.header >= revs[-1], f"{where}: header {item.header} < {revs}"
                for rev in sorted(set(revs)):
                    group = sorted((e for e in item.events if e.revision == rev), key=by_name)
                    assert i < len(expected), f"{where}: unexpected revision {rev}: {group}"
                    want_rev, want_events = expected[i]
                    assert rev == want_rev, (
                        f"{where}: revision {rev}, the next matching one is {want_rev} "
                        f"({want_events})"
                    )
                    assert group == want_events, f"{where}: {group}, the model says {want_events}"
                    i += 1
                    for e in group:
                        if e.type is EventType.PUT:
                            state[e.service.name] = e.service
                        else:
                            assert state.pop(e.service.name, None) is not None, (
                                f"{where}: DELETE of {e.service.name}, which it never had"
                            )
                last_event = revs[-1]
            elif item.kind == "progress":
                r = item.revision
                assert r >= max(last_progress, last_event), (
                    f"{where}: progress {r} after {max(last_progress, last_event)}"
                )
                if self.strict:  # on etcd, revisions without changes may follow
                    assert r <= self.revision, f"{where}: progress {r} beyond {self.revision}"
                if item.header:
                    assert item.header >= r, f"{where}: header {item.header} < progress {r}"
                assert i == len(expected) or expected[i][0] > r, (
                    f"{where}: progress {r}, but revision {expected[i][0]} was not delivered"
                )
                last_progress = r
            elif item.kind == "break":
                raw = isinstance(w, RawRecorder)
                assert raw and item.code == "UNAVAILABLE" and self.restarts, (
                    f"{where}: the stream ended with {item.code} (restarts {self.restarts})"
                )
            else:
                raise AssertionError(f"{where}: a second snapshot: {item}")
        return state

    async def sync(self, w: Recorder) -> None:
        """Wait until ``w`` has everything up to now; check it; replay == Find."""
        target = self.last_change()

        def caught_up() -> bool:
            if w.reached() >= target or (w.task is not None and w.task.done()):
                return True
            w.request_progress()
            return False

        await eventually(caught_up, timeout=SETTLE_TIMEOUT, interval=0.1)
        state = self.verify(w)
        breaks = sum(it.kind == "break" for it in w.items)
        REACHED[f"synced {type(w).__name__} from {w.mode}{' across restarts' * bool(breaks)}"] += 1
        delivered = collections.Counter(
            (e.revision, e.type is EventType.DELETE and e.service != e.prev)
            for it in w.items
            if it.kind == "events"
            for e in it.events
        )
        REACHED["watched events"] += sum(delivered.values())
        REACHED["watched revisions of several events"] += sum(n > 1 for n in delivered.values())
        REACHED["watched leaving the filter"] += sum(
            n for (_, left), n in delivered.items() if left
        )
        assert w.reached() >= target, f"{w}: ended at {w.reached()}, short of {target}: {w.items}"
        found, revision = await self.c(OWNERS[0]).find(w.attrs, prefix=w.prefix)
        self.check_read(f"find for {w}", revision)
        got = dict(sorted(state.items()))
        want = {s.name: s for s in found}
        assert got == want, f"{w}: replay gives {got}, Find {want}"

    # ---- after every step, and at the end -----------------------------------

    @invariant()
    def agrees_with_model(self) -> None:
        self.run(self._agrees())

    async def _agrees(self) -> None:
        found, revision = await self.c(OWNERS[0]).find(prefix=self.ns)
        want = sorted(self.entries.values(), key=lambda s: s.name)
        assert found == want, f"find: the registry has {found}, the model {want}"
        self.check_read("find", revision)
        live = await self.live_leases(settled=True)
        for lid, held in self.leases.items():
            assert lid in live, f"lease {lid} ({held}) is gone"
            x = live[lid]
            got = (x.owner, x.ttl_ms, x.services)
            assert got == (held.owner, held.ttl_ms, len(self.under(lid))), f"lease {lid}: {x}"
            assert 0 <= x.remaining_ms <= x.ttl_ms, f"lease {lid}: {x}"
            assert held.keeper is None or not held.keeper.lost.is_set(), f"lease {lid} lost"
        ended = self.dead & live.keys()
        assert not ended, f"ended leases still listed: {sorted(ended)}"
        for w in [self.oracle, *self.watchers]:
            self.verify(w)

    def teardown(self) -> None:
        try:
            if not self.broken:
                self.run(self._sync_all())
        finally:
            self.env.loop.run_until_complete(self._cleanup())

    async def _cleanup(self) -> None:
        """Leave nothing behind for the next example: no watchers, no leases
        (revoked before their keepalive streams close, so no stream's end
        deletes anything later), no services."""
        admin = self.c(OWNERS[0])
        with contextlib.suppress(Exception):
            async with asyncio.timeout(STEP_TIMEOUT):
                for w in [self.oracle, *self.watchers]:
                    await w.close()
                for lid in list(self.leases):
                    with contextlib.suppress(errors.NotFound):
                        await admin.revoke(lid)
                for held in self.leases.values():
                    if held.keeper is not None:
                        await held.keeper.close(revoke=False)
                found, _ = await admin.find(prefix=self.ns)
                for s in found:
                    with contextlib.suppress(errors.NotFound):
                        await admin.unregister(s.name)


backend = both_stores  # the machine runs on SQLite, and as a front of the session's etcd


@pytest.mark.timeout(max(120, 30 * EXAMPLES))
def test_registry_agrees_with_model(start_registry: Callable[..., Registry], backend: str) -> None:
    # With etcd, a front of the session's cluster in a prefix of its own.
    registry = start_registry(extra=["--history", "20000"])
    REACHED.clear()
    loop = asyncio.new_event_loop()
    env = Env(registry, loop, strict=backend == "sqlite")

    async def connect() -> None:
        env.clients = {o: registry.client(user=o) for o in OWNERS}

    async def disconnect() -> None:
        for c in env.clients.values():
            await c.close()

    loop.run_until_complete(connect())
    try:
        machine = type("RegistryModel", (RegistryMachine,), {"env": env})
        run_state_machine_as_test(machine, settings=SETTINGS)
    finally:
        loop.run_until_complete(disconnect())
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    print(f"reached ({backend}):", ", ".join(f"{k} {n}" for k, n in sorted(REACHED.items())))
    log = registry.log()
    assert "Traceback" not in log and "internal error" not in log, log[-4000:]
