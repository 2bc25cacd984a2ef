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
import contextlib
import dataclasses
import fcntl
import heapq
import itertools
import json
import logging
import os
import sqlite3
import sys
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import IO, Any, TypeVar

import orjson

from geryon.errors import FailedPrecondition, NotFound, OutOfRange, Unavailable
from geryon.model import (
    WILDCARD,
    Caller,
    Event,
    EventType,
    Filter,
    Lease,
    LeaseID,
    Registration,
    Revision,
    Service,
    validate_name,
    validate_ttl,
)
from geryon.store.base import Store, Written
from geryon.store.state import (
    Limits,
    Stored,
    validate_batch,
    validate_expected,
    validate_register,
    validate_update,
)

log = logging.getLogger("geryon.store")

T = TypeVar("T")

# Every row carries a CRC-32 of its other columns (``crc``): SQLite checks
# its pages' structure (quick_check, at start) but not what a row holds, and
# a flipped byte in a stored value must not be served as if it were stored.
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS services (
    name TEXT PRIMARY KEY, attrs TEXT NOT NULL, lease INTEGER NOT NULL,
    owner TEXT NOT NULL, create_revision INTEGER NOT NULL, mod_revision INTEGER NOT NULL,
    crc INTEGER);
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY, ttl_ms INTEGER NOT NULL, owner TEXT NOT NULL, crc INTEGER);
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER NOT NULL, idx INTEGER NOT NULL, type INTEGER NOT NULL,
    service TEXT NOT NULL, prev TEXT, ts REAL NOT NULL, crc INTEGER,
    PRIMARY KEY (revision, idx));
"""
# 1: rows without checksums (before the crc columns); 2: every row has one.
SCHEMA_VERSION = 2
# Each table's columns the checksum covers, in order.
COLUMNS = {
    "services": "name, attrs, lease, owner, create_revision, mod_revision",
    "leases": "id, ttl_ms, owner",
    "events": "revision, idx, type, service, prev, ts",
}
# How often a store that could not write tries again.
RETRY_S = 1.0

# One SQL statement and its parameters; a batch is a list of these.
Op = tuple[str, tuple[Any, ...]]


@dataclass
class _Batch:
    """Writes applied to memory and waiting for the same transaction."""

    future: asyncio.Future[None]
    ops: list[Op] = field(default_factory=list)
    # (revision, events, wall time, their stored size)
    revisions: list[tuple[Revision, tuple[Event, ...], float, int]] = field(default_factory=list)
    revision: Revision = 0


def row_crc(*columns: object) -> int:
    """The checksum a row carries of its other columns."""
    return zlib.crc32("\x1f".join(map(str, columns)).encode())


def _json(value: object) -> str:
    """Compact JSON, by orjson: json.dumps cost 8 us a row, a fifth of a
    registration's time in a batch. json.loads reads it back."""
    return orjson.dumps(value).decode()


def _service_json(s: Service) -> str:
    return _json([s.name, s.attrs, s.lease, s.owner, s.create_revision, s.mod_revision])


# row_crc, spelled out for the two tables every entry's write and load goes
# through: no tuple and no str() per column.
def _service_crc(name: str, attrs: str, lease: int, owner: str, create: int, mod: int) -> int:
    return zlib.crc32(f"{name}\x1f{attrs}\x1f{lease}\x1f{owner}\x1f{create}\x1f{mod}".encode())


def _event_crc(rev: int, idx: int, typ: int, svc: str, prev: str | None, ts: float) -> int:
    return zlib.crc32(f"{rev}\x1f{idx}\x1f{typ}\x1f{svc}\x1f{prev}\x1f{ts}".encode())


def service_row(s: Service) -> tuple[Any, ...]:
    """A service as its ``services`` row, checksum last."""
    name, attrs, lease, owner, create, mod = (
        s.name,
        _json(s.attrs),
        s.lease,
        s.owner,
        s.create_revision,
        s.mod_revision,
    )
    return (
        name,
        attrs,
        lease,
        owner,
        create,
        mod,
        _service_crc(name, attrs, lease, owner, create, mod),
    )


def lease_row(lease_id: LeaseID, ttl_ms: int, owner: str) -> tuple[Any, ...]:
    """A lease as its ``leases`` row, checksum last."""
    return (lease_id, ttl_ms, owner, row_crc(lease_id, ttl_ms, owner))


def event_row(revision: Revision, idx: int, e: Event, ts: float) -> tuple[Any, ...]:
    """An event as its ``events`` row, checksum last."""
    typ, svc = e.type.value, _service_json(e.service)
    prev = _service_json(e.prev) if e.prev else None
    return (revision, idx, typ, svc, prev, ts, _event_crc(revision, idx, typ, svc, prev, ts))


def _stored_size(row: tuple[Any, ...]) -> int:
    """An event row's size for the history's byte bound: its entries' JSON."""
    return len(row[3]) + len(row[4] or "")


intern = sys.intern

# Service's slots, set directly: its frozen dataclass __init__ sets each
# field through object.__setattr__, which took a third of the time loaded
# entries take to decode.
_SLOTS = {f.name: getattr(Service, f.name).__set__ for f in dataclasses.fields(Service)}
_set_name, _set_attrs, _set_lease = _SLOTS["name"], _SLOTS["attrs"], _SLOTS["lease"]
_set_owner, _set_create, _set_mod = (
    _SLOTS["owner"],
    _SLOTS["create_revision"],
    _SLOTS["mod_revision"],
)
_set_wire = _SLOTS["wire"]
assert len(_SLOTS) == 7, "a new Service field must be set in _loaded_service"


def _loaded_service(
    name: str, attrs: dict[str, str], lease: int, owner: str, create: int, mod: int
) -> Service:
    """Service(name, attrs, lease, owner, create, mod), without its frozen
    dataclass __init__ (object.__setattr__ per field: 2.4 against 0.9 us),
    for the load and a batch."""
    s = object.__new__(Service)
    _set_name(s, name)
    _set_attrs(s, attrs)
    _set_lease(s, lease)
    _set_owner(s, owner)
    _set_create(s, create)
    _set_mod(s, mod)
    _set_wire(s, None)
    return s


def _attrs(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("attributes are not a map of strings")
    return value


def _service(
    name: object, attrs: object, lease: object, owner: object, create: object, mod: object
) -> Service:
    """A stored service, checked to be one (a row SQLite kept but we cannot read)."""
    if not isinstance(name, str) or not isinstance(owner, str):
        raise ValueError("name or owner is not text")
    if not all(isinstance(n, int) for n in (lease, create, mod)):
        raise ValueError("lease or revisions are not integers")
    return Service(name, _attrs(attrs), lease, owner, create, mod)


def _service_from_json(text: str) -> Service:
    fields = json.loads(text)
    if not isinstance(fields, list) or len(fields) != 6:
        raise ValueError("not a stored service")
    return _service(*fields)


async def wait(future: Awaitable[None]) -> None:
    """Await a durability future without letting a cancelled caller cancel it.
    A failure is raised afresh for each waiter: one exception raised by many
    would carry every waiter's traceback."""
    try:
        await asyncio.shield(future)
    except Unavailable as exc:
        raise Unavailable(exc.message) from None


@dataclass
class _Durable:
    """What the database holds of the live state (not the history)."""

    revision: Revision
    next_lease: LeaseID
    oldest: Revision
    leases: list[tuple[LeaseID, int, str]]
    services: list[Service]


class Damaged(Exception):
    """The database holds something we did not write."""


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise Damaged(what)


def _cause(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _consume(future: asyncio.Future[None]) -> None:
    """Mark a shared future's exception as seen: its waiters may all be gone."""
    if not future.cancelled():
        future.exception()


def _add_checksums(db: sqlite3.Connection) -> None:
    """Upgrade a store from before row checksums (or a new one): add the
    column where missing and fill it in, in one transaction."""
    db.execute("BEGIN")
    try:
        for table, columns in COLUMNS.items():
            if "crc" not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                db.execute(f"ALTER TABLE {table} ADD COLUMN crc INTEGER")
            rows = db.execute(f"SELECT rowid, {columns} FROM {table}").fetchall()
            db.executemany(
                f"UPDATE {table} SET crc = ? WHERE rowid = ?",
                [(row_crc(*row[1:]), row[0]) for row in rows],
            )
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


class SQLiteStore(Store):
    """The state, applied at once and made durable by group commit."""

    def __init__(self, path: Path, *, limits: Limits | None = None) -> None:
        super().__init__(limits=limits)
        self.path = path
        self.next_lease: LeaseID = 1
        self._deadlines: list[tuple[float, LeaseID]] = []
        self._batch: _Batch | None = None
        self._inflight: _Batch | None = None
        self._loop = asyncio.get_running_loop()
        self._db: sqlite3.Connection | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="geryon-store")
        self._recovery: asyncio.Task[None] | None = None
        # Why the last commit failed; writes are refused until one succeeds.
        self._failed: str | None = None
        # Memory holds writes that never became durable: reads are refused
        # until it is put back to what the database holds.
        self._stale = False
        self._lock: IO[str] | None = None
        # The event loop's own connection, for reading back stored history
        # (and entries, while the state loads).
        self._reader: sqlite3.Connection | None = None
        # The state loading into memory in the writer thread (None: loaded).
        self._loading: asyncio.Future[None] | None = None

    def describe(self) -> str:
        return f"data {self.path.parent}"

    # ---- opening and closing ------------------------------------------------

    @classmethod
    async def open(
        cls, data_dir: Path, *, limits: Limits | None = None, wait: bool = True
    ) -> SQLiteStore:
        """Open the store. With ``wait`` False, return once the database is
        open and checked, and load the state in the writer thread meanwhile:
        ``lookup`` and ``search`` answer from the database until it is in memory, and
        ``ready`` waits for it (and raises what the load found wrong)."""
        store = cls(data_dir / "registry.db", limits=limits)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(store._writer, store._open)
        except BaseException:
            store._abandon()
            raise
        store._loading = loop.run_in_executor(store._writer, store._load)
        store._loading.add_done_callback(_consume)
        if wait:
            await store.ready()
        return store

    async def ready(self) -> None:
        if self._loading is None:
            return
        try:
            await asyncio.shield(self._loading)
        except BaseException:
            self._abandon()
            raise
        self._loading = None

    def _abandon(self) -> None:
        """The store could not open: release what it held."""
        self._writer.shutdown(wait=False)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    async def lookup(self, name: str) -> tuple[Service, Revision]:
        if self._loading is None:
            return await super().lookup(name)
        validate_name(name, new=False)
        found = self._select("name = ?", [name])
        if not found:
            raise NotFound(f"no service {name!r}")
        return found[0], self.revision

    async def search(self, flt: Filter) -> tuple[list[Service], Revision]:
        if self._loading is None:
            return await super().search(flt)
        where, params = [], []
        if flt.prefix:
            where.append("substr(name, 1, ?) = ?")
            params += [len(flt.prefix), flt.prefix]
        for attr, want in flt.attrs.items():
            path = f'$."{attr}"'  # attribute names hold no quotes ([A-Za-z0-9._-])
            if want == WILDCARD:
                where.append("json_type(attrs, ?) IS NOT NULL")
                params.append(path)
            else:
                where.append("json_extract(attrs, ?) = ?")
                params += [path, want]
        found = self._select(" AND ".join(where) or "1", params)
        return [s for s in found if flt.matches(s)], self.revision

    def _select(self, where: str, params: list[object]) -> list[Service]:
        """While the state loads: the entries the database holds that pass
        ``where``, sorted by name (UTF-8's byte order is the code points'),
        each checked. Nothing is written before the load ends, so the
        database is the state at ``revision``."""
        if self._reader is None:
            self._reader = sqlite3.connect(self.path, isolation_level=None)
        out = []
        for *row, crc in self._reader.execute(
            "SELECT name, attrs, lease, owner, create_revision, mod_revision, crc "
            f"FROM services WHERE {where} ORDER BY name",
            params,
        ):
            try:
                _check(row_crc(*row) == crc, "checksum does not match")
                out.append(_service(row[0], orjson.loads(row[1]), *row[2:]))
            except (Damaged, ValueError, TypeError):  # the load says so, in one line, and exits
                raise Unavailable("registryd: starting: the store is damaged") from None
        return out

    def _open(self) -> None:
        """Lock the store, open its database, check its pages and schema,
        and find the revision it is at."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Two registries on one store would hand out the same revisions.
        lock = self.path.parent / "LOCK"
        try:
            self._lock = open(lock, "a")
        except OSError:  # a store we cannot write: the write check below says so
            try:
                self._lock = open(lock)
            except OSError as exc:
                raise FailedPrecondition(f"{lock}: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FailedPrecondition(f"{self.path.parent} is in use by another registry") from None
        for where in (self.path, self.path.parent):
            # SQLite would say only "unable to open database file".
            if where.exists() and not os.access(where, os.W_OK):
                raise FailedPrecondition(f"{self.path}: {where} is read-only to this registry")
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        with self._refusing_damage():
            self._open_db(self._db)
            # The revision never goes back: not below a change the store holds.
            db = self._db
            meta = dict(db.execute("SELECT key, value FROM meta"))
            (newest,) = db.execute("SELECT max(mod_revision) FROM services").fetchone()
            (last_event,) = db.execute("SELECT max(revision) FROM events").fetchone()
            self.revision = self.durable_revision = max(
                meta.get("revision", 0), newest or 0, last_event or 0
            )

    def _load(self) -> None:
        """Read every row, checked, into memory; then commit once."""
        assert self._db is not None
        with self._refusing_damage():
            self._apply(self._read_durable(self._db))
            self._load_history(self._db)
            # Refuse now, not at the first write, a store we cannot write.
            self._write([], self.revision)

    @contextlib.contextmanager
    def _refusing_damage(self) -> Iterator[None]:
        """Close the database on any failure; name damage and SQLite's
        refusals in one line."""
        assert self._db is not None
        try:
            yield
        except BaseException as exc:
            self._db.close()
            self._db = None
            if isinstance(exc, Damaged):
                raise FailedPrecondition(
                    f"{self.path} is damaged ({exc}): restore it from a backup or move it aside"
                ) from None
            if isinstance(exc, sqlite3.DatabaseError):  # not ours, or unwritable: touch nothing
                raise FailedPrecondition(f"{self.path}: {_cause(exc)}") from None
            raise

    def _open_db(self, db: sqlite3.Connection) -> None:
        report = [r[0] for r in db.execute("PRAGMA quick_check(100)")]
        if report != ["ok"]:
            # One line: the first problem found, and how many more.
            found = [p for r in report for p in r.splitlines() if not p.startswith("***")]
            more = f" and {len(found) - 1} more problems" if len(found) > 1 else ""
            raise Damaged(f"quick_check: {found[0] if found else report[0]}{more}")
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so an acknowledged write
        # survives power loss, not only a process crash.
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
        (version,) = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() or (1,)
        if version < SCHEMA_VERSION:
            _add_checksums(db)
        elif version > SCHEMA_VERSION:
            raise FailedPrecondition(
                f"{self.path}: written by a newer registry (schema {version}; "
                f"this one reads up to {SCHEMA_VERSION})"
            )

    def _read_durable(self, db: sqlite3.Connection) -> _Durable:
        """The live state as the database holds it, every row checked."""
        meta = dict(db.execute("SELECT key, value FROM meta"))
        leases = []
        for *row, crc in db.execute("SELECT id, ttl_ms, owner, crc FROM leases"):
            _check(row_crc(*row) == crc, f"lease {row[0]}: checksum does not match")
            leases.append(tuple(row))
        services, newest = [], 0
        leases_seen: dict[int, int] = {}  # one int object per lease, not per entry
        for *row, crc in db.execute(
            "SELECT name, attrs, lease, owner, create_revision, mod_revision, crc FROM services"
        ):
            name, attrs, lease, owner, create, mod = row
            if _service_crc(name, attrs, lease, owner, create, mod) != crc:
                raise Damaged(f"service {name!r}: checksum does not match")
            try:
                if type(name) is not str or not type(lease) is type(create) is type(mod) is int:
                    raise ValueError("a column is not of its type")
                attrs = orjson.loads(attrs)
                if type(attrs) is not dict:
                    raise ValueError("attributes are not a map of strings")
                # One object per distinct name and value, however many entries
                # share it; sys.intern refuses anything but text.
                attrs = {intern(k): intern(v) for k, v in attrs.items()}
                s = _loaded_service(
                    name,
                    attrs,
                    leases_seen.setdefault(lease, lease),
                    intern(owner),
                    mod if create == mod else create,
                    mod,
                )
            except (ValueError, TypeError) as exc:  # TypeError: a non-text attribute
                # (orjson.JSONDecodeError is a ValueError)
                raise Damaged(f"service {name!r}: {_cause(exc)}") from None
            services.append(s)
            newest = max(newest, mod)
        (last_event,) = db.execute("SELECT max(revision) FROM events").fetchone()
        revision = meta.get("revision", 0)
        # The revision never goes back: not below a change the store holds,
        # whatever the meta row says.
        held = max(newest, last_event or 0)
        if held > revision:
            log.warning(
                "store: %s says revision %d but holds %d: starting there", self.path, revision, held
            )
        next_lease = max(
            meta.get("next_lease", 1), max((lid for lid, _, _ in leases), default=0) + 1
        )
        return _Durable(max(revision, held), next_lease, meta.get("oldest", 1), leases, services)

    def _apply(self, durable: _Durable) -> None:
        """Make memory what the database holds. Leases still here keep their
        deadlines and holders; the others (at start: all) get a fresh TTL."""
        now = time.monotonic()
        old = self.leases
        self.leases = {}
        for lid, ttl_ms, owner in durable.leases:
            prev = old.get(lid)
            lease = Lease(lid, ttl_ms, owner, now + ttl_ms / 1000)
            if prev is not None:
                lease.deadline, lease.holder = prev.deadline, prev.holder
            self.leases[lid] = lease
        self.load_services(durable.services)
        self.link_leases()
        self._rebuild_deadlines()
        self.revision = self.durable_revision = durable.revision
        self.next_lease = durable.next_lease
        self.oldest_revision = max(self.oldest_revision, durable.oldest)

    def _load_history(self, db: sqlite3.Connection) -> None:
        """The history window as each revision's event count, size and time,
        its events left in the database (``Stored``): decoding them all
        would make every start pay for what only a watch resuming from
        before it needs. SQLite sums them; the rows' checksums are checked
        by ``scrub`` once the registry serves, and by ``resolve`` as it
        reads them back."""
        held = db.execute(
            "SELECT revision, count(*), sum(length(service) + coalesce(length(prev), 0)), "
            "min(ts) FROM events WHERE revision >= ? GROUP BY revision ORDER BY revision",
            (self.oldest_revision,),
        ).fetchall()
        of = Stored.of
        self.history.extend((rev, of(count), ts) for rev, count, _, ts in held)
        self.history_sizes.extend(size for _, _, size, _ in held)
        self.history_events += sum(count for _, count, _, _ in held)
        self.history_bytes += sum(size for _, _, size, _ in held)

    async def scrub(self) -> None:
        """Check every held event row's checksum. A damaged one is logged,
        and the history up to it dropped, as if compacted: a watch resuming
        from there re-lists instead of being told a change that was not
        stored."""
        # A thread and connection of its own: the writer's would hold up
        # every commit behind a pass over the whole window.
        damaged = await asyncio.to_thread(self._scrub, self.oldest_revision)
        if damaged is not None:
            self._history_damaged(*damaged)

    def _history_damaged(self, revision: Revision, why: str) -> OutOfRange:
        """Drop the history up to a damaged revision; the error for a watch
        that was reading it."""
        if revision >= self.oldest_revision:
            log.error(
                "store: %s: the history is damaged (%s): dropped up to revision %d; "
                "watches resuming from before it re-list",
                self.path,
                why,
                revision,
            )
            self.forget_before(revision + 1)
        return OutOfRange(
            f"revision {revision}: the history is damaged; oldest held is {self.oldest_revision}",
            resume_revision=self.oldest_revision,
        )

    def _scrub(self, oldest: Revision) -> tuple[Revision, str] | None:
        """The newest revision from ``oldest`` on with a damaged event row, and why."""
        damaged = None
        with contextlib.closing(sqlite3.connect(self.path, isolation_level=None)) as db:
            for rev, idx, typ, svc, prev, ts, crc in db.execute(
                "SELECT revision, idx, type, service, prev, ts, crc FROM events "
                "WHERE revision >= ?",
                (oldest,),
            ):
                if _event_crc(rev, idx, typ, svc, prev, ts) != crc and (
                    damaged is None or rev > damaged[0]
                ):
                    damaged = (rev, f"event {rev}.{idx}: checksum does not match")
        return damaged

    def resolve(
        self, held: list[tuple[Revision, tuple[Event, ...] | Stored]]
    ) -> list[tuple[Revision, tuple[Event, ...]]]:
        """Read back the events the history holds as ``Stored`` (from before
        this start), on the event loop's own connection: a watch resuming
        from before the start waits for them as it would for their replay."""
        stored = [rev for rev, events in held if isinstance(events, Stored)]
        if not stored:
            return held  # type: ignore[return-value]
        if self._reader is None:
            self._reader = sqlite3.connect(self.path, isolation_level=None)
        found: dict[Revision, list[Event]] = {}
        try:
            for *row, crc in self._reader.execute(
                "SELECT revision, idx, type, service, prev, ts, crc FROM events "
                "WHERE revision BETWEEN ? AND ? ORDER BY revision, idx",
                (stored[0], stored[-1]),
            ):
                rev, idx, typ, svc, prev, ts = row
                if _event_crc(rev, idx, typ, svc, prev, ts) != crc:
                    raise self._history_damaged(rev, f"event {rev}.{idx}: checksum does not match")
                found.setdefault(rev, []).append(
                    Event(
                        EventType(typ),
                        _service_from_json(svc),
                        _service_from_json(prev) if prev else None,
                        rev,
                    )
                )
        except (ValueError, sqlite3.Error) as exc:
            # Checked at start, so written behind our back since.
            log.error("store: %s: the history cannot be read: %s", self.path, _cause(exc))
            raise Unavailable(f"registryd: the history cannot be read: {_cause(exc)}") from None
        out = []
        for rev, events in held:
            if isinstance(events, Stored):
                got = tuple(found.get(rev, ()))
                if len(got) != events.count:
                    raise Unavailable(f"registryd: revision {rev} is missing from the history")
                events = got
            out.append((rev, events))
        return out

    async def close(self) -> None:
        """Flush what is pending and close the database."""
        with contextlib.suppress(Unavailable):  # a failed store: nothing to flush
            while self._batch is not None or self._inflight is not None:
                await self.sync()
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery
            self._recovery = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.get_running_loop().run_in_executor(self._writer, db.close)
        self._writer.shutdown(wait=True)
        if self._lock is not None:
            self._lock.close()

    # ---- durability ---------------------------------------------------------

    def _writable(self) -> None:
        """Refuse a write before it changes anything, while the store cannot write."""
        if self._failed is not None:
            raise self._refusal()

    def _refusal(self) -> Unavailable:
        # Watches are not refused (unavailable() stays None): nothing changes
        # while no write can, and they hear the writes once they resume.
        return Unavailable(f"registryd: the store cannot write: {self._failed}")

    def _enqueue(
        self, ops: list[Op], events: tuple[Event, ...] = (), revision: Revision = 0, size: int = 0
    ) -> asyncio.Future[None]:
        if self._batch is None:
            self._batch = _Batch(self._loop.create_future())
            # Next turn of the loop: the writes of this one share the batch.
            self._loop.call_soon(self._flush)
        batch = self._batch
        batch.ops.extend(ops)
        if events:
            batch.revisions.append((revision, events, time.time(), size))
            batch.revision = revision
        return batch.future

    async def read(self, look: Callable[[], T]) -> tuple[T, Revision]:
        if self._stale:
            raise self._refusal()
        # Memory may hold writes not yet durable: look now, answer once they are.
        seen = look()
        return seen, await self.sync()

    async def sync(self) -> Revision:
        """Wait until everything applied so far is durable; return that revision."""
        revision = self.revision
        pending = self._batch or self._inflight
        if pending is not None:
            await wait(pending.future)
        return revision

    def _flush(self) -> None:
        """Hand the waiting batch to the writer thread, unless one is in flight
        (then it goes when that one lands, with whatever joined it meanwhile)."""
        if self._inflight is not None or self._batch is None or self._failed is not None:
            return
        batch, self._batch = self._batch, None
        self._inflight = batch
        self._compact(batch)
        self._writer.submit(
            self._write_batch, batch, batch.revision or self.durable_revision, time.perf_counter()
        )

    def _write_batch(self, batch: _Batch, revision: Revision, started: float) -> None:
        """In the writer thread: one transaction, then one wakeup of the loop
        (not an executor future chained to an asyncio one and a task)."""
        try:
            self._write(batch.ops, revision)
        except Exception as exc:  # disk full, read-only, damaged: until it heals
            self._loop.call_soon_threadsafe(self._landed, batch, started, _cause(exc))
        else:
            self._loop.call_soon_threadsafe(self._landed, batch, started, None)

    def _landed(self, batch: _Batch, started: float, failed: str | None) -> None:
        if failed is not None:
            self._fail(batch, failed)
            self._recovery = asyncio.create_task(self._recover(), name="store-recovery")
            return
        if self.commit_latency is not None:
            self.commit_latency(time.perf_counter() - started)
        self._inflight = None
        for revision, events, ts, size in batch.revisions:
            self.publish(revision, events, ts, size)
        batch.future.set_result(None)
        self._flush()

    def _fail(self, batch: _Batch, cause: str) -> None:
        """A commit failed: fail its writes and those queued behind it (which
        can never commit before it), and refuse writes and reads until
        memory is back to what is durable."""
        log.error("store: cannot write %s: %s; refusing writes until it can", self.path, cause)
        self._failed, self._stale = cause, True
        error = self._refusal()
        for failed in (batch, self._batch):
            if failed is not None:
                failed.future.set_exception(error)
                _consume(failed.future)
        self._batch = self._inflight = None
        self.set_health(f"the store cannot write: {cause}")

    async def _recover(self) -> None:
        """Put memory back to what the database holds, then try a commit every
        RETRY_S until one succeeds."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                if self._stale:
                    assert self._db is not None
                    self._apply(
                        await loop.run_in_executor(self._writer, self._read_durable, self._db)
                    )
                    self._stale = False
                    log.info("store: serving reads of what is durable, revision %d", self.revision)
                await loop.run_in_executor(self._writer, self._probe)
            except Exception as exc:
                log.debug("store: still cannot write: %s", _cause(exc))
                await asyncio.sleep(RETRY_S)
                continue
            self._failed = None
            log.warning("store: writing again at revision %d", self.revision)
            self.set_health(None)
            self._flush()  # what was queued meanwhile (a lease's expiry)
            return

    def _probe(self) -> None:
        """Can a commit land again? Fold the WAL into the database and empty
        it first: a commit that only reuses room the WAL already had proves
        nothing about the disk."""
        assert self._db is not None
        busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise sqlite3.OperationalError("the WAL could not be checkpointed")
        self._write([], self.revision)

    def _write(self, ops: list[Op], revision: Revision) -> None:
        assert self._db is not None
        db = self._db
        db.execute("BEGIN")
        try:
            # A run of the same statement (a batch's rows) in one call: SQLite
            # steps through them in C, without a Python call per row.
            for sql, run in itertools.groupby(ops, key=itemgetter(0)):
                db.executemany(sql, map(itemgetter(1), run))
            db.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [
                    ("revision", revision),
                    ("next_lease", self.next_lease),
                    ("oldest", self.oldest_revision),
                ],
            )
            db.execute("COMMIT")
        except BaseException:
            # A failed COMMIT may have rolled back already ("disk full"); a
            # second error here would hide the cause.
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise

    def _compact(self, batch: _Batch) -> None:
        """Drop whole revisions from the history past its count or age bound."""
        if self.trim_history(now=time.time()):
            batch.ops.append(("DELETE FROM events WHERE revision < ?", (self.oldest_revision,)))

    # ---- writes -------------------------------------------------------------

    def _next_revision(self) -> Revision:
        self.revision += 1
        return self.revision

    def _put(self, new: Service, prev: Service | None) -> tuple[Event, Op]:
        op = ("INSERT OR REPLACE INTO services VALUES (?, ?, ?, ?, ?, ?, ?)", service_row(new))
        return self.put(new, prev), op

    def _delete(self, s: Service, revision: Revision) -> tuple[Event, Op]:
        op = ("DELETE FROM services WHERE name = ?", (s.name,))
        return self.delete(s, revision), op

    def _commit(
        self, revision: Revision, events: list[Event], ops: list[Op]
    ) -> asyncio.Future[None]:
        now, size = time.time(), 0
        for i, e in enumerate(events):
            row = event_row(revision, i, e, now)
            size += _stored_size(row)
            ops.append(("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)", row))
        return self._enqueue(ops, tuple(events), revision, size)

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
        self._writable()
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

    async def register_batch(
        self, batch: Sequence[Registration], *, caller: Caller
    ) -> Written[list[Service]]:
        batch = validate_batch(batch)
        self._writable()
        checked = self.check_batch(batch, caller)
        if all(noop for _, noop in checked):
            decided_at = await self.sync()
            return Written([prev for prev, _ in checked], decided_at)  # type: ignore[misc]
        revision = self._next_revision()
        out: list[Service] = []
        events: list[Event] = []
        ops: list[Op] = []
        for r, (prev, noop) in zip(batch, checked, strict=True):
            if noop:
                assert prev is not None
                out.append(prev)
                continue
            new = _loaded_service(
                r.name,
                r.attrs,  # type: ignore[arg-type]  # a dict: validate_batch made it one
                r.lease,
                caller.name,
                prev.create_revision if prev else revision,
                revision,
            )
            event, op = self._put(new, prev)
            out.append(new)
            events.append(event)
            ops.append(op)
        await wait(self._commit(revision, events, ops))
        return Written(out, revision)

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
        self._writable()
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
        validate_name(name, new=False)
        validate_expected(expected_mod_revision)
        self._writable()
        prev = self.owned_service(name, caller, expected_mod_revision)
        revision = self._next_revision()
        event, op = self._delete(prev, revision)
        await wait(self._commit(revision, [event], [op]))
        return Written(prev, revision)

    # ---- leases -------------------------------------------------------------

    async def grant(self, ttl_ms: int, *, caller: Caller) -> Written[Lease]:
        validate_ttl(ttl_ms)
        self._writable()
        lease = Lease(self.next_lease, ttl_ms, caller.name, time.monotonic() + ttl_ms / 1000)
        self.next_lease += 1
        self.leases[lease.id] = lease
        heapq.heappush(self._deadlines, (lease.deadline, lease.id))
        op = ("INSERT INTO leases VALUES (?, ?, ?, ?)", lease_row(lease.id, ttl_ms, caller.name))
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
        self._writable()
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
        ended: list[LeaseID] = []
        if self._failed is not None:  # ended once the store writes again
            return ended
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
        if self._failed is not None:  # nothing expires until writes resume
            return None
        return self._deadlines[0][0] if self._deadlines else None
