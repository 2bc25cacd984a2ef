"""Fair queuing of writes between identities: a node writing one write at a
time goes on as if a flood beside it were not there, and the flooders share
what is left.

A registry's cost is its event loop's time, and most of a write's is spent
in grpc's machinery, in first-come order, before its handler runs and after
it answers. A write's place in a queue cannot be bought back there; the only
way to keep a polite identity's writes prompt is to keep the loop from
filling up with the others'. As FQ-CoDel serves sparse flows first:

- A *sparse* identity, with no write in service or waiting, is admitted at
  once, always.
- The writes of a *busy* identity (one already in service) are admitted at
  once too, unless sparse identities wrote within the last ``SPARSE_FOR_S``.
  Then they wait in their identity's queue, and a pacer hands out places to
  the waiting identities in turn, one write each, at a rate it adjusts
  every tick: up while the loop thread was busy less than ``busy_target``
  of the last tick, down by a third when more. A flooder is slowed to the
  loop's spare time, never starved (at least ``MIN_RATE`` a second), and
  refused with RESOURCE_EXHAUSTED only past ``max_waiting`` writes waiting.

With only busy identities (a benchmark, a bulk load) nothing is paced: the
registry runs flat out. Kubernetes' API priority and fairness is the model
for queues per identity; the loop's busy time stands in for its seats.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from geryon.errors import ResourceExhausted

DEFAULT_MAX_WAITING = 1000
BUSY_TARGET = 0.4  # the loop thread's busy share the pacer keeps to
TICK_S = 0.005
SPARSE_FOR_S = 0.5  # how long busy identities stay paced after a sparse write
MIN_RATE = 50.0  # writes a second the pacer always lets through
MAX_RATE = 100_000.0


@dataclass
class _Flow:
    in_service: int = 0
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)


class FairQueue:
    def __init__(
        self, *, max_waiting: int = DEFAULT_MAX_WAITING, busy_target: float = BUSY_TARGET
    ) -> None:
        self.max_waiting = max_waiting
        self.busy_target = busy_target
        self.flows: dict[str, _Flow] = {}
        # Identities with writes waiting, in the order they are served next.
        self.turns: deque[str] = deque()
        self.rate = MAX_RATE  # writes a second the pacer admits
        self._sparse_until = 0.0
        self._pacer: asyncio.Task[None] | None = None

    def pacing(self, now: float) -> bool:
        return now < self._sparse_until

    @contextlib.asynccontextmanager
    async def turn(self, who: str, what: str) -> AsyncIterator[None]:
        """Hold one place in service for ``who``'s write (``what``, for the
        refusal's words). A write refused here has spent its quota token."""
        flow = self.enter(who) or await self.wait(who, what)
        try:
            yield
        finally:
            self.done(who, flow)

    # enter, wait and done are turn() unrolled, for the registry's every
    # write: a generator-based context manager costs more than the rest.
    def enter(self, who: str) -> _Flow | None:
        """Take ``who``'s place in service at once, or None: it must wait()."""
        now = time.monotonic()
        flow = self.flows.get(who)
        if flow is None:
            flow = self.flows[who] = _Flow()
        if flow.in_service == 0 and not flow.waiting:
            if len(self.flows) > 1:  # sparse, beside others: protect it
                self._sparse_until = now + SPARSE_FOR_S
                self._start()
        elif flow.waiting or self.pacing(now):
            return None
        flow.in_service += 1
        return flow

    async def wait(self, who: str, what: str) -> _Flow:
        """Wait for ``who``'s turn (enter() said it must); its place once admitted."""
        flow = self.flows[who]
        await self._wait(who, flow, what)  # counted in service once admitted
        return flow

    def done(self, who: str, flow: _Flow) -> None:
        """Give back a place that enter() or wait() gave."""
        flow.in_service -= 1
        self._forget_if_idle(who, flow)

    def _forget_if_idle(self, who: str, flow: _Flow) -> None:
        if flow.in_service == 0 and not flow.waiting and self.flows.get(who) is flow:
            del self.flows[who]

    async def _wait(self, who: str, flow: _Flow, what: str) -> None:
        if len(flow.waiting) >= self.max_waiting:
            raise ResourceExhausted(f"{what}: {who} has {len(flow.waiting)} writes waiting")
        if not flow.waiting:
            self.turns.append(who)
        admitted = asyncio.get_running_loop().create_future()
        flow.waiting.append(admitted)
        self._start()
        try:
            await admitted
        except asyncio.CancelledError:
            if not admitted.cancelled():  # admitted the moment its caller went
                self.done(who, flow)
                raise
            # The pacer may have passed over it already (it was cancelled a
            # step before this runs).
            with contextlib.suppress(ValueError):
                flow.waiting.remove(admitted)
            if not flow.waiting:
                with contextlib.suppress(ValueError):
                    self.turns.remove(who)
            self._forget_if_idle(who, flow)
            raise

    def _admit_next(self) -> bool:
        """Admit the next identity's oldest waiting write; False when none wait."""
        while self.turns:
            who = self.turns.popleft()
            flow = self.flows[who]
            admitted = flow.waiting.popleft()
            if flow.waiting:
                self.turns.append(who)
            if admitted.done():  # its caller went while it waited
                self._forget_if_idle(who, flow)
                continue
            flow.in_service += 1
            admitted.set_result(None)
            return True
        return False

    # ---- the pacer ------------------------------------------------------------

    def _start(self) -> None:
        if self._pacer is None or self._pacer.done():
            self._pacer = asyncio.create_task(self._pace(), name="fair-pacer")

    async def _pace(self) -> None:
        """While busy identities are paced or wait: measure the loop thread's
        busy share each tick, set the rate from it, admit that many."""
        wall, cpu = time.monotonic(), time.thread_time()
        owed = 0.0
        while self.turns or self.pacing(wall):
            await asyncio.sleep(TICK_S)
            now, used = time.monotonic(), time.thread_time()
            busy = (used - cpu) / max(now - wall, 1e-6)
            elapsed = now - wall
            wall, cpu = now, used
            if not self.pacing(now):  # nobody to protect any more: let them all in
                while self._admit_next():
                    pass
                continue
            if busy > self.busy_target:
                self.rate = max(MIN_RATE, self.rate * 2 / 3)
            else:
                self.rate = min(MAX_RATE, self.rate * 1.05 + MIN_RATE)
            owed = min(owed + self.rate * elapsed, self.rate * TICK_S * 4)
            while owed >= 1 and self._admit_next():
                owed -= 1
        self.rate = MAX_RATE
