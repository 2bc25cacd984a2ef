"""The lease keeper: ends leases whose TTL passed, but never because of the
registry's own trouble.

A registry that was stalled (a slow disk, a long GC or SIGSTOP pause, a VM
migration) could not hear keepalives while it stood still; expiring every
lease the moment it wakes would delete half the cluster for a fault of its
own. So the keeper watches its own clock: when a tick arrives much later than
it was due, every lease gets a fresh TTL first, and only then does expiry run.
"""

from __future__ import annotations

import asyncio
import logging
import time

from geryon.store import Store

log = logging.getLogger("geryon.leases")

TICK_S = 0.05
# A tick this much later than due means we were stalled, not the clients.
STALL_S = 0.5


async def keep(store: Store, *, tick: float = TICK_S, stall: float = STALL_S) -> None:
    """Run until cancelled: expire leases, forgiving our own stalls."""
    last = time.monotonic()
    while True:
        due = store.next_deadline()
        now = time.monotonic()
        delay = tick if due is None else min(tick, max(0.0, due - now))
        await asyncio.sleep(delay)
        now = time.monotonic()
        late = now - last - delay
        last = now
        if late > stall:
            log.warning("registryd: stalled for %.1fs; renewing every lease", late)
            store.refresh_all_leases()
            continue
        for lid in store.expire(now):
            log.info("registryd: lease %d expired", lid)
