"""The embedded store: the registry's state, durable in one SQLite file.

The default backend, for a registry that runs on one node. Invariants:
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
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from geryon.errors import FailedPrecondition
from geryon.model import (
    Caller,
    Event,
    EventType,
    Lease,
    LeaseID,
    Revision,
    Service,
    validate_name,
    validate_ttl,
)
from geryon.store.base import Store, Written
from geryon.store.state import (
    Limits,
    validate_expected,
    validate_register,
    validate_update,
)

log = logging.getLogger("geryon.store")

T = TypeVar("T")

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


async def wait(future: Awaitable[None]) -> None:
    """Await a durability future without letting a cancelled caller cancel it."""
    await asyncio.shield(future)


class SQLiteStore(Store):
    """The state, applied at once and made durable by group commit."""

    def __init__(self, path: Path, *, limits: Limits | None = None) -> None:
        super().__init__(limits=limits)
        self.path = path
        self.next_lease: LeaseID = 1
        self._deadlines: list[tuple[float, LeaseID]] = []
        self._batch: _Batch | None = None
        self._inflight: _Batch | None = None
        self._kick = asyncio.Event()
        self._db: sqlite3.Connection | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="geryon-store")
        self._committer: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None
        self._lock: IO[str] | None = None

    def describe(self) -> str:
        return f"data {self.path.parent}"

    # ---- opening and closing ------------------------------------------------

    @classmethod
    async def open(cls, data_dir: Path, *, limits: Limits | None = None) -> SQLiteStore:
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
            self.index_add(Service(row[0], json.loads(row[1]), row[2], row[3], row[4], row[5]))
        self.link_leases()
        self._rebuild_deadlines()
        current: list[Event] = []
        current_rev, current_ts = 0, 0.0
        for rev, _idx, typ, svc, prev, ts in db.execute(
            "SELECT revision, idx, type, service, prev, ts FROM events "
            "WHERE revision >= ? ORDER BY revision, idx",
            (self.oldest_revision,),
        ):
            if rev != current_rev and current:
                self.record(current_rev, tuple(current), current_ts)
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
            self.record(current_rev, tuple(current), current_ts)

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

    async def read(self, look: Callable[[], T]) -> tuple[T, Revision]:
        # Memory may hold writes not yet durable: look now, answer once they are.
        seen = look()
        return seen, await self.sync()

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
                    self.publish(revision, events, ts)
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
        if self.trim_history(now=time.time()):
            batch.ops.append(("DELETE FROM events WHERE revision < ?", (self.oldest_revision,)))

    # ---- writes -------------------------------------------------------------

    def _next_revision(self) -> Revision:
        self.revision += 1
        return self.revision

    def _put(self, new: Service, prev: Service | None) -> tuple[Event, Op]:
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
        return self.put(new, prev), op

    def _delete(self, s: Service, revision: Revision) -> tuple[Event, Op]:
        op = ("DELETE FROM services WHERE name = ?", (s.name,))
        return self.delete(s, revision), op

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
        # Everything up to the first await runs as one step of the event
        # loop: decided and applied before any other request is looked at.
        attrs = validate_register(name, attrs, lease=lease, persist=persist)
        prev, noop = self.check_register(
            name, attrs, lease=lease, caller=caller, create_only=create_only
        )
        if noop:  # idempotent: no new revision
            assert prev is not None
            decided_at = await self.sync()
            return Written(prev, decided_at)
        revision = self._next_revision()
        new = Service(
            name, attrs, lease, caller.name, prev.create_revision if prev else revision, revision
        )
        event, op = self._put(new, prev)
        await wait(self._commit(revision, [event], [op]))
        return Written(new, revision)

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
        prev, attrs = self.check_update(
            name, set_attrs, remove, expected_mod_revision=expected_mod_revision, caller=caller
        )
        if attrs == prev.attrs:
            decided_at = await self.sync()
            return Written(prev, decided_at)
        revision = self._next_revision()
        new = Service(name, attrs, prev.lease, prev.owner, prev.create_revision, revision)
        event, op = self._put(new, prev)
        await wait(self._commit(revision, [event], [op]))
        return Written(new, revision)

    async def unregister(
        self, name: str, *, expected_mod_revision: Revision, caller: Caller
    ) -> Written[Service]:
        validate_name(name)
        validate_expected(expected_mod_revision)
        prev = self.owned_service(name, caller, expected_mod_revision)
        revision = self._next_revision()
        event, op = self._delete(prev, revision)
        await wait(self._commit(revision, [event], [op]))
        return Written(prev, revision)

    # ---- leases -------------------------------------------------------------

    async def grant(self, ttl_ms: int, *, caller: Caller) -> Written[Lease]:
        validate_ttl(ttl_ms)
        lease = Lease(self.next_lease, ttl_ms, caller.name, time.monotonic() + ttl_ms / 1000)
        self.next_lease += 1
        self.leases[lease.id] = lease
        heapq.heappush(self._deadlines, (lease.deadline, lease.id))
        op = ("INSERT INTO leases VALUES (?, ?, ?)", (lease.id, ttl_ms, caller.name))
        decided_at = self.revision
        await wait(self._enqueue([op]))
        return Written(lease, decided_at)

    async def keepalive(self, lease_id: LeaseID, *, caller: Caller, holder: str) -> int:
        lease = self.check_keepalive(lease_id, caller)
        if lease is None:
            return 0
        # The deadline moves later; the heap entry is checked lazily on expiry.
        lease.deadline = time.monotonic() + lease.ttl_ms / 1000
        lease.holder = holder
        return lease.ttl_ms

    async def release(self, lease_id: LeaseID, *, holder: str) -> int | None:
        lease = self.leases.get(lease_id)
        if lease is None or lease.holder != holder:
            return None  # gone already, or renewed on a newer stream since
        deleted, durable = self._revoke(lease_id, caller=None)
        await wait(durable)
        return deleted

    async def remaining_ms(self, leases: list[Lease]) -> list[int]:
        now = time.monotonic()
        return [max(0, int((lease.deadline - now) * 1000)) for lease in leases]

    async def revoke(self, lease_id: LeaseID, *, caller: Caller) -> Written[int]:
        deleted, durable = self._revoke(lease_id, caller=caller)
        revision = self.revision
        await wait(durable)
        return Written(deleted, revision)

    def _revoke(
        self, lease_id: LeaseID, *, caller: Caller | None
    ) -> tuple[int, asyncio.Future[None]]:
        """End a lease and delete its services in one revision, now.

        ``caller`` None is the registry itself (expiry, a closed stream).
        """
        lease = self.check_revoke(lease_id, caller)
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
            self._revoke(lid, caller=None)
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
