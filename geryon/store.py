"""The registry's state and its durable home.

Invariants this module keeps:
- Every change to the set of services gets the next revision; the revision is
  stored with the change and never goes back, across any restart.
- A change is applied to memory at once (so the next request validates against
  it) and acknowledged only after it is in SQLite and fsynced. Writes waiting
  at the same moment share one transaction and one fsync (group commit).
- Readers are answered only once everything they saw is durable, and watchers
  hear of a change only after it is durable: nothing a client observed can be
  lost by a crash.
- Leases are durable (id, ttl, owner) but their deadlines are not: a restarted
  registry gives every lease a fresh TTL, so it expires nothing in a burst.

All methods run on the event loop thread; only the SQLite writes run in the
store's own writer thread.
"""

from __future__ import annotations

import asyncio
import fcntl
import heapq
import itertools
import json
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sortedcontainers import SortedList

from geryon.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
)
from geryon.model import (
    WILDCARD,
    Caller,
    Event,
    EventType,
    Filter,
    Lease,
    LeaseID,
    Revision,
    Service,
    validate_attr_name,
    validate_attrs,
    validate_name,
    validate_ttl,
)

log = logging.getLogger("geryon.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS services (
    name TEXT PRIMARY KEY, attrs TEXT NOT NULL, lease INTEGER NOT NULL,
    owner TEXT NOT NULL, create_revision INTEGER NOT NULL, mod_revision INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY, ttl_ms INTEGER NOT NULL, owner TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER NOT NULL, idx INTEGER NOT NULL, type INTEGER NOT NULL,
    service TEXT NOT NULL, prev TEXT, ts REAL NOT NULL, PRIMARY KEY (revision, idx));
"""

# One SQL statement and its parameters; a batch is a list of these.
Op = tuple[str, tuple[Any, ...]]


@dataclass
class Limits:
    """Bounds that keep one client from filling the registry."""

    services_per_lease: int = 10_000
    history_events: int = 100_000
    history_age_s: float = 3600.0


@dataclass
class _Batch:
    """Writes applied to memory and waiting for the same transaction."""

    future: asyncio.Future[None]
    ops: list[Op] = field(default_factory=list)
    revisions: list[tuple[Revision, tuple[Event, ...], float]] = field(default_factory=list)
    revision: Revision = 0


def _service_json(s: Service) -> str:
    return json.dumps(
        [s.name, s.attrs, s.lease, s.owner, s.create_revision, s.mod_revision],
        separators=(",", ":"),
    )


def _service_from_json(text: str) -> Service:
    name, attrs, lease, owner, create, mod = json.loads(text)
    return Service(name, attrs, lease, owner, create, mod)


class Store:
    """Services, leases, the revision and the event history.

    ``on_commit`` is called with each revision's events once they are durable,
    in revision order (the watch hub subscribes here).
    """

    def __init__(self, path: Path, *, limits: Limits | None = None) -> None:
        self.path = path
        self.limits = limits or Limits()
        self.services: dict[str, Service] = {}
        self.names: SortedList = SortedList()
        # attr -> value -> names, and attr -> names having it (for "*").
        self.index: dict[str, dict[str, set[str]]] = {}
        self.having: dict[str, set[str]] = {}
        self.leases: dict[LeaseID, Lease] = {}
        self.revision: Revision = 0  # applied (may not be durable yet)
        self.durable_revision: Revision = 0
        self.next_lease: LeaseID = 1
        # (revision, events, wall time) for every durable revision still held.
        self.history: deque[tuple[Revision, tuple[Event, ...], float]] = deque()
        self.oldest_revision: Revision = 1
        self._history_events = 0  # events held in self.history
        self.on_commit: list[Callable[[Revision, tuple[Event, ...]], None]] = []
        self.commit_latency: Callable[[float], None] | None = None
        self._deadlines: list[tuple[float, LeaseID]] = []
        self._batch: _Batch | None = None
        self._inflight: _Batch | None = None
        self._kick = asyncio.Event()
        self._db: sqlite3.Connection | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="geryon-store")
        self._committer: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None
        self._lock: IO[str] | None = None

    # ---- opening and closing ------------------------------------------------

    @classmethod
    async def open(cls, data_dir: Path, *, limits: Limits | None = None) -> Store:
        store = cls(data_dir / "registry.db", limits=limits)
        await asyncio.get_running_loop().run_in_executor(store._writer, store._load)
        store._committer = asyncio.create_task(store._commit_loop(), name="store-committer")
        return store

    def _load(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Two registries on one store would hand out the same revisions.
        self._lock = open(self.path.parent / "LOCK", "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise FailedPrecondition(f"{self.path.parent} is in use by another registry") from None
        try:
            self._load_db()
        except sqlite3.DatabaseError as exc:  # not ours, or damaged: say so, touch nothing
            raise FailedPrecondition(f"{self.path}: {exc}") from None

    def _load_db(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so an acknowledged write
        # survives power loss, not only a process crash.
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        self._db = db
        meta = dict(db.execute("SELECT key, value FROM meta"))
        self.revision = self.durable_revision = meta.get("revision", 0)
        self.next_lease = meta.get("next_lease", 1)
        self.oldest_revision = meta.get("oldest", 1)
        now = time.monotonic()
        for lid, ttl_ms, owner in db.execute("SELECT id, ttl_ms, owner FROM leases"):
            self.leases[lid] = Lease(lid, ttl_ms, owner, now + ttl_ms / 1000)
        for row in db.execute(
            "SELECT name, attrs, lease, owner, create_revision, mod_revision FROM services"
        ):
            s = Service(row[0], json.loads(row[1]), row[2], row[3], row[4], row[5])
            self._index_add(s)
            if s.lease and s.lease in self.leases:
                self.leases[s.lease].services.add(s.name)
        self._rebuild_deadlines()
        current: list[Event] = []
        current_rev, current_ts = 0, 0.0
        for rev, _idx, typ, svc, prev, ts in db.execute(
            "SELECT revision, idx, type, service, prev, ts FROM events "
            "WHERE revision >= ? ORDER BY revision, idx",
            (self.oldest_revision,),
        ):
            if rev != current_rev and current:
                self.history.append((current_rev, tuple(current), current_ts))
                current = []
            current_rev, current_ts = rev, ts
            current.append(
                Event(
                    EventType(typ),
                    _service_from_json(svc),
                    _service_from_json(prev) if prev else None,
                    rev,
                )
            )
        if current:
            self.history.append((current_rev, tuple(current), current_ts))
        self._history_events = sum(len(ev) for _, ev, _ in self.history)

    async def close(self) -> None:
        """Flush what is pending and close the database."""
        if self._committer is not None:
            while self._batch is not None or self._inflight is not None:
                await self.sync()
            self._committer.cancel()
            try:
                await self._committer
            except asyncio.CancelledError:
                pass
            self._committer = None
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.get_running_loop().run_in_executor(self._writer, db.close)
        self._writer.shutdown(wait=True)
        if self._lock is not None:
            self._lock.close()

    # ---- durability ---------------------------------------------------------

    def _enqueue(
        self, ops: list[Op], events: tuple[Event, ...] = (), revision: Revision = 0
    ) -> asyncio.Future[None]:
        if self._failed is not None:
            raise self._failed
        if self._batch is None:
            self._batch = _Batch(asyncio.get_running_loop().create_future())
            self._kick.set()
        batch = self._batch
        batch.ops.extend(ops)
        if events:
            batch.revisions.append((revision, events, time.time()))
            batch.revision = revision
        return batch.future

    def _barrier(self) -> asyncio.Future[None]:
        """Done once every write applied so far is durable: what a no-op
        answer waits for, without a transaction (and fsync) of its own."""
        if self._failed is not None:
            raise self._failed
        pending = self._batch or self._inflight
        if pending is not None:
            return pending.future
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def sync(self) -> Revision:
        """Wait until everything applied so far is durable; return that revision."""
        if self._failed is not None:  # what memory holds never became durable
            raise self._failed
        revision = self.revision
        pending = self._batch or self._inflight
        if pending is not None:
            await asyncio.shield(pending.future)
        return revision

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._kick.wait()
            self._kick.clear()
            while self._batch is not None:
                batch, self._batch = self._batch, None
                self._inflight = batch
                self._compact(batch)
                started = time.perf_counter()
                try:
                    await loop.run_in_executor(self._writer, self._write, batch)
                except Exception as exc:  # a broken disk: refuse everything after
                    log.critical("store: commit failed: %s", exc)
                    self._failed = exc
                    batch.future.set_exception(exc)
                    self._inflight = None
                    # Writes queued behind this one can never commit either:
                    # fail them too rather than leave their waiters hanging.
                    if self._batch is not None:
                        self._batch.future.set_exception(exc)
                        self._batch = None
                    return
                if self.commit_latency is not None:
                    self.commit_latency(time.perf_counter() - started)
                self._inflight = None
                for revision, events, ts in batch.revisions:
                    self.durable_revision = revision
                    self.history.append((revision, events, ts))
                    self._history_events += len(events)
                    for notify in self.on_commit:
                        notify(revision, events)
                if not batch.future.done():
                    batch.future.set_result(None)

    def _write(self, batch: _Batch) -> None:
        assert self._db is not None
        db = self._db
        db.execute("BEGIN")
        try:
            for sql, params in batch.ops:
                db.execute(sql, params)
            db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [
                    ("revision", self._batch_revision(batch)),
                    ("next_lease", self.next_lease),
                    ("oldest", self.oldest_revision),
                ],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _batch_revision(self, batch: _Batch) -> Revision:
        return batch.revision or self.durable_revision

    def _compact(self, batch: _Batch) -> None:
        """Drop whole revisions from the history past its count or age bound."""
        limit, oldest_ts = self.limits.history_events, time.time() - self.limits.history_age_s
        dropped = False
        while self.history and (self._history_events > limit or self.history[0][2] < oldest_ts):
            rev, events, _ = self.history.popleft()
            self._history_events -= len(events)
            self.oldest_revision = rev + 1
            dropped = True
        if dropped:
            batch.ops.append(("DELETE FROM events WHERE revision < ?", (self.oldest_revision,)))

    # ---- the index ----------------------------------------------------------

    def _index_add(self, s: Service) -> None:
        if s.name not in self.services:
            self.names.add(s.name)
        self.services[s.name] = s
        for attr, value in s.attrs.items():
            self.index.setdefault(attr, {}).setdefault(value, set()).add(s.name)
            self.having.setdefault(attr, set()).add(s.name)

    def _index_remove(self, s: Service) -> None:
        del self.services[s.name]
        self.names.remove(s.name)
        for attr, value in s.attrs.items():
            values = self.index[attr]
            names = values[value]
            names.discard(s.name)
            if not names:
                del values[value]
                if not values:
                    del self.index[attr]
            having = self.having[attr]
            having.discard(s.name)
            if not having:
                del self.having[attr]

    # ---- reads --------------------------------------------------------------

    def get(self, name: str) -> Service:
        validate_name(name)
        try:
            return self.services[name]
        except KeyError:
            raise NotFound(f"no service {name!r}") from None

    def find(self, flt: Filter) -> list[Service]:
        """Every service matching ``flt``, sorted by name."""
        # Walk the smallest candidate set any term offers, so a Find costs
        # about what its answer costs, not a scan of every entry.
        candidates: set[str] | None = None
        for attr, want in flt.attrs.items():
            names = (
                self.having.get(attr) if want == WILDCARD else self.index.get(attr, {}).get(want)
            )
            if not names:
                return []
            if candidates is None or len(names) < len(candidates):
                candidates = names
        if candidates is None:
            if flt.prefix:
                # Names with the prefix sort first from it on; no string bounds
                # them from above (prefix + U+10FFFF + more sorts past that).
                candidates = itertools.takewhile(
                    lambda n: n.startswith(flt.prefix), self.names.irange(flt.prefix)
                )
            else:
                candidates = self.names
            out = [self.services[n] for n in candidates]
            return [s for s in out if flt.matches(s)] if flt.attrs or flt.prefix else out
        return sorted(
            (s for n in candidates if flt.matches(s := self.services[n])),
            key=lambda s: s.name,
        )

    def lease_list(self) -> list[Lease]:
        return [self.leases[i] for i in sorted(self.leases)]

    # ---- writes -------------------------------------------------------------

    def _next_revision(self) -> Revision:
        self.revision += 1
        return self.revision

    def _put(self, new: Service, prev: Service | None) -> tuple[Event, Op]:
        if prev is not None:
            self._index_remove(prev)
            if prev.lease and prev.lease in self.leases:
                self.leases[prev.lease].services.discard(prev.name)
        self._index_add(new)
        if new.lease:
            self.leases[new.lease].services.add(new.name)
        op = (
            "INSERT OR REPLACE INTO services VALUES (?, ?, ?, ?, ?, ?)",
            (
                new.name,
                json.dumps(new.attrs, separators=(",", ":")),
                new.lease,
                new.owner,
                new.create_revision,
                new.mod_revision,
            ),
        )
        return Event(EventType.PUT, new, prev, new.mod_revision), op

    def _delete(self, s: Service, revision: Revision) -> tuple[Event, Op]:
        self._index_remove(s)
        if s.lease and s.lease in self.leases:
            self.leases[s.lease].services.discard(s.name)
        op = ("DELETE FROM services WHERE name = ?", (s.name,))
        return Event(EventType.DELETE, s, s, revision), op

    def _commit(
        self, revision: Revision, events: list[Event], ops: list[Op]
    ) -> asyncio.Future[None]:
        ops.extend(
            (
                "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)",
                (
                    revision,
                    i,
                    e.type.value,
                    _service_json(e.service),
                    _service_json(e.prev) if e.prev else None,
                    time.time(),
                ),
            )
            for i, e in enumerate(events)
        )
        return self._enqueue(ops, tuple(events), revision)

    def _owned_lease(self, lease_id: LeaseID, caller: Caller) -> Lease:
        lease = self.leases.get(lease_id)
        if lease is None:
            raise NotFound(f"lease {lease_id} not found or expired")
        if lease.owner != caller.name:
            raise PermissionDenied(f"lease {lease_id} belongs to {lease.owner}, not {caller.name}")
        return lease

    def _owned_service(self, name: str, caller: Caller, expected: Revision) -> Service:
        s = self.get(name)
        if s.owner != caller.name and not caller.admin:
            raise PermissionDenied(f"{name} belongs to {s.owner}, not {caller.name}")
        if expected and s.mod_revision != expected:
            raise FailedPrecondition(
                f"{name} changed: mod_revision is {s.mod_revision}, expected {expected}"
            )
        return s

    def register(
        self,
        name: str,
        attrs: Mapping[str, str],
        *,
        lease: LeaseID,
        persist: bool,
        caller: Caller,
        create_only: bool = False,
    ) -> tuple[Service, asyncio.Future[None]]:
        validate_name(name)
        attrs = validate_attrs(attrs)
        if bool(lease) == persist:
            raise InvalidArgument("lease, persist: give exactly one of a lease and persist")
        if lease < 0:
            raise InvalidArgument(f"lease: bad lease id {lease}")
        if lease:
            held = self._owned_lease(lease, caller)
            if len(held.services) >= self.limits.services_per_lease and name not in held.services:
                raise ResourceExhausted(
                    f"lease {lease} holds {len(held.services)} services, the limit"
                )
        prev = self.services.get(name)
        if prev is not None and prev.owner != caller.name:
            raise AlreadyExists(f"{name} is registered by {prev.owner}")
        if prev is not None and create_only:
            raise FailedPrecondition(
                f"{name}: create_only, but it exists (created at revision {prev.create_revision})"
            )
        if prev is not None and prev.attrs == attrs and prev.lease == lease:
            return prev, self._barrier()  # idempotent: no new revision
        revision = self._next_revision()
        new = Service(
            name,
            attrs,
            lease,
            caller.name,
            prev.create_revision if prev else revision,
            revision,
        )
        event, op = self._put(new, prev)
        return new, self._commit(revision, [event], [op])

    def update(
        self,
        name: str,
        set_attrs: Mapping[str, str],
        remove_attrs: Iterable[str],
        *,
        expected_mod_revision: Revision,
        caller: Caller,
    ) -> tuple[Service, asyncio.Future[None]]:
        validate_name(name)
        set_attrs = validate_attrs(set_attrs, "set_attrs")
        remove = {validate_attr_name(a, "remove_attrs") for a in remove_attrs}
        if both := remove & set_attrs.keys():
            raise InvalidArgument(f"remove_attrs: {sorted(both)[0]!r} is also in set_attrs")
        if expected_mod_revision < 0:
            raise InvalidArgument("expected_mod_revision: negative")
        prev = self._owned_service(name, caller, expected_mod_revision)
        attrs = {k: v for k, v in prev.attrs.items() if k not in remove}
        attrs.update(set_attrs)
        validate_attrs(attrs)
        if attrs == prev.attrs:
            return prev, self._barrier()
        revision = self._next_revision()
        new = Service(name, attrs, prev.lease, prev.owner, prev.create_revision, revision)
        event, op = self._put(new, prev)
        return new, self._commit(revision, [event], [op])

    def unregister(
        self, name: str, *, expected_mod_revision: Revision, caller: Caller
    ) -> tuple[Service, asyncio.Future[None]]:
        validate_name(name)
        if expected_mod_revision < 0:
            raise InvalidArgument("expected_mod_revision: negative")
        prev = self._owned_service(name, caller, expected_mod_revision)
        revision = self._next_revision()
        event, op = self._delete(prev, revision)
        return prev, self._commit(revision, [event], [op])

    # ---- leases -------------------------------------------------------------

    def grant(self, ttl_ms: int, *, caller: Caller) -> tuple[Lease, asyncio.Future[None]]:
        validate_ttl(ttl_ms)
        lease = Lease(self.next_lease, ttl_ms, caller.name, time.monotonic() + ttl_ms / 1000)
        self.next_lease += 1
        self.leases[lease.id] = lease
        heapq.heappush(self._deadlines, (lease.deadline, lease.id))
        op = ("INSERT INTO leases VALUES (?, ?, ?)", (lease.id, ttl_ms, caller.name))
        return lease, self._enqueue([op])

    def keepalive(self, lease_id: LeaseID, *, caller: Caller) -> int:
        """Renew a lease; return its TTL in ms, 0 when it is gone."""
        lease = self.leases.get(lease_id)
        if lease is None:
            return 0
        if lease.owner != caller.name:
            raise PermissionDenied(f"lease {lease_id} belongs to {lease.owner}, not {caller.name}")
        # The deadline moves later; the heap entry is checked lazily on expiry.
        lease.deadline = time.monotonic() + lease.ttl_ms / 1000
        return lease.ttl_ms

    def revoke(
        self, lease_id: LeaseID, *, caller: Caller | None
    ) -> tuple[int, asyncio.Future[None]]:
        """End a lease and delete its services in one revision.

        ``caller`` None is the registry itself (expiry, a closed stream).
        """
        if caller is None:
            lease = self.leases.get(lease_id)
            if lease is None:
                raise NotFound(f"lease {lease_id} not found or expired")
        elif caller.admin and lease_id in self.leases:
            lease = self.leases[lease_id]
        else:
            lease = self._owned_lease(lease_id, caller)
        del self.leases[lease_id]
        ops: list[Op] = [("DELETE FROM leases WHERE id = ?", (lease_id,))]
        if not lease.services:
            return 0, self._enqueue(ops)
        revision = self._next_revision()
        events = []
        for name in sorted(lease.services):
            event, op = self._delete(self.services[name], revision)
            events.append(event)
            ops.append(op)
        return len(events), self._commit(revision, events, ops)

    def expire(self, now: float | None = None) -> list[LeaseID]:
        """End every lease whose deadline has passed; return their ids."""
        now = time.monotonic() if now is None else now
        ended = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, lid = heapq.heappop(self._deadlines)
            lease = self.leases.get(lid)
            if lease is None:
                continue
            if lease.deadline > now:  # renewed since this entry was pushed
                heapq.heappush(self._deadlines, (lease.deadline, lid))
                continue
            self.revoke(lid, caller=None)
            ended.append(lid)
        return ended

    def refresh_all_leases(self) -> None:
        """Give every lease a fresh TTL: after a restart or a stall of our own,
        clients could not renew, and that is not their fault."""
        now = time.monotonic()
        for lease in self.leases.values():
            lease.deadline = max(lease.deadline, now + lease.ttl_ms / 1000)
        self._rebuild_deadlines()

    def _rebuild_deadlines(self) -> None:
        self._deadlines = [(lease.deadline, lid) for lid, lease in self.leases.items()]
        heapq.heapify(self._deadlines)

    def next_deadline(self) -> float | None:
        return self._deadlines[0][0] if self._deadlines else None

    # ---- history ------------------------------------------------------------

    def history_since(self, start: Revision) -> list[tuple[Revision, tuple[Event, ...]]]:
        """Durable revisions >= start, oldest first. Raises OutOfRange when
        part of that history was compacted away."""
        if start < self.oldest_revision:
            raise OutOfRange(
                f"revision {start} compacted; oldest held is {self.oldest_revision}",
                resume_revision=self.oldest_revision,
            )
        out = []
        for rev, events, _ in reversed(self.history):
            if rev < start:
                break
            out.append((rev, events))
        out.reverse()
        return out


async def wait(future: Awaitable[None]) -> None:
    """Await a durability future without letting a cancelled caller cancel it."""
    await asyncio.shield(future)
