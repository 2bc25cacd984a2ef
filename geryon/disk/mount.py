"""`geryon mount`: a disk name as a FUSE file system that follows its entry.

Inferno's rmnt mounted a disk name's address once; when the chunk server
moved (a restart on a new port, a failover to a replica) the mount was dead
and someone had to notice. Here the mount process keeps a registry watch on
the name's entry and a 9P2000 connection to whatever ``addr`` it says now,
and ordinary programs (ls, cat, cp, mv, rm, find, editors) use the disk
through the kernel's FUSE, never knowing the server moved.

How it is kept, and why:

- Inodes are qid paths: the disk never reuses one, so an inode number names
  one file for the mount's whole life, across reconnections. Each known
  inode keeps its name and parent (its path) and, lazily, a walked fid on
  the current connection; a fid from an older connection is simply dead.
- An open file is an opened fid, clunked on release (the clunk is where the
  server makes writes durable); after a reconnection it is opened again by
  path on its next use, without OTRUNC.
- Every FUSE call waits for a live connection at most ``wait`` seconds, then
  fails with EIO: a mount whose disk is gone answers, it never hangs.
- The connection follows the entry by a registry watch, not a poll: a
  failover is one event, acted on the moment it is written, and a thousand
  idle mounts cost the registry nothing. The watch rides out registry
  restarts itself (geryon.client.Watch); meanwhile the last known addr is
  used.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import grp
import itertools
import logging
import os
import pwd
import shutil
import ssl
import stat as statmod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from geryon import errors
from geryon.client import Backoff, Client
from geryon.disk import fs, styx
from geryon.disk.client import (
    CONNECT_TIMEOUT,
    Conn,
    Gone,
    Remote,
    StyxError,
    client_ssl,
    replica_addr,
)
from geryon.disk.styx import DMDIR, ORDWR, OREAD, OTRUNC, OWRITE, Fcall, Stat
from geryon.model import EventType, Service

try:
    import pyfuse3
    import pyfuse3.asyncio
except ImportError:  # FUSE is optional: fuse_unavailable() says why
    pyfuse3 = None  # type: ignore[assignment]

log = logging.getLogger("geryon.mount")

T = TypeVar("T")

ROOT_INODE = 1  # pyfuse3.ROOT_INODE, and the root's qid path on a geryon disk
# The kernel trusts names and attributes this long: other clients change the
# disk too, so not long; but long enough that `ls -l` and find, which stat
# what readdir just described, do not ask again per file.
ATTR_TIMEOUT = 1.0
BLKSIZE = 128 * 1024  # FUSE's largest write: cp sizes its buffer by this
STATFS_BLOCK = 4096
MIN_ATTEMPT = 1.0  # a request started just before its call's deadline still gets this
PROMOTION_RETRY_S = 0.05  # asking a just-promoted primary again (see DiskFS._run)
CHUNK_ATTRS_TTL = 5.0  # how long the chunk entry's size/used are reused by statfs

# The server's error strings (geryon.disk.fs, Plan 9's own) as errnos.
ERRNO = {
    fs.ENONEXIST: errno.ENOENT,
    fs.EPERM: errno.EACCES,
    fs.EEXIST: errno.EEXIST,
    fs.ENOTDIR: errno.ENOTDIR,
    fs.EISDIR: errno.EISDIR,
    fs.ENOTEMPTY: errno.ENOTEMPTY,
    fs.EFULL: errno.ENOSPC,
    fs.ERDONLY: errno.EROFS,
    fs.ENAME: errno.EINVAL,
    fs.EINUSE: errno.EBUSY,
    "file too large": errno.EFBIG,
}


def errno_of(ename: str) -> int:
    """The errno for a 9P error string; EIO for any the table does not know."""
    if ename.startswith("wstat -- attempt to change"):  # owner, atime, qid...
        return errno.EPERM
    if ename.startswith(fs.EREPLICA):  # a replica until promoted: says whose
        return errno.EROFS
    return ERRNO.get(ename, errno.EIO)


def fuse_unavailable() -> str | None:
    """Why FUSE cannot be used here (None: it can)."""
    if pyfuse3 is None:
        return "pyfuse3 missing"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 missing"
    return None


class MountError(Exception):
    """Why a mount could not be made: one line for the user."""


def usable_addr(entry: Service | None, *, replica: bool = False) -> str | None:
    """Where ENTRY says its disk is, if it is usable (as geryon.resolve judges
    it: status=down, or no addr, is unusable); with REPLICA, its replica."""
    if entry is None or entry.attrs.get("status") == "down":
        return None
    if replica:
        return replica_addr(entry.attrs)
    return entry.attrs.get("addr") or None


def _fuse_error(code: int) -> Exception:
    return pyfuse3.FUSEError(code)


# ---- the connection, following the entry ------------------------------------


class Link:
    """The 9P connection a mount uses now, kept pointed at its entry's addr.

    ``gen`` counts connections: a fid is good only on the connection
    (generation) it was made on. ``get`` waits for a live one until a
    deadline; ``lost`` says one failed, and the keeper dials the entry's
    current addr again, with backoff, until it answers.
    """

    def __init__(
        self,
        name: str,
        client: Client,
        *,
        uname: str,
        ssl_ctx: ssl.SSLContext | None,
        wait: float,
        replica: bool = False,
    ) -> None:
        self.name = name
        self.replica = replica
        self.client = client
        self.uname = uname
        self.ssl_ctx = ssl_ctx
        self.wait = wait
        self.entry: Service | None = None
        self.addr: str | None = None  # where the entry says the disk is
        self.remote: Remote | None = None
        self.remote_addr: str | None = None
        self.gen = 0
        self.live = asyncio.Event()
        self._kick = asyncio.Event()  # the addr changed, or the connection was lost
        self._tasks: list[asyncio.Task[None]] = []
        self._closers: set[asyncio.Task[None]] = set()  # old connections being closed
        self._closing = False
        self._chunk_attrs: tuple[float, str, dict[str, str]] | None = None

    async def first(self, entry: Service) -> None:
        """The first connection, made before the mount: its failure is the user's error."""
        self.entry = entry
        self.addr = usable_addr(entry, replica=self.replica)
        if self.addr is None:
            what = "no live replica" if self.replica else "no usable addr"
            raise MountError(f"{self.name} has {what}")
        try:
            remote = await self._dial(self.addr)
        except Gone as exc:
            raise MountError(f"{self.name}: {exc}") from None
        except StyxError as exc:
            raise MountError(f"{self.name}: {self.addr}: attach as {self.uname}: {exc}") from None
        self._adopt(remote, self.addr)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._keep(), name=f"mount {self.name}: connection"),
            asyncio.create_task(self._follow(), name=f"mount {self.name}: watch"),
        ]

    async def close(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._closers, return_exceptions=True)
        if self.remote is not None:
            await self.remote.conn.close()
            self.remote = None
        self.live.clear()

    async def get(self, deadline: float) -> tuple[Remote, int]:
        """The live connection and its generation; EIO if none by DEADLINE."""
        loop = asyncio.get_running_loop()
        while self.remote is None:
            left = deadline - loop.time()
            if left <= 0 or self._closing:
                raise _fuse_error(errno.EIO)
            try:
                async with asyncio.timeout(left):
                    await self.live.wait()
            except TimeoutError:
                raise _fuse_error(errno.EIO) from None
        return self.remote, self.gen

    def lost(self, remote: Remote, why: str) -> None:
        """REMOTE failed (or stopped answering): stop using it and dial again."""
        if self.remote is not remote or self._closing:
            return
        log.warning("%s: %s: %s; reconnecting", self.name, self.remote_addr, why)
        self._drop()

    def _drop(self) -> None:
        remote, self.remote, self.remote_addr = self.remote, None, None
        self.live.clear()
        self._kick.set()
        if remote is not None:
            t = asyncio.create_task(remote.conn.close())
            self._closers.add(t)  # held: a task nobody holds may be collected
            t.add_done_callback(self._closers.discard)

    async def _dial(self, addr: str) -> Remote:
        conn = await Conn.dial(
            addr, ssl_ctx=self.ssl_ctx, limit=min(CONNECT_TIMEOUT, max(self.wait, 1.0))
        )
        try:
            return await Remote.attach(conn, self.uname)
        except BaseException:
            await conn.close()
            raise

    def _adopt(self, remote: Remote, addr: str) -> None:
        self.remote, self.remote_addr = remote, addr
        self.gen += 1
        self.live.set()
        # The server hanging up is noticed at once, not at the next call.
        remote.conn.on_close(lambda why: self.lost(remote, str(why)))

    async def _keep(self) -> None:
        """Dial the entry's addr whenever there is no live connection to it."""
        backoff = Backoff(0.05, 1.0)
        said = ""  # the last failure logged: a dead server is one line, not one a second
        while True:
            self._kick.clear()
            delay: float | None = None
            if self.remote is not None and self.remote_addr != self.addr:
                log.info("%s: leaving %s", self.name, self.remote_addr)
                self._drop()
                self._kick.clear()
            if self.remote is None and self.addr is not None:
                addr = self.addr
                try:
                    remote = await self._dial(addr)
                except Exception as exc:  # whatever it was, this task must go on
                    msg = str(exc) if isinstance(exc, Gone) else f"{addr}: {exc}"
                    if msg != said:
                        log.warning("%s: %s; retrying", self.name, msg)
                        said = msg
                    delay = backoff.next()
                else:
                    said = ""
                    if addr == self.addr:
                        log.info("%s: connected to %s (connection %d)", self.name, addr,
                                 self.gen + 1)  # fmt: skip
                        self._adopt(remote, addr)
                        backoff.reset()
                    else:  # the entry moved while we dialed
                        await remote.conn.close()
                        continue
            # Until something changes, or it is time to dial again.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._kick.wait()

    async def _follow(self) -> None:
        """Keep ``entry`` and ``addr`` as the registry has them (a watch on the name)."""
        while True:
            watch = self.client.watch(prefix=self.name, snapshot=True)
            try:
                async for m in watch:
                    if m.kind == "snapshot":
                        self._set_entry(next((s for s in m.services if s.name == self.name), None))
                    elif m.kind == "events":
                        for e in m.events:
                            if e.service.name == self.name:
                                gone = e.type is EventType.DELETE
                                self._set_entry(None if gone else e.service)
            except Exception as exc:
                # Not one the watch rides out itself (a refusal): say so, try
                # again; the last known addr stays in use meanwhile.
                log.warning("%s: registry watch: %s; again in 5s", self.name, exc)
                await asyncio.sleep(5)
            finally:
                await watch.close()

    def _set_entry(self, entry: Service | None) -> None:
        self.entry = entry
        addr = usable_addr(entry, replica=self.replica)
        if addr != self.addr:
            why = "deleted" if entry is None else "down" if addr is None else f"at {addr}"
            log.info("%s: the entry says %s", self.name, why)
            self.addr = addr
            self._kick.set()

    async def usage(self) -> tuple[int, int] | None:
        """(size, used) in bytes: the entry's attributes, else its chunk's entry's."""
        attrs = dict(self.entry.attrs) if self.entry is not None else {}
        if "size" not in attrs and self.addr:
            loop = asyncio.get_running_loop()
            cached = self._chunk_attrs
            if (
                cached is None
                or cached[1] != self.addr
                or loop.time() - cached[0] > CHUNK_ATTRS_TTL
            ):
                chunk: dict[str, str] = {}
                with contextlib.suppress(errors.GeryonError, TimeoutError):
                    async with asyncio.timeout(min(self.wait, 2.0)):
                        chunk = dict((await self.client.get(self.addr)).attrs)
                cached = self._chunk_attrs = (loop.time(), self.addr, chunk)
            attrs = cached[2]
        try:
            return int(attrs["size"]), int(attrs.get("used", "0") or 0)
        except (KeyError, ValueError):
            return None


# ---- the file system ----------------------------------------------------------


@dataclass(slots=True)
class Node:
    """A file the kernel knows: where it is (for walking again) and its fid."""

    ino: int
    parent: int | None  # None once removed
    name: str
    is_dir: bool
    lookups: int = 0
    fid: int | None = None
    gen: int = -1  # the connection FID belongs to


@dataclass(slots=True)
class Handle:
    """An open file (an opened fid) or directory (a listing)."""

    ino: int
    mode: int  # the 9P open mode a reopen asks for (never OTRUNC)
    fid: int | None = None
    gen: int = -1
    writes: int = 0  # writes so far, and how many of them a sync covered
    synced: int = 0
    listing: list[Stat] | None = None


@dataclass(slots=True)
class _Attempt:
    sent: bool = False  # whether a request that changes the disk went out


_Base: Any = pyfuse3.Operations if pyfuse3 is not None else object


def _op(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Any failure but a FUSEError is a bug: log it and answer EIO, because an
    exception escaping a handler would end pyfuse3's main loop."""

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> T:
        try:
            return await fn(*args)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise _fuse_error(errno.EIO) from None

    return wrapper


class DiskFS(_Base):
    """pyfuse3's operations on one disk, through a Link."""

    def __init__(self, link: Link, root_qid_path: int = ROOT_INODE) -> None:
        super().__init__()
        # Not ``self.link``: that name is pyfuse3's link(2) handler, and an
        # attribute there makes `ln` kill the FUSE worker (the mount hangs).
        self.conn_link = link
        self.root_qid = root_qid_path
        self.nodes: dict[int, Node] = {ROOT_INODE: Node(ROOT_INODE, None, "", True, lookups=1)}
        self.handles: dict[int, Handle] = {}
        self._fhs = itertools.count(1)
        self._uids: dict[str, int] = {}
        self._gids: dict[str, int] = {}
        self._background: set[asyncio.Task[None]] = set()

    # -- helpers -------------------------------------------------------------

    def _ino(self, qid_path: int) -> int:
        # The root must be inode 1; a server whose root has another qid path
        # swaps the two numbers.
        if qid_path == self.root_qid:
            return ROOT_INODE
        if qid_path == ROOT_INODE:
            return self.root_qid
        return qid_path

    def _uid(self, name: str) -> int:
        if name not in self._uids:
            try:
                self._uids[name] = pwd.getpwnam(name).pw_uid
            except KeyError:
                self._uids[name] = os.getuid()
        return self._uids[name]

    def _gid(self, name: str) -> int:
        if name not in self._gids:
            try:
                self._gids[name] = grp.getgrnam(name).gr_gid
            except KeyError:
                self._gids[name] = os.getgid()
        return self._gids[name]

    def _attrs(self, st: Stat) -> Any:
        e = pyfuse3.EntryAttributes()
        e.st_ino = self._ino(st.qid.path)
        e.generation = 0  # qid paths are never reused
        e.entry_timeout = e.attr_timeout = ATTR_TIMEOUT
        is_dir = bool(st.mode & DMDIR)
        e.st_mode = (statmod.S_IFDIR if is_dir else statmod.S_IFREG) | (st.mode & 0o777)
        # 1 for a directory too: the disk keeps no link counts, and 2 would
        # tell find's leaf optimisation there are no subdirectories.
        e.st_nlink = 1
        e.st_uid, e.st_gid = self._uid(st.uid), self._gid(st.gid)
        e.st_size = st.length
        e.st_blksize = BLKSIZE
        e.st_blocks = (st.length + 511) // 512
        e.st_atime_ns = st.atime * 10**9
        e.st_mtime_ns = e.st_ctime_ns = st.mtime * 10**9
        return e

    def _node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise _fuse_error(errno.ESTALE)
        return node

    def _handle(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise _fuse_error(errno.EBADF)
        return h

    @staticmethod
    def _name(name: bytes) -> str:
        try:
            return name.decode()
        except UnicodeDecodeError:  # 9P names are UTF-8
            raise _fuse_error(errno.EINVAL) from None

    def _names(self, node: Node) -> list[str]:
        out: list[str] = []
        while node.ino != ROOT_INODE:
            parent = self.nodes.get(node.parent) if node.parent is not None else None
            if parent is None or len(out) > 4096:
                raise _fuse_error(errno.ENOENT)  # removed (or lost track of)
            out.append(node.name)
            node = parent
        out.reverse()
        return out

    def _learn(self, parent: int, st: Stat, fid: int | None = None, gen: int = -1) -> Node:
        """The node for ST, found in PARENT; FID (walked to it on GEN) becomes its fid."""
        ino = self._ino(st.qid.path)
        node = self.nodes.get(ino)
        if node is None:
            node = self.nodes[ino] = Node(ino, parent, st.name, bool(st.mode & DMDIR))
        elif ino != ROOT_INODE:
            node.parent, node.name = parent, st.name  # renamed by someone else, maybe
        if fid is not None:
            if node.fid is not None and node.gen == gen and node.fid != fid:
                self._clunk_later(fid, gen)
            else:
                node.fid, node.gen = fid, gen
        return node

    def _clunk_later(self, fid: int, gen: int) -> None:
        """Release FID of connection GEN, if that connection still lives."""
        remote = self.conn_link.remote
        if remote is None or gen != self.conn_link.gen or fid == remote.root:
            return

        async def clunk() -> None:
            with contextlib.suppress(Gone, StyxError, TimeoutError):
                async with asyncio.timeout(self.conn_link.wait):
                    await remote.clunk(fid)

        t = asyncio.create_task(clunk())
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    def _drop_fid(self, node: Node) -> None:
        if node.fid is not None:
            self._clunk_later(node.fid, node.gen)
        node.fid, node.gen = None, -1

    async def _run(
        self, fn: Callable[[Remote, int, _Attempt], Awaitable[T]], *, once: bool = False
    ) -> T:
        """FN on the live connection, again on the next one if it is lost, within
        the wait; a 9P error becomes its errno. ONCE: FN changes the disk, so
        when the connection is lost after its change went out (did it happen?),
        fail with EIO rather than do it twice."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.conn_link.wait
        while True:
            remote, gen = await self.conn_link.get(deadline)
            attempt = _Attempt()
            started = loop.time()
            ends = max(deadline, started + MIN_ATTEMPT)
            try:
                async with asyncio.timeout_at(ends):
                    return await fn(remote, gen, attempt)
            except Gone as exc:
                self.conn_link.lost(remote, str(exc))
                if once and attempt.sent:
                    raise _fuse_error(errno.EIO) from None
            except TimeoutError:
                # A connection silent for half the wait or more is taken as
                # dead (a server that stopped, a host cut off): dial again.
                if ends - started >= self.conn_link.wait / 2:
                    self.conn_link.lost(remote, f"no answer in {ends - started:.1f}s")
                raise _fuse_error(errno.EIO) from None
            except StyxError as exc:
                if self._promotion_in_flight(str(exc)) and loop.time() < deadline:
                    # Refused, so nothing changed: ask again once the server
                    # has heard what the entry already says.
                    await asyncio.sleep(PROMOTION_RETRY_S)
                    continue
                raise _fuse_error(errno_of(str(exc))) from None

    def _promotion_in_flight(self, ename: str) -> bool:
        """A replica's refusal while the entry says the chunk we reach serves
        as the primary: a promotion its server has not heard of yet."""
        entry = self.conn_link.entry
        return (
            ename.startswith(fs.EREPLICA)
            and not self.conn_link.replica
            and entry is not None
            and entry.attrs.get("serving") == "master"
            and self.conn_link.remote_addr == self.conn_link.addr
        )

    @staticmethod
    async def _send(remote: Remote, attempt: _Attempt, f: Fcall) -> Fcall:
        """A request that changes the disk: note that it went out."""
        if remote.conn.closed is not None:  # not sent: safe to try again elsewhere
            raise Gone(str(remote.conn.closed))
        attempt.sent = True  # rpc writes it before it first yields
        return await remote.conn.rpc(f)

    async def _fid(self, remote: Remote, gen: int, node: Node) -> int:
        """NODE's fid on connection GEN, walked from the root by path when missing."""
        if node.ino == ROOT_INODE:
            return remote.root
        if node.fid is not None and node.gen == gen:
            return node.fid
        fid = await remote.walk(self._names(node))
        if node.fid is not None and node.gen == gen:  # another call walked it meanwhile
            self._clunk_later(fid, gen)
            return node.fid
        node.fid, node.gen = fid, gen
        return fid

    async def _clone(self, remote: Remote, gen: int, node: Node) -> int:
        return await remote.walk([], start=await self._fid(remote, gen, node))

    async def _open_fid(self, remote: Remote, gen: int, h: Handle, mode: int | None = None) -> int:
        """H's opened fid on connection GEN: opened again (never truncating)
        when the handle's connection was lost."""
        if h.fid is not None and h.gen == gen:
            return h.fid
        fid = await self._clone(remote, gen, self._node(h.ino))
        try:
            r = await remote.conn.rpc(
                Fcall(styx.Topen, fid=fid, mode=h.mode if mode is None else mode)
            )
        except BaseException:
            self._clunk_later(fid, gen)
            raise
        if self._ino(r.qid.path) != h.ino:  # its path now names another file
            self._clunk_later(fid, gen)
            raise _fuse_error(errno.ESTALE)
        if h.fid is not None and h.gen == gen:
            self._clunk_later(fid, gen)
            return h.fid
        h.fid, h.gen = fid, gen
        return fid

    async def _stat(self, remote: Remote, fid: int) -> Stat:
        return (await remote.conn.rpc(Fcall(styx.Tstat, fid=fid))).stat

    async def _sync(self, node: Node, h: Handle | None = None) -> None:
        """A Twstat that touches nothing: the server makes every change durable.
        Sent on H's open fid when it has one on this connection (no walk)."""

        async def fn(r: Remote, gen: int, _a: _Attempt) -> None:
            if h is not None and h.fid is not None and h.gen == gen:
                fid = h.fid
            else:
                fid = await self._fid(r, gen, node)
            await r.conn.rpc(Fcall(styx.Twstat, fid=fid, stat=Stat.dont_touch()))

        await self._run(fn)

    # -- names ---------------------------------------------------------------

    @_op
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        parent = self._node(parent_inode)
        n = self._name(name)
        if n in (".", ".."):
            target = parent if n == "." or parent.parent is None else self._node(parent.parent)
            attrs = await self.getattr(target.ino, ctx)
            target.lookups += 1
            return attrs

        async def fn(r: Remote, gen: int, _a: _Attempt) -> Stat:
            fid = await r.walk([n], start=await self._fid(r, gen, parent))
            try:
                st = await self._stat(r, fid)
            except BaseException:
                self._clunk_later(fid, gen)
                raise
            self._learn(parent.ino, st, fid, gen).lookups += 1
            return st

        return self._attrs(await self._run(fn))

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        # No @_op: forget answers no request, and must never raise.
        for ino, n in inode_list:
            node = self.nodes.get(ino)
            if node is None or ino == ROOT_INODE:
                continue
            node.lookups -= n
            if node.lookups <= 0:
                del self.nodes[ino]
                self._drop_fid(node)

    @_op
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        node = self._node(inode)

        async def fn(r: Remote, gen: int, _a: _Attempt) -> Stat:
            return await self._stat(r, await self._fid(r, gen, node))

        st = await self._run(fn)
        if self._ino(st.qid.path) != inode:  # its path now names another file
            self._drop_fid(node)
            raise _fuse_error(errno.ESTALE)
        return self._attrs(st)

    @_op
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> Any:
        node = self._node(inode)

        async def fn(r: Remote, gen: int, _a: _Attempt) -> Stat:
            fid = await self._fid(r, gen, node)
            cur = await self._stat(r, fid)
            st = Stat.dont_touch()
            touched = False
            if fields.update_size:
                st.length, touched = attr.st_size, True
            if fields.update_mode:
                st.mode, touched = (cur.mode & ~0o777) | (attr.st_mode & 0o777), True
            if fields.update_mtime:
                st.mtime, touched = attr.st_mtime_ns // 10**9, True
            # 9P2000 keeps the atime itself and refuses to set it: ignored.
            if fields.update_uid and attr.st_uid != self._uid(cur.uid):
                raise _fuse_error(errno.EPERM)  # nobody changes a file's owner
            if fields.update_gid and attr.st_gid != self._gid(cur.gid):
                try:
                    st.gid, touched = grp.getgrgid(attr.st_gid).gr_name, True
                except KeyError:
                    raise _fuse_error(errno.EPERM) from None
            if touched:  # the same values again are harmless: no need for once
                await r.conn.rpc(Fcall(styx.Twstat, fid=fid, stat=st))
                return await self._stat(r, fid)
            return cur

        st = await self._run(fn)
        if fields.update_size and fh is not None and fh in self.handles:
            self.handles[fh].writes += 1
        return self._attrs(st)

    @_op
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        parent = self._node(parent_inode)
        n = self._name(name)
        perm = DMDIR | (mode & ~ctx.umask & 0o777)

        async def fn(r: Remote, gen: int, a: _Attempt) -> Stat:
            fid = await self._clone(r, gen, parent)
            try:
                await self._send(r, a, Fcall(styx.Tcreate, fid=fid, name=n, perm=perm, mode=OREAD))
                st = await self._stat(r, fid)
            finally:
                with contextlib.suppress(Gone):
                    await r.clunk(fid)  # the clunk makes the new directory durable
            self._learn(parent.ino, st).lookups += 1
            return st

        return self._attrs(await self._run(fn, once=True))

    async def _remove(self, parent_inode: int, name: bytes) -> None:
        parent = self._node(parent_inode)
        n = self._name(name)

        async def fn(r: Remote, gen: int, a: _Attempt) -> int:
            fid = await r.walk([n], start=await self._fid(r, gen, parent))
            try:
                st = await self._stat(r, fid)
            except BaseException:
                self._clunk_later(fid, gen)
                raise
            await self._send(r, a, Fcall(styx.Tremove, fid=fid))  # clunks FID, either way
            return self._ino(st.qid.path)

        ino = await self._run(fn, once=True)
        if (node := self.nodes.get(ino)) is not None:
            node.parent = None  # the kernel forgets it in its own time
            self._drop_fid(node)

    @_op
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._remove(parent_inode, name)

    @_op
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._remove(parent_inode, name)

    @_op
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise _fuse_error(errno.EINVAL)
        if parent_inode_old != parent_inode_new:
            # 9P2000 renames only within a directory (wstat of the name);
            # EXDEV makes mv copy and remove instead.
            raise _fuse_error(errno.EXDEV)
        parent = self._node(parent_inode_old)
        old, new = self._name(name_old), self._name(name_new)
        if old == new:
            return

        async def fn(r: Remote, gen: int, a: _Attempt) -> tuple[int, int | None]:
            pfid = await self._fid(r, gen, parent)
            src = await r.walk([old], start=pfid)
            try:
                sst = await self._stat(r, src)
                try:
                    dst: int | None = await r.walk([new], start=pfid)
                except StyxError as exc:
                    if errno_of(str(exc)) != errno.ENOENT:
                        raise
                    dst = None
                replaced = None
                if dst is not None:
                    try:
                        dstat = await self._stat(r, dst)
                    except BaseException:
                        self._clunk_later(dst, gen)
                        raise
                    if self._ino(dstat.qid.path) == self._ino(sst.qid.path):
                        self._clunk_later(dst, gen)
                        return self._ino(sst.qid.path), None
                    problem = (
                        errno.EEXIST if flags & pyfuse3.RENAME_NOREPLACE
                        else errno.EISDIR if dstat.mode & DMDIR and not sst.mode & DMDIR
                        else errno.ENOTDIR if sst.mode & DMDIR and not dstat.mode & DMDIR
                        else 0
                    )  # fmt: skip
                    if problem:
                        self._clunk_later(dst, gen)
                        raise _fuse_error(problem)
                    # Not atomic: 9P2000's wstat will not rename onto an existing
                    # name, so the target is removed first. Between the two the
                    # new name is missing; if the rename then fails, the old
                    # contents of the new name are gone (the source keeps its name).
                    await self._send(r, a, Fcall(styx.Tremove, fid=dst))
                    replaced = self._ino(dstat.qid.path)
                st = Stat.dont_touch()
                st.name = new
                await self._send(r, a, Fcall(styx.Twstat, fid=src, stat=st))
                return self._ino(sst.qid.path), replaced
            finally:
                self._clunk_later(src, gen)

        moved, replaced = await self._run(fn, once=True)
        if (node := self.nodes.get(moved)) is not None:
            node.name = new
        if replaced is not None and (gone := self.nodes.get(replaced)) is not None:
            gone.parent = None
            self._drop_fid(gone)

    # -- files ---------------------------------------------------------------

    @staticmethod
    def _omode(flags: int) -> int:
        mode = {os.O_RDONLY: OREAD, os.O_WRONLY: OWRITE, os.O_RDWR: ORDWR}.get(
            flags & os.O_ACCMODE, OREAD
        )
        return mode | (OTRUNC if flags & os.O_TRUNC else 0)

    def _new_handle(self, h: Handle) -> int:
        fh = next(self._fhs)
        self.handles[fh] = h
        return fh

    @_op
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        node = self._node(inode)
        mode = self._omode(flags)
        h = Handle(node.ino, mode & ~OTRUNC)

        async def fn(r: Remote, gen: int, _a: _Attempt) -> int:
            return await self._open_fid(r, gen, h, mode)

        await self._run(fn)
        if mode & OTRUNC:
            h.writes += 1
        return pyfuse3.FileInfo(fh=self._new_handle(h))

    @_op
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        parent = self._node(parent_inode)
        n = self._name(name)
        omode = self._omode(flags)
        perm = mode & ~ctx.umask & 0o777

        async def fn(r: Remote, gen: int, a: _Attempt) -> tuple[int, int, Stat]:
            fid = await self._clone(r, gen, parent)
            try:
                try:
                    f = Fcall(styx.Tcreate, fid=fid, name=n, perm=perm, mode=omode & ~OTRUNC)
                    await self._send(r, a, f)
                except StyxError as exc:
                    if errno_of(str(exc)) != errno.EEXIST or flags & os.O_EXCL:
                        raise
                    # Created by someone else since the kernel looked: open it, as open(2) would.
                    self._clunk_later(fid, gen)
                    fid = await r.walk([n], start=await self._fid(r, gen, parent))
                    await r.conn.rpc(Fcall(styx.Topen, fid=fid, mode=omode))
                st = await self._stat(r, fid)
            except BaseException:
                self._clunk_later(fid, gen)
                raise
            self._learn(parent.ino, st).lookups += 1
            return fid, gen, st

        fid, gen, st = await self._run(fn, once=True)
        h = Handle(self._ino(st.qid.path), omode & ~OTRUNC, fid, gen)
        return pyfuse3.FileInfo(fh=self._new_handle(h)), self._attrs(st)

    @_op
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handle(fh)

        async def fn(r: Remote, gen: int, _a: _Attempt) -> bytes:
            fid = await self._open_fid(r, gen, h)
            out: list[bytes] = []
            got = 0
            while got < size:  # FUSE wants all of it, short only at the end
                data = await r.read_fid(fid, off + got, size - got)
                if not data:
                    break
                out.append(data)
                got += len(data)
            return b"".join(out)

        return await self._run(fn)

    @_op
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handle(fh)

        async def fn(r: Remote, gen: int, _a: _Attempt) -> int:
            # Writing the same bytes at the same offset again is harmless.
            return await r.write_fid(await self._open_fid(r, gen, h), off, buf)

        n = await self._run(fn)
        h.writes += 1
        return n

    @_op
    async def flush(self, fh: int) -> None:
        # close(2) returns once what this handle wrote is durable, as a 9P
        # clunk would, and can say so when it is not.
        h = self._handle(fh)
        if h.writes != h.synced:
            upto = h.writes
            await self._sync(self._node(h.ino), h)
            h.synced = max(h.synced, upto)

    @_op
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self._handle(fh)
        upto = h.writes
        await self._sync(self._node(h.ino), h)
        h.synced = max(h.synced, upto)

    @_op
    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        remote = self.conn_link.remote
        if h is None or h.fid is None or remote is None or h.gen != self.conn_link.gen:
            return  # its connection is gone, and with it the fid (the server clunked it)
        with contextlib.suppress(Gone, StyxError, TimeoutError):
            async with asyncio.timeout(self.conn_link.wait):
                await remote.clunk(h.fid)

    # -- directories -----------------------------------------------------------

    @_op
    async def opendir(self, inode: int, ctx: Any) -> int:
        node = self._node(inode)
        if not node.is_dir:
            raise _fuse_error(errno.ENOTDIR)
        return self._new_handle(Handle(node.ino, OREAD))

    async def _listing(self, node: Node) -> list[Stat]:
        async def fn(r: Remote, gen: int, _a: _Attempt) -> list[Stat]:
            fid = await self._clone(r, gen, node)
            try:
                await r.conn.rpc(Fcall(styx.Topen, fid=fid, mode=OREAD))
                return await r.read_dir(fid)
            finally:
                self._clunk_later(fid, gen)

        return await self._run(fn)

    @_op
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        h = self._handle(fh)
        if start_id == 0 or h.listing is None:  # a listing per pass: ids index it
            h.listing = await self._listing(self._node(h.ino))
        for i in range(start_id, len(h.listing)):
            st = h.listing[i]
            # readdirplus: the entry's attributes come with it, so `ls -l`
            # of a big directory asks for nothing more.
            if not pyfuse3.readdir_reply(token, st.name.encode(), self._attrs(st), i + 1):
                break
            self._learn(h.ino, st).lookups += 1

    @_op
    async def releasedir(self, fh: int) -> None:
        self.handles.pop(fh, None)

    @_op
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self._sync(self._node(self._handle(fh).ino))

    @_op
    async def statfs(self, ctx: Any) -> Any:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = STATFS_BLOCK
        usage = await self.conn_link.usage()
        if usage is not None:
            size, used = usage
            s.f_blocks = size // STATFS_BLOCK
            s.f_bfree = s.f_bavail = max(size - used, 0) // STATFS_BLOCK
        s.f_namemax = 255
        return s

    async def close(self) -> None:
        for t in list(self._background):
            t.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)


# ---- the mount ----------------------------------------------------------------


Resolver = Callable[[Client, str], Awaitable[Service]]


@dataclass
class Options:
    name: str
    mountpoint: Path
    registry: str
    # NAME's entry, checked usable, or a GeryonError saying why not:
    # geryon.resolve.disk_entry, which sits above this module.
    resolve: Resolver
    tls_dir: Path | None = None
    user: str | None = None
    timeout: float = 10.0  # for the registry, as everywhere
    uname: str = ""
    wait: float = 10.0
    replica: bool = False  # read NAME's replica, read-only
    allow_other: bool = False  # other local users may use it (a cpu session's account)


def mounts() -> dict[str, str]:
    """Mount points of this mount namespace and their file system types."""
    out: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            # Spaces and the like are octal escapes (\040).
            point = fields[4].encode().decode("unicode_escape").encode("latin-1").decode()
            out[point] = fields[sep + 1]
    return out


def resolved_path(p: Path | str) -> str:
    """P made absolute, its directory's symlinks resolved, without touching P
    itself (a dead FUSE mount there would fail, or make us wait)."""
    p = os.path.abspath(p)
    return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))


async def mount(opts: Options, *, ready: Callable[[], None] | None = None) -> None:
    """Mount OPTS.name at OPTS.mountpoint and serve it until it is unmounted
    (fusermount3 -u) or this task is cancelled (then unmount). READY is
    called once the mount answers. MountError: one line saying why not."""
    why = fuse_unavailable()
    if why is not None:
        raise MountError(f"FUSE is not available here ({why})")
    pyfuse3.asyncio.enable()
    point = resolved_path(opts.mountpoint)
    if point in mounts():
        raise MountError(f"{point}: already a mount point (geryon umount it first)")
    client = Client(opts.registry, tls_dir=opts.tls_dir or "", user=opts.user,
                    retry_for=opts.timeout)  # fmt: skip
    ssl_ctx = client_ssl(opts.tls_dir) if opts.tls_dir else None
    link = Link(opts.name, client, uname=opts.uname, ssl_ctx=ssl_ctx, wait=opts.wait,
                replica=opts.replica)  # fmt: skip
    ops: DiskFS | None = None
    try:
        try:
            entry = await opts.resolve(client, opts.name)
        except (errors.Unavailable, errors.DeadlineExceeded) as exc:
            raise MountError(f"registry {opts.registry} unreachable: {exc}") from None
        except errors.GeryonError as exc:
            raise MountError(str(exc)) from None
        await link.first(entry)
        assert link.remote is not None
        try:
            root = await link.remote.conn.rpc(Fcall(styx.Tstat, fid=link.remote.root))
        except (Gone, StyxError) as exc:
            raise MountError(f"{opts.name}: {link.addr}: stat /: {exc}") from None
        ops = DiskFS(link, root.stat.qid.path)
        try:  # made only now: a name that does not resolve leaves no directory behind
            os.makedirs(point, exist_ok=True)
        except OSError as exc:
            raise MountError(f"cannot make {point}: {exc.strerror}") from None
        # No default_permissions: the disk's /adm/users decides, as over 9P.
        options = {f"fsname={opts.name}", "subtype=geryon"}
        if opts.replica:
            options.add("ro")
        if opts.allow_other:
            options.add("allow_other")
        try:
            pyfuse3.init(ops, point, options)
        except RuntimeError as exc:
            raise MountError(f"{point}: cannot mount: {exc}") from None
        who = f"the identity in {opts.tls_dir}" if opts.tls_dir else f"uname {opts.uname}"
        log.info("%s: mounted at %s (as %s, wait %gs)", opts.name, point, who, opts.wait)
        link.start()
        main = asyncio.create_task(pyfuse3.main(), name="fuse")
        try:
            # Live once the kernel has the mount answering: stat it through
            # FUSE from a thread (this loop is the one that answers).
            probe = asyncio.ensure_future(asyncio.to_thread(os.stat, point))
            await asyncio.wait({probe, main}, return_when=asyncio.FIRST_COMPLETED)
            if main.done():
                probe.cancel()
                main.result()
                raise MountError(f"{point}: the FUSE session ended at once")
            probe.result()
            if ready is not None:
                ready()
            # Shielded: cancelling the mount must end the session in order
            # (terminate, let calls in flight finish), not abandon its tasks.
            await asyncio.shield(main)
            log.info("%s: unmounted from %s", opts.name, point)
        except BaseException:
            if not main.done():
                log.info("%s: unmounting from %s", opts.name, point)
                pyfuse3.terminate()
                with contextlib.suppress(Exception):
                    await main
            raise
        finally:
            pyfuse3.close(unmount=True)
    finally:
        if ops is not None:
            await ops.close()
        await link.close()
        await client.close()
