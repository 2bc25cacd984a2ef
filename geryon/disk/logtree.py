"""The primary's side of replication: the ``log`` tree a chunk server serves.

A follower attaches with aname ``log`` (over TLS a node or admin identity)
and finds three files, in Plan 9's manner of synthetic files:

    changes  write ``follow UUID SEQ EXPECT`` and the follower's epochs
             table (or ``snapshot``), then read:
             each read at offset S (the follower's applied seq, which
             acknowledges it) returns the next part of a batch from S, or
             after HEARTBEAT seconds of quiet a header alone. A follower
             that cannot go on gets the Rerror ``resync: WHY``, ending in
             ``[S]`` when it holds changes past seq S the primary lacks
    status   read: this server's replication state, as JSON
    recover  write: one record of a diverged follower's file, kept under
             /recovered (geryon.disk.log.recover)

``Replication`` keeps the followers' positions and, in synchronous mode,
holds a durable acknowledgement (a clunk after writes, a remove, a wstat)
until a follower has applied it -- or, when none does within SYNC_TIMEOUT,
falls back to asynchronous until one catches up again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from geryon.disk import log as dlog
from geryon.disk import styx
from geryon.disk.fs import EPERM, Disk, FSError
from geryon.disk.styx import Qid, Stat

logger = logging.getLogger("geryon.disk")

HEARTBEAT = 1.0  # a follower hears from its primary at least this often
SYNC_TIMEOUT = 2.0  # a durable write waits this long for a follower in sync mode
TRIM_EVERY = 1000  # changes between trims of the log's tombstones
FILES = {"changes": 1, "status": 2, "recover": 3}
ENOTPRIMARY = "not the primary"


@dataclass(slots=True)
class Follower:
    name: str
    applied: int = 0
    seen: float = field(default_factory=time.monotonic)
    caught_up: float = field(default_factory=time.monotonic)  # when applied last met seq
    producer: dlog.Producer | None = None
    snapshot: bool = False
    db: sqlite3.Connection | None = None  # its read connection, opened at its first batch


class Replication:
    """The followers of one disk, and the acknowledgements they hold up."""

    def __init__(self, disk: Disk, *, sync: bool = False) -> None:
        self.disk = disk
        self.sync = sync
        self.in_sync = False
        self.acked = disk.seq  # what clients were told is durable (all of it, at start)
        self.followers: dict[int, Follower] = {}
        self.waiting = 0  # followers in a long poll now
        self._wake = asyncio.Event()
        self._applied = asyncio.Event()
        self._trimmed = disk.seq
        self.chunk = ""  # HOST!CHUNK, when the registry gave this server a role
        # Set by the server: what `status` says of this server's own role and
        # of the primary it follows (geryon.disk.replica).
        self.describe: Callable[[], dict[str, object]] = dict
        disk.on_commit = self._committed

    def _committed(self, seq: int) -> None:
        self._wake.set()
        self._wake = asyncio.Event()
        if seq - self._trimmed >= TRIM_EVERY and not self.disk.frozen:
            self._trimmed = seq
            dlog.trim(self.disk)

    def _ack_from(self, f: Follower, seq: int) -> None:
        now = time.monotonic()
        f.applied, f.seen = seq, now
        if seq >= self.disk.seq:
            f.caught_up = now
        # In sync once a follower has everything acknowledged so far (under
        # a steady load it is rarely at the very last commit).
        if seq >= self.acked:
            if self.sync and not self.in_sync:
                self.in_sync = True
                logger.info("disk: %s: follower %s in sync", self.disk.path, f.name)
        self._applied.set()
        self._applied = asyncio.Event()

    async def durable(self) -> None:
        """After Disk.sync: the acknowledgement of everything so far may go out
        once (in sync mode) a follower has it, too."""
        seq = self.disk.seq
        if self.sync and self.in_sync:
            try:
                async with asyncio.timeout(SYNC_TIMEOUT):
                    while max((f.applied for f in self.followers.values()), default=-1) < seq:
                        await self._applied.wait()
            except TimeoutError:
                self.in_sync = False
                logger.warning(
                    "disk: %s: no follower applied seq %d in %gs; acknowledging "
                    "asynchronously until one catches up",
                    self.disk.path,
                    seq,
                    SYNC_TIMEOUT,
                )
        if self.disk.frozen:
            # Demoted while waiting: the new primary may not have it.
            raise FSError(f"{ENOTPRIMARY} any more: this change may be lost ({self.disk.frozen})")
        self.acked = max(self.acked, seq)
        if self.waiting:
            # Tell the followers what was acknowledged before the client
            # hears it: their long polls answer on the next turns of the loop.
            self._wake.set()
            self._wake = asyncio.Event()
            for _ in range(3):
                await asyncio.sleep(0)

    def status(self) -> dict[str, object]:
        now = time.monotonic()
        out: dict[str, object] = {
            "uuid": self.disk.uuid,
            "epoch": self.disk.epoch,
            "seq": self.disk.seq,
            "acked": self.acked,
            "sync": self.sync,
            "in_sync": self.in_sync if self.sync else None,
            "followers": [
                {
                    "name": f.name,
                    "applied": f.applied,
                    "lag": max(0, self.disk.seq - f.applied),
                    "lag_s": 0.0 if f.applied >= self.disk.seq else round(now - f.caught_up, 3),
                    "seen_s": round(now - f.seen, 3),
                }
                for f in self.followers.values()
            ],
        }
        out.update(self.describe())
        return out


@dataclass(slots=True)
class LogFid:
    """A fid in the log tree: the root (file 0) or one of FILES."""

    file: int = 0
    mode: int = -1
    follower: Follower | None = None
    text: bytes | None = None  # status: what this open reads


def qid(file: int) -> Qid:
    return Qid(styx.QTDIR if file == 0 else 0, 0, (1 << 63) | file)


def stat(file: int) -> Stat:
    name = next((n for n, i in FILES.items() if i == file), "/")
    mode = (styx.DMDIR | 0o555) if file == 0 else (0o444 if name == "status" else 0o666)
    now = int(time.time())
    return Stat(0, 0, qid(file), mode, now, now, 0, name, "log", "log", "log")


def walk(f: LogFid, names: list[str]) -> list[Qid]:
    qids = []
    file = f.file
    for name in names:
        if file != 0:
            break
        if name == "..":
            qids.append(qid(0))
            continue
        if name not in FILES:
            break
        file = FILES[name]
        qids.append(qid(file))
    return qids


def dir_entries() -> bytes:
    return b"".join(styx.pack_stat(stat(i)) for i in FILES.values())


def parse_follow(data: bytes) -> tuple[str, int, str, list[dlog.Term]]:
    """``follow UUID SEQ EXPECT`` and, on the next line, the follower's
    epochs table as JSON [[start, epoch, id], ...]; EXPECT is the chunk
    (HOST!CHUNK) it means to follow, or -."""
    head, _, rest = data.partition(b"\n")
    words = head.decode(errors="replace").split()
    try:
        if len(words) != 4 or words[0] != "follow" or not words[2].isascii():
            raise ValueError("want: follow UUID SEQ EXPECT, then the epochs table")
        terms = [(int(s), int(e), str(i)) for s, e, i in json.loads(rest or b"[]")]
        seq = int(words[2])
        if not 0 <= seq < 1 << 63:
            raise ValueError(f"bad seq {words[2]}")
    except (ValueError, TypeError) as exc:
        raise FSError(f"bad follow: {exc}") from None
    return words[1], seq, words[3], terms


class Tree:
    """The log tree's I/O for one session (geryon.disk.server routes to it)."""

    def __init__(self, rep: Replication, name: str) -> None:
        self.rep = rep
        self.name = name  # the follower: its identity, or its address

    def _db(self, fol: Follower) -> sqlite3.Connection:
        if fol.db is None:
            fol.db = dlog.reader(self.rep.disk.path)
        return fol.db

    def close(self, f: LogFid) -> None:
        if f.follower is not None:
            self.rep.followers.pop(id(f), None)
            if f.follower.producer is not None:
                f.follower.producer.close()
            if f.follower.db is not None:
                f.follower.db.close()
            f.follower = None

    def write(self, f: LogFid, data: bytes) -> int:
        disk = self.rep.disk
        if f.file == FILES["recover"]:
            if disk.frozen:
                raise FSError(ENOTPRIMARY)
            try:
                dlog.recover(disk, data)
            except (ValueError, KeyError, TypeError) as exc:
                raise FSError(f"bad recovery record: {exc}") from None
            disk.sync()
            return len(data)
        if f.file != FILES["changes"]:
            raise FSError(EPERM)
        if disk.frozen:
            raise FSError(f"{ENOTPRIMARY}: {disk.frozen}")
        self.close(f)
        if data.strip() == b"snapshot":
            fol = Follower(self.name, snapshot=True)
        else:
            uuid, seq, expect, their_terms = parse_follow(data)
            if expect not in ("-", self.rep.chunk) and self.rep.chunk:
                raise FSError(f"this is {self.rep.chunk}, not {expect}")
            try:
                dlog.check_follow(disk, uuid, seq, their_terms)
            except dlog.Resync as exc:
                at = f" [{exc.diverged}]" if exc.diverged >= 0 else ""
                raise FSError(f"resync: {exc}{at}") from None
            fol = Follower(self.name, applied=seq)
        f.follower = fol
        self.rep.followers[id(f)] = fol
        logger.info(
            "disk: %s: %s follows from %s",
            disk.path,
            self.name,
            "a snapshot" if fol.snapshot else f"seq {fol.applied}",
        )
        return len(data)

    async def read(self, f: LogFid, offset: int, count: int) -> bytes:
        if f.file == FILES["status"]:
            # One text per open, so that reads in pieces make one document.
            if f.text is None or offset == 0:
                f.text = (json.dumps(self.rep.status(), indent=1) + "\n").encode()
            return f.text[offset : offset + count]
        if f.file == 0:
            return dir_entries() if offset == 0 else b""
        fol = f.follower
        if fol is None:
            raise FSError("write follow first")
        disk, rep = self.rep.disk, self.rep
        if disk.frozen:
            raise FSError(f"{ENOTPRIMARY}: {disk.frozen}")
        if offset > disk.seq:  # a follower cannot have what we never wrote
            raise FSError(f"resync: read at seq {offset}, past this disk's {disk.seq}")
        if fol.producer is None:
            if fol.snapshot:
                fol.snapshot = False
                fol.producer = dlog.Producer(self._db(fol), 0, wipe=True)
            else:
                rep._ack_from(fol, offset)
                if disk.seq <= offset:
                    rep.waiting += 1
                    try:
                        wake = rep._wake
                        async with asyncio.timeout(HEARTBEAT):
                            await wake.wait()
                    except TimeoutError:
                        pass
                    finally:
                        rep.waiting -= 1
                    if disk.frozen:
                        raise FSError(f"{ENOTPRIMARY}: {disk.frozen}")
                try:  # trimmed while this follower was away or busy
                    dlog.check_horizon(disk, offset)
                except dlog.Resync as exc:
                    raise FSError(f"resync: {exc}") from None
                fol.producer = dlog.Producer(self._db(fol), offset)
        in_sync = rep.in_sync if rep.sync else None
        part = fol.producer.part(count, acked=rep.acked, in_sync=in_sync)
        if not fol.producer.header.more:
            fol.producer = None
        return part


__all__ = ["HEARTBEAT", "SYNC_TIMEOUT", "LogFid", "Replication", "Tree"]
