"""Per-identity write quotas: one client flooding the registry gets
RESOURCE_EXHAUSTED while the others carry on.

A token bucket per caller name: ``rate`` writes a second on average, bursts up
to ``burst``. Reads are not limited; they cost no disk.
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

    def take(self, who: str, what: str) -> None:
        """Spend one token of ``who``'s or raise ResourceExhausted."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        b = self._buckets.get(who)
        if b is None:
            if len(self._buckets) > 100_000:  # forget idle callers, bounded memory
                self._buckets.clear()
            b = self._buckets[who] = _Bucket(self.burst, now)
        b.tokens = min(self.burst, b.tokens + (now - b.stamp) * self.rate)
        b.stamp = now
        if b.tokens < 1:
            raise ResourceExhausted(f"{what}: {who} is over its quota of {self.rate:g}/s")
        b.tokens -= 1
