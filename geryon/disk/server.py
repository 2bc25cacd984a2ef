"""The chunk server: one disk (geryon.disk.fs) served over 9P2000.

    geryon disk serve CHUNK --listen ADDR [--tls-dir DIR] [--read-only]

Each connection is one 9P session: Tversion first, then attaches, walks and
I/O on the session's fids. Requests of a connection are answered in order,
each run to its end on the event loop, so the disk sees one request at a
time and each is one transaction. (A worker thread per request measured
twice the CPU per message; the only long waits, the fsyncs of a clunk after
writes, are short and would serialize on the one disk anyway.) A Tflush
therefore finds its request already answered, and answers at once, which
flush(5) allows.

Who a caller is: over TLS, the name in its certificate (the attach uname is
ignored; an admin certificate counts as a member of adm, a reader one may
not change anything); over plain 9P, the attach uname. A name the disk's
/adm/users does not know is refused at attach.

Durability: a clunk of a fid that wrote, and a Twstat that touches nothing,
are answered only once every change so far is on disk (Disk.sync) -- and, in
synchronous mode, on a follower's disk too (geryon.disk.logtree).

Replication: aname ``log`` attaches to the log tree (geryon.disk.logtree)
that followers read the change log from; it is for node and admin
identities only. A handler that must wait (a follower's long poll, a write
held for a follower) returns a coroutine, which the connection's loop
awaits before it reads that connection's next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from geryon import errors, tls
from geryon.disk import logtree, styx
from geryon.disk.fs import (
    EINUSE,
    ENOTOPEN,
    EPERM,
    Caller,
    Disk,
    Entry,
    FSError,
)
from geryon.disk.logtree import LogFid
from geryon.disk.styx import DMEXCL, ORCLOSE, Fcall, ProtocolError

Reply = Fcall | Awaitable[Fcall]

log = logging.getLogger("geryon.disk")

MSIZE = (1 << 20) + styx.IOHDRSZ  # the largest message we agree to: an iounit of 1 MiB
MIN_MSIZE = 256  # a smaller one cannot carry a useful stat
MAX_FRAME = 64 << 20  # a size word beyond this is garbage, not a message: hang up

EBOTCH = "9P protocol botch"
ENOVERSION = "Tversion first"
EUNKNOWNFID = "unknown fid"
EDUPFID = "fid already in use"
EOPEN = "fid already open"
EWALKOPEN = "cannot walk an open fid"
EBADDIROFF = "bad offset in directory read"
ENOAUTH = "authentication not required"
EATTACH = "unknown attach name"
ETOOBIG = "message larger than msize"


@dataclass(slots=True)
class Fid:
    entry: Entry
    who: Caller
    mode: int = -1  # -1 until opened
    wrote: bool = False
    exclusive: bool = False  # holds a DMEXCL file's one open
    dir_stats: list[bytes] = field(default_factory=list)
    dir_index: int = 0
    dir_offset: int = 0


class Session:
    """One connection's state: its msize and fids."""

    def __init__(self, server: ChunkServer, identity: tls.Identity | None, peer: str) -> None:
        self.server = server
        self.identity = identity
        self.peer = peer
        self.msize = 0
        self.fids: dict[int, Fid | LogFid] = {}
        name = identity.name if identity is not None else peer
        self.tree = logtree.Tree(server.replication, name)

    def dispatch(self, f: Fcall) -> Reply:
        try:
            if f.type == styx.Tversion:
                return self.version(f)
            if not self.msize:
                raise FSError(ENOVERSION)
            handler = _HANDLERS.get(f.type)
            if handler is None:
                raise FSError(EBOTCH)
            return handler(self, f)
        except FSError as exc:
            return Fcall(styx.Rerror, f.tag, ename=str(exc))
        except sqlite3.Error as exc:
            # The disk itself failed (I/O error, damaged page): the request
            # fails, the session lives on.
            log.error("disk: %s: %s: %s", self.server.disk.path, styx.NAMES[f.type], exc)
            return Fcall(styx.Rerror, f.tag, ename=f"i/o error: {exc}")

    async def finish(self, f: Fcall, reply: Awaitable[Fcall]) -> Fcall:
        """A handler's coroutine, its errors answered as dispatch answers them."""
        try:
            return await reply
        except FSError as exc:
            return Fcall(styx.Rerror, f.tag, ename=str(exc))
        except sqlite3.Error as exc:
            log.error("disk: %s: %s: %s", self.server.disk.path, styx.NAMES[f.type], exc)
            return Fcall(styx.Rerror, f.tag, ename=f"i/o error: {exc}")

    def clunk_all(self) -> None:
        for n in list(self.fids):
            fid = self.fids.pop(n)
            if isinstance(fid, LogFid):
                self.tree.close(fid)
                continue
            with contextlib.suppress(FSError):
                self._clunk(fid)

    @property
    def disk(self) -> Disk:
        return self.server.disk

    def any_fid(self, n: int) -> Fid | LogFid:
        try:
            return self.fids[n]
        except KeyError:
            raise FSError(EUNKNOWNFID) from None

    def fid(self, n: int) -> Fid:
        fid = self.any_fid(n)
        if isinstance(fid, LogFid):
            raise FSError(EPERM)
        return fid

    async def _durable(self, reply: Fcall) -> Fcall:
        await self.server.replication.durable()
        return reply

    def new_fid(self, n: int) -> None:
        if n in self.fids or n == styx.NOFID:
            raise FSError(EDUPFID)

    def iounit(self) -> int:
        return self.msize - styx.IOHDRSZ

    def writable(self, who: Caller) -> None:
        if self.identity is not None and self.identity.role == "reader":
            raise FSError(EPERM)

    # -- the messages --------------------------------------------------------
    def version(self, f: Fcall) -> Fcall:
        self.clunk_all()  # a Tversion starts the session over
        self.msize = 0  # until this one succeeds: a refused Tversion leaves no session
        if not f.version.startswith(styx.VERSION) or f.version[len(styx.VERSION) :][:1] not in (
            "",
            ".",
        ):
            return Fcall(styx.Rversion, f.tag, msize=min(f.msize, MSIZE), version="unknown")
        if f.msize < MIN_MSIZE:
            raise FSError(f"msize {f.msize} too small")
        self.msize = min(f.msize, MSIZE)
        return Fcall(styx.Rversion, f.tag, msize=self.msize, version=styx.VERSION)

    def auth(self, f: Fcall) -> Fcall:
        raise FSError(ENOAUTH)

    def attach(self, f: Fcall) -> Fcall:
        self.new_fid(f.fid)
        if f.afid != styx.NOFID:
            raise FSError(ENOAUTH)
        if f.aname == "log":
            if self.identity is not None and self.identity.role not in ("node", "admin"):
                raise FSError(EPERM)
            self.fids[f.fid] = LogFid()
            return Fcall(styx.Rattach, f.tag, qid=logtree.qid(0))
        if f.aname not in ("", "/"):
            raise FSError(EATTACH)
        if self.identity is not None:
            who = Caller(self.identity.name, admin=self.identity.role == "admin")
        else:
            who = Caller(f.uname)
        if not self.disk.users.exists(who.name) and not who.admin:
            raise FSError(f"unknown user {who.name}")
        root = self.disk.entry(1)
        self.fids[f.fid] = Fid(root, who)
        return Fcall(styx.Rattach, f.tag, qid=root.qid)

    def flush(self, f: Fcall) -> Fcall:
        # Requests are answered in order, so the flushed one is already answered.
        return Fcall(styx.Rflush, f.tag)

    def walk(self, f: Fcall) -> Fcall:
        any_fid = self.any_fid(f.fid)
        if any_fid.mode >= 0:
            raise FSError(EWALKOPEN)
        if f.newfid != f.fid:
            self.new_fid(f.newfid)
        if len(f.wname) > styx.MAXWELEM:
            raise FSError("too many names in walk")
        if isinstance(any_fid, LogFid):
            wqid = logtree.walk(any_fid, f.wname)
            if not wqid and f.wname:
                raise FSError("file does not exist")
            if len(wqid) == len(f.wname):
                file = wqid[-1].path & 0xFF if wqid else any_fid.file
                self.fids[f.newfid] = LogFid(0 if wqid and wqid[-1].type else file)
            return Fcall(styx.Rwalk, f.tag, wqid=wqid)
        fid = any_fid
        e = self.disk.entry(fid.entry.path)
        qids = []
        for i, name in enumerate(f.wname):
            try:
                e = self.disk.walk1(e, name, fid.who)
            except FSError:
                if i == 0:
                    raise
                return Fcall(styx.Rwalk, f.tag, wqid=qids)
            qids.append(e.qid)
        self.fids[f.newfid] = Fid(e, fid.who)
        return Fcall(styx.Rwalk, f.tag, wqid=qids)

    def open(self, f: Fcall) -> Fcall:
        any_fid = self.any_fid(f.fid)
        if any_fid.mode >= 0:
            raise FSError(EOPEN)
        if isinstance(any_fid, LogFid):
            any_fid.mode = f.mode & 3
            return Fcall(styx.Ropen, f.tag, qid=logtree.qid(any_fid.file), iounit=self.iounit())
        fid = any_fid
        e = self.disk.entry(fid.entry.path)
        self.disk.check_open(e, f.mode, fid.who)
        if self.disk.open_bits(e, f.mode) & 2 or f.mode & ORCLOSE:
            self.writable(fid.who)
        fid.exclusive = self._exclusive(e)
        try:
            fid.entry = self.disk.opened(e, f.mode, fid.who)
        except BaseException:
            self._release(fid)
            raise
        fid.mode = f.mode
        if f.mode & styx.OTRUNC:  # a truncation is a write: durable at clunk
            fid.wrote = True
            if self.disk.is_users_file(e.path):
                self.disk.reload_users()
        return Fcall(styx.Ropen, f.tag, qid=fid.entry.qid, iounit=self.iounit())

    def _exclusive(self, e: Entry) -> bool:
        """Claim E's one open if it is DMEXCL: whether it was claimed."""
        if e.mode & DMEXCL:
            if e.path in self.server.exclusive:
                raise FSError(EINUSE)
            self.server.exclusive.add(e.path)
            return True
        return False

    def _release(self, fid: Fid) -> None:
        if fid.exclusive:
            self.server.exclusive.discard(fid.entry.path)
            fid.exclusive = False

    def create(self, f: Fcall) -> Fcall:
        fid = self.fid(f.fid)
        if fid.mode >= 0:
            raise FSError(EOPEN)
        self.writable(fid.who)
        d = self.disk.entry(fid.entry.path)
        e = self.disk.create(d, f.name, f.perm, f.mode, fid.who)
        fid.exclusive = self._exclusive(e)
        fid.entry, fid.mode, fid.wrote = e, f.mode, True
        return Fcall(styx.Rcreate, f.tag, qid=e.qid, iounit=self.iounit())

    def read(self, f: Fcall) -> Reply:
        any_fid = self.any_fid(f.fid)
        if isinstance(any_fid, LogFid):
            if any_fid.mode < 0:
                raise FSError(ENOTOPEN)

            async def long_read(fid: LogFid = any_fid) -> Fcall:
                data = await self.tree.read(fid, f.offset, min(f.count, self.iounit()))
                return Fcall(styx.Rread, f.tag, data=data)

            return long_read()
        fid = any_fid
        if fid.mode < 0 or (fid.mode & 3) not in (styx.OREAD, styx.ORDWR, styx.OEXEC):
            raise FSError(ENOTOPEN)
        count = min(f.count, self.iounit())
        if not fid.entry.is_dir:
            data = self.disk.read(self.disk.entry(fid.entry.path), f.offset, count)
            return Fcall(styx.Rread, f.tag, data=data)
        # A directory is read from the start or from where the last read ended
        # (read(5)), in whole entries; offset 0 takes a fresh listing. A count
        # too small for the next entry gets no bytes, as kfs and lib9p answer:
        # Linux's v9fs asks again for what is left of its buffer after a short
        # reply, and an error there would fail the whole getdents.
        if f.offset == 0:
            fid.dir_stats = [styx.pack_stat(c.stat()) for c in self.disk.children(fid.entry.path)]
            fid.dir_index = fid.dir_offset = 0
        elif f.offset != fid.dir_offset:
            raise FSError(EBADDIROFF)
        out: list[bytes] = []
        n = 0
        stats = fid.dir_stats
        while fid.dir_index < len(stats) and n + len(stats[fid.dir_index]) <= count:
            out.append(stats[fid.dir_index])
            n += len(stats[fid.dir_index])
            fid.dir_index += 1
        fid.dir_offset += n
        return Fcall(styx.Rread, f.tag, data=b"".join(out))

    def write(self, f: Fcall) -> Fcall:
        any_fid = self.any_fid(f.fid)
        if isinstance(any_fid, LogFid):
            if any_fid.mode not in (styx.OWRITE, styx.ORDWR):
                raise FSError(ENOTOPEN)
            return Fcall(styx.Rwrite, f.tag, count=self.tree.write(any_fid, bytes(f.data)))
        fid = any_fid
        if fid.mode < 0 or (fid.mode & 3) not in (styx.OWRITE, styx.ORDWR):
            raise FSError(ENOTOPEN)
        n = self.disk.write(fid.entry, f.offset, f.data[: self.iounit()], fid.who)
        fid.wrote = True
        return Fcall(styx.Rwrite, f.tag, count=n)

    def clunk(self, f: Fcall) -> Reply:
        fid = self.fids.pop(f.fid, None) or self.any_fid(f.fid)
        if isinstance(fid, LogFid):
            self.tree.close(fid)
            return Fcall(styx.Rclunk, f.tag)
        self._clunk(fid)
        reply = Fcall(styx.Rclunk, f.tag)
        return self._durable(reply) if fid.wrote else reply

    def _clunk(self, fid: Fid) -> None:
        """Release FID; a clunk that follows writes returns once they are durable."""
        self._release(fid)
        if fid.mode >= 0 and fid.mode & ORCLOSE:
            # Permission to remove was checked at the open (open(5)).
            with contextlib.suppress(FSError):
                self.disk.remove(fid.entry, fid.who, checked=True)
        if fid.wrote:
            self.disk.sync()
            if self.disk.is_users_file(fid.entry.path) and self.disk.users_error:
                raise FSError(f"{self.disk.users_error} (the old table stays in force)")

    def remove(self, f: Fcall) -> Reply:
        fid = self.fids.pop(f.fid, None) or self.any_fid(f.fid)
        if isinstance(fid, LogFid):
            self.tree.close(fid)
            raise FSError(EPERM)
        # The fid is clunked even when the remove fails (remove(5)).
        try:
            self.writable(fid.who)
            self.disk.remove(fid.entry, fid.who)
            self.disk.sync()
        finally:
            self._release(fid)
        return self._durable(Fcall(styx.Rremove, f.tag))

    def stat(self, f: Fcall) -> Fcall:
        any_fid = self.any_fid(f.fid)
        if isinstance(any_fid, LogFid):
            return Fcall(styx.Rstat, f.tag, stat=logtree.stat(any_fid.file))
        fid = any_fid
        return Fcall(styx.Rstat, f.tag, stat=self.disk.entry(fid.entry.path).stat())

    def wstat(self, f: Fcall) -> Fcall:
        fid = self.fid(f.fid)
        st: styx.Stat = f.stat
        sync_only = (st.name, st.uid, st.gid, st.muid) == ("", "", "", "") and all(
            v == 0xFFFFFFFF for v in (st.mode, st.atime, st.mtime)
        ) and st.length == 0xFFFFFFFFFFFFFFFF
        if not sync_only:
            self.writable(fid.who)
        self.disk.wstat(fid.entry, st, fid.who)
        self.disk.sync()
        fid.entry = self.disk.entry(fid.entry.path)
        return self._durable(Fcall(styx.Rwstat, f.tag))


_HANDLERS: dict[int, Callable[[Session, Fcall], Reply]] = {
    styx.Tauth: Session.auth,
    styx.Tattach: Session.attach,
    styx.Tflush: Session.flush,
    styx.Twalk: Session.walk,
    styx.Topen: Session.open,
    styx.Tcreate: Session.create,
    styx.Tread: Session.read,
    styx.Twrite: Session.write,
    styx.Tclunk: Session.clunk,
    styx.Tremove: Session.remove,
    styx.Tstat: Session.stat,
    styx.Twstat: Session.wstat,
}


class RoleLost(Exception):
    """The task keeping the disk's role ended: the server stops."""


class ChunkServer:
    """A disk and the sessions on it."""

    def __init__(
        self, disk: Disk, *, ssl_ctx: ssl.SSLContext | None = None, sync: bool = False
    ) -> None:
        self.disk = disk
        self.ssl = ssl_ctx
        self.replication = logtree.Replication(disk, sync=sync)
        self.exclusive: set[int] = set()  # qid paths of DMEXCL files open now
        self.sessions: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        name = writer.get_extra_info("peername")
        peer = f"{name[0]}:{name[1]}" if isinstance(name, tuple) else str(name)
        identity: tls.Identity | None = None
        if self.ssl is not None:
            try:
                identity = tls.identity_from_der(
                    writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
                )
            except errors.Unauthenticated as exc:
                log.warning("disk: %s refused: %s", peer, exc)
                writer.close()
                return
        session = Session(self, identity, peer)
        task = asyncio.current_task()
        assert task is not None
        self.sessions[task] = writer
        try:
            await self._serve(session, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        except asyncio.CancelledError:
            # stop_sessions ended a waiting request: the session simply ends
            # (a cancelled connection callback would be logged as an error).
            if task.uncancel() > 0:
                raise
        finally:
            self.sessions.pop(task, None)
            with contextlib.suppress(Exception):
                session.clunk_all()
            writer.close()

    async def stop_sessions(self) -> None:
        """End every session and wait until they are gone: hanging up makes
        each one's next read fail (a request in progress runs to its end; one
        waiting -- a follower's long poll, a write held for a follower -- ends
        with its connection)."""
        tasks = list(self.sessions)
        for writer in self.sessions.values():
            writer.close()
        for t in tasks:  # a request waiting (never one mid-change) ends now
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(
        self, session: Session, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            head = await reader.readexactly(4)
            size = int.from_bytes(head, "little")
            limit = session.msize or MSIZE
            if size < 7 or size > MAX_FRAME:
                # Not a frame we can skip: say why on tag NOTAG and hang up.
                writer.write(styx.pack(Fcall(styx.Rerror, styx.NOTAG, ename=EBOTCH)))
                await writer.drain()
                return
            body = await reader.readexactly(size - 4)
            tag = int.from_bytes(body[1:3], "little")
            if size > limit:
                reply = Fcall(styx.Rerror, tag, ename=ETOOBIG)
            else:
                try:
                    f = styx.unpack(head + body)
                except ProtocolError as exc:
                    reply = Fcall(styx.Rerror, tag, ename=f"{EBOTCH}: {exc}")
                else:
                    if f.type % 2 or f.type == styx.Terror:  # an R-message sent to us
                        reply = Fcall(styx.Rerror, tag, ename=EBOTCH)
                    else:
                        answer = session.dispatch(f)
                        reply = (
                            answer if isinstance(answer, Fcall) else await session.finish(f, answer)
                        )
            if writer.is_closing():  # hung up while the reply was awaited
                return
            writer.write(styx.pack(reply))
            await writer.drain()

    def close(self) -> None:
        self.disk.close()


async def serve(
    chunk: Path,
    host: str,
    port: int,
    *,
    tls_dir: Path | None = None,
    read_only: bool = False,
    sync: bool = False,
    ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
    beside: Callable[[ChunkServer], Awaitable[None]] | None = None,
) -> None:
    """Serve CHUNK on HOST:PORT (HOST * for every address) until STOP is set
    (or SIGTERM/SIGINT when none is given). BESIDE(server) runs alongside
    (the role a registry gives the disk: geryon.disk.role)."""
    disk = Disk(chunk, read_only=read_only)
    ctx = tls.ssl_context(tls_dir, server=True) if tls_dir is not None else None
    cs = ChunkServer(disk, ssl_ctx=ctx, sync=sync)
    side = asyncio.create_task(beside(cs), name="chunk-role") if beside is not None else None
    try:
        server = await asyncio.start_server(
            cs.handle, None if host == "*" else host, port, ssl=ctx, limit=MSIZE + 64
        )
        bound = server.sockets[0].getsockname()[1]
        if ready is not None:
            ready(bound)
        if stop is None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
        async with server:
            waiter = asyncio.create_task(stop.wait(), name="chunk-stop")
            await asyncio.wait({waiter, *([side] if side else [])}, return_when="FIRST_COMPLETED")
            waiter.cancel()
            server.close()
            await cs.stop_sessions()
            if side is not None and side.done() and not stop.is_set():
                # Without its role the server cannot know whether it may
                # write: it stops (its agent starts it again), never guesses.
                failure = side.exception() if not side.cancelled() else None
                raise RoleLost(f"the disk's role task ended: {failure!r}") from failure
    finally:
        if side is not None:
            side.cancel()
            await asyncio.gather(side, return_exceptions=True)
        # On this thread, after the sessions: SQLite is used by one thread at a time.
        cs.close()
