"""Who may write: a chunk server's role, from its disk's registry entry.

The reconciler's entry for a disk names its ``primary`` chunk (HOST!CHUNK)
and an ``epoch``, and for a replicated disk its ``standby``; ``geryon disk
promote`` swaps the two and raises the epoch. A chunk server started with
``--registry`` and ``--chunk HOST!CHUNK`` watches those entries and takes
the role they give it:

- named ``standby`` (first: a standby's contents are another disk's
  history, whatever else names the chunk): it refuses writes and follows
  the primary at the entry's ``addr`` (geryon.disk.replica) while the entry
  serves it.
- named ``primary`` at epoch E: it accepts writes, as a new term of epoch E
  (geryon.disk.log.begin_term). A disk already at a later epoch than the
  entry's refuses writes: the entry is behind.
- named by no entry: writable if it has never been replicated (one term);
  otherwise it refuses writes, which no follow could place in a history.

Fencing: until the first answer from the registry every write is refused,
so an old primary that comes back never writes before it learns it was
replaced; a primary of a replicated disk that has not heard from the
registry for FENCE_GRACE seconds refuses writes until it does. A newly
promoted primary waits FENCE_GRACE before its first write when the old
primary's chunk is still registered (it may not have heard yet). If this
task fails, the server stops (geryon.disk.server.RoleLost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time

from geryon import errors
from geryon.client import Client
from geryon.disk import log as dlog
from geryon.disk.replica import Follow
from geryon.disk.server import ChunkServer
from geryon.model import EventType, Service

logger = logging.getLogger("geryon.disk")

FENCE_GRACE = 3.0
PROGRESS_MS = 1000
MANAGED = {"managed-by": "reconciler"}


class Role:
    def __init__(
        self, server: ChunkServer, client: Client, me: str, *, ssl_ctx: ssl.SSLContext | None
    ) -> None:
        self.server = server
        self.client = client
        self.me = me
        self.ssl = ssl_ctx
        self.entries: dict[str, Service] = {}
        self.heard = 0.0
        self.kind = "unknown"  # unknown, primary, standby, solo
        self.name = ""  # the disk entry naming this chunk
        self.follow: Follow | None = None
        self.writable_at = 0.0  # a new primary's first write, after the grace
        self._deciding = asyncio.Lock()  # the watch and the tick both decide
        self.term: tuple[str, int] | None = None  # (entry, epoch) of the writes begun
        self.disk.frozen = "waiting for the registry to say whose disk this is"
        server.replication.describe = self.describe
        server.replication.chunk = me

    @property
    def disk(self):
        return self.server.disk

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {
            "role": self.kind,
            "disk": self.name,
            "chunk": self.me,
            "frozen": self.disk.frozen,
        }
        if self.follow is not None:
            out["following"] = self.follow.status()
        return out

    async def run(self) -> None:
        """Until cancelled; an error in either task ends both (and the server)."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._watch(), name="role-watch")
                tg.create_task(self._tick(), name="role-tick")
        finally:
            await self._stop_following()

    async def _watch(self) -> None:
        while True:
            try:
                async for m in self.client.watch(
                    MANAGED, snapshot=True, progress_interval_ms=PROGRESS_MS
                ):
                    self.heard = time.monotonic()
                    if m.kind == "snapshot":
                        self.entries = {s.name: s for s in m.services}
                    for ev in m.events:
                        if ev.type is EventType.DELETE:
                            self.entries.pop(ev.service.name, None)
                        else:
                            self.entries[ev.service.name] = ev.service
                    await self._decide()
            except errors.GeryonError as exc:
                logger.warning("disk: registry watch: %s; retrying", exc)
            await asyncio.sleep(1.0)

    async def _tick(self) -> None:
        """Fence a primary cut off from the registry; lift a promotion's grace."""
        while True:
            await asyncio.sleep(0.5)
            await self._decide()

    async def _decide(self) -> None:
        async with self._deciding:
            await self._decide_now()

    async def _decide_now(self) -> None:
        disk = self.disk
        mine = [s for s in self.entries.values() if s.attrs.get("primary") == self.me]
        standby = [s for s in self.entries.values() if s.attrs.get("standby") == self.me]
        if not self.heard:
            return
        if standby:
            # A standby first: its contents are another disk's history,
            # whatever else names the chunk.
            s = standby[0]
            self.kind, self.name = "standby", s.name
            self._freeze(
                f"replica of {s.name} (primary {s.attrs.get('primary')} at epoch "
                f"{_epoch(s)}); geryon disk promote {s.name} makes it writable"
            )
            addr = s.attrs.get("addr", "") if s.attrs.get("serving") == "master" else ""
            primary = s.attrs.get("primary", "")
            # With the primary gone (no addr) the follower stays as it is: its
            # last word from the primary says whether promotion is safe.
            moved = self.follow is not None and (self.follow.addr, self.follow.primary) != (
                addr,
                primary,
            )
            if moved and addr:
                await self._stop_following()
            if self.follow is None and addr:
                self.follow = Follow(self.server, addr, primary, me=self.me, ssl_ctx=self.ssl)
                self.follow.start()
        elif mine:
            s = max(mine, key=lambda s: _epoch(s))
            epoch = _epoch(s)
            await self._stop_following()
            if self.kind != "primary" or self.name != s.name:
                promoted = self.kind == "standby" and await self._old_primary_alive(s)
                self.kind, self.name = "primary", s.name
                self.writable_at = time.monotonic() + (FENCE_GRACE if promoted else 0)
                logger.info("disk: %s is the primary of %s at epoch %d", disk.path, s.name, epoch)
            now = time.monotonic()
            if disk.epoch > epoch:
                why = f"this disk is at epoch {disk.epoch}, its entry {s.name} at {epoch}"
            elif s.attrs.get("standby") and now - self.heard > FENCE_GRACE:
                why = f"no word from the registry for {now - self.heard:.0f}s"
            elif now < self.writable_at:
                why = f"promoted to epoch {epoch}; writable in {self.writable_at - now:.1f}s"
            else:
                why = ""
            if why:
                self._freeze(why)
            elif self.term != (s.name, epoch) or disk.frozen:
                # Each time writes begin, a new term (geryon.disk.log.begin_term).
                dlog.begin_term(disk, epoch)
                self.term = (s.name, epoch)
                disk.frozen = ""
        else:
            await self._stop_following()
            self.kind, self.name = "solo", ""
            if len(dlog.terms(disk.db)) > 1:
                # Once a primary's or a replica's, its changes belong to a
                # history: none outside it, or a follow could not tell.
                self._freeze("no disk entry names this chunk (it has been replicated)")
            else:
                disk.frozen = ""

    def _freeze(self, why: str) -> None:
        """Refuse writes from now on, with everything written so far durable
        (a follower's applier makes its own commits, on its own connection)."""
        if not self.disk.frozen:
            self.disk.sync()
        self.disk.frozen = why
        self.term = None

    async def _old_primary_alive(self, s: Service) -> bool:
        """Whether the chunk this promotion replaced is still registered (even
        critical: it may still take writes until it hears of the promotion)."""
        host, _, chunk = s.attrs.get("standby", "").partition("!")
        if not host:
            return False
        with contextlib.suppress(errors.GeryonError):
            found, _ = await self.client.find({"host": host, "id": chunk})
            return bool(found)
        return True

    async def _stop_following(self) -> None:
        if self.follow is not None:
            f, self.follow = self.follow, None
            await f.stop()


def _epoch(s: Service) -> int:
    try:
        return int(s.attrs.get("epoch", "1"))
    except ValueError:
        return 1


__all__ = ["FENCE_GRACE", "Role"]
