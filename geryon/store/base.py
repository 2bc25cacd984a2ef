"""The interface every store backend offers the servicer, the watch hub and
the lease keeper, which never know which backend runs.

A store is its in-memory ``State`` (read directly: Get, Find, Leases, the
history window) plus the way it makes changes durable. Every write is a
coroutine that returns once the change is durable and in the state, with the
revision it was decided at. ``read`` is the read barrier: it looks at the
state once that reflects every write acknowledged before it was called, by
this process or any other sharing the store. Watchers hear of a revision through
``on_commit``, in revision order, once it is durable.

As Kubernetes' ``storage.Interface`` over its watch cache: the cache is the
state, the interface is what each backend implements.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Generic, NamedTuple, TypeVar

from geryon.errors import GeryonError
from geryon.model import Caller, Event, Filter, Lease, LeaseID, Registration, Revision, Service
from geryon.store.state import Limits, State

T = TypeVar("T")

Subscriber = Callable[[Revision, tuple[Event, ...]], None]


class Written(NamedTuple, Generic[T]):
    """A write's result and the revision it was decided at (for a write
    that changed nothing, the revision it was checked against)."""

    value: T
    revision: Revision


class Store(State, abc.ABC):
    """The registry's state and where it is kept."""

    def __init__(self, *, limits: Limits | None = None) -> None:
        super().__init__(limits=limits)
        self.on_commit: list[Subscriber] = []
        # Called with None when the store can serve, with the cause when it
        # cannot (the registry's health follows it).
        self.on_health: list[Callable[[str | None], None]] = []
        # Called when watchers here can no longer be served in order: with
        # OutOfRange (the history they follow is gone: they must re-list) or
        # Unavailable (the store is out of reach: they should go elsewhere).
        self.on_lost: list[Callable[[GeryonError], None]] = []
        self.commit_latency: Callable[[float], None] | None = None

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the state is kept, for the daemon's ready line."""

    # ---- writes -------------------------------------------------------------

    @abc.abstractmethod
    async def register(
        self,
        name: str,
        attrs: Mapping[str, str],
        *,
        lease: LeaseID,
        persist: bool,
        caller: Caller,
        create_only: bool = False,
    ) -> Written[Service]: ...

    @abc.abstractmethod
    async def register_batch(
        self, batch: Sequence[Registration], *, caller: Caller
    ) -> Written[list[Service]]:
        """Register every entry of ``batch`` in one revision, or none (each
        as ``register`` would, in order); the services as stored."""

    @abc.abstractmethod
    async def update(
        self,
        name: str,
        set_attrs: Mapping[str, str],
        remove_attrs: Iterable[str],
        *,
        expected_mod_revision: Revision,
        caller: Caller,
    ) -> Written[Service]: ...

    @abc.abstractmethod
    async def unregister(
        self, name: str, *, expected_mod_revision: Revision, caller: Caller
    ) -> Written[Service]: ...

    # ---- leases -------------------------------------------------------------

    @abc.abstractmethod
    async def grant(self, ttl_ms: int, *, caller: Caller) -> Written[Lease]:
        """A new lease; its ``ttl_ms`` is what the store granted, which may
        be more than was asked for."""

    @abc.abstractmethod
    async def revoke(self, lease_id: LeaseID, *, caller: Caller) -> Written[int]:
        """End a lease, deleting its services in one revision; how many."""

    @abc.abstractmethod
    async def keepalive(self, lease_id: LeaseID, *, caller: Caller, holder: str) -> int:
        """Renew a lease and make ``holder`` (a KeepAlive stream's token) the
        one whose end ends it; return its TTL in ms, 0 when it is gone."""

    @abc.abstractmethod
    async def release(self, lease_id: LeaseID, *, holder: str) -> int | None:
        """``holder``'s stream ended from the client's side: end the lease if
        that stream still holds it. Return how many services went (None: it
        was not ended here)."""

    @abc.abstractmethod
    async def remaining_ms(self, leases: list[Lease]) -> list[int]:
        """Each lease's time left before it ends unless renewed."""

    # Lease expiry for backends that keep lease deadlines themselves (the
    # lease keeper drives these); a backend whose leases end by themselves
    # (etcd's) keeps the defaults and says so here.
    expires_leases = True

    def next_deadline(self) -> float | None:
        return None

    def expire(self, now: float | None = None) -> list[LeaseID]:
        return []

    def refresh_all_leases(self) -> None:
        return None

    # ---- reads --------------------------------------------------------------

    @abc.abstractmethod
    async def read(self, look: Callable[[], T]) -> tuple[T, Revision]:
        """Answer a read: ``look`` at the state once it reflects every write
        acknowledged (by anyone) before this call, and the revision to report
        with what it saw; the answer is sent only once all of it is durable."""

    async def lookup(self, name: str) -> tuple[Service, Revision]:
        """Get: one service by name, and the revision it was read at. A
        store may answer this before the rest of its state is loaded."""
        return await self.read(lambda: self.get(name))

    async def search(self, flt: Filter) -> tuple[list[Service], Revision]:
        """Find: the services matching ``flt``, sorted by name, and the
        revision they were read at. Answered, like ``lookup``, before the
        rest of the state is loaded where the store can."""
        return await self.read(lambda: self.find(flt))

    # ---- life ---------------------------------------------------------------

    async def ready(self) -> None:
        """Wait until the whole state is in memory; raise what kept it out."""
        return None

    async def scrub(self) -> None:
        """Check what the start left unchecked (the SQLite store's history
        rows), once the registry serves; log and drop what is damaged."""
        return None

    @abc.abstractmethod
    async def close(self) -> None: ...

    def publish(
        self, revision: Revision, events: tuple[Event, ...], ts: float, size: int | None = None
    ) -> None:
        """A durable revision (``ts``: its wall time; ``size``: what its
        events take stored, None to estimate): into the history window, then
        to every subscriber."""
        self.durable_revision = revision
        if events:
            self.record(revision, events, ts, size)
            for notify in self.on_commit:
                notify(revision, events)

    def unavailable(self) -> str | None:
        """Why the store cannot serve now (None: it can). A watch started
        now would hear nothing until it can."""
        return None

    def set_health(self, cause: str | None) -> None:
        for notify in self.on_health:
            notify(cause)

    def lost(self, error: GeryonError) -> None:
        for notify in self.on_lost:
            notify(error)
