"""What every store keeps in memory, whichever backend makes it durable.

The services with their attribute index, the leases with the names under
each, the revision, and the window of history that watches resume from. Reads
(Get, Find, Leases, history) are answered from here. The rules that decide
whether a write is allowed (ownership, leases, fences, limits) live here too,
as checks that raise domain errors and change nothing, so that both backends
refuse the same requests with the same words.

Nothing here does I/O: the SQLite backend changes this state as it decides a
write, the etcd backend as etcd's watch tells it what was committed.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sortedcontainers import SortedList

from geryon.errors import (
    AlreadyExists,
    FailedPrecondition,
    GeryonError,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
)
from geryon.model import (
    MAX_BATCH,
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
    validate_attr_name,
    validate_attrs,
    validate_name,
)


@dataclass
class Limits:
    """Bounds that keep one client from filling the registry."""

    services_per_lease: int = 10_000
    history_events: int = 100_000
    history_age_s: float = 3600.0
    # The history's size, counted as its events take stored (``events_size``):
    # a count alone lets maximum-size entries (64 attributes of 1 KiB) fill
    # gigabytes within it.
    history_bytes: int = 64 << 20


class Stored:
    """A durable revision's events that the backend keeps and memory does
    not (a restarted SQLite store's history): ``State.resolve`` reads them
    back when a watch resumes from them. Only their count is held."""

    __slots__ = ("count",)
    _shared: dict[int, Stored] = {}

    def __init__(self, count: int) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"Stored({self.count})"

    @classmethod
    def of(cls, count: int) -> Stored:
        """One instance per count: a window holds 100,000 of them."""
        got = cls._shared.get(count)
        if got is None:
            got = cls._shared[count] = cls(count)
        return got


def _entry_size(s: Service) -> int:
    return 64 + len(s.name) + len(s.owner) + sum(len(k) + len(v) + 6 for k, v in s.attrs.items())


def events_size(events: Iterable[Event]) -> int:
    """About what events take stored (their entries as JSON), in bytes."""
    return sum(_entry_size(e.service) + (_entry_size(e.prev) if e.prev else 0) for e in events)


# How many refused entries a batch's error names before it only counts them.
BATCH_NAMED = 10


# Refusals that depend on what the state holds (not on the request alone): a
# backend whose state may lag the truth confirms them on fresh state first.
STATE_ERRORS = (AlreadyExists, FailedPrecondition, NotFound, PermissionDenied, ResourceExhausted)


class State:
    """Services, their index, leases, the revision and the history window."""

    def __init__(self, *, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.services: dict[str, Service] = {}
        self.names: SortedList = SortedList()
        # attr -> value -> names. Those having an attribute at all (for "*")
        # are the union of its values' sets, not a set of their own: that
        # would cost as much again, a sixth of what an entry takes.
        self.index: dict[str, dict[str, set[str]]] = {}
        self.leases: dict[LeaseID, Lease] = {}
        # ``revision``: every change up to it is in this state (the SQLite
        # backend applies before it is durable); ``durable_revision``: every
        # change up to it is durable and was handed to watchers.
        self.revision: Revision = 0
        self.durable_revision: Revision = 0
        # (revision, events, wall time) for every durable revision still held,
        # and beside it each one's size (``events_size``).
        self.history: deque[tuple[Revision, tuple[Event, ...] | Stored, float]] = deque()
        self.history_sizes: deque[int] = deque()
        self.oldest_revision: Revision = 1
        self.history_events = 0  # events held in self.history
        self.history_bytes = 0  # their sizes

    # ---- the index ----------------------------------------------------------

    def index_add(self, s: Service) -> None:
        if s.name not in self.services:
            self.names.add(s.name)
        self.services[s.name] = s
        self._index_attrs(s)

    def load_services(self, services: list[Service]) -> None:
        """Replace every service and the index by ``services`` (a store's
        load: index_add for each, in bulk)."""
        self.services = {s.name: s for s in services}
        self.names = SortedList(self.services)
        self.index = {}
        for s in services:
            self._index_attrs(s)

    def _index_attrs(self, s: Service) -> None:
        index, name = self.index, s.name
        # get, not setdefault: no empty dict and set built per attribute.
        for attr, value in s.attrs.items():
            by_value = index.get(attr)
            if by_value is None:
                by_value = index[attr] = {}
            names = by_value.get(value)
            if names is None:
                by_value[value] = {name}
            else:
                names.add(name)

    def index_remove(self, s: Service) -> None:
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

    # ---- applying changes ---------------------------------------------------

    def put(self, new: Service, prev: Service | None) -> Event:
        """Replace ``prev`` (None: create) by ``new``; return the PUT event."""
        if prev is not None:
            self.index_remove(prev)
            if prev.lease and prev.lease in self.leases:
                self.leases[prev.lease].services.discard(prev.name)
        self.index_add(new)
        if new.lease and new.lease in self.leases:
            self.leases[new.lease].services.add(new.name)
        return Event(EventType.PUT, new, prev, new.mod_revision)

    def delete(self, s: Service, revision: Revision) -> Event:
        self.index_remove(s)
        if s.lease and s.lease in self.leases:
            self.leases[s.lease].services.discard(s.name)
        return Event(EventType.DELETE, s, s, revision)

    def link_leases(self) -> None:
        """After loading services and leases in any order: each lease's names."""
        for s in self.services.values():
            if s.lease and s.lease in self.leases:
                self.leases[s.lease].services.add(s.name)

    # ---- reads --------------------------------------------------------------

    def get(self, name: str) -> Service:
        validate_name(name, new=False)
        try:
            return self.services[name]
        except KeyError:
            raise NotFound(f"no service {name!r}") from None

    def find(self, flt: Filter) -> list[Service]:
        """Every service matching ``flt``, sorted by name."""
        # Walk the smallest candidate set any term offers, so a Find costs
        # about what its answer costs, not a scan of every entry.
        candidates: Iterable[str] | None = None
        size = 0
        for attr, want in flt.attrs.items():
            if want == WILDCARD:
                values = self.index.get(attr, {}).values()
                names: Iterable[str] = itertools.chain.from_iterable(values)
                n = sum(map(len, values))
            else:
                names = self.index.get(attr, {}).get(want) or ()
                n = len(names)  # type: ignore[arg-type]
            if not n:
                return []
            if candidates is None or n < size:
                candidates, size = names, n
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

    def lease_list(self, caller: Caller) -> list[Lease]:
        """The leases ``caller`` may see: an admin every one, others their own."""
        return [
            self.leases[i]
            for i in sorted(self.leases)
            if caller.admin or self.leases[i].owner == caller.name
        ]

    # ---- what a write may do (checks only: nothing changes) ------------------

    def owned_lease(self, lease_id: LeaseID, caller: Caller) -> Lease:
        """``caller``'s lease. Someone else's is not found, as one that never
        existed: whether a lease exists, and whose, is its owner's business."""
        lease = self.leases.get(lease_id)
        if lease is None or lease.owner != caller.name:
            raise NotFound(f"lease {lease_id} not found or expired")
        return lease

    def owned_service(self, name: str, caller: Caller, expected: Revision) -> Service:
        s = self.get(name)
        if s.owner != caller.name and not caller.admin:
            raise PermissionDenied(f"{name} belongs to {s.owner}, not {caller.name}")
        if expected and s.mod_revision != expected:
            raise FailedPrecondition(
                f"{name} changed: mod_revision is {s.mod_revision}, expected {expected}"
            )
        return s

    def check_register(
        self,
        name: str,
        attrs: Mapping[str, str],
        *,
        lease: LeaseID,
        caller: Caller,
        create_only: bool,
        adding: int = 0,
    ) -> tuple[Service | None, bool]:
        """May ``caller`` register ``name``? Return the entry it replaces (None
        when new) and whether the request changes nothing. ``attrs`` and the
        lease/persist choice were validated by ``validate_register``;
        ``adding``: names the same batch adds to the lease before this one."""
        if lease:
            held = self.owned_lease(lease, caller)
            count = len(held.services) + adding
            if count >= self.limits.services_per_lease and name not in held.services:
                raise ResourceExhausted(f"lease {lease} holds {count} services, the limit")
        prev = self.services.get(name)
        if prev is not None and prev.owner != caller.name:
            raise AlreadyExists(f"{name} is registered by {prev.owner}")
        if prev is not None and create_only:
            raise FailedPrecondition(
                f"{name}: create_only, but it exists (created at revision {prev.create_revision})"
            )
        noop = prev is not None and prev.attrs == attrs and prev.lease == lease
        return prev, noop

    def check_batch(
        self, batch: Sequence[Registration], caller: Caller
    ) -> list[tuple[Service | None, bool]]:
        """``check_register`` for every entry of a validated batch, as if
        each before it were applied; refuse the whole batch, naming every
        refused entry, when any is refused."""
        out: list[tuple[Service | None, bool]] = []
        refused: list[tuple[int, GeryonError]] = []
        adding: Counter[LeaseID] = Counter()
        for i, r in enumerate(batch):
            try:
                prev, noop = self.check_register(
                    r.name,
                    r.attrs,
                    lease=r.lease,
                    caller=caller,
                    create_only=r.create_only,
                    adding=adding[r.lease],
                )
            except GeryonError as exc:
                refused.append((i, exc))
                continue
            if r.lease and r.name not in self.leases[r.lease].services:
                adding[r.lease] += 1
            out.append((prev, noop))
        if refused:
            raise batch_refused(batch, refused)
        return out

    def check_update(
        self,
        name: str,
        set_attrs: Mapping[str, str],
        remove: set[str],
        *,
        expected_mod_revision: Revision,
        caller: Caller,
    ) -> tuple[Service, dict[str, str]]:
        """May ``caller`` update ``name``? Return it and its attributes after."""
        prev = self.owned_service(name, caller, expected_mod_revision)
        attrs = {k: v for k, v in prev.attrs.items() if k not in remove}
        attrs.update(set_attrs)
        validate_attrs(attrs)
        return prev, attrs

    def check_revoke(self, lease_id: LeaseID, caller: Caller | None) -> Lease:
        """The lease ``caller`` may end (None: the registry itself)."""
        if caller is None:
            lease = self.leases.get(lease_id)
            if lease is None:
                raise NotFound(f"lease {lease_id} not found or expired")
            return lease
        if caller.admin and lease_id in self.leases:
            return self.leases[lease_id]
        return self.owned_lease(lease_id, caller)

    def check_keepalive(self, lease_id: LeaseID, caller: Caller) -> Lease | None:
        """The lease to renew, or None when it is gone (or someone else's)."""
        lease = self.leases.get(lease_id)
        return lease if lease is not None and lease.owner == caller.name else None

    # ---- history ------------------------------------------------------------

    def record(
        self,
        revision: Revision,
        events: tuple[Event, ...] | Stored,
        ts: float,
        size: int | None = None,
    ) -> None:
        """Hold a durable revision's events in the history window; ``size``
        is what they take stored (None: ``events_size``)."""
        if size is None:
            assert isinstance(events, tuple)
            size = events_size(events)
        self.history.append((revision, events, ts))
        self.history_sizes.append(size)
        self.history_events += len(events)
        self.history_bytes += size

    def prepend_history(self, held: list[tuple[Revision, tuple[Event, ...]]], ts: float) -> None:
        """Put older revisions before those held (the etcd store's replay)."""
        self.history.extendleft((rev, events, ts) for rev, events in reversed(held))
        sizes = [events_size(events) for _, events in held]
        self.history_sizes.extendleft(reversed(sizes))
        self.history_events += sum(len(events) for _, events in held)
        self.history_bytes += sum(sizes)

    def clear_history(self) -> None:
        self.history.clear()
        self.history_sizes.clear()
        self.history_events = self.history_bytes = 0

    def history_bound(self, *, now: float) -> Revision:
        """The oldest revision the window's count, size and age bounds keep
        (one past the newest held when they keep none of it)."""
        limit, oldest_ts = self.limits.history_events, now - self.limits.history_age_s
        byte_limit = self.limits.history_bytes
        events, size = self.history_events, self.history_bytes
        bound = self.oldest_revision
        for (rev, held, ts), held_size in zip(self.history, self.history_sizes, strict=True):
            if events <= limit and size <= byte_limit and ts >= oldest_ts:
                # Not ``rev``: revisions between hold no events (the etcd
                # store's have gaps) but can still be resumed from.
                return bound
            events -= len(held)
            size -= held_size
            bound = rev + 1
        return bound

    def trim_history(self, *, now: float) -> bool:
        """Drop whole revisions past the window's bounds; say whether
        anything was dropped (``oldest_revision`` moved)."""
        bound = self.history_bound(now=now)
        if bound <= self.oldest_revision:
            return False
        self.forget_before(bound)
        return True

    def forget_before(self, revision: Revision) -> None:
        """Drop the history below ``revision`` (trimmed here, or compacted
        by another process sharing the store)."""
        while self.history and self.history[0][0] < revision:
            _, events, _ = self.history.popleft()
            self.history_events -= len(events)
            self.history_bytes -= self.history_sizes.popleft()
        self.oldest_revision = max(self.oldest_revision, revision)

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
        return self.resolve(out)

    def resolve(
        self, held: list[tuple[Revision, tuple[Event, ...] | Stored]]
    ) -> list[tuple[Revision, tuple[Event, ...]]]:
        """``held`` with every ``Stored`` read back (a backend that makes
        them says how)."""
        return held  # type: ignore[return-value]


def validate_register(
    name: str, attrs: Mapping[str, str], *, lease: LeaseID, persist: bool
) -> dict[str, str]:
    """Check a Register request on its own; return its attributes."""
    validate_name(name)
    attrs = validate_attrs(attrs)
    if bool(lease) == persist:
        raise InvalidArgument("lease, persist: give exactly one of a lease and persist")
    if lease < 0:
        raise InvalidArgument(f"lease: bad lease id {lease}")
    return attrs


def validate_batch(batch: Sequence[Registration]) -> list[Registration]:
    """Check a RegisterBatch request on its own: each entry as Register's,
    and names distinct. Return the entries with their attributes checked."""
    if not batch:
        raise InvalidArgument("services: empty")
    if len(batch) > MAX_BATCH:
        raise InvalidArgument(f"services: {len(batch)} entries, more than {MAX_BATCH}")
    out: list[Registration] = []
    refused: list[tuple[int, GeryonError]] = []
    first: dict[str, int] = {}
    for i, r in enumerate(batch):
        try:
            attrs = validate_register(r.name, r.attrs, lease=r.lease, persist=r.persist)
            if (j := first.setdefault(r.name, i)) != i:
                raise InvalidArgument(f"name: also services[{j}]")
        except GeryonError as exc:
            refused.append((i, exc))
            continue
        out.append(Registration(r.name, attrs, r.lease, r.persist, r.create_only))
    if refused:
        raise batch_refused(batch, refused)
    return out


def batch_refused(
    batch: Sequence[Registration], refused: list[tuple[int, GeryonError]]
) -> GeryonError:
    """One error for a refused batch: the first refusal's kind, naming every
    refused entry (the first BATCH_NAMED of them) by index and name."""
    named = "; ".join(
        f"services[{i}] {batch[i].name!r}: {exc.message}" for i, exc in refused[:BATCH_NAMED]
    )
    more = f"; and {len(refused) - BATCH_NAMED} more" if len(refused) > BATCH_NAMED else ""
    counted = f"{len(refused)} of {len(batch)} entries refused, nothing registered"
    return type(refused[0][1])(f"{counted}: {named}{more}")


def validate_update(
    name: str, set_attrs: Mapping[str, str], remove_attrs: Iterable[str], expected: Revision
) -> tuple[dict[str, str], set[str]]:
    """Check an Update request on its own; return what to set and remove."""
    validate_name(name, new=False)
    set_attrs = validate_attrs(set_attrs, "set_attrs")
    remove = {validate_attr_name(a, "remove_attrs") for a in remove_attrs}
    if both := remove & set_attrs.keys():
        raise InvalidArgument(f"remove_attrs: {sorted(both)[0]!r} is also in set_attrs")
    validate_expected(expected)
    return set_attrs, remove


def validate_expected(expected: Revision) -> None:
    if expected < 0:
        raise InvalidArgument("expected_mod_revision: negative")
