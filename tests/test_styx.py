"""9P2000 conformance of the chunk server, message by message, over real TCP.

Each test formats a chunk in tmp_path, serves it in-process with
geryon.disk.server.serve on a loopback port, and talks to it through ``Raw``:
a few lines that pack requests with styx.pack and read replies with exact
framing, so a test can also send bytes no client would. What is asserted is
what a 9P client sees: reply types, tags, qids and Plan 9's error strings
(intro(5), walk(5), open(5), read(5), stat(5), remove(5), flush(5)).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import eventually

from geryon.disk import fs, server, styx
from geryon.disk.styx import (
    DMAPPEND,
    DMDIR,
    DMEXCL,
    NOFID,
    NOTAG,
    OEXEC,
    ORCLOSE,
    ORDWR,
    OREAD,
    OTRUNC,
    OWRITE,
    QTAPPEND,
    QTDIR,
    QTEXCL,
    QTFILE,
    Fcall,
    Qid,
    Stat,
)

TIMEOUT = 10.0  # a reply that takes this long means the server is stuck
MSIZE = 8192  # small, so iounit caps are easy to reach
IOUNIT = MSIZE - styx.IOHDRSZ
ROOTFID = 0

# alice owns the disk; erin administers it (member of adm); carol shares the
# group staff with alice; bob is nobody in particular.
USERS = """\
# id:name:leader:members
-1:adm:adm:erin
0:none::
10000:alice:alice:
10001:bob:bob:
10002:carol:carol:
10003:erin:erin:
10004:staff:alice:alice,carol
"""


def _touch(**changes: Any) -> Stat:
    """A Twstat's stat: CHANGES over "don't touch" everywhere else."""
    st = Stat.dont_touch()
    for k, v in changes.items():
        setattr(st, k, v)
    return st


class Raw:
    """One 9P connection spoken by hand: exact framing and nothing else."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.fids = itertools.count(100)
        self.msize = 0

    # -- bytes -----------------------------------------------------------------
    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> Fcall:
        async with asyncio.timeout(TIMEOUT):
            head = await self.reader.readexactly(4)
            size = int.from_bytes(head, "little")
            assert 7 <= size <= server.MSIZE, f"reply size {size}"
            body = await self.reader.readexactly(size - 4)
        return styx.unpack(head + body)

    async def hung_up(self) -> bool:
        """Whether the server closed the connection (EOF, nothing more to read)."""
        async with asyncio.timeout(TIMEOUT):
            try:
                return await self.reader.read(1) == b""
            except ConnectionResetError:
                return True

    def close(self) -> None:
        self.writer.close()

    # -- messages --------------------------------------------------------------
    async def rpc(self, type: int, tag: int | None = None, **fields: Any) -> Fcall:
        if tag is None:
            tag = NOTAG if type == styx.Tversion else 1
        await self.send(styx.pack(Fcall(type, tag, **fields)))
        r = await self.recv()
        assert r.tag == tag, r
        return r

    async def ok(self, type: int, **fields: Any) -> Fcall:
        r = await self.rpc(type, **fields)
        assert r.type == type + 1, r
        return r

    async def err(self, type: int, **fields: Any) -> str:
        r = await self.rpc(type, **fields)
        assert r.type == styx.Rerror, r
        return r.ename

    # -- file operations, each asserting success -------------------------------
    async def version(self, msize: int = MSIZE) -> Fcall:
        r = await self.ok(styx.Tversion, msize=msize, version=styx.VERSION)
        self.msize = r.msize
        return r

    async def attach(self, uname: str, fid: int = ROOTFID) -> Qid:
        r = await self.ok(styx.Tattach, fid=fid, afid=NOFID, uname=uname, aname="")
        return r.qid

    async def walk(self, path: str, fid: int = ROOTFID) -> int:
        newfid = next(self.fids)
        names = [p for p in path.split("/") if p]
        r = await self.ok(styx.Twalk, fid=fid, newfid=newfid, wname=names)
        assert len(r.wqid) == len(names), r
        return newfid

    async def open(self, path: str, mode: int) -> int:
        fid = await self.walk(path)
        await self.ok(styx.Topen, fid=fid, mode=mode)
        return fid

    async def create(self, path: str, perm: int, mode: int = OWRITE) -> tuple[int, Fcall]:
        parent, _, name = path.rpartition("/")
        fid = await self.walk(parent)
        r = await self.ok(styx.Tcreate, fid=fid, name=name, perm=perm, mode=mode)
        return fid, r

    async def mkdir(self, path: str, perm: int = 0o775) -> None:
        fid, _ = await self.create(path, DMDIR | perm, OREAD)
        await self.clunk(fid)

    async def chmod(self, path: str, mode: int) -> None:
        assert (await self.wstat(path, mode=mode)).type == styx.Rwstat

    async def put(self, path: str, data: bytes, perm: int = 0o664) -> None:
        fid, _ = await self.create(path, perm, OWRITE)
        if data:
            assert await self.write(fid, 0, data) == len(data)
        await self.clunk(fid)

    async def get(self, path: str) -> bytes:
        fid = await self.open(path, OREAD)
        out = b""
        while data := await self.read(fid, len(out), IOUNIT):
            out += data
        await self.clunk(fid)
        return out

    async def read(self, fid: int, offset: int, count: int) -> bytes:
        return (await self.ok(styx.Tread, fid=fid, offset=offset, count=count)).data

    async def write(self, fid: int, offset: int, data: bytes) -> int:
        return (await self.ok(styx.Twrite, fid=fid, offset=offset, data=data)).count

    async def clunk(self, fid: int) -> None:
        await self.ok(styx.Tclunk, fid=fid)

    async def stat(self, path: str) -> Stat:
        fid = await self.walk(path)
        st = (await self.ok(styx.Tstat, fid=fid)).stat
        await self.clunk(fid)
        return st

    async def wstat(self, path: str, **changes: Any) -> Fcall:
        """Twstat with CHANGES over a don't-touch stat; the reply, whatever it is."""
        fid = await self.walk(path)
        r = await self.rpc(styx.Twstat, fid=fid, stat=_touch(**changes))
        await self.clunk(fid)
        return r

    async def exists(self, path: str) -> bool:
        names = [p for p in path.split("/") if p]
        newfid = next(self.fids)
        r = await self.rpc(styx.Twalk, fid=ROOTFID, newfid=newfid, wname=names)
        if r.type == styx.Rwalk and len(r.wqid) == len(names):
            await self.clunk(newfid)
            return True
        return False


class Harness:
    """A chunk server running in this event loop, and the connections to it."""

    def __init__(self, chunk: Path) -> None:
        self.chunk = chunk
        self.port = 0
        self.read_only = False
        self.conns: list[Raw] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._stop = asyncio.Event()
        bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(
            server.serve(
                self.chunk,
                "127.0.0.1",
                0,
                read_only=self.read_only,
                ready=bound.set_result,
                stop=self._stop,
            )
        )
        async with asyncio.timeout(TIMEOUT):
            await asyncio.wait({self._task, bound}, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            self._task.result()  # serve failed: say why
        self.port = bound.result()

    async def stop(self) -> None:
        for c in self.conns:
            c.close()
        self.conns.clear()
        if self._task is not None:
            self._stop.set()
            async with asyncio.timeout(TIMEOUT):
                await self._task
            self._task = None

    async def dial(self) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        c = Raw(reader, writer)
        self.conns.append(c)
        return c

    async def session(self, uname: str = "alice", msize: int = MSIZE) -> Raw:
        """A connection past Tversion with the root attached as ROOTFID."""
        c = await self.dial()
        await c.version(msize)
        await c.attach(uname)
        return c

    async def assert_alive(self) -> None:
        """A fresh connection still gets served: the server survived what came before."""
        c = await self.session("bob")
        st = (await c.ok(styx.Tstat, fid=ROOTFID)).stat
        assert st.qid.path == fs.ROOT


@contextlib.asynccontextmanager
async def running(chunk: Path) -> AsyncIterator[Harness]:
    h = Harness(chunk)
    await h.start()
    try:
        yield h
    finally:
        await h.stop()


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[Harness]:
    chunk = tmp_path / "chunk"
    fs.format(chunk, 16 << 20, owner="alice", users_text=USERS)
    async with running(chunk) as h:
        yield h


@pytest.fixture
async def alice(srv: Harness) -> Raw:
    return await srv.session("alice")


# -- version ---------------------------------------------------------------------


async def test_version_negotiates_msize(srv: Harness) -> None:
    c = await srv.dial()
    r = await c.ok(styx.Tversion, msize=MSIZE, version="9P2000")
    assert (r.tag, r.msize, r.version) == (NOTAG, MSIZE, "9P2000")
    # The server answers with at most its own maximum.
    r = await c.ok(styx.Tversion, msize=1 << 30, version="9P2000")
    assert r.msize == server.MSIZE
    # Too small to carry a stat: refused.
    assert "too small" in await c.err(styx.Tversion, msize=64, version="9P2000")


async def test_version_dotted_and_unknown(srv: Harness) -> None:
    c = await srv.dial()
    # version(5): only the part before the period counts; we speak plain 9P2000.
    r = await c.ok(styx.Tversion, msize=MSIZE, version="9P2000.u")
    assert r.version == "9P2000"
    await c.attach("alice")
    # An unknown version is an Rversion "unknown", not an Rerror...
    for v in ("9P1999", "9P20001", "styx", ""):
        r = await c.ok(styx.Tversion, msize=MSIZE, version=v)
        assert r.version == "unknown"
    # ...and leaves the connection without a version, so nothing else is served.
    assert await c.err(styx.Tstat, fid=ROOTFID) == server.ENOVERSION
    await c.version()
    await c.attach("alice")


async def test_version_with_a_stray_tag_is_answered_on_it(srv: Harness) -> None:
    c = await srv.dial()
    r = await c.rpc(styx.Tversion, tag=7, msize=MSIZE, version="9P2000")
    assert (r.type, r.tag) == (styx.Rversion, 7)


async def test_version_resets_fids(alice: Raw) -> None:
    fid = await alice.walk("adm")
    await alice.version()
    # version(5): all fids of the connection are clunked.
    assert await alice.err(styx.Tstat, fid=fid) == server.EUNKNOWNFID
    assert await alice.err(styx.Tstat, fid=ROOTFID) == server.EUNKNOWNFID
    await alice.attach("alice")  # the fid number is free again


async def test_failed_version_leaves_no_session(srv: Harness) -> None:
    c = await srv.session("alice")
    assert "too small" in await c.err(styx.Tversion, msize=16, version="9P2000")
    # Neither the old fids nor the old msize survive a Tversion, even a refused one.
    assert await c.err(styx.Tstat, fid=ROOTFID) == server.ENOVERSION


async def test_messages_before_version_are_refused(srv: Harness) -> None:
    c = await srv.dial()
    assert await c.err(styx.Tattach, fid=0, afid=NOFID, uname="alice", aname="") == (
        server.ENOVERSION
    )
    assert await c.err(styx.Tstat, fid=0) == server.ENOVERSION
    assert await c.err(styx.Tflush, oldtag=3) == server.ENOVERSION
    await c.version()
    await c.attach("alice")


# -- auth and attach -------------------------------------------------------------


async def test_auth_is_refused(srv: Harness) -> None:
    c = await srv.dial()
    await c.version()
    assert await c.err(styx.Tauth, afid=5, uname="alice", aname="") == server.ENOAUTH


async def test_attach(srv: Harness) -> None:
    c = await srv.dial()
    await c.version()
    qid = await c.attach("alice")
    assert qid.type == QTDIR and qid.path == fs.ROOT
    att = {"afid": NOFID, "uname": "alice", "aname": ""}
    assert await c.err(styx.Tattach, **{**att, "fid": 1, "uname": "mallory"}) == (
        "unknown user mallory"
    )
    # attach(5): without authentication the afid must be NOFID.
    assert await c.err(styx.Tattach, **{**att, "fid": 1, "afid": 9}) == server.ENOAUTH
    assert await c.err(styx.Tattach, **{**att, "fid": 1, "aname": "other"}) == server.EATTACH
    assert await c.err(styx.Tattach, **{**att, "fid": ROOTFID}) == server.EDUPFID
    assert await c.err(styx.Tattach, **{**att, "fid": NOFID}) == server.EDUPFID
    # "/" names the one tree too; a second attach as someone else is its own fid.
    await c.ok(styx.Tattach, **{**att, "fid": 1, "aname": "/", "uname": "bob"})
    assert await c.attach("none", fid=2) == qid


# -- walk ------------------------------------------------------------------------


async def test_walk_clone_and_steps(alice: Raw) -> None:
    await alice.mkdir("a")
    await alice.mkdir("a/b")
    await alice.put("a/b/c", b"data")
    # nwname 0: newfid is a clone of fid and no qids come back.
    r = await alice.ok(styx.Twalk, fid=ROOTFID, newfid=1, wname=[])
    assert r.wqid == []
    assert (await alice.ok(styx.Tstat, fid=1)).stat.qid.path == fs.ROOT
    # Several steps at once: one qid per name, in order.
    r = await alice.ok(styx.Twalk, fid=ROOTFID, newfid=2, wname=["a", "b", "c"])
    types = [q.type for q in r.wqid]
    assert types == [QTDIR, QTDIR, QTFILE]
    st = (await alice.ok(styx.Tstat, fid=2)).stat
    assert st.qid == r.wqid[-1] and st.name == "c"
    assert (await alice.stat("a")).qid == r.wqid[0]
    # A file's fid can be cloned but not walked from.
    await alice.ok(styx.Twalk, fid=2, newfid=3, wname=[])
    assert await alice.err(styx.Twalk, fid=2, newfid=4, wname=["x"]) == fs.ENOTDIR


async def test_partial_walk(alice: Raw) -> None:
    await alice.mkdir("a")
    await alice.mkdir("a/b")
    r = await alice.ok(styx.Twalk, fid=ROOTFID, newfid=1, wname=["a", "b", "nope", "x"])
    # walk(5): the qids of the steps that worked, and newfid is not made.
    assert len(r.wqid) == 2
    assert await alice.err(styx.Tstat, fid=1) == server.EUNKNOWNFID
    # With newfid == fid a partial walk leaves fid where it was.
    await alice.ok(styx.Twalk, fid=ROOTFID, newfid=5, wname=[])
    r = await alice.ok(styx.Twalk, fid=5, newfid=5, wname=["a", "nope"])
    assert len(r.wqid) == 1
    assert (await alice.ok(styx.Tstat, fid=5)).stat.qid.path == fs.ROOT
    # A failure at the first name is an Rerror, not an empty Rwalk.
    assert await alice.err(styx.Twalk, fid=ROOTFID, newfid=1, wname=["nope"]) == fs.ENONEXIST
    assert await alice.err(styx.Tstat, fid=1) == server.EUNKNOWNFID


async def test_walk_dotdot(alice: Raw) -> None:
    await alice.mkdir("a")
    await alice.mkdir("a/b")
    root = (await alice.ok(styx.Tstat, fid=ROOTFID)).stat.qid
    a = (await alice.stat("a")).qid
    b = (await alice.stat("a/b")).qid
    # ".." in the root is the root: a walk cannot climb out of the tree.
    r = await alice.ok(styx.Twalk, fid=ROOTFID, newfid=1, wname=["..", "..", "a"])
    assert r.wqid == [root, root, a]
    r = await alice.ok(styx.Twalk, fid=ROOTFID, newfid=2, wname=["a", "b", "..", "..", ".."])
    assert r.wqid == [a, b, a, root, root]
    assert (await alice.ok(styx.Tstat, fid=2)).stat.qid == root
    # ".." from a walked-to directory goes to its parent.
    bfid = await alice.walk("a/b")
    r = await alice.ok(styx.Twalk, fid=bfid, newfid=3, wname=[".."])
    assert r.wqid == [a]
    # "." is not a name in 9P (walk(5)): no file is called that.
    assert await alice.err(styx.Twalk, fid=ROOTFID, newfid=4, wname=["."]) == fs.ENONEXIST


async def test_walk_refusals(alice: Raw) -> None:
    await alice.mkdir("a")
    # An open fid cannot be walked (walk(5)), not even cloned.
    fid = await alice.open("a", OREAD)
    assert await alice.err(styx.Twalk, fid=fid, newfid=1, wname=[]) == server.EWALKOPEN
    # At most MAXWELEM names; exactly 16 is fine.
    r = await alice.ok(styx.Twalk, fid=ROOTFID, newfid=1, wname=[".."] * 16)
    assert len(r.wqid) == 16
    assert await alice.err(styx.Twalk, fid=ROOTFID, newfid=2, wname=[".."] * 17)
    assert await alice.err(styx.Tstat, fid=2) == server.EUNKNOWNFID
    # newfid must not be in use (unless it is fid itself).
    assert await alice.err(styx.Twalk, fid=ROOTFID, newfid=1, wname=["a"]) == server.EDUPFID
    assert await alice.err(styx.Twalk, fid=ROOTFID, newfid=NOFID, wname=[]) == server.EDUPFID
    assert await alice.err(styx.Twalk, fid=77, newfid=78, wname=[]) == server.EUNKNOWNFID
    # fid == newfid moves the fid itself.
    await alice.ok(styx.Twalk, fid=1, newfid=1, wname=["a"])
    assert (await alice.ok(styx.Tstat, fid=1)).stat.name == "a"


# -- open ------------------------------------------------------------------------


async def test_open_modes(alice: Raw) -> None:
    await alice.put("f", b"hello")
    st = await alice.stat("f")
    fid = await alice.walk("f")
    r = await alice.ok(styx.Topen, fid=fid, mode=OREAD)
    assert r.qid == st.qid and r.iounit == IOUNIT
    assert await alice.read(fid, 0, 100) == b"hello"
    assert await alice.err(styx.Twrite, fid=fid, offset=0, data=b"x") == fs.ENOTOPEN

    fid = await alice.open("f", OWRITE)
    assert await alice.write(fid, 0, b"J") == 1
    assert await alice.err(styx.Tread, fid=fid, offset=0, count=10) == fs.ENOTOPEN

    fid = await alice.open("f", ORDWR)
    assert await alice.write(fid, 4, b"y") == 1
    assert await alice.read(fid, 0, 100) == b"Jelly"

    # OEXEC needs x, and then reads (Plan 9 lets an executing client read).
    fid = await alice.walk("f")
    assert await alice.err(styx.Topen, fid=fid, mode=OEXEC) == fs.EPERM
    assert (await alice.wstat("f", mode=0o755)).type == styx.Rwstat
    fid = await alice.open("f", OEXEC)
    assert await alice.read(fid, 0, 100) == b"Jelly"
    assert await alice.err(styx.Twrite, fid=fid, offset=0, data=b"x") == fs.ENOTOPEN

    # A fid not opened at all can do no I/O.
    fid = await alice.walk("f")
    assert await alice.err(styx.Tread, fid=fid, offset=0, count=1) == fs.ENOTOPEN
    assert await alice.err(styx.Twrite, fid=fid, offset=0, data=b"x") == fs.ENOTOPEN
    # Bits open(5) does not define are refused.
    assert await alice.err(styx.Topen, fid=fid, mode=0x80) == fs.EBADMODE
    assert await alice.err(styx.Topen, fid=fid, mode=0x04) == fs.EBADMODE


async def test_open_twice_and_unknown(alice: Raw) -> None:
    await alice.put("f", b"")
    fid = await alice.open("f", OREAD)
    assert await alice.err(styx.Topen, fid=fid, mode=OREAD) == server.EOPEN
    assert await alice.err(styx.Tcreate, fid=fid, name="g", perm=0o644, mode=OREAD) == (
        server.EOPEN
    )
    assert await alice.err(styx.Topen, fid=55, mode=OREAD) == server.EUNKNOWNFID


async def test_open_trunc(alice: Raw) -> None:
    await alice.put("f", b"some bytes")
    before = await alice.stat("f")
    fid = await alice.open("f", OWRITE | OTRUNC)
    after = await alice.stat("f")
    assert after.length == 0 and after.qid.vers > before.qid.vers
    await alice.clunk(fid)
    # An append-only file is not truncated (open(5)), though the open succeeds.
    fid, _ = await alice.create("log", DMAPPEND | 0o644, OWRITE)
    await alice.write(fid, 0, b"kept")
    await alice.clunk(fid)
    fid = await alice.open("log", OWRITE | OTRUNC)
    assert (await alice.stat("log")).length == 4
    # OTRUNC needs write permission even with OREAD.
    await alice.put("ro", b"x", perm=0o444)
    rofid = await alice.walk("ro")
    assert await alice.err(styx.Topen, fid=rofid, mode=OREAD | OTRUNC) == fs.EPERM


async def test_open_rclose(srv: Harness, alice: Raw) -> None:
    await alice.put("tmp", b"x")
    fid = await alice.open("tmp", OREAD | ORCLOSE)
    assert await alice.exists("tmp")
    await alice.clunk(fid)
    assert not await alice.exists("tmp")
    # ORCLOSE needs permission to remove: write in the parent directory.
    await alice.mkdir("mine", 0o755)
    await alice.put("mine/f", b"x", perm=0o666)
    bob = await srv.session("bob")
    fid = await bob.walk("mine/f")
    assert await bob.err(styx.Topen, fid=fid, mode=OREAD | ORCLOSE) == fs.EPERM
    # A Tversion clunks the fids, so ORCLOSE files go with it.
    await alice.open("mine/f", OREAD | ORCLOSE)
    await alice.version()
    await alice.attach("alice")
    assert not await alice.exists("mine/f")


async def test_rclose_file_goes_when_the_client_hangs_up(srv: Harness, alice: Raw) -> None:
    await alice.put("tmp", b"x")
    other = await srv.session("alice")
    await other.open("tmp", OREAD | ORCLOSE)
    other.close()

    # The server clunks a closed connection's fids on its own time: poll.
    async def gone() -> bool:
        return not await alice.exists("tmp")

    await eventually(gone, timeout=TIMEOUT)


async def test_open_directory(alice: Raw) -> None:
    await alice.mkdir("d")
    fid = await alice.walk("d")
    # open(5): a directory cannot be written, truncated or removed on close.
    for mode in (OWRITE, ORDWR, OREAD | OTRUNC, OREAD | ORCLOSE):
        assert await alice.err(styx.Topen, fid=fid, mode=mode) == fs.EISDIR
    r = await alice.ok(styx.Topen, fid=fid, mode=OREAD)
    assert r.qid.type == QTDIR


async def test_exclusive_use(srv: Harness, alice: Raw) -> None:
    fid, r = await alice.create("lock", DMEXCL | 0o666, ORDWR)
    assert r.qid.type == QTEXCL
    # stat(5): an exclusive file is open by one fid at a time, across connections.
    bob = await srv.session("bob")
    bfid = await bob.walk("lock")
    assert await bob.err(styx.Topen, fid=bfid, mode=OREAD) == fs.EINUSE
    await alice.clunk(fid)
    await bob.ok(styx.Topen, fid=bfid, mode=OREAD)
    assert await alice.err(styx.Topen, fid=await alice.walk("lock"), mode=OREAD) == fs.EINUSE


# -- create ----------------------------------------------------------------------


async def test_create_file_and_directory(alice: Raw) -> None:
    fid, r = await alice.create("f", 0o644, ORDWR)
    assert r.qid.type == QTFILE and r.iounit == IOUNIT
    # The fid now is the new file, open as asked.
    assert await alice.write(fid, 0, b"abc") == 3
    assert await alice.read(fid, 0, 10) == b"abc"
    assert await alice.err(styx.Twalk, fid=fid, newfid=1, wname=[]) == server.EWALKOPEN
    await alice.clunk(fid)
    st = await alice.stat("f")
    assert (st.qid.path, st.mode, st.uid, st.gid, st.muid) == (
        r.qid.path, 0o644, "alice", "alice", "alice"
    )  # fmt: skip

    fid, r = await alice.create("d", DMDIR | 0o755, OREAD)
    assert r.qid.type == QTDIR
    assert await alice.read(fid, 0, IOUNIT) == b""  # open for reading: empty
    await alice.clunk(fid)
    assert (await alice.stat("d")).mode == DMDIR | 0o755
    # A directory is created open for reading only.
    dfid = await alice.walk("")
    assert await alice.err(styx.Tcreate, fid=dfid, name="e", perm=DMDIR | 0o755, mode=OWRITE) == (
        fs.EISDIR
    )
    assert not await alice.exists("e")
    # The qid path is new for every file, even after a remove (never reused).
    fid = await alice.walk("f")
    await alice.ok(styx.Tremove, fid=fid)
    _, again = await alice.create("f", 0o644)
    assert again.qid.path > r.qid.path


async def test_create_perm_is_masked_by_the_directory(alice: Raw) -> None:
    await alice.mkdir("d", 0o750)
    assert (await alice.stat("d")).mode == DMDIR | 0o750  # root is 0775: 0750 kept
    # open(5): perm & (~0666 | (dir.perm & 0666)) for files, 0777 for directories.
    _, r = await alice.create("d/f", 0o777)
    assert (await alice.stat("d/f")).mode == 0o777 & (~0o666 | 0o750 & 0o666)  # 0o751
    await alice.mkdir("d/sub", 0o777)
    assert (await alice.stat("d/sub")).mode == DMDIR | 0o750
    _, r = await alice.create("d/log", DMAPPEND | 0o666)
    assert r.qid.type == QTAPPEND
    assert (await alice.stat("d/log")).mode == DMAPPEND | 0o640
    # The group is the directory's, the owner whoever created it.
    assert (await alice.wstat("d", gid="staff")).type == styx.Rwstat
    await alice.put("d/g", b"")
    st = await alice.stat("d/g")
    assert (st.uid, st.gid) == ("alice", "staff")


async def test_create_refusals(srv: Harness, alice: Raw) -> None:
    await alice.put("f", b"")
    for name in (".", "..", "a/b", "", "nul\0"):
        fid = await alice.walk("")
        ename = await alice.err(styx.Tcreate, fid=fid, name=name, perm=0o644, mode=OWRITE)
        assert ename == fs.ENAME, name
    fid = await alice.walk("")
    assert await alice.err(styx.Tcreate, fid=fid, name="f", perm=0o644, mode=OWRITE) == fs.EEXIST
    assert await alice.err(styx.Tcreate, fid=fid, name="adm", perm=DMDIR | 0o755, mode=OREAD) == (
        fs.EEXIST
    )
    ffid = await alice.walk("f")
    assert await alice.err(styx.Tcreate, fid=ffid, name="g", perm=0o644, mode=OWRITE) == (
        fs.ENOTDIR
    )
    # Creating needs write permission in the directory (root is alice's 0775).
    bob = await srv.session("bob")
    bfid = await bob.walk("")
    assert await bob.err(styx.Tcreate, fid=bfid, name="g", perm=0o644, mode=OWRITE) == fs.EPERM
    assert await alice.err(styx.Tcreate, fid=99, name="g", perm=0o644, mode=OWRITE) == (
        server.EUNKNOWNFID
    )


# -- read ------------------------------------------------------------------------


async def test_read_file(alice: Raw) -> None:
    data = bytes(range(256)) * 100  # 25600 bytes: more than one iounit
    fid, _ = await alice.create("f", 0o644, ORDWR)
    for off in range(0, len(data), IOUNIT):
        piece = data[off : off + IOUNIT]
        assert await alice.write(fid, off, piece) == len(piece)
    assert await alice.read(fid, 0, 5) == data[:5]
    assert await alice.read(fid, 1000, 17) == data[1000:1017]
    assert await alice.read(fid, len(data) - 3, 100) == data[-3:]
    # read(5): at or past the end, zero bytes.
    assert await alice.read(fid, len(data), 100) == b""
    assert await alice.read(fid, len(data) + 12345, 100) == b""
    assert await alice.read(fid, (1 << 64) - 1, 100) == b""
    assert await alice.read(fid, 0, 0) == b""
    # A count beyond the iounit gets at most the iounit (the reply fits msize).
    assert await alice.read(fid, 0, 1 << 30) == data[:IOUNIT]
    assert await alice.get("f") == data


async def _dir_read_all(c: Raw, fid: int, count: int) -> tuple[list[bytes], str]:
    """Read a directory to its end COUNT bytes at a time: the replies, and the
    Rerror that stopped it (if one did)."""
    replies: list[bytes] = []
    off = 0
    while True:
        r = await c.rpc(styx.Tread, fid=fid, offset=off, count=count)
        if r.type == styx.Rerror:
            return replies, r.ename
        assert r.type == styx.Rread
        if not r.data:
            return replies, ""
        replies.append(r.data)
        off += len(r.data)


async def test_read_directory_at_every_count(alice: Raw) -> None:
    await alice.mkdir("d")
    # Names of varied lengths so entries differ in size and boundaries fall
    # everywhere.
    names = [("x" * (i * 5 % 13 + 1)) + str(i) for i in range(12)]
    for n in names:
        await alice.put(f"d/{n}", b"")
    fid = await alice.open("d", OREAD)
    whole = await alice.read(fid, 0, IOUNIT)
    stats = styx.unpack_stats(whole)
    assert sorted(s.name for s in stats) == sorted(names)
    sizes = [len(styx.pack_stat(s)) for s in stats]
    assert len(set(sizes)) > 3
    for count in range(1, len(whole) + 2):
        replies, ename = await _dir_read_all(alice, fid, count)
        for data in replies:
            # read(5): whole entries only, never more than asked.
            assert len(data) <= count
            styx.unpack_stats(data)
        assert ename == "", (count, ename)
        if count >= max(sizes):
            assert b"".join(replies) == whole, count
        else:
            # Some entry does not fit: no bytes (kfs, lib9p), never a torn entry.
            assert whole.startswith(b"".join(replies))


async def test_read_directory_the_way_linux_v9fs_does(alice: Raw) -> None:
    """v9fs (9p2000) fills a buffer of msize-IOHDRSZ bytes: after a short
    reply it asks at the new offset for what is left of the buffer, which is
    less than the next entry; only a zero-byte reply ends that round. An
    Rerror there would fail getdents, and with it `ls` of a big directory."""
    await alice.mkdir("d")
    names = [f"file-{i:04d}-" + "n" * (i % 40) for i in range(300)]
    for n in names:
        fid, _ = await alice.create(f"d/{n}", 0o644, OWRITE)
        await alice.clunk(fid)
    fid = await alice.open("d", OREAD)
    got: list[str] = []
    pos = 0
    while True:  # v9fs_dir_readdir
        buf = b""
        while len(buf) < IOUNIT:  # p9_client_read
            r = await alice.rpc(styx.Tread, fid=fid, offset=pos + len(buf), count=IOUNIT - len(buf))
            assert r.type == styx.Rread, r
            if not r.data:
                break
            buf += r.data
        if not buf:
            break
        got += [st.name for st in styx.unpack_stats(buf)]
        pos += len(buf)
    assert got == sorted(names)


async def test_read_directory_offsets(alice: Raw) -> None:
    await alice.mkdir("d")
    for n in ("a", "b", "c"):
        await alice.put(f"d/{n}", b"")
    fid = await alice.open("d", OREAD)
    whole = await alice.read(fid, 0, IOUNIT)
    one = len(styx.pack_stat(styx.unpack_stats(whole)[0]))
    first = await alice.read(fid, 0, one)
    assert first == whole[:one]
    # read(5): only 0 or where the last read ended.
    for bad in (one + 1, one - 1, 5, len(whole)):
        assert await alice.err(styx.Tread, fid=fid, offset=bad, count=IOUNIT) == (server.EBADDIROFF)
    # A refused offset leaves the position where it was.
    assert await alice.read(fid, one, IOUNIT) == whole[one:]
    assert await alice.read(fid, len(whole), IOUNIT) == b""
    # Offset 0 rewinds, and takes a fresh listing.
    await alice.put("d/e", b"")
    again = await alice.read(fid, 0, IOUNIT)
    assert [s.name for s in styx.unpack_stats(again)] == ["a", "b", "c", "e"]
    # The entries are the files' stats.
    e = styx.unpack_stats(again)[-1]
    st = await alice.stat("d/e")
    assert (e.qid, e.mode, e.uid, e.length) == (st.qid, st.mode, st.uid, st.length)


async def test_read_empty_directory_and_root(alice: Raw) -> None:
    await alice.mkdir("empty")
    fid = await alice.open("empty", OREAD)
    assert await alice.read(fid, 0, IOUNIT) == b""
    assert await alice.read(fid, 0, IOUNIT) == b""
    root = await alice.open("", OREAD)
    entries = styx.unpack_stats(await alice.read(root, 0, IOUNIT))
    # The root is its own parent in the tree but never its own entry.
    assert [s.name for s in entries] == ["adm", "empty"]


# -- write -----------------------------------------------------------------------


async def test_write_offsets_and_holes(alice: Raw) -> None:
    fid, _ = await alice.create("f", 0o644, ORDWR)
    assert await alice.write(fid, 0, b"hello") == 5
    assert await alice.write(fid, 1, b"EL") == 2
    assert await alice.read(fid, 0, 100) == b"hELlo"
    # A write past the end leaves a hole that reads as zeros, across block
    # boundaries.
    far = 3 * fs.BLOCK + 100
    assert await alice.write(fid, far, b"end") == 3
    assert (await alice.ok(styx.Tstat, fid=fid)).stat.length == far + 3
    await alice.clunk(fid)
    data = await alice.get("f")
    assert data == b"hELlo" + bytes(far - 5) + b"end"
    # A write into the hole fills just its bytes.
    fid = await alice.open("f", OWRITE)
    await alice.write(fid, fs.BLOCK - 2, b"spans")
    await alice.clunk(fid)
    data = await alice.get("f")
    assert data[fs.BLOCK - 3 : fs.BLOCK + 4] == b"\0spans\0"
    assert len(data) == far + 3


async def test_write_bumps_qid_version(alice: Raw) -> None:
    fid, r = await alice.create("f", 0o644, ORDWR)
    vers = [r.qid.vers]
    for i in range(3):
        await alice.write(fid, i, b"x")
        vers.append((await alice.ok(styx.Tstat, fid=fid)).stat.qid.vers)
    assert vers == sorted(set(vers)), vers
    # An empty write changes nothing.
    assert await alice.write(fid, 0, b"") == 0
    assert (await alice.ok(styx.Tstat, fid=fid)).stat.qid.vers == vers[-1]


async def test_write_append_only(alice: Raw) -> None:
    fid, _ = await alice.create("log", DMAPPEND | 0o644, ORDWR)
    await alice.write(fid, 0, b"ab")
    await alice.write(fid, 0, b"cd")
    await alice.write(fid, 1000, b"ef")
    # read(5): an append-only file takes each write at its end, whatever the offset.
    assert await alice.read(fid, 0, 100) == b"abcdef"
    # Another fid appends after this one's writes.
    other = await alice.open("log", OWRITE)
    await alice.write(other, 0, b"gh")
    assert await alice.read(fid, 0, 100) == b"abcdefgh"


async def test_write_largest(alice: Raw) -> None:
    # A Twrite with iounit bytes is as large as a message can carry.
    fid, _ = await alice.create("f", 0o644, ORDWR)
    data = bytes(IOUNIT)
    assert len(styx.pack(Fcall(styx.Twrite, 1, fid=fid, offset=0, data=data))) <= MSIZE
    assert await alice.write(fid, 0, data) == IOUNIT


# -- clunk and remove ------------------------------------------------------------


async def test_clunk(alice: Raw) -> None:
    fid = await alice.walk("adm")
    await alice.clunk(fid)
    assert await alice.err(styx.Tclunk, fid=fid) == server.EUNKNOWNFID
    assert await alice.err(styx.Tstat, fid=fid) == server.EUNKNOWNFID
    assert await alice.err(styx.Tclunk, fid=12345) == server.EUNKNOWNFID
    # The root fid is an ordinary fid: clunked, it is gone.
    await alice.clunk(ROOTFID)
    assert await alice.err(styx.Tstat, fid=ROOTFID) == server.EUNKNOWNFID


async def test_remove(srv: Harness, alice: Raw) -> None:
    await alice.mkdir("d")
    await alice.put("d/f", b"data")
    held = await alice.walk("d/f")
    fid = await alice.walk("d/f")
    await alice.ok(styx.Tremove, fid=fid)
    assert not await alice.exists("d/f")
    assert await alice.err(styx.Tstat, fid=fid) == server.EUNKNOWNFID
    # Another fid on the removed file finds it gone.
    assert await alice.err(styx.Tstat, fid=held) == fs.ENONEXIST
    # An empty directory can go.
    await alice.mkdir("e")
    await alice.ok(styx.Tremove, fid=await alice.walk("e"))
    assert not await alice.exists("e")


async def test_remove_refused_still_clunks(srv: Harness, alice: Raw) -> None:
    await alice.mkdir("d")
    await alice.put("d/f", b"")
    # remove(5): the fid is clunked even when the remove fails.
    fid = await alice.walk("d")
    assert await alice.err(styx.Tremove, fid=fid) == fs.ENOTEMPTY
    assert await alice.err(styx.Tstat, fid=fid) == server.EUNKNOWNFID
    assert await alice.exists("d/f")
    # The root cannot be removed; the root fid is clunked all the same.
    assert await alice.err(styx.Tremove, fid=ROOTFID) == fs.EPERM
    assert await alice.err(styx.Tstat, fid=ROOTFID) == server.EUNKNOWNFID
    # Removing needs write permission in the parent, not on the file.
    await alice.attach("alice")
    await alice.put("d/g", b"", perm=0o666)
    bob = await srv.session("bob")
    bfid = await bob.walk("d/g")
    assert await bob.err(styx.Tremove, fid=bfid) == fs.EPERM
    assert await bob.err(styx.Tclunk, fid=bfid) == server.EUNKNOWNFID
    assert await alice.exists("d/g")
    assert await alice.err(styx.Tremove, fid=4242) == server.EUNKNOWNFID


# -- stat and wstat --------------------------------------------------------------


async def test_stat(alice: Raw) -> None:
    st = (await alice.ok(styx.Tstat, fid=ROOTFID)).stat
    assert (st.name, st.mode, st.uid, st.gid, st.length, st.qid.path) == (
        "/", DMDIR | 0o775, "alice", "alice", 0, fs.ROOT
    )  # fmt: skip
    users = await alice.stat("adm/users")
    assert (users.uid, users.gid, users.mode, users.length) == (
        "alice", "adm", 0o664, len(USERS.encode())
    )  # fmt: skip
    assert await alice.err(styx.Tstat, fid=999) == server.EUNKNOWNFID


async def test_wstat_rename(alice: Raw) -> None:
    await alice.put("a", b"A")
    await alice.put("b", b"B")
    path = (await alice.stat("a")).qid.path
    assert (await alice.wstat("a", name="c")).type == styx.Rwstat
    assert not await alice.exists("a")
    st = await alice.stat("c")
    assert (st.name, st.qid.path) == ("c", path)
    assert await alice.get("c") == b"A"
    # stat(5): renaming onto an existing name is an error, and changes nothing.
    r = await alice.wstat("c", name="b")
    assert (r.type, r.ename) == (styx.Rerror, fs.EEXIST)
    assert await alice.get("b") == b"B" and await alice.get("c") == b"A"
    for bad in ("x/y", ".", ".."):
        assert (await alice.wstat("c", name=bad)).ename == fs.ENAME
    # The root has no name to change.
    r = await alice.rpc(styx.Twstat, fid=ROOTFID, stat=_touch(name="top"))
    assert (r.type, r.ename) == (styx.Rerror, fs.EPERM)


async def test_wstat_length(alice: Raw) -> None:
    await alice.put("f", b"0123456789")
    assert (await alice.wstat("f", length=4)).type == styx.Rwstat
    assert await alice.get("f") == b"0123"
    # Growing reads as zeros past the old end, not as the bytes cut off.
    assert (await alice.wstat("f", length=8)).type == styx.Rwstat
    assert await alice.get("f") == b"0123\0\0\0\0"
    assert (await alice.wstat("f", length=0)).type == styx.Rwstat
    assert await alice.get("f") == b""
    # A directory's length is 0 and stays so.
    await alice.mkdir("d")
    assert (await alice.wstat("d", length=1)).ename == fs.EISDIR
    assert (await alice.wstat("d", length=0)).type == styx.Rwstat


async def test_wstat_mode(srv: Harness, alice: Raw) -> None:
    await alice.put("f", b"x", perm=0o666)
    assert (await alice.wstat("f", mode=0o600)).type == styx.Rwstat
    st = await alice.stat("f")
    assert st.mode == 0o600
    # Write permission is not enough: only the owner (or group leader) may chmod.
    assert (await alice.wstat("f", mode=0o666)).type == styx.Rwstat
    bob = await srv.session("bob")
    assert (await bob.wstat("f", mode=0o777)).ename == fs.EPERM
    assert (await bob.wstat("f", mtime=5)).ename == fs.EPERM
    # The directory bit is not the wstat's to change, either way.
    assert "directory bit" in (await alice.wstat("f", mode=DMDIR | 0o666)).ename
    await alice.mkdir("d")
    assert "directory bit" in (await alice.wstat("d", mode=0o775)).ename
    assert (await alice.wstat("d", mode=DMDIR | 0o700)).type == styx.Rwstat
    assert (await alice.stat("d")).mode == DMDIR | 0o700
    # The owner may set mtime.
    assert (await alice.wstat("f", mtime=12345)).type == styx.Rwstat
    assert (await alice.stat("f")).mtime == 12345


async def test_wstat_owner_group_and_the_rest(alice: Raw) -> None:
    await alice.put("f", b"x")
    # stat(5): the owner cannot be changed, nor the qid.
    assert "owner" in (await alice.wstat("f", uid="bob")).ename
    st = await alice.stat("f")
    # muid and atime are the server's: a value for them is ignored, as kfs
    # does -- Linux's v9fs renames with muid=uname and touches with an atime.
    assert (await alice.wstat("f", muid="bob", atime=1)).type == styx.Rwstat
    after = await alice.stat("f")
    assert (after.muid, after.atime, after.qid) == (st.muid, st.atime, st.qid)
    assert "qid" in (await alice.wstat("f", qid=Qid(0xFF, 0xFFFFFFFF, st.qid.path + 1))).ename
    # Naming the current values is not a change.
    same = await alice.wstat("f", uid="alice", muid="alice", name="f", qid=st.qid)
    assert same.type == styx.Rwstat
    # The group: to one the owner is a member of, not to another.
    assert (await alice.wstat("f", gid="staff")).type == styx.Rwstat
    assert (await alice.stat("f")).gid == "staff"
    assert (await alice.wstat("f", gid="bob")).ename == fs.EPERM
    assert (await alice.wstat("f", gid="nobody")).ename == "unknown group nobody"


async def test_wstat_as_linux_v9fs_sends_it(srv: Harness, alice: Raw) -> None:
    """v9fs (9p2000): mv is a wstat of the name with muid=uname; touch sets
    atime and mtime together. Both must work on a file another user wrote."""
    await alice.mkdir("pub")
    await alice.chmod("pub", DMDIR | 0o777)
    bob = await srv.session("bob")
    await bob.put("pub/f", b"bob's", perm=0o666)
    fid = await alice.open("pub/f", OWRITE)
    await alice.write(fid, 0, b"ALICE")
    await alice.clunk(fid)
    assert (await bob.stat("pub/f")).muid == "alice"
    assert (await bob.wstat("pub/f", name="g", muid="bob")).type == styx.Rwstat
    assert (await bob.wstat("pub/g", atime=1000, mtime=2000)).type == styx.Rwstat
    st = await bob.stat("pub/g")
    assert (st.name, st.mtime, st.muid) == ("g", 2000, "alice")


async def test_wstat_all_or_nothing(srv: Harness, alice: Raw) -> None:
    await alice.mkdir("pub")
    await alice.chmod("pub", DMDIR | 0o777)  # a new directory is masked by the root's 0775
    await alice.put("pub/f", b"x", perm=0o666)
    bob = await srv.session("bob")
    # bob may rename (write in the directory) but not chmod: neither happens.
    r = await bob.wstat("pub/f", name="g", mode=0o600)
    assert (r.type, r.ename) == (styx.Rerror, fs.EPERM)
    st = await alice.stat("pub/f")
    assert (st.name, st.mode) == ("f", 0o666)
    # With the owner's rights, rename, chmod and truncate are one change.
    r = await alice.wstat("pub/f", name="g", mode=0o600, length=0)
    assert r.type == styx.Rwstat
    st = await alice.stat("pub/g")
    assert (st.name, st.mode, st.length) == ("g", 0o600, 0)


async def test_wstat_dont_touch_is_sync(srv: Harness, alice: Raw) -> None:
    await alice.put("f", b"x")
    before = await alice.stat("f")
    assert (await alice.wstat("f")).type == styx.Rwstat
    assert await alice.stat("f") == before
    # Even someone who may change nothing can ask for durability.
    bob = await srv.session("bob")
    assert (await bob.wstat("f")).type == styx.Rwstat
    none = await srv.session("none")
    assert (await none.wstat("f")).type == styx.Rwstat


# -- flush -----------------------------------------------------------------------


async def test_flush(alice: Raw) -> None:
    # flush(5): Rflush echoes the Tflush's tag, known oldtag or not.
    r = await alice.rpc(styx.Tflush, tag=9, oldtag=3)
    assert (r.type, r.tag) == (styx.Rflush, 9)
    r = await alice.rpc(styx.Tflush, tag=9, oldtag=NOTAG)
    assert (r.type, r.tag) == (styx.Rflush, 9)


async def test_flush_after_a_request_in_flight(alice: Raw) -> None:
    await alice.put("f", b"payload")
    fid = await alice.open("f", OREAD)
    # Both sent before either answer: the old request's reply, if any, comes
    # before the Rflush (flush(5)), and the tag is then free.
    await alice.send(
        styx.pack(Fcall(styx.Tread, 5, fid=fid, offset=0, count=100))
        + styx.pack(Fcall(styx.Tflush, 6, oldtag=5))
    )
    first, second = await alice.recv(), await alice.recv()
    assert (first.type, first.tag, first.data) == (styx.Rread, 5, b"payload")
    assert (second.type, second.tag) == (styx.Rflush, 6)
    r = await alice.rpc(styx.Tread, tag=5, fid=fid, offset=1, count=3)
    assert (r.type, r.data) == (styx.Rread, b"ayl")


async def test_pipelined_requests_are_answered_in_order(alice: Raw) -> None:
    await alice.put("f", b"0123456789")
    fid = await alice.open("f", OREAD)
    await alice.send(
        b"".join(
            styx.pack(Fcall(styx.Tread, 10 + i, fid=fid, offset=i, count=1)) for i in range(10)
        )
    )
    replies = [await alice.recv() for _ in range(10)]
    assert [(r.tag, r.data) for r in replies] == [(10 + i, b"%d" % i) for i in range(10)]


# -- permissions -----------------------------------------------------------------


async def test_other_user_cannot_write_owners_file(srv: Harness, alice: Raw) -> None:
    await alice.put("f", b"mine", perm=0o644)
    bob = await srv.session("bob")
    fid = await bob.walk("f")
    for mode in (OWRITE, ORDWR, OREAD | OTRUNC):
        assert await bob.err(styx.Topen, fid=fid, mode=mode) == fs.EPERM
    assert await bob.get("f") == b"mine"  # "other" may read
    assert (await bob.wstat("f", length=0)).ename == fs.EPERM
    assert await alice.get("f") == b"mine"


async def test_private_directory(srv: Harness, alice: Raw) -> None:
    await alice.mkdir("private", 0o700)
    await alice.put("private/secret", b"s")
    bob = await srv.session("bob")
    # The directory itself can be reached (x on the root)...
    r = await bob.ok(styx.Twalk, fid=ROOTFID, newfid=1, wname=["private", "secret"])
    # ...but not searched: the walk stops at it, and newfid is not made.
    assert len(r.wqid) == 1
    assert await bob.err(styx.Tstat, fid=1) == server.EUNKNOWNFID
    pfid = await bob.walk("private")
    assert await bob.err(styx.Twalk, fid=pfid, newfid=2, wname=["secret"]) == fs.EPERM
    assert await bob.err(styx.Topen, fid=pfid, mode=OREAD) == fs.EPERM
    assert await alice.get("private/secret") == b"s"


async def test_group_bits(srv: Harness, alice: Raw) -> None:
    await alice.mkdir("shared", 0o775)
    assert (await alice.wstat("shared", gid="staff")).type == styx.Rwstat
    await alice.put("shared/doc", b"v1", perm=0o660)
    assert (await alice.stat("shared/doc")).gid == "staff"
    # carol is in staff: the group bits let her read and write.
    carol = await srv.session("carol")
    fid = await carol.open("shared/doc", ORDWR)
    await carol.write(fid, 0, b"v2")
    await carol.clunk(fid)
    assert (await alice.stat("shared/doc")).muid == "carol"
    # bob is not, and "other" grants nothing.
    bob = await srv.session("bob")
    bfid = await bob.walk("shared/doc")
    assert await bob.err(styx.Topen, fid=bfid, mode=OREAD) == fs.EPERM
    # Group write on the directory lets carol create there; bob may not.
    assert (await alice.wstat("shared", mode=DMDIR | 0o770)).type == styx.Rwstat
    await carol.put("shared/new", b"")
    dfid = await bob.walk("shared")
    assert await bob.err(styx.Tcreate, fid=dfid, name="x", perm=0o644, mode=OWRITE) == fs.EPERM


async def test_none_gets_only_other_bits(srv: Harness, alice: Raw) -> None:
    await alice.mkdir("pub")
    await alice.chmod("pub", DMDIR | 0o777)
    await alice.put("pub/readable", b"r", perm=0o604)
    await alice.put("pub/grouped", b"g", perm=0o660)
    none = await srv.session("none")
    assert await none.get("pub/readable") == b"r"
    fid = await none.walk("pub/readable")
    assert await none.err(styx.Topen, fid=fid, mode=OWRITE) == fs.EPERM
    # none is a member of no group, not even one named in a file's gid.
    gfid = await none.walk("pub/grouped")
    assert await none.err(styx.Topen, fid=gfid, mode=OREAD) == fs.EPERM
    # Not even its own files' owner bits: a 0600 file none made is closed to it.
    nfid, _ = await none.create("pub/mine", 0o600, OWRITE)
    await none.clunk(nfid)
    assert (await alice.stat("pub/mine")).uid == "none"
    mfid = await none.walk("pub/mine")
    assert await none.err(styx.Topen, fid=mfid, mode=OREAD) == fs.EPERM
    assert (await none.wstat("pub/mine", mode=0o666)).ename == fs.EPERM


# -- malformed and oversized messages ----------------------------------------------


def _frame(type: int, tag: int, body: bytes) -> bytes:
    return struct.pack("<IBH", 7 + len(body), type, tag) + body


async def test_oversized_message(srv: Harness, alice: Raw) -> None:
    fid, _ = await alice.create("f", 0o644, ORDWR)
    big = styx.pack(Fcall(styx.Twrite, 4, fid=fid, offset=0, data=bytes(MSIZE)))
    assert len(big) > MSIZE
    await alice.send(big)
    r = await alice.recv()
    assert (r.type, r.tag, r.ename) == (styx.Rerror, 4, server.ETOOBIG)
    # The session goes on, the oversized write undone.
    assert await alice.write(fid, 0, b"ok") == 2
    assert await alice.read(fid, 0, 100) == b"ok"
    await srv.assert_alive()


@pytest.mark.parametrize(
    ("name", "frame", "want"),
    [
        ("bad type", _frame(99, 3, b"\0" * 8), "unknown message type 99"),
        ("Terror", _frame(styx.Terror, 3, b""), "unknown message type 106"),
        ("type 255", _frame(255, 3, b""), "unknown message type 255"),
        ("truncated", _frame(styx.Tattach, 3, b"\0\0\0\0\xff\xff"), "too short"),
        ("trailing", _frame(styx.Tclunk, 3, b"\0\0\0\0extra"), "longer than its fields"),
        ("string too long", _frame(styx.Tauth, 3, b"\xff\xff\xff\xff\xff\x7f"), "too short"),
        (
            "not utf-8",
            _frame(styx.Tattach, 3, b"\1\0\0\0\xff\xff\xff\xff\2\0\xff\xfe\0\0"),
            "not UTF-8",
        ),
        ("no fields", _frame(styx.Twalk, 3, b""), "too short"),
        ("bad stat", _frame(styx.Twstat, 3, b"\0\0\0\0\3\0\1\0\0"), ""),
        ("R-message", styx.pack(Fcall(styx.Rclunk, 3)), server.EBOTCH),
        ("Rversion", styx.pack(Fcall(styx.Rversion, 3, msize=MSIZE, version="9P2000")), ""),
    ],
)
async def test_garbage_in_a_frame(
    srv: Harness, alice: Raw, name: str, frame: bytes, want: str
) -> None:
    # A well-framed message that is not a request: Rerror on its tag, and the
    # session (a good frame can be skipped) goes on.
    await alice.send(frame)
    r = await alice.recv()
    assert (r.type, r.tag) == (styx.Rerror, 3), name
    assert r.ename.startswith(server.EBOTCH) and want in r.ename, r.ename
    assert (await alice.ok(styx.Tstat, fid=ROOTFID)).stat.qid.path == fs.ROOT
    await srv.assert_alive()


@pytest.mark.parametrize(
    "head",
    [
        struct.pack("<I", 0),
        struct.pack("<I", 3),
        struct.pack("<I", 6) + b"\x64\0",
        struct.pack("<I", 0xFFFFFFFF),
        struct.pack("<I", server.MAX_FRAME + 1) + b"\x76\1\0",
    ],
    ids=["size 0", "size 3", "size 6", "size 4G", "past MAX_FRAME"],
)
async def test_unframeable_size_hangs_up(srv: Harness, alice: Raw, head: bytes) -> None:
    # A size word no frame can have: the stream cannot be resynchronised, so
    # the server says why on NOTAG and hangs up.
    await alice.send(head)
    r = await alice.recv()
    assert (r.type, r.tag, r.ename) == (styx.Rerror, NOTAG, server.EBOTCH)
    assert await alice.hung_up()
    await srv.assert_alive()


async def test_unframeable_size_before_version(srv: Harness) -> None:
    c = await srv.dial()
    await c.send(b"\1\0\0\0")
    r = await c.recv()
    assert (r.type, r.tag) == (styx.Rerror, NOTAG)
    assert await c.hung_up()
    await srv.assert_alive()


async def test_client_hangs_up_mid_frame(srv: Harness) -> None:
    for partial in (b"\x20", b"\x20\0\0\0\x6e\1", styx.pack(Fcall(styx.Tclunk, 1, fid=0))[:-1]):
        c = await srv.session("alice")
        await c.send(partial)
        c.writer.write_eof()
        assert await c.hung_up()
    await srv.assert_alive()


async def test_random_garbage_never_kills_the_server(srv: Harness) -> None:
    # Deterministic noise: whatever the server makes of it, it answers with
    # well-formed replies and lives on.
    seed = 12345
    for _ in range(20):
        c = await srv.session("alice")
        noise = bytearray()
        for _ in range(64):
            seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
            noise.append(seed >> 16 & 0xFF)
        # A plausible size word in front, so the noise is read as a body.
        await c.send(struct.pack("<I", 4 + len(noise)) + bytes(noise))
        r = await c.recv()
        assert r.type in (styx.Rerror, *range(styx.Rversion, styx.Rwstat + 1, 2)), r
        c.close()
    await srv.assert_alive()


# -- capacity --------------------------------------------------------------------


async def test_fill_the_disk(tmp_path: Path) -> None:
    chunk = tmp_path / "small"
    fs.format(chunk, 512 * 1024, owner="alice", users_text=USERS)
    msize = 64 * 1024
    async with running(chunk) as h:
        c = await h.session("alice", msize=msize)
        written: dict[str, bytes] = {}
        full = ""
        for i in range(100):
            name = f"f{i}"
            data = bytes([i + 1]) * (10_000 + i * 7919 % 40_000)  # < iounit
            dfid = await c.walk("")
            r = await c.rpc(styx.Tcreate, fid=dfid, name=name, perm=0o644, mode=OWRITE)
            if r.type == styx.Rerror:
                full = r.ename
                break
            r = await c.rpc(styx.Twrite, fid=dfid, offset=0, data=data)
            await c.clunk(dfid)
            if r.type == styx.Rerror:
                full = r.ename
                # The failed write was undone whole: the file is there, empty.
                assert (await c.stat(name)).length == 0
                break
            written[name] = data
        assert full == fs.EFULL
        assert len(written) >= 5
        # Everything written before reads back intact.
        for name, data in written.items():
            assert await c.get(name) == data
        # Other requests that need no space still work on a full disk.
        assert (await c.wstat("f0", mode=0o600)).type == styx.Rwstat
        # Removing a file frees its space for the next write.
        biggest = max(written, key=lambda n: len(written[n]))
        await c.ok(styx.Tremove, fid=await c.walk(biggest))
        await c.put("after", b"z" * 20_000)
        assert await c.get("after") == b"z" * 20_000
    # Stopped, the tree checks clean and the chunk kept its size.
    disk = fs.Disk(chunk)
    try:
        assert disk.check() == []
        assert disk.usage().used <= 512 * 1024
    finally:
        disk.close()
    assert chunk.stat().st_size <= 512 * 1024


# -- /adm/users ------------------------------------------------------------------


async def _write_users(c: Raw, text: str) -> Fcall:
    """Rewrite /adm/users; the clunk's reply (where a bad table is refused)."""
    fid = await c.open("adm/users", OWRITE | OTRUNC)
    assert await c.write(fid, 0, text.encode()) == len(text.encode())
    return await c.rpc(styx.Tclunk, fid=fid)


async def test_bad_users_file_keeps_the_old_table(srv: Harness, alice: Raw) -> None:
    bad = USERS + "10010:dave:dave:\nthis is not a users line\n"
    r = await _write_users(alice, bad)
    assert r.type == styx.Rerror
    line = f"line {len(bad.splitlines())}:"
    assert "/adm/users" in r.ename and line in r.ename and "old table" in r.ename, r.ename
    # The table in force is the old one: dave is unknown, bob still known.
    c = await srv.dial()
    await c.version()
    r = await c.rpc(styx.Tattach, fid=0, afid=NOFID, uname="dave", aname="")
    assert (r.type, r.ename) == (styx.Rerror, "unknown user dave")
    await c.attach("bob", fid=1)
    # The bad text was written, so it can be read back and fixed.
    assert await alice.get("adm/users") == bad.encode()
    assert (await _write_users(alice, USERS)).type == styx.Rclunk


async def test_bad_users_file_still_lets_the_owner_in_after_a_restart(
    srv: Harness, alice: Raw
) -> None:
    assert (await _write_users(alice, "garbage\n")).type == styx.Rerror
    await srv.stop()
    await srv.start()
    # The disk opens with the default table (as fossil does), so its owner can
    # attach and repair the file; users only the bad file named cannot.
    c = await srv.session("alice")
    assert await c.get("adm/users") == b"garbage\n"
    d = await srv.dial()
    await d.version()
    assert await d.err(styx.Tattach, fid=0, afid=NOFID, uname="bob", aname="") == (
        "unknown user bob"
    )
    assert (await _write_users(c, USERS)).type == styx.Rclunk
    await d.attach("bob")


async def test_good_users_file_takes_effect_at_once(srv: Harness, alice: Raw) -> None:
    bob = await srv.session("bob")
    r = await _write_users(alice, USERS.replace("10001:bob:bob:\n", "") + "10010:dave:dave:\n")
    assert r.type == styx.Rclunk
    dave = await srv.session("dave")
    assert (await dave.ok(styx.Tstat, fid=ROOTFID)).stat.qid.path == fs.ROOT
    # bob is gone from the table: refused at attach (his open session stays).
    c = await srv.dial()
    await c.version()
    assert await c.err(styx.Tattach, fid=0, afid=NOFID, uname="bob", aname="") == (
        "unknown user bob"
    )
    assert (await bob.ok(styx.Tstat, fid=ROOTFID)).type == styx.Rstat


async def test_group_changes_in_users_file_apply_to_open_sessions(srv: Harness, alice: Raw) -> None:
    await alice.put("doc", b"d", perm=0o640)
    assert (await alice.wstat("doc", gid="staff")).type == styx.Rwstat
    bob = await srv.session("bob")
    fid = await bob.walk("doc")
    assert await bob.err(styx.Topen, fid=fid, mode=OREAD) == fs.EPERM
    r = await _write_users(alice, USERS.replace("alice,carol", "alice,bob,carol"))
    assert r.type == styx.Rclunk
    await bob.ok(styx.Topen, fid=fid, mode=OREAD)


async def test_only_owner_or_adm_writes_users_file(srv: Harness) -> None:
    for who in ("bob", "carol", "none"):
        c = await srv.session(who)
        fid = await c.walk("adm/users")
        assert await c.err(styx.Topen, fid=fid, mode=OWRITE) == fs.EPERM, who
        assert await c.get("adm/users") == USERS.encode()  # readable by all
    # erin is in adm (the file's group): she may.
    erin = await srv.session("erin")
    assert (await _write_users(erin, USERS + "10010:dave:dave:\n")).type == styx.Rclunk
    await srv.session("dave")


# -- rules that hold after open ----------------------------------------------------


async def test_permissions_are_checked_at_open_only(srv: Harness, alice: Raw) -> None:
    await alice.mkdir("pub")
    await alice.chmod("pub", DMDIR | 0o777)
    await alice.put("pub/f", b"old", perm=0o666)
    bob = await srv.session("bob")
    wfid = await bob.open("pub/f", ORDWR)
    await bob.put("pub/tmp", b"", perm=0o666)
    tfid = await bob.open("pub/tmp", OREAD | ORCLOSE)
    # open(5): later permission changes do not affect what an open fid may do.
    await alice.chmod("pub/f", 0o600)
    await alice.chmod("pub", DMDIR | 0o755)
    assert await bob.write(wfid, 0, b"new") == 3
    assert await bob.read(wfid, 0, 10) == b"new"
    # ...including removing an ORCLOSE file when it is clunked.
    await bob.clunk(tfid)
    assert not await alice.exists("pub/tmp")


async def test_exclusive_use_follows_the_fid_not_its_mode(alice: Raw) -> None:
    fid, _ = await alice.create("lock", DMEXCL | 0o644, ORDWR)
    # The fid that holds the file changes its mode: clunking must still let go.
    r = await alice.rpc(styx.Twstat, fid=fid, stat=_touch(mode=0o644))
    assert r.type == styx.Rwstat
    await alice.clunk(fid)
    await alice.chmod("lock", DMEXCL | 0o644)
    fid = await alice.open("lock", OREAD)
    # And an open fid that makes a file exclusive does not free someone else's hold.
    await alice.put("other", b"")
    ofid = await alice.open("other", OREAD)
    await alice.chmod("other", DMEXCL | 0o644)
    held = await alice.open("other", OREAD)  # opened after it became exclusive
    await alice.clunk(ofid)
    assert await alice.err(styx.Topen, fid=await alice.walk("other"), mode=OREAD) == fs.EINUSE
    await alice.clunk(held)
    await alice.clunk(fid)


async def test_clunk_error_still_frees_the_fid(alice: Raw) -> None:
    fid = await alice.open("adm/users", OWRITE | OTRUNC)
    await alice.write(fid, 0, b"bad\n")
    r = await alice.rpc(styx.Tclunk, fid=fid)
    assert r.type == styx.Rerror
    # clunk(5): even when it returns an error, the fid is no longer valid.
    assert await alice.err(styx.Tclunk, fid=fid) == server.EUNKNOWNFID


async def test_group_leader_rights(srv: Harness, alice: Raw) -> None:
    await alice.mkdir("shared")
    await alice.chmod("shared", DMDIR | 0o775)
    assert (await alice.wstat("shared", gid="staff")).type == styx.Rwstat
    await alice.chmod("shared", DMDIR | 0o775)
    carol = await srv.session("carol")
    await carol.put("shared/c", b"", perm=0o664)
    assert (await alice.stat("shared/c")).uid == "carol"
    # stat(5): the leader of the file's group (alice leads staff) may chmod it
    # and move it to another group she leads; bob may do neither.
    assert (await alice.wstat("shared/c", mode=0o640)).type == styx.Rwstat
    assert (await alice.wstat("shared/c", mtime=77)).type == styx.Rwstat
    bob = await srv.session("bob")
    assert (await bob.wstat("shared/c", mode=0o666)).ename == fs.EPERM
    assert (await alice.wstat("shared/c", gid="alice")).type == styx.Rwstat
    # carol, owner but not a member of bob's group, cannot give it to bob.
    assert (await carol.wstat("shared/c", gid="bob")).ename == fs.EPERM


async def test_walk_through_a_file_stops_there(alice: Raw) -> None:
    await alice.mkdir("a")
    await alice.put("a/f", b"")
    r = await alice.ok(styx.Twalk, fid=ROOTFID, newfid=1, wname=["a", "f", "x"])
    assert [q.type for q in r.wqid] == [QTDIR, QTFILE]
    assert await alice.err(styx.Tstat, fid=1) == server.EUNKNOWNFID


async def test_fids_of_removed_files(alice: Raw) -> None:
    await alice.mkdir("d")
    await alice.put("d/f", b"x")
    dfid = await alice.walk("d")
    ffid = await alice.open("d/f", ORDWR)
    await alice.ok(styx.Tremove, fid=await alice.walk("d/f"))
    await alice.ok(styx.Tremove, fid=await alice.walk("d"))
    # Every use of a fid whose file is gone says so, none crashes.
    assert await alice.err(styx.Tread, fid=ffid, offset=0, count=1) == fs.ENONEXIST
    assert await alice.err(styx.Twrite, fid=ffid, offset=0, data=b"y") == fs.ENONEXIST
    assert await alice.err(styx.Twalk, fid=dfid, newfid=9, wname=["f"]) == fs.ENONEXIST
    assert await alice.err(styx.Tcreate, fid=dfid, name="g", perm=0o644, mode=OWRITE) == (
        fs.ENONEXIST
    )
    assert await alice.err(styx.Tremove, fid=dfid) == fs.ENONEXIST
    await alice.clunk(ffid)


async def test_huge_offsets_and_lengths(alice: Raw) -> None:
    fid, _ = await alice.create("f", 0o644, ORDWR)
    assert await alice.err(styx.Twrite, fid=fid, offset=(1 << 64) - 1, data=b"x") == (
        "file too large"
    )
    assert (await alice.wstat("f", length=1 << 63)).ename == "file too large"
    assert (await alice.stat("f")).length == 0


@pytest.mark.parametrize(
    "msg",
    [
        Fcall(styx.Twalk, fid=42, newfid=43, wname=[]),
        Fcall(styx.Topen, fid=42, mode=OREAD),
        Fcall(styx.Tcreate, fid=42, name="x", perm=0o644, mode=OWRITE),
        Fcall(styx.Tread, fid=42, offset=0, count=1),
        Fcall(styx.Twrite, fid=42, offset=0, data=b"x"),
        Fcall(styx.Tclunk, fid=42),
        Fcall(styx.Tremove, fid=42),
        Fcall(styx.Tstat, fid=42),
        Fcall(styx.Twstat, fid=42, stat=Stat.dont_touch()),
    ],
    ids=lambda f: styx.NAMES[f.type],
)
async def test_unknown_fid(alice: Raw, msg: Fcall) -> None:
    await alice.send(styx.pack(msg))
    r = await alice.recv()
    assert (r.type, r.ename) == (styx.Rerror, server.EUNKNOWNFID)


async def test_read_only_server(tmp_path: Path) -> None:
    chunk = tmp_path / "chunk"
    fs.format(chunk, 1 << 20, owner="alice", users_text=USERS)
    async with running(chunk) as h:
        c = await h.session("alice")
        await c.put("f", b"kept")
    h = Harness(chunk)
    h.read_only = True
    await h.start()
    try:
        c = await h.session("alice")
        assert await c.get("f") == b"kept"
        fid = await c.walk("f")
        assert await c.err(styx.Topen, fid=fid, mode=OWRITE) == fs.ERDONLY
        dfid = await c.walk("")
        assert await c.err(styx.Tcreate, fid=dfid, name="g", perm=0o644, mode=OREAD) == (fs.ERDONLY)
        assert (await c.wstat("f", mode=0o600)).ename == fs.ERDONLY
        assert await c.err(styx.Tremove, fid=await c.walk("f")) == fs.ERDONLY
        assert (await c.wstat("f")).type == styx.Rwstat  # a sync has nothing to do
    finally:
        await h.stop()


async def test_random_requests(srv: Harness, alice: Raw) -> None:
    # Well-framed requests with fields drawn from edges and small pools, on one
    # connection: each gets exactly one reply on its tag, of the right type or
    # Rerror, never an i/o error; the tree checks clean afterwards.
    rnd = random.Random(20240601)
    names = ["a", "b", "..", "adm", "users", "x" * 300, "", "."]
    nums = [0, 1, 2, 3, 100, 101, NOFID, 0xFFFF, 1 << 31]
    offsets = [0, 1, 5, fs.BLOCK - 1, fs.BLOCK, 1 << 40, (1 << 62) - 1, (1 << 64) - 1]
    await alice.mkdir("a")
    await alice.put("a/b", b"bee")

    def stat() -> Stat:
        st = Stat.dont_touch()
        for _ in range(rnd.randrange(3)):
            field, value = rnd.choice(
                [
                    ("name", rnd.choice(names)),
                    ("length", rnd.choice(offsets)),
                    ("mode", rnd.choice([0o644, 0o777, DMDIR | 0o755, DMEXCL | 0o600, 0])),
                    ("gid", rnd.choice(["staff", "bob", "nobody"])),
                    ("mtime", rnd.randrange(1 << 32)),
                ]
            )
            setattr(st, field, value)
        return st

    def request() -> Fcall:
        fid, newfid = rnd.choice(nums[:6]), rnd.choice(nums)
        return rnd.choice(
            [
                lambda: Fcall(styx.Tattach, fid=fid, afid=NOFID, uname="alice", aname=""),
                lambda: Fcall(
                    styx.Twalk, fid=fid, newfid=newfid, wname=rnd.choices(names, k=rnd.randrange(4))
                ),
                lambda: Fcall(styx.Topen, fid=fid, mode=rnd.choice([0, 1, 2, 3, 0x10, 0x40, 0x52])),
                lambda: Fcall(
                    styx.Tcreate,
                    fid=fid,
                    name=rnd.choice(names),
                    perm=rnd.choice([0o644, DMDIR | 0o755, DMAPPEND | 0o600, 0xFFFFFFFF]),
                    mode=rnd.choice([0, 1, 2, 0x40]),
                ),
                lambda: Fcall(
                    styx.Tread, fid=fid, offset=rnd.choice(offsets), count=rnd.choice(nums)
                ),
                lambda: Fcall(
                    styx.Twrite, fid=fid, offset=rnd.choice(offsets), data=b"w" * rnd.randrange(9)
                ),
                lambda: Fcall(styx.Tclunk, fid=fid),
                lambda: Fcall(styx.Tremove, fid=fid),
                lambda: Fcall(styx.Tstat, fid=fid),
                lambda: Fcall(styx.Twstat, fid=fid, stat=stat()),
                lambda: Fcall(styx.Tflush, oldtag=rnd.randrange(1 << 16)),
            ]
        )()

    for i in range(1500):
        f = request()
        f.tag = i % 0xFFFF
        await alice.send(styx.pack(f))
        r = await alice.recv()
        assert r.tag == f.tag and r.type in (f.type + 1, styx.Rerror), (f, r)
        if r.type == styx.Rerror:
            assert not r.ename.startswith("i/o error"), (f, r)
    await srv.assert_alive()
    await srv.stop()
    disk = fs.Disk(srv.chunk)
    try:
        assert disk.check() == []
    finally:
        disk.close()


async def test_client_walk_past_sixteen_names_leaks_no_fid(srv: Harness, alice: Raw) -> None:
    """geryon.disk.client walks long paths 16 names a message: when a later
    message fails at its first name, the fid the earlier ones made is clunked."""
    from geryon.disk import client as styx_client

    deep = "/".join(f"d{i}" for i in range(16))
    for i in range(1, 17):
        await alice.mkdir("/".join(f"d{j}" for j in range(i)))
    r = await styx_client.connect(f"tcp!127.0.0.1!{srv.port}", uname="alice")
    try:
        leaked = r.conn.fid() + 1  # the fid the walk below will use
        with pytest.raises(styx_client.StyxError, match="file does not exist"):
            await r.walk([*deep.split("/"), "missing"])
        with pytest.raises(styx_client.StyxError, match=server.EUNKNOWNFID):
            await r.conn.rpc(Fcall(styx.Tclunk, fid=leaked))
    finally:
        await r.conn.close()
