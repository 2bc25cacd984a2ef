"""The follower's side of replication: Inferno's applylog, run continuously.

``Follow`` dials the primary's chunk server, attaches to its log tree
(geryon.disk.logtree) and asks to go on from this disk's position. Each read
names the seq applied so far and brings the next part of a batch, which
``geryon.disk.log.Applier`` applies in one transaction per batch. A lost
connection, a restart of either side or of the registry: it dials again and
goes on from the position on disk, which every commit made durable.

When the primary says the follower cannot go on (``resync``), the follower
starts over from a snapshot; if it holds changes the primary never had (it
was the primary once, and wrote after its replica was promoted) those files
are first written to the primary's ``/recovered/CHUNK-epochE-TIME/``, so
nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sqlite3
import ssl
import time

from geryon.disk import log as dlog
from geryon.disk import styx
from geryon.disk.client import Conn, Gone, Remote, StyxError
from geryon.disk.logtree import HEARTBEAT, TRIM_EVERY
from geryon.disk.server import ChunkServer

logger = logging.getLogger("geryon.disk")

RETRY_S = (0.2, 3.0)  # first and longest pause between attempts
SILENCE_S = 10 * HEARTBEAT  # no answer to a read in this long: dial again


class Follow:
    """Follow the primary at ADDR (chunk PRIMARY) until cancelled."""

    def __init__(
        self,
        server: ChunkServer,
        addr: str,
        primary: str,
        *,
        me: str,
        ssl_ctx: ssl.SSLContext | None,
    ) -> None:
        self.server = server
        self.addr = addr
        self.primary = primary
        self.me = me
        self.ssl = ssl_ctx
        self.primary_seq = 0
        self.acked = 0  # the primary's acknowledged seq, as last heard
        self.heard = 0.0  # monotonic time of the last part or heartbeat
        self.caught_up = time.monotonic()
        self.error = ""
        self.in_sync: bool | None = None  # synchronous mode, as the primary last said
        self.apply_error = ""  # the last batch failed to apply: not safe to promote
        self.trimmed = server.disk.seq
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"follow {self.addr}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def status(self) -> dict[str, object]:
        disk = self.server.disk
        now = time.monotonic()
        lag = max(0, self.primary_seq - disk.seq)
        return {
            "primary": self.primary,
            "primary_addr": self.addr,
            "primary_seq": self.primary_seq,
            "primary_acked": self.acked,
            "lag": lag,
            "lag_s": 0.0 if lag == 0 else round(now - self.caught_up, 3),
            "heard_s": round(now - self.heard, 3) if self.heard else None,
            # Promotion loses nothing the primary acknowledged, as last heard
            # (and a batch that fails to apply makes it unsafe).
            "safe": disk.seq >= self.acked and self.heard > 0 and not self.apply_error,
            "in_sync": self.in_sync,
            "error": self.apply_error or self.error,
        }

    async def run(self) -> None:
        pause = RETRY_S[0]
        while True:
            heard = self.heard
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except (Gone, StyxError, OSError, ValueError, sqlite3.Error) as exc:
                why = str(exc)
                if isinstance(exc, TimeoutError):
                    why = f"no answer from the primary in {SILENCE_S:g}s"
                if why != self.error:
                    logger.warning("disk: following %s: %s; retrying", self.addr, why)
                self.error = why
            except Exception:
                logger.exception("disk: following %s", self.addr)
                self.error = "internal error (see the log)"
            # A session that got somewhere starts the backoff over.
            pause = RETRY_S[0] if self.heard != heard else min(pause * 2, RETRY_S[1])
            await asyncio.sleep(pause)

    async def _session(self) -> None:
        disk = self.server.disk
        conn = await Conn.dial(self.addr, ssl_ctx=self.ssl)
        applier = dlog.Applier(disk)
        try:
            remote = await Remote.attach(conn, "log", "log")
            fid = await remote.open("changes", styx.ORDWR)
            start = f"seq {disk.seq}"
            try:
                terms = json.dumps(dlog.terms(disk.db))
                await self._write(
                    remote, fid, f"follow {disk.uuid} {disk.seq} {self.primary or '-'}\n{terms}"
                )
            except StyxError as exc:
                if not str(exc).startswith("resync:"):
                    raise
                await self._start_over(remote, fid, str(exc))
                start = "a snapshot"
            logger.info("disk: %s follows %s from %s", disk.path, self.addr, start)
            while True:
                # The primary answers within its heartbeat: silence far past
                # it is a primary that froze or a cut connection.
                async with asyncio.timeout(SILENCE_S):
                    part = await remote.read_fid(fid, disk.seq, conn.iounit)
                nl = part.index(b"\n")
                h = dlog.Header.decode(part[:nl])
                # What the primary says counts before the batch is applied: a
                # batch that cannot be applied must not leave us "safe".
                self.primary_seq, self.acked = max(h.seq, self.primary_seq), h.acked
                self.in_sync = h.in_sync
                if not (h.seq == h.start and not h.wipe and len(part) == nl + 1):
                    try:
                        done = applier.apply(part)
                    except (sqlite3.Error, ValueError) as exc:
                        self.apply_error = f"cannot apply a batch: {exc}"
                        raise
                    self.apply_error = ""
                    if done is not None:
                        self.server.replication.acked = disk.seq
                        if disk.seq - self.trimmed >= TRIM_EVERY:
                            self.trimmed = disk.seq
                            dlog.trim(disk)
                self.error = ""
                self.heard = time.monotonic()
                if disk.seq >= h.seq and not h.more:
                    self.primary_seq = h.seq
                    self.caught_up = self.heard
        finally:
            applier.close()
            await conn.close()

    async def _write(self, remote: Remote, fid: int, text: str) -> None:
        await remote.conn.rpc(styx.Fcall(styx.Twrite, fid=fid, offset=0, data=text.encode()))

    async def _start_over(self, remote: Remote, fid: int, why: str) -> None:
        """Resync from a snapshot, first keeping any changes the primary lacks."""
        disk = self.server.disk
        m = re.search(r"\[(\d+)\]$", why)
        # Another disk altogether: whatever it holds beyond its format is kept.
        after = int(m.group(1)) if m else (0 if "another disk" in why else -1)
        if after >= 0 and dlog.diverged_files(disk, after):
            # Named by what is kept, not when: a recovery cut short and
            # tried again writes the same files again.
            folder = f"{self.me}-{disk.uuid[:8]}-epoch{disk.epoch}-after{after}"
            rfid = await remote.open("recover", styx.OWRITE)
            try:
                for rec in dlog.recovery_records(disk, after, folder, remote.conn.iounit):
                    await remote.conn.rpc(styx.Fcall(styx.Twrite, fid=rfid, offset=0, data=rec))
            finally:
                await remote.clunk(rfid)
            logger.warning(
                "disk: %s: %s; its changes after seq %d are kept on the primary in /%s/%s",
                disk.path,
                why,
                after,
                dlog.RECOVERED,
                folder,
            )
        else:
            logger.info("disk: %s: %s; starting over from a snapshot", disk.path, why)
        await self._write(remote, fid, "snapshot")


__all__ = ["Follow"]
