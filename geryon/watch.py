"""The watch hub: fans durable changes out to watchers, each through a filter.

A watcher sees the registry through its filter: a change that makes a service
start matching is a PUT, one that makes it stop matching is a DELETE, so
replaying a watcher's events always rebuilds Find's answer. Each watcher has a
bounded backlog; one that falls past it is cut off with the revision to resume
from, so a slow reader never grows the registry's memory or slows the others.

The hub wakes its watchers in rounds, so that a busy registry sends fewer,
fuller messages. A watcher woken to send comes back (``Hub.sent``) once its
message is out; revisions that reach it meanwhile are held. When every
watcher of the round is back, the loop gets as long again for the rest (the
writes, each of which needs several turns of a loop that 1,000 streams keep
full), then the next round wakes the held watchers together. A
watcher still writing after ``ROUND_MAX_S`` (its reader slow or stuck) holds
up that round only: no round waits for a watcher still writing an earlier
round's message, which is woken again once it is back. An idle
registry has no round open, so a revision goes out at once; under load each
message carries every revision committed in a round, whole and in order.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

from geryon.errors import GeryonError, ResourceExhausted
from geryon.model import Event, EventType, Filter, Revision

DEFAULT_BACKLOG = 10_000  # events queued per watcher before it is cut off
# The longest the hub waits for a round's watchers before starting the next.
ROUND_MAX_S = 0.25


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
        # Woken by its hub's rounds rather than by each live revision.
        self.paced = False
        self.writing = False  # woken by a round, not back yet

    def offer(self, revision: Revision, events: Iterable[Event], *, replay: bool = False) -> bool:
        """Queue a revision's events; True when some matched. History replayed
        at the start of a watch (``replay``) is not held against the backlog
        bound: it already sits in the store's history, and the bound is about
        live growth."""
        if self.error is not None or revision <= self.seen:
            return False
        self.seen = revision
        matched = translate(self.filter, events)
        if not matched:
            return False
        if not replay and self.pending_events + len(matched) > self.backlog_limit:
            self.fail(
                ResourceExhausted(
                    f"watch: fell {self.pending_events} events behind; "
                    f"resume from revision {self.delivered + 1}",
                    resume_revision=self.delivered + 1,
                )
            )
            return False
        self.pending.append((revision, matched))
        self.pending_events += len(matched)
        if replay or not self.paced:
            self.wakeup.set()
        return True

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


def _loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # the hub driven without a loop (tests)
        return None


class Hub:
    """Every open watcher; the store calls ``publish`` for each durable revision."""

    def __init__(self, *, backlog: int = DEFAULT_BACKLOG) -> None:
        self.backlog = backlog
        self.watchers: set[Watcher] = set()
        self.woken: set[Watcher] = set()  # this round's, not yet back
        self.held: set[Watcher] = set()  # with events, for the next round
        self._round = 0
        self._started = 0.0  # when the round began (loop time)
        self._quiet_until = 0.0  # no round begins before this
        self._timer: asyncio.TimerHandle | None = None

    def subscribe(self, flt: Filter, *, after: Revision, owner: str = "") -> Watcher:
        w = Watcher(flt, after=after, backlog=self.backlog, owner=owner)
        w.paced = True
        self.watchers.add(w)
        return w

    def unsubscribe(self, w: Watcher) -> None:
        self.watchers.discard(w)
        self.held.discard(w)
        self.back(w)

    def publish(self, revision: Revision, events: tuple[Event, ...]) -> None:
        woken, held = self.woken, self.held
        for w in self.watchers:
            if w.offer(revision, events) and w not in woken:
                held.add(w)
        self._next()

    def sent(self, w: Watcher) -> None:
        """``w``'s stream sent what it took: it waits for the next round."""
        w.wakeup.clear()
        w.writing = False
        if w.pending:
            self.held.add(w)
        else:  # a progress request had it send out of turn
            self.held.discard(w)
        self.back(w)

    def back(self, w: Watcher) -> None:
        if w in self.woken:
            self.woken.discard(w)
            if not self.woken:
                self._ended()
        self._next()

    def _ended(self) -> None:
        """The round is over: the loop gets as long again for everything
        else (the writes the next round will carry) before the next one."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = _loop()
        if loop is not None:
            now = loop.time()
            self._quiet_until = now + min(now - self._started, ROUND_MAX_S)

    def _next(self) -> None:
        """Start a round if none is open, events are held and the quiet
        after the last round is over; otherwise when it is."""
        if self.woken or not self.held or self._timer is not None:
            return
        loop = _loop()
        if loop is not None and loop.time() < self._quiet_until:
            self._timer = loop.call_at(self._quiet_until, self._quiet_over)
            return
        self.flush()

    def _quiet_over(self) -> None:
        self._timer = None
        self._next()

    def flush(self) -> None:
        """Start a round: wake every watcher with events held, but one still
        writing an earlier round's message (it is woken when it is back)."""
        ready = {w for w in self.held if w.pending and not w.writing}
        self.held = {w for w in self.held - ready if w.pending}
        for w in ready:
            w.wakeup.set()
            w.writing = True
        loop = _loop()
        if not ready or loop is None:  # without a loop (tests): no rounds
            for w in ready:
                w.writing = False
            return
        self.woken = ready
        self._round += 1
        self._started = loop.time()
        self._timer = loop.call_later(ROUND_MAX_S, self._overdue, self._round)

    def _overdue(self, round_: int) -> None:
        # Watchers still writing this round's message (their reader is slow
        # or stuck) are not waited for: the others go on, and they join a
        # round again once they are back.
        self._timer = None
        if round_ == self._round and self.woken:
            self.woken = set()
            self._ended()
            self._next()

    def count(self, owner: str) -> int:
        return sum(1 for w in self.watchers if w.owner == owner)

    def close_all(self, error: GeryonError) -> None:
        for w in list(self.watchers):
            w.fail(error)
