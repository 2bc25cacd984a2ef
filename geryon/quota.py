"""Per-identity write quotas: one client flooding the registry is slowed to
its rate, and refused with RESOURCE_EXHAUSTED past that, while the others
carry on.

A token bucket per caller: ``rate`` writes a second on average, bursts up to
``burst``. A write over the rate may wait for its token (the registry lets it
wait up to a second), so a client keeping many writes in flight is paced
rather than refused in a busy loop. Reads are not limited; they cost no disk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from geryon.errors import ResourceExhausted


@dataclass
class _Bucket:
    tokens: float
    stamp: float = field(default_factory=time.monotonic)


class Quota:
    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate * 2, 1.0)
        self._buckets: dict[str, _Bucket] = {}

    def take(self, who: str, what: str, *, max_wait: float = 0.0, cost: float = 1.0) -> float:
        """Spend ``cost`` of ``who``'s tokens (a batch, one per entry); return
        how long to wait before using them (tokens not yet earned may be
        borrowed up to ``max_wait`` ahead), or raise ResourceExhausted and
        spend nothing."""
        if self.rate <= 0:
            return 0.0
        # Never more than a full bucket: a batch bigger than the burst
        # would otherwise be refused however long its caller waited.
        cost = min(cost, self.burst)
        now = time.monotonic()
        b = self._buckets.get(who)
        if b is None:
            if len(self._buckets) > 100_000:  # bounded memory: forget idle callers
                self._forget_full(now)
            b = self._buckets[who] = _Bucket(self.burst, now)
        b.tokens = min(self.burst, b.tokens + (now - b.stamp) * self.rate)
        b.stamp = now
        wait = 0.0 if b.tokens >= cost else (cost - b.tokens) / self.rate
        if wait > max_wait:
            raise ResourceExhausted(f"{what}: {who} is over its quota of {self.rate:g}/s")
        b.tokens -= cost  # below zero: borrowed from the time it waits
        return wait

    def _forget_full(self, now: float) -> None:
        """Drop the buckets that have refilled: forgetting them changes
        nothing (one in debt would be given its tokens back)."""
        self._buckets = {
            who: b
            for who, b in self._buckets.items()
            if b.tokens + (now - b.stamp) * self.rate < self.burst
        }
