"""The etcd store: the registry's state kept in an etcd v3 cluster, so that
the registry outlives any one node and several fronts can serve it at once.

etcd is the truth; this process holds a watch-fed copy (the shared ``State``)
and answers from it, as Kubernetes' apiserver answers from its watch cache.

Keys, under the prefix P (default ``/geryon/``):

    P s/NAME        a service: {"attrs": {...}, "owner": "..."}; its lease is
                    the key's etcd lease, its revisions the key's
    P l/ID          a lease (ID in hex): {"owner": "...", "ttl_ms": N}, put
                    with the etcd lease it describes, so it goes with it
    P h/ID          the lease's holder: the token of the KeepAlive stream that
                    renewed it last ("-" once a front is ending it)
    P compact       the revision fronts last compacted etcd's history to
    P fence         written by a front to see its watch catch up to a revision

Invariants:
- A write is acknowledged only once etcd committed it, and once this front's
  copy shows it. Geryon's revision is etcd's: global, shared by every front,
  never going back, and not contiguous (lease and holder keys take revisions,
  and so does anything else writing to the same etcd).
- Every write is one etcd transaction fenced on what the front saw: the
  entry's mod_revision (or its absence), the lease's key. A fence that fails
  means another front moved first: the front catches up and decides again.
  A refusal that depends on the state is confirmed on a caught-up copy.
- Reads catch up first (``read``): they reflect every write acknowledged by
  any front before they began, or fail UNAVAILABLE.
- Leases are etcd's: etcd expires them, and deletes every key under one in
  the revision that ends it. A front ends a lease itself only when the client
  side of the KeepAlive stream holding it goes away; a front that dies or
  loses etcd ends nothing, so leases then live by their TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from geryon.errors import (
    FailedPrecondition,
    GeryonError,
    NotFound,
    OutOfRange,
    Unavailable,
)
from geryon.model import (
    Caller,
    Event,
    EventType,
    Lease,
    LeaseID,
    Registration,
    Revision,
    Service,
    validate_name,
    validate_ttl,
)
from geryon.store.base import Store, Written
from geryon.store.etcd_rpc import Compacted, Etcd, TooLarge, epb, prefix_end
from geryon.store.state import (
    STATE_ERRORS,
    Limits,
    State,
    validate_batch,
    validate_expected,
    validate_register,
    validate_update,
)

log = logging.getLogger("geryon.store")

T = TypeVar("T")

DEFAULT_PREFIX = "/geryon/"
ENDING = b"-"  # a holder value no stream token takes
# Keys per Range page when listing; a page too big for one message is
# asked for again in smaller ones.
PAGE = 1000
# How long a starting front waits for its history window to fill before it
# serves anyway (a watch resuming from before its list is then told to
# re-list until the window is full).
FILL_WAIT_S = 5.0
# How long the watch may be down before this front stops claiming to serve
# (and ends its watch streams, so their clients move to another front).
LOST_AFTER_S = 3.0
# How long a read waits for the watch to bring in revisions it knows exist
# before it writes a fence to find out (see _catch_up_once).
SETTLE_S = 0.02


@dataclass
class _Plan:
    """One try at a write: the transaction, and what it means."""

    compare: list[epb.Compare]
    success: list[epb.RequestOp]
    # The result once committed at a revision.
    result: Callable[[Revision], Any]
    # After a try whose outcome was lost (a timeout, a member gone): given
    # the revision the copy was at when it was sent, and on a caught-up copy,
    # the result if the change is there, else None.
    landed: Callable[[Revision], Written[Any] | None] | None = None


class Keys:
    """The key layout under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.encode()
        self.end = prefix_end(self.prefix)
        self.compact = self.prefix + b"compact"
        self.fence = self.prefix + b"fence"

    def service(self, name: str) -> bytes:
        return self.prefix + b"s/" + name.encode()

    def lease(self, lease_id: LeaseID) -> bytes:
        return self.prefix + b"l/%016x" % lease_id

    def holder(self, lease_id: LeaseID) -> bytes:
        return self.prefix + b"h/%016x" % lease_id

    def parse(self, key: bytes) -> tuple[str, Any]:
        """("s", name) | ("l", id) | ("h", id) | ("compact", None) | ("", None)."""
        rest = key[len(self.prefix) :]
        kind, _, ident = rest.partition(b"/")
        try:
            if kind == b"s":
                return "s", ident.decode()
            if kind in (b"l", b"h"):
                return kind.decode(), int(ident, 16)
        except (UnicodeDecodeError, ValueError):
            return "", None
        if rest == b"compact":
            return "compact", None
        return "", None


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _put(key: bytes, value: bytes, lease: LeaseID = 0) -> epb.RequestOp:
    return epb.RequestOp(request_put=epb.PutRequest(key=key, value=value, lease=lease))


def _same_mod(key: bytes, mod_revision: Revision) -> epb.Compare:
    """The key is as we saw it: unchanged since ``mod_revision`` (0: absent)."""
    if not mod_revision:
        return epb.Compare(
            key=key, target=epb.Compare.CREATE, result=epb.Compare.EQUAL, create_revision=0
        )
    return epb.Compare(
        key=key, target=epb.Compare.MOD, result=epb.Compare.EQUAL, mod_revision=mod_revision
    )


def _exists(key: bytes) -> epb.Compare:
    return epb.Compare(key=key, target=epb.Compare.VERSION, result=epb.Compare.GREATER, version=0)


def _value_is(key: bytes, value: bytes, *, equal: bool = True) -> epb.Compare:
    # A missing key fails any VALUE compare: only a live lease passes.
    result = epb.Compare.EQUAL if equal else epb.Compare.NOT_EQUAL
    return epb.Compare(key=key, target=epb.Compare.VALUE, result=result, value=value)


class EtcdStore(Store):
    """The state, fed by etcd's watch; writes as fenced etcd transactions."""

    expires_leases = False  # etcd does

    def __init__(
        self,
        etcd: Etcd,
        prefix: str = DEFAULT_PREFIX,
        *,
        limits: Limits | None = None,
        compact_interval: float = 60.0,
    ) -> None:
        super().__init__(limits=limits)
        self.etcd = etcd
        self.keys = Keys(prefix)
        self.prefix = prefix
        self.compact_interval = compact_interval
        self.front = f"{socket.gethostname()}:{os.getpid()}"
        self._holders: dict[LeaseID, bytes] = {}
        # The compaction key: its version (for the CAS) and revision.
        self._compact_version = 0
        self._compacted_at: Revision = 0
        self._listed_at: Revision = 0
        # Who waits for the copy to reach a revision: (revision, seq, future).
        self._waiters: list[tuple[Revision, int, asyncio.Future[None]]] = []
        self._waiter_seq = itertools.count()
        self._next_round: asyncio.Future[Revision] | None = None
        self._rounds: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._serving: str | None = "starting"  # None: serving; else why not
        self._watch_up = asyncio.Event()
        self._ttl_limit = asyncio.Semaphore(32)
        self._last_error = ""
        self._filler: asyncio.Task[None] | None = None
        self._filled = asyncio.Event()
        # While starting: the start's deadline, and how far each listed page moves it.
        self._start_deadline: tuple[asyncio.Timeout, float] | None = None

    def describe(self) -> str:
        return f"etcd {self.etcd} prefix {self.prefix}"

    # ---- opening and closing ------------------------------------------------

    @classmethod
    async def open(
        cls,
        targets: Sequence[str],
        *,
        prefix: str = DEFAULT_PREFIX,
        tls_dir: Path | None = None,
        limits: Limits | None = None,
        give_up_after: float = 5.0,
        compact_interval: float = 60.0,
        start_timeout: float = 10.0,
    ) -> EtcdStore:
        """Connect, list the prefix, and start following it. An operation
        that etcd has not answered in ``give_up_after`` seconds fails
        UNAVAILABLE; starting fails so after ``start_timeout`` without
        progress (each page of the list moves the deadline: 100,000 entries
        take longer than that to list on a busy machine)."""
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise FailedPrecondition(f"--etcd-prefix: want /PATH/, got {prefix!r}")
        store = cls(
            Etcd(targets, tls_dir=tls_dir, timeout=give_up_after),
            prefix,
            limits=limits,
            compact_interval=compact_interval,
        )
        try:
            async with asyncio.timeout(start_timeout) as deadline:
                store._start_deadline = (deadline, start_timeout)
                await store._start()
            store._start_deadline = None
        except TimeoutError:
            await store.close()
            why = f" ({store._last_error})" if store._last_error else ""
            raise Unavailable(
                f"etcd {store.etcd}: not reachable in {start_timeout:g}s{why}"
            ) from None
        except BaseException:
            await store.close()
            raise
        return store

    async def _persist(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt`` until etcd answers (the caller bounds how long)."""
        while True:
            try:
                return await attempt()
            except Unavailable as exc:
                self._last_error = str(exc)
                log.warning("registryd: %s; retrying", exc)
                await asyncio.sleep(0.5)

    async def _start(self) -> None:
        await self._persist(self._list)
        self._tasks.append(asyncio.create_task(self._follow(self.revision + 1), name="etcd-watch"))
        self._fill_window()
        # A write of our own, seen through the watch: the copy is current.
        fence = await self._persist(self._fence)
        await self._until(fence, None)
        # Serve once the window has filled, or after a moment (meanwhile a
        # watch resuming from before the list is told to re-list).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FILL_WAIT_S):
                await self._filled.wait()
        self._serving = None
        self._tasks.append(asyncio.create_task(self._health_loop(), name="etcd-health"))
        if self.compact_interval > 0:
            self._tasks.append(asyncio.create_task(self._compact_loop(), name="etcd-compactor"))

    async def _list(self) -> None:
        """Load the state: every key under the prefix at one revision, in
        pages (smaller ones when a page is too big for a message; from the
        start again if etcd compacts past that revision meanwhile). It is
        loaded aside and swapped in whole: until then the old copy serves
        (stale, so reads wait and fenced writes fail, but never half-empty).
        The history window starts empty, after it."""
        page = PAGE
        while True:
            fresh, holders = State(limits=self.limits), {}
            key, at = self.keys.prefix, 0
            try:
                while True:
                    try:
                        r = await self.etcd.range(key, self.keys.end, revision=at, limit=page)
                    except TooLarge:
                        if page == 1:
                            raise
                        page = max(1, page // 8)
                        continue
                    at = at or r.header.revision
                    for kv in r.kvs:
                        self._load(kv, fresh, holders)
                    if self._start_deadline is not None:  # starting, and etcd answers
                        deadline, grace = self._start_deadline
                        deadline.reschedule(asyncio.get_running_loop().time() + grace)
                    if not r.more or not r.kvs:
                        break
                    key = r.kvs[-1].key + b"\0"
                break
            except OutOfRange:
                continue
        fresh.link_leases()
        self.services, self.names, self.index, self.leases = (
            fresh.services,
            fresh.names,
            fresh.index,
            fresh.leases,
        )
        self._holders = holders
        self.revision = self.durable_revision = self._listed_at = at
        self.clear_history()
        self.oldest_revision = at + 1

    def _load(self, kv: epb.KeyValue, into: State, holders: dict[LeaseID, bytes]) -> None:
        kind, ident = self.keys.parse(kv.key)
        if kind == "s":
            s = self._service(ident, kv)
            if s is not None:
                into.index_add(s)
        elif kind == "l":
            lease = self._lease(ident, kv)
            if lease is not None:
                into.leases[lease.id] = lease
        elif kind == "h":
            holders[ident] = kv.value
        elif kind == "compact":
            self._compacted(kv)

    def _compacted(self, kv: epb.KeyValue) -> None:
        """A front compacted etcd's history: no front serves below it now."""
        self._compact_version = kv.version
        with contextlib.suppress(ValueError):
            self._compacted_at = int(kv.value)
            self.forget_before(self._compacted_at)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._rounds is not None:
            self._rounds.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rounds
        self._fail_waiting(Unavailable("registryd: closing"))
        await self.etcd.close()

    # ---- decoding -----------------------------------------------------------

    def _service(self, name: str, kv: epb.KeyValue) -> Service | None:
        try:
            v = json.loads(kv.value)
            # Interned (sys.intern refuses anything but text): each entry
            # would otherwise hold its own copy of every name and value.
            attrs = {sys.intern(k): sys.intern(x) for k, x in v["attrs"].items()}
            owner = sys.intern(v["owner"])
            validate_name(name, new=False)
        except (ValueError, KeyError, TypeError, AttributeError, GeryonError):
            log.warning("registryd: etcd key %r holds no service; ignored", kv.key)
            return None
        return Service(name, attrs, kv.lease, owner, kv.create_revision, kv.mod_revision)

    def _lease(self, lease_id: LeaseID, kv: epb.KeyValue) -> Lease | None:
        try:
            v = json.loads(kv.value)
            return Lease(lease_id, int(v["ttl_ms"]), str(v["owner"]))
        except (ValueError, KeyError, TypeError):
            log.warning("registryd: etcd key %r holds no lease; ignored", kv.key)
            return None

    # ---- following etcd -----------------------------------------------------

    async def _follow(self, start: Revision) -> None:
        """Keep the copy in step with etcd, for ever: resume the watch from
        the next revision whenever it breaks; re-list if etcd compacted the
        history it needs (a front that was away too long)."""
        delay = 0.05
        lost_since: float | None = None
        compacted: Compacted | None = None
        while True:
            try:
                if compacted is not None:  # in here: a failed re-list is tried again
                    await self._relist(compacted)
                    compacted = None
                    start = self.revision + 1
                async for events in self.etcd.watch(
                    self.keys.prefix, self.keys.end, start_revision=start
                ):
                    if lost_since is not None:
                        log.info("registryd: etcd watch is back (%s)", self.etcd.member().target)
                        lost_since = None
                    self._watch_up.set()
                    self._apply(events)
                    start = self.revision + 1
                    delay = 0.05
            except Compacted as exc:
                compacted = exc
                continue
            except GeryonError as exc:
                self._watch_up.clear()
                if lost_since is None:
                    lost_since = time.monotonic()
                    log.warning("registryd: etcd watch: %s; resuming", exc)
            except Exception:  # a bug: say so, and keep following
                self._watch_up.clear()
                log.exception("registryd: etcd watch failed; resuming")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _relist(self, exc: Compacted) -> None:
        """Our watch cannot resume: the history it needs is gone. Load the
        state afresh; watchers here lost continuity, so they are told to
        re-list too (OUT_OF_RANGE), as clients already do after compaction."""
        log.warning("registryd: %s: re-listing", exc)
        await self._persist(self._list)
        self._wake()
        self.lost(
            OutOfRange(
                f"registryd: history before revision {self.oldest_revision} is gone",
                resume_revision=self.oldest_revision,
            )
        )
        self._fill_window()

    def _apply(self, events: Iterable[epb.Event]) -> None:
        """Events of whole revisions, in order, from the live watch."""
        for rev, group in itertools.groupby(events, key=lambda e: e.kv.mod_revision):
            if rev <= self.revision:  # in the list already
                continue
            changes = [self._change(e) for e in group]
            self.revision = rev
            self.publish(rev, tuple(e for e in changes if e is not None), time.time())
        # The window's bounds, as the SQLite store keeps them; every front
        # sees the same events, so every front drops the same revisions.
        # etcd's own history follows at the next compaction.
        self.trim_history(now=time.time())
        self._wake()

    def _change(self, e: epb.Event) -> Event | None:
        """Apply one etcd event to the copy; the registry event it makes."""
        kv = e.kv
        kind, ident = self.keys.parse(kv.key)
        if e.type == epb.Event.DELETE:
            if kind == "s":
                prev = self.services.get(ident)
                return self.delete(prev, kv.mod_revision) if prev is not None else None
            if kind == "l":
                self.leases.pop(ident, None)
            elif kind == "h":
                self._holders.pop(ident, None)
            return None
        if kind == "s":
            new, prev = self._service(ident, kv), self.services.get(ident)
            if new is None:  # not ours to read: as good as gone
                return self.delete(prev, kv.mod_revision) if prev is not None else None
            return self.put(new, prev)
        if kind == "l":
            lease = self._lease(ident, kv)
            if lease is not None and ident not in self.leases:
                self.leases[ident] = lease
        elif kind == "h":
            self._holders[ident] = kv.value
        elif kind == "compact":
            self._compacted(kv)
        return None

    # ---- the history window before the list ---------------------------------

    def _fill_window(self) -> None:
        """Replay, behind the live watch, what etcd still holds of the
        history before the list (from the fronts' last compaction, which
        keeps it within the window's bounds), for watches resuming there."""
        if self._filler is not None:
            self._filler.cancel()
            self._tasks.remove(self._filler)
        self._filled.clear()
        self._filler = asyncio.create_task(
            self._fill(max(self._compacted_at, 1), self._listed_at), name="etcd-window"
        )
        self._tasks.append(self._filler)

    async def _fill(self, start: Revision, upto: Revision) -> None:
        held: list[tuple[Revision, tuple[Event, ...]]] = []
        origin = start  # held is every revision from here on, so far
        delay = 0.05
        while start <= upto:
            try:
                fenced = False
                async for events in self.etcd.watch(
                    self.keys.prefix, self.keys.end, start_revision=start, prev_kv=True
                ):
                    if not fenced:  # so that a revision past ``upto`` comes
                        fenced = True
                        await self._fence()
                    for rev, group in itertools.groupby(events, key=lambda e: e.kv.mod_revision):
                        if rev > upto:
                            break
                        replayed = self._replayed(group)
                        if replayed is None:  # cannot be replayed: start after it
                            held.clear()
                            origin = rev + 1
                        elif replayed:
                            held.append((rev, replayed))
                        start = rev + 1
                    else:
                        continue
                    start = upto + 1
                    break
            except Compacted as exc:  # it goes only from there now
                held = [h for h in held if h[0] >= exc.revision]
                origin = max(origin, exc.revision)
                start = max(start, exc.revision)
            except GeryonError as exc:
                log.warning("registryd: filling the history window: %s; resuming", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        # Behind what the live watch brought since, unless the window's bounds
        # have dropped revisions after the list already.
        if self.oldest_revision == upto + 1:
            now = time.time()
            self.prepend_history(held, now)
            self.oldest_revision = max(min(origin, upto + 1), self._compacted_at)
            self.forget_before(self.oldest_revision)
            self.trim_history(now=now)
        self._filled.set()

    def _replayed(self, group: Iterable[epb.Event]) -> tuple[Event, ...] | None:
        """A revision from before the list as watch events, or None when it
        cannot be replayed: what it changed was compacted away (no previous
        value), so watchers could not be told what left their filters."""
        out = []
        for e in group:
            kind, name = self.keys.parse(e.kv.key)
            if kind != "s":
                continue
            prev = self._service(name, e.prev_kv) if e.HasField("prev_kv") else None
            if prev is None and (e.type == epb.Event.DELETE or e.kv.version > 1):
                return None
            if e.type == epb.Event.DELETE:
                out.append(Event(EventType.DELETE, prev, prev, e.kv.mod_revision))
            elif (new := self._service(name, e.kv)) is not None:
                out.append(Event(EventType.PUT, new, prev, e.kv.mod_revision))
        return tuple(out)

    def _wake(self) -> None:
        """The copy moved: wake whoever waits for a revision it has reached
        (only them: with many writers waiting, each watch answer would
        otherwise wake them all)."""
        while self._waiters and self._waiters[0][0] <= self.revision:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)

    async def _until(self, revision: Revision, deadline: float | None) -> bool:
        """Wait until the copy reaches ``revision``; False at ``deadline``
        (a loop time; None: no limit)."""
        if self.revision >= revision:
            return True
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        heapq.heappush(self._waiters, (revision, next(self._waiter_seq), fut))
        try:
            async with asyncio.timeout_at(deadline):
                await fut
        except TimeoutError:
            return self.revision >= revision
        return True

    # ---- the read barrier ---------------------------------------------------

    async def read(self, look: Callable[[], T]) -> tuple[T, Revision]:
        revision = await self._caught_up()
        # The copy may be past etcd's revision at the catch-up: say what it shows.
        seen = look()
        return seen, max(revision, self.revision)

    async def _caught_up(self) -> Revision:
        """Wait until the copy reflects every write committed before now.

        Reads arriving while one catch-up is on its way wait for the next one
        (which starts after they arrived); all of them share it, so a burst
        of reads costs one etcd round trip, not one each."""
        if self._next_round is None:
            self._next_round = asyncio.get_running_loop().create_future()
            self._next_round.add_done_callback(_consume)
            if self._rounds is None or self._rounds.done():
                self._rounds = asyncio.create_task(self._run_rounds(), name="etcd-catch-up")
        return await asyncio.shield(self._next_round)

    async def _run_rounds(self) -> None:
        while self._next_round is not None:
            round_, self._next_round = self._next_round, None
            try:
                round_.set_result(await self._catch_up_once())
            except GeryonError as exc:
                round_.set_exception(exc)
            except BaseException as exc:  # a bug, or close(): strand no reader
                self._fail_waiting(Unavailable(f"registryd: catch-up failed: {exc!r}"))
                round_.set_exception(Unavailable(f"registryd: catch-up failed: {exc!r}"))
                raise

    def _fail_waiting(self, err: GeryonError) -> None:
        """Nothing will wake them: fail the reads and writes that wait."""
        waiting = [f for _, _, f in self._waiters]
        if self._next_round is not None:
            waiting.append(self._next_round)
        self._waiters, self._next_round = [], None
        for fut in waiting:
            if not fut.done():
                fut.set_exception(err)

    async def _catch_up_once(self) -> Revision:
        """One catch-up: etcd's current revision R (a linearizable read of
        one key), then wait for the copy to reach it.

        Revisions under the prefix reach the copy through the watch, usually
        within milliseconds. Revisions of other keys in the same etcd never
        do, and etcd 3.4's progress notices can overtake the events they
        cover; so if the copy is not at R after a moment, the front writes
        its fence key: once the watch shows that write, the copy holds every
        revision before it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.etcd.timeout
        try:
            r = await self.etcd.range(self.keys.fence, count_only=True)
            now = r.header.revision
            if not await self._until(now, min(deadline, loop.time() + SETTLE_S)):
                fence = await self._fence(within=max(0.1, deadline - loop.time()))
                if not await self._until(fence, deadline):
                    raise Unavailable(
                        f"registryd: behind etcd (at {self.revision}, etcd at {fence})"
                    )
        except Unavailable as exc:
            self._health(str(exc))
            raise
        self._health(None)
        return now

    async def _fence(self, within: float | None = None) -> Revision:
        """Write the fence key; the revision it took."""
        r = await self.etcd.txn(
            success=[_put(self.keys.fence, self.front.encode())], repeat=True, within=within
        )
        return r.header.revision

    # ---- writes -------------------------------------------------------------

    async def _transact(self, plan: Callable[[], _Plan]) -> Written[Any]:
        """Decide, commit fenced, and on a failed fence or a lost answer,
        catch up and decide again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.etcd.timeout
        fresh = False  # decided on a caught-up copy
        # Tries whose outcome we did not hear, with the copy's revision then:
        # once caught up, the history since shows whether they landed.
        lost: list[tuple[_Plan, Revision]] = []
        while True:
            for p, sent_at in lost:
                done = p.landed(sent_at) if p.landed is not None else None
                if done is not None:
                    return done
            try:
                p = plan()
            except STATE_ERRORS:
                if fresh:
                    raise
                await self._caught_up()
                fresh = True
                continue
            started, sent_at = time.perf_counter(), self.revision
            try:
                r = await self.etcd.txn(
                    p.compare, p.success, within=max(0.1, deadline - loop.time())
                )
            except NotFound:  # the lease ended as we wrote
                r = None
            except Unavailable:
                if loop.time() >= deadline:
                    raise
                lost.append((p, sent_at))
                r = None
            if r is not None and r.succeeded:
                if p.success and self.commit_latency is not None:
                    self.commit_latency(time.perf_counter() - started)
                revision = r.header.revision
                if p.success:  # answer once this front shows it
                    await self._until(revision, deadline)
                return Written(p.result(revision), revision)
            if loop.time() >= deadline:
                raise Unavailable("registryd: etcd: the entry kept changing; try again")
            await self._caught_up()
            fresh = True

    def _service_put(
        self, name: str, attrs: Mapping[str, str], lease: LeaseID, owner: str
    ) -> epb.RequestOp:
        return _put(self.keys.service(name), _json({"attrs": attrs, "owner": owner}), lease)

    def _fences(self, name: str, prev: Service | None, lease: LeaseID) -> list[epb.Compare]:
        out = [_same_mod(self.keys.service(name), prev.mod_revision if prev else 0)]
        if lease:
            out.append(_exists(self.keys.lease(lease)))
        return out

    def _found(self, name: str, since: Revision, test: Callable[[Event], bool]) -> Event | None:
        """The first change to ``name`` after ``since`` that passes ``test``
        (None too when the history window no longer reaches back there)."""
        try:
            revisions = self.history_since(since + 1)
        except OutOfRange:
            return None
        for _, events in revisions:
            for e in events:
                if e.service.name == name and test(e):
                    return e
        return None

    def _put_landed(
        self, name: str, fenced: Revision, want: tuple[Mapping[str, str], LeaseID, str]
    ) -> Callable[[Revision], Written[Service] | None]:
        """A lost put landed if, since it was sent, the entry as it was
        (``fenced``: its mod_revision, 0 when absent) became what it wrote."""

        def landed(since: Revision) -> Written[Service] | None:
            e = self._found(
                name,
                since,
                lambda e: (
                    e.type is EventType.PUT
                    and (e.prev.mod_revision if e.prev else 0) == fenced
                    and (e.service.attrs, e.service.lease, e.service.owner) == want
                ),
            )
            return Written(e.service, e.revision) if e is not None else None

        return landed

    async def register(
        self,
        name: str,
        attrs: Mapping[str, str],
        *,
        lease: LeaseID,
        persist: bool,
        caller: Caller,
        create_only: bool = False,
    ) -> Written[Service]:
        attrs = validate_register(name, attrs, lease=lease, persist=persist)

        def plan() -> _Plan:
            prev, noop = self.check_register(
                name, attrs, lease=lease, caller=caller, create_only=create_only
            )
            fences = self._fences(name, prev, lease)
            if noop:  # still as asked for: nothing to write, but say so at a revision
                return _Plan(fences, [], lambda _: prev)
            return _Plan(
                fences,
                [self._service_put(name, attrs, lease, caller.name)],
                lambda rev: Service(
                    name, attrs, lease, caller.name, prev.create_revision if prev else rev, rev
                ),
                self._put_landed(
                    name, prev.mod_revision if prev else 0, (attrs, lease, caller.name)
                ),
            )

        return await self._transact(plan)

    async def register_batch(
        self, batch: Sequence[Registration], *, caller: Caller
    ) -> Written[list[Service]]:
        batch = validate_batch(batch)
        owner = caller.name

        def plan() -> _Plan:
            checked = self.check_batch(batch, caller)
            # One transaction: each entry fenced as Register fences it, each
            # lease once (etcd bounds a transaction's operations).
            fences = [
                _same_mod(self.keys.service(r.name), prev.mod_revision if prev else 0)
                for r, (prev, _) in zip(batch, checked, strict=True)
            ]
            fences += [_exists(self.keys.lease(lid)) for lid in {r.lease for r in batch} - {0}]
            changed = [
                (r, prev) for r, (prev, noop) in zip(batch, checked, strict=True) if not noop
            ]

            def result(rev: Revision) -> list[Service]:
                out = []
                for r, (prev, noop) in zip(batch, checked, strict=True):
                    if noop:
                        assert prev is not None
                        out.append(prev)
                    else:
                        create = prev.create_revision if prev else rev
                        out.append(Service(r.name, r.attrs, r.lease, owner, create, rev))
                return out

            checks = [
                self._put_landed(
                    r.name, prev.mod_revision if prev else 0, (r.attrs, r.lease, owner)
                )
                for r, prev in changed
            ]

            def landed(since: Revision) -> Written[list[Service]] | None:
                found = [check(since) for check in checks]
                if not found or any(w is None for w in found):
                    return None
                revision = found[0].revision  # type: ignore[union-attr]
                return Written(result(revision), revision)

            return _Plan(
                fences,
                [self._service_put(r.name, r.attrs, r.lease, owner) for r, _ in changed],
                result,
                landed if changed else None,
            )

        return await self._transact(plan)

    async def update(
        self,
        name: str,
        set_attrs: Mapping[str, str],
        remove_attrs: Iterable[str],
        *,
        expected_mod_revision: Revision,
        caller: Caller,
    ) -> Written[Service]:
        set_attrs, remove = validate_update(name, set_attrs, remove_attrs, expected_mod_revision)

        def plan() -> _Plan:
            prev, attrs = self.check_update(
                name, set_attrs, remove, expected_mod_revision=expected_mod_revision, caller=caller
            )
            fences = self._fences(name, prev, 0)
            if attrs == prev.attrs:
                return _Plan(fences, [], lambda _: prev)
            return _Plan(
                fences,
                [self._service_put(name, attrs, prev.lease, prev.owner)],
                lambda rev: Service(name, attrs, prev.lease, prev.owner, prev.create_revision, rev),
                self._put_landed(name, prev.mod_revision, (attrs, prev.lease, prev.owner)),
            )

        return await self._transact(plan)

    async def unregister(
        self, name: str, *, expected_mod_revision: Revision, caller: Caller
    ) -> Written[Service]:
        validate_name(name, new=False)
        validate_expected(expected_mod_revision)

        def plan() -> _Plan:
            prev = self.owned_service(name, caller, expected_mod_revision)
            key = self.keys.service(name)

            def landed(since: Revision) -> Written[Service] | None:
                e = self._found(
                    name,
                    since,
                    lambda e: (
                        e.type is EventType.DELETE
                        and e.prev is not None
                        and e.prev.mod_revision == prev.mod_revision
                    ),
                )
                return Written(prev, e.revision) if e is not None else None

            return _Plan(
                [_same_mod(key, prev.mod_revision)],
                [epb.RequestOp(request_delete_range=epb.DeleteRangeRequest(key=key))],
                lambda _: prev,
                landed,
            )

        return await self._transact(plan)

    # ---- leases -------------------------------------------------------------

    async def grant(self, ttl_ms: int, *, caller: Caller) -> Written[Lease]:
        validate_ttl(ttl_ms)
        # etcd's TTLs are whole seconds, and at least its minimum.
        lease_id, ttl_s = await self.etcd.grant(math.ceil(ttl_ms / 1000))
        lease = Lease(lease_id, ttl_s * 1000, caller.name)
        meta = _json({"owner": lease.owner, "ttl_ms": lease.ttl_ms})
        try:
            # Repeatable: the same two puts again change nothing that matters.
            r = await self.etcd.txn(
                success=[
                    _put(self.keys.lease(lease_id), meta, lease_id),
                    _put(self.keys.holder(lease_id), b"", lease_id),
                ],
                repeat=True,
            )
        except NotFound:
            raise Unavailable(f"etcd: lease {lease_id} ended as it was granted") from None
        loop = asyncio.get_running_loop()
        await self._until(r.header.revision, loop.time() + self.etcd.timeout)
        return Written(lease, r.header.revision)

    async def _lease_for(
        self, lease_id: LeaseID, check: Callable[[], Lease | None]
    ) -> Lease | None:
        """``check`` on this copy, and again once caught up if it found no
        lease (it may have been granted through another front just now) or
        refused."""
        try:
            lease = check()
            if lease is not None:
                return lease
        except STATE_ERRORS:
            pass
        await self._caught_up()
        return check()

    async def keepalive(self, lease_id: LeaseID, *, caller: Caller, holder: str) -> int:
        lease = await self._lease_for(lease_id, lambda: self.check_keepalive(lease_id, caller))
        if lease is None:
            return 0
        if await self.etcd.keepalive(lease_id) <= 0:
            return 0
        token = holder.encode()
        before = self._holders.get(lease_id)
        if before != token:
            # This stream holds it from now on; not if a front is ending it.
            key = self.keys.holder(lease_id)
            try:
                r = await self.etcd.txn(
                    [_value_is(key, ENDING, equal=False)], [_put(key, token, lease_id)]
                )
            except NotFound:
                return 0
            if not r.succeeded:
                return 0
            # Ahead of our watch, unless it brought a newer holder meanwhile.
            if self._holders.get(lease_id) == before:
                self._holders[lease_id] = token
        return lease.ttl_ms

    async def release(self, lease_id: LeaseID, *, holder: str) -> int | None:
        token = holder.encode()
        if self._holders.get(lease_id) != token:
            return None
        key = self.keys.holder(lease_id)
        # Only if no stream took it since, here or at another front; once
        # marked, no stream can take it.
        try:
            r = await self.etcd.txn([_value_is(key, token)], [_put(key, ENDING, lease_id)])
        except NotFound:
            return None
        if not r.succeeded:
            return None
        lease = self.leases.get(lease_id)
        deleted = len(lease.services) if lease is not None else 0
        try:
            revision = await self.etcd.revoke(lease_id, repeat=True)
        except NotFound:  # it ended meanwhile
            return deleted
        loop = asyncio.get_running_loop()
        await self._until(revision, loop.time() + self.etcd.timeout)
        return self._deleted_at(revision, lease_id, deleted)

    async def revoke(self, lease_id: LeaseID, *, caller: Caller) -> Written[int]:
        lease = await self._lease_for(lease_id, lambda: self.check_revoke(lease_id, caller))
        assert lease is not None  # check_revoke raises rather than answer None
        deleted = len(lease.services)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.etcd.timeout
        lost = False  # a try whose outcome we did not hear
        while True:
            try:
                revision = await self.etcd.revoke(lease_id)
                break
            except NotFound:
                if not lost:
                    raise NotFound(f"lease {lease_id} not found or expired") from None
                # The lost try landed after all.
                await self._caught_up()
                return Written(deleted, self.revision)
            except Unavailable:
                # Did it go through? After catching up, the lease says.
                if loop.time() >= deadline:
                    raise
                lost = True
                await self._caught_up()
                if lease_id not in self.leases:
                    return Written(deleted, self.revision)
        await self._until(revision, deadline)
        return Written(self._deleted_at(revision, lease_id, deleted), revision)

    def _deleted_at(self, revision: Revision, lease_id: LeaseID, guess: int) -> int:
        """How many services of ``lease_id`` the revision that ended it
        deleted (the copy's count, ``guess``, can miss ones registered
        through another front a moment before)."""
        for rev, events, _ in reversed(self.history):
            if rev == revision:
                return sum(
                    e.type is EventType.DELETE and e.service.lease == lease_id for e in events
                )
            if rev < revision:
                break
        return guess

    async def remaining_ms(self, leases: list[Lease]) -> list[int]:
        async def left(lease: Lease) -> int:
            async with self._ttl_limit:
                ttl = await self.etcd.time_to_live(lease.id)
            return max(0, ttl * 1000)

        return list(await asyncio.gather(*(left(lease) for lease in leases)))

    # ---- compaction ---------------------------------------------------------

    async def _compact_loop(self) -> None:
        while True:
            await asyncio.sleep(self.compact_interval)
            try:
                await self.compact()
            except GeryonError as exc:
                log.warning("registryd: etcd compaction: %s", exc)

    async def compact(self) -> Revision | None:
        """Compact etcd's history to this front's window (the revisions its
        count and age bounds dropped). Only one front does it at a time: the
        one whose compare-and-swap on the compaction key wins (as Kubernetes'
        compactor). Returns the revision compacted to, None when nothing was."""
        if not self._filled.is_set():  # our window is not whole yet
            return None
        target = self.oldest_revision
        if target <= max(self._compacted_at, 1):
            return None
        r = await self.etcd.txn(
            [
                epb.Compare(
                    key=self.keys.compact,
                    target=epb.Compare.VERSION,
                    result=epb.Compare.EQUAL,
                    version=self._compact_version,
                )
            ],
            [_put(self.keys.compact, str(target).encode())],
        )
        if not r.succeeded:
            return None  # another front moved first; we learn its point by the watch
        try:
            # One revision more than we serve: etcd gives an event the value
            # it replaced (prev_kv) only while it holds the revision before.
            await self.etcd.compact(target - 1)
        except OutOfRange:  # etcd was already compacted past it
            pass
        log.info("registryd: compacted etcd's history to revision %d", target)
        return target

    # ---- health -------------------------------------------------------------

    async def _health_loop(self) -> None:
        """Not serving while reads fail or the watch is down; once the watch
        has been down a while, send this front's streams elsewhere."""
        down_since: float | None = None
        while True:
            await asyncio.sleep(0.5)
            if self._watch_up.is_set():
                down_since = None
                if self._serving is not None:  # is etcd back?
                    with contextlib.suppress(GeryonError):
                        await self._caught_up()
                continue
            now = time.monotonic()
            if down_since is None:
                down_since = now
            elif down_since != -1 and now - down_since >= LOST_AFTER_S:
                down_since = -1  # said once per outage
                cause = f"lost etcd {self.etcd}"
                self._health(cause)
                # Watchers here would hear nothing: send them elsewhere.
                self.lost(Unavailable(f"registryd: {cause}"))

    def unavailable(self) -> str | None:
        return self._serving

    def _health(self, cause: str | None) -> None:
        """Serving (None) or not, and why; only changes are said."""
        if (cause is None) == (self._serving is None):
            return
        self._serving = cause
        if cause is None:
            log.info("registryd: etcd reachable again: serving")
        else:
            log.warning("registryd: not serving: %s", cause)
        self.set_health(cause)


def _consume(fut: asyncio.Future[Any]) -> None:
    """Mark a shared future's exception as seen: its waiters may all be gone."""
    if not fut.cancelled():
        fut.exception()
