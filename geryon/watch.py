"""The watch hub: fans durable changes out to watchers, each through a filter.

A watcher sees the registry through its filter: a change that makes a service
start matching is a PUT, one that makes it stop matching is a DELETE, so
replaying a watcher's events always rebuilds Find's answer. Each watcher has a
bounded backlog; one that falls past it is cut off with the revision to resume
from, so a slow reader never grows the registry's memory or slows the others.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

from geryon.errors import GeryonError, ResourceExhausted
from geryon.model import Event, EventType, Filter, Revision

DEFAULT_BACKLOG = 10_000  # events queued per watcher before it is cut off


def translate(flt: Filter, events: Iterable[Event]) -> list[Event]:
    """The events of one revision as a watcher with ``flt`` must see them."""
    out = []
    for e in events:
        was = flt.matches(e.prev)
        if e.type is EventType.DELETE:
            if was:
                out.append(e)
        elif flt.matches(e.service):
            out.append(e)
        elif was:
            out.append(Event(EventType.DELETE, e.service, e.prev, e.revision))
    return out


class Watcher:
    """One watch stream's queue. ``seen`` is the newest revision offered to
    it; once its backlog is empty, every matching event up to ``seen`` has been
    handed to the stream."""

    def __init__(self, flt: Filter, *, after: Revision, backlog: int, owner: str = "") -> None:
        self.filter = flt
        self.owner = owner
        self.seen = after
        self.delivered = after  # newest revision whose events the stream took
        self.backlog_limit = backlog
        self.pending: deque[tuple[Revision, list[Event]]] = deque()
        self.pending_events = 0
        self.error: GeryonError | None = None
        self.wakeup = asyncio.Event()

    def offer(self, revision: Revision, events: Iterable[Event], *, replay: bool = False) -> None:
        """Queue a revision's events. History replayed at the start of a watch
        (``replay``) is not held against the backlog bound: it already sits in
        the store's history, and the bound is about live growth."""
        if self.error is not None or revision <= self.seen:
            return
        self.seen = revision
        matched = translate(self.filter, events)
        if not matched:
            return
        if not replay and self.pending_events + len(matched) > self.backlog_limit:
            self.fail(
                ResourceExhausted(
                    f"watch: fell {self.pending_events} events behind; "
                    f"resume from revision {self.delivered + 1}",
                    resume_revision=self.delivered + 1,
                )
            )
            return
        self.pending.append((revision, matched))
        self.pending_events += len(matched)
        self.wakeup.set()

    def fail(self, error: GeryonError) -> None:
        """End the stream with ``error`` (shutdown, overflow, a denied caller)."""
        if self.error is None:
            self.error = error
            self.pending.clear()
            self.pending_events = 0
        self.wakeup.set()

    def take(self, max_events: int) -> list[Event]:
        """Pop whole revisions, at least one, up to about ``max_events``."""
        out: list[Event] = []
        while self.pending and (not out or len(out) + len(self.pending[0][1]) <= max_events):
            revision, events = self.pending.popleft()
            self.pending_events -= len(events)
            out.extend(events)
            self.delivered = revision
        if not self.pending:
            self.delivered = max(self.delivered, self.seen)
            self.wakeup.clear()
        return out


class Hub:
    """Every open watcher; the store calls ``publish`` for each durable revision."""

    def __init__(self, *, backlog: int = DEFAULT_BACKLOG) -> None:
        self.backlog = backlog
        self.watchers: set[Watcher] = set()

    def subscribe(self, flt: Filter, *, after: Revision, owner: str = "") -> Watcher:
        w = Watcher(flt, after=after, backlog=self.backlog, owner=owner)
        self.watchers.add(w)
        return w

    def unsubscribe(self, w: Watcher) -> None:
        self.watchers.discard(w)

    def publish(self, revision: Revision, events: tuple[Event, ...]) -> None:
        for w in self.watchers:
            w.offer(revision, events)

    def count(self, owner: str) -> int:
        return sum(1 for w in self.watchers if w.owner == owner)

    def close_all(self, error: GeryonError) -> None:
        for w in list(self.watchers):
            w.fail(error)
