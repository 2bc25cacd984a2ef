"""A 9P2000 client: one connection, many requests in flight, and file
operations by path on top.

``Conn`` speaks the protocol: each request gets a free tag, one reader task
hands replies to their waiters, an Rerror becomes ``StyxError`` carrying the
server's string, and a request cancelled while in flight is flushed (Tflush)
before its tag is used again. ``Remote`` is what `geryon disk ls/cat/put...`
and the FUSE mount use: attach once, then walk paths from the root.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from geryon import errors
from geryon.disk import styx
from geryon.disk.styx import Fcall, Stat

if TYPE_CHECKING:  # cryptography is imported only once TLS is used
    from geryon import tls

MSIZE = (1 << 20) + styx.IOHDRSZ  # an iounit of 1 MiB: FUSE's 1 MiB writes are one Twrite
CONNECT_TIMEOUT = 10.0


class StyxError(Exception):
    """The server's Rerror: the message is its error string."""


class Gone(ConnectionError):
    """The connection ended (or never began): requests on it fail with this."""


def parse_addr(addr: str) -> tuple[str, int]:
    """A dial string (tcp!HOST!PORT, as registry entries carry) or HOST:PORT."""
    if "!" in addr:
        parts = addr.split("!")
        if len(parts) == 3 and parts[0] in ("tcp", "net") and parts[2].isdigit():
            return parts[1], int(parts[2])
    else:
        host, sep, port = addr.rpartition(":")
        if sep and host and port.isdigit():
            return host.strip("[]"), int(port)
    raise ValueError(f"bad disk address {addr!r} (want tcp!HOST!PORT or HOST:PORT)")


def client_ssl(tls_dir: Path) -> ssl.SSLContext:
    from geryon import tls

    ctx = tls.ssl_context(tls_dir, server=False)
    # Chunk servers present node certificates named by identity, not by host
    # name; the CA check is what vouches for them.
    ctx.check_hostname = False
    return ctx


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.msize = MSIZE
        self.waiting: dict[int, asyncio.Future[Fcall]] = {}
        self.free_tags = list(range(1, 256))
        self.more_tags = itertools.count(256)
        self.fids = itertools.count(1)
        self.closed: BaseException | None = None
        self.peer: tls.Identity | None = None
        self._reader_task = asyncio.create_task(self._read(), name="9p reader")

    @classmethod
    async def dial(
        cls,
        addr: str,
        *,
        ssl_ctx: ssl.SSLContext | None = None,
        msize: int = MSIZE,
        limit: float = CONNECT_TIMEOUT,
    ) -> Conn:
        """Connect, negotiate 9P2000, and return; Gone within LIMIT seconds if not."""
        host, port = parse_addr(addr)
        try:
            async with asyncio.timeout(limit):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=ssl_ctx, limit=msize + 64
                )
        except TimeoutError:
            raise Gone(f"{addr}: no answer in {limit:g}s") from None
        except ssl.SSLError as exc:
            raise Gone(f"{addr}: TLS handshake failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise Gone(f"{addr}: {exc.strerror or exc}") from None
        conn = cls(reader, writer)
        if ssl_ctx is not None:
            try:
                from geryon import tls

                conn.peer = tls.identity_from_der(
                    writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
                )
            except errors.GeryonError as exc:  # closed, not left open behind the error
                await conn.close()
                raise Gone(f"{addr}: {exc}") from None
        try:
            async with asyncio.timeout(limit):
                r = await conn.rpc(Fcall(styx.Tversion, msize=msize, version=styx.VERSION))
        except TimeoutError:
            await conn.close()
            raise Gone(f"{addr}: no 9P answer in {limit:g}s") from None
        except BaseException:
            await conn.close()
            raise
        if r.version != styx.VERSION:
            await conn.close()
            raise Gone(f"{addr}: server speaks {r.version!r}, not {styx.VERSION}")
        conn.msize = r.msize
        return conn

    @property
    def iounit(self) -> int:
        return self.msize - styx.IOHDRSZ

    async def _read(self) -> None:
        try:
            while True:
                head = await self.reader.readexactly(4)
                size = int.from_bytes(head, "little")
                if size < 7 or size > self.msize + 64:
                    raise Gone(f"bad reply size {size}")
                f = styx.unpack(head + await self.reader.readexactly(size - 4))
                fut = self.waiting.pop(f.tag, None)
                if fut is not None and not fut.done():
                    fut.set_result(f)
        except (OSError, asyncio.IncompleteReadError, styx.ProtocolError, Gone) as exc:
            self._fail(exc if isinstance(exc, Gone) else Gone(f"connection lost: {exc}"))
        except asyncio.CancelledError:
            self._fail(Gone("connection closed"))
            raise

    def _fail(self, exc: BaseException) -> None:
        self.closed = exc
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(exc)
        self.waiting.clear()
        self.writer.close()

    def _tag(self) -> int:
        return self.free_tags.pop() if self.free_tags else next(self.more_tags) & 0x7FFF

    async def rpc(self, f: Fcall) -> Fcall:
        """Send F and return its reply; StyxError for an Rerror, Gone if the
        connection is lost. Cancelled, the request is flushed in the background."""
        if self.closed is not None:
            raise Gone(str(self.closed))
        f.tag = styx.NOTAG if f.type == styx.Tversion else self._tag()
        fut: asyncio.Future[Fcall] = asyncio.get_running_loop().create_future()
        self.waiting[f.tag] = fut
        self.writer.write(styx.pack(f))
        try:
            await self.writer.drain()
            r = await fut
        except asyncio.CancelledError:
            if f.tag != styx.NOTAG and self.closed is None:
                t = asyncio.create_task(self._flush(f.tag, fut))
                t.add_done_callback(lambda _t: None)
            raise
        except Gone:
            raise
        except OSError as exc:
            self._fail(Gone(f"connection lost: {exc}"))
            raise Gone(str(self.closed)) from None
        if f.tag != styx.NOTAG:
            self.free_tags.append(f.tag)
        if r.type == styx.Rerror:
            raise StyxError(r.ename)
        if r.type != f.type + 1:
            raise Gone(f"{styx.NAMES.get(f.type)} answered by {styx.NAMES.get(r.type, r.type)}")
        return r

    async def _flush(self, oldtag: int, old: asyncio.Future[Fcall]) -> None:
        """flush(5): the old tag is free once Rflush (or the old reply) arrives."""
        with contextlib.suppress(Exception):
            await self.rpc(Fcall(styx.Tflush, oldtag=oldtag))
        self.waiting.pop(oldtag, None)
        self.free_tags.append(oldtag)

    def fid(self) -> int:
        return next(self.fids)

    def on_close(self, callback: Callable[[BaseException], None]) -> None:
        """Call CALLBACK with the reason once the connection has ended."""
        self._reader_task.add_done_callback(
            lambda _t: callback(self.closed or Gone("connection closed"))
        )

    async def close(self) -> None:
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader_task
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def split(path: str) -> list[str]:
    return [p for p in path.split("/") if p and p != "."]


class Remote:
    """File operations by path on one attached tree."""

    def __init__(self, conn: Conn, root: int) -> None:
        self.conn = conn
        self.root = root

    @classmethod
    async def attach(
        cls, conn: Conn, uname: str, aname: str = ""
    ) -> Remote:
        fid = conn.fid()
        await conn.rpc(Fcall(styx.Tattach, fid=fid, afid=styx.NOFID, uname=uname, aname=aname))
        return cls(conn, fid)

    async def walk(self, names: list[str], *, start: int | None = None) -> int:
        """A new fid for the file at NAMES from START (the root): StyxError
        'file does not exist' when a step fails."""
        fid = self.root if start is None else start
        newfid = self.conn.fid()
        first = True
        while first or names:
            step, names = names[: styx.MAXWELEM], names[styx.MAXWELEM :]
            try:
                r = await self.conn.rpc(Fcall(styx.Twalk, fid=fid, newfid=newfid, wname=step))
            except StyxError:
                if not first:  # NEWFID was made by an earlier step: not leaked
                    await self.clunk(newfid)
                raise
            if len(r.wqid) != len(step):
                if not first:
                    await self.clunk(newfid)
                raise StyxError("file does not exist")
            fid, first = newfid, False
        return newfid

    async def clunk(self, fid: int) -> None:
        with contextlib.suppress(StyxError):
            await self.conn.rpc(Fcall(styx.Tclunk, fid=fid))

    async def stat(self, path: str) -> Stat:
        fid = await self.walk(split(path))
        try:
            return (await self.conn.rpc(Fcall(styx.Tstat, fid=fid))).stat
        finally:
            await self.clunk(fid)

    async def open(self, path: str, mode: int, *, file_only: bool = False) -> int:
        """An opened fid for PATH; FILE_ONLY refuses a directory ("file is a
        directory"), whose reads would be directory entries, not its contents."""
        fid = await self.walk(split(path))
        try:
            r = await self.conn.rpc(Fcall(styx.Topen, fid=fid, mode=mode))
            if file_only and r.qid.type & styx.QTDIR:
                raise StyxError("file is a directory")
        except BaseException:
            await self.clunk(fid)
            raise
        return fid

    async def create(self, path: str, perm: int, mode: int) -> int:
        names = split(path)
        if not names:
            raise StyxError("file already exists")
        fid = await self.walk(names[:-1])
        try:
            await self.conn.rpc(Fcall(styx.Tcreate, fid=fid, name=names[-1], perm=perm, mode=mode))
        except BaseException:
            await self.clunk(fid)
            raise
        return fid

    async def read_fid(self, fid: int, offset: int, count: int) -> bytes:
        r = await self.conn.rpc(
            Fcall(styx.Tread, fid=fid, offset=offset, count=min(count, self.conn.iounit))
        )
        return r.data

    async def write_fid(self, fid: int, offset: int, data: bytes | memoryview) -> int:
        """Write all of DATA, in iounit pieces, several in flight."""
        unit = self.conn.iounit
        view = memoryview(data)
        pieces = [(offset + i, view[i : i + unit]) for i in range(0, len(view), unit)] or [
            (offset, view)
        ]
        sem = asyncio.Semaphore(8)

        async def one(off: int, piece: memoryview) -> int:
            async with sem:
                r = await self.conn.rpc(Fcall(styx.Twrite, fid=fid, offset=off, data=piece))
                if r.count != len(piece):
                    raise StyxError("short write")
                return r.count

        return sum(await asyncio.gather(*(one(o, p) for o, p in pieces)))

    async def chunks(self, path: str) -> AsyncIterator[bytes]:
        """A file's contents, an iounit at a time."""
        fid = await self.open(path, styx.OREAD, file_only=True)
        try:
            offset = 0
            while data := await self.read_fid(fid, offset, self.conn.iounit):
                offset += len(data)
                yield data
        finally:
            await self.clunk(fid)

    async def read_file(self, path: str) -> bytes:
        return b"".join([c async for c in self.chunks(path)])

    async def read_dir(self, fid: int) -> list[Stat]:
        """Every entry of the directory open on FID, read from its start."""
        out: list[Stat] = []
        offset = 0
        while data := await self.read_fid(fid, offset, self.conn.iounit):
            offset += len(data)
            out.extend(styx.unpack_stats(data))
        return out

    async def listdir(self, path: str) -> list[Stat]:
        fid = await self.open(path, styx.OREAD)
        try:
            return await self.read_dir(fid)
        finally:
            await self.clunk(fid)

    async def write_file(self, path: str, data: bytes, *, perm: int = 0o664) -> None:
        """PATH's contents become DATA (created when missing); durable on return."""
        try:
            fid = await self.open(path, styx.OWRITE | styx.OTRUNC)
        except StyxError as exc:
            if str(exc) != "file does not exist":
                raise
            fid = await self.create(path, perm, styx.OWRITE)
        try:
            await self.write_fid(fid, 0, data)
        finally:
            await self.conn.rpc(Fcall(styx.Tclunk, fid=fid))

    async def mkdir(self, path: str, perm: int = 0o775) -> None:
        fid = await self.create(path, styx.DMDIR | perm, styx.OREAD)
        await self.clunk(fid)

    async def remove(self, path: str) -> None:
        fid = await self.walk(split(path))
        await self.conn.rpc(Fcall(styx.Tremove, fid=fid))

    async def wstat(self, path: str, st: Stat) -> None:
        fid = await self.walk(split(path))
        try:
            await self.conn.rpc(Fcall(styx.Twstat, fid=fid, stat=st))
        finally:
            await self.clunk(fid)


def replica_addr(attrs: Mapping[str, str]) -> str | None:
    """A replicated disk's live replica, from its entry's ATTRS:
    ``replica-addr`` beside a live primary, or ``addr`` itself while the
    replica serves in the primary's place."""
    if attrs.get("serving") == "replica":
        return attrs.get("addr") or None
    return attrs.get("replica-addr") or None


async def connect(
    addr: str,
    *,
    uname: str,
    tls_dir: Path | None = None,
    limit: float = CONNECT_TIMEOUT,
    aname: str = "",
) -> Remote:
    """Dial ADDR (over TLS with TLS_DIR's identity) and attach as UNAME."""
    conn = await Conn.dial(addr, ssl_ctx=client_ssl(tls_dir) if tls_dir else None, limit=limit)
    try:
        return await Remote.attach(conn, uname, aname)
    except BaseException:
        await conn.close()
        raise


async def replication_status(
    addr: str, *, tls_dir: Path | None = None, limit: float = CONNECT_TIMEOUT
) -> dict[str, object]:
    """A chunk server's replication state: its log tree's ``status`` file."""
    r = await connect(addr, uname="log", tls_dir=tls_dir, limit=limit, aname="log")
    try:
        async with asyncio.timeout(limit):
            return dict(json.loads(await r.read_file("status")))
    except TimeoutError:
        raise Gone(f"{addr}: no status in {limit:g}s") from None
    finally:
        await r.conn.close()


__all__ = [
    "Conn",
    "Gone",
    "Remote",
    "StyxError",
    "connect",
    "parse_addr",
    "replica_addr",
    "replication_status",
]
