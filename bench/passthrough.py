"""A plain FUSE passthrough of a local directory: the disk bench's middle column.

    python -m bench.passthrough SRC MOUNTPOINT

Why it exists: ``geryon mount`` is a pyfuse3 file system, so beside the local
disk (the physical limit) the disk benchmark needs what any pyfuse3 file
system pays before it does any work of its own (the kernel's FUSE round
trips, pyfuse3 and its event loop, one Python process). This is that file
system with no work of its own: each request becomes the same system call
on SRC. Where ``geryon mount`` is slower than this, the difference is
Geryon's (9P, the chunk server, its SQLite); where this is slower than the
local disk, it is FUSE's and Python's.

It is made the way ``geryon.disk.mount`` is, so the two columns differ only
in what a request does: the same kernel cache settings (names and
attributes trusted for 1 s, pyfuse3's default ``keep_cache``, no writeback
cache), readdirplus, one asyncio loop. It is made like libfuse's
``passthrough_ll``: each inode the kernel knows holds an ``O_PATH`` file
descriptor of the file, counted by lookups and closed on forget, so a
rename anywhere cannot leave an inode naming the wrong file; names are
resolved relative to their directory's descriptor. Hard links share the
inode of their file. fsync runs in a thread so that the loop keeps
answering; everything else is one quick system call, made on the loop.

It prints ``passthrough: serving SRC at MOUNTPOINT`` once the mount answers,
and unmounts on SIGTERM or SIGINT (or ``fusermount3 -u``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import itertools
import os
import resource
import signal
import stat as statmod
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import pyfuse3.asyncio

T = TypeVar("T")

# As geryon.disk.mount.ATTR_TIMEOUT: the kernel trusts names and attributes this long.
TIMEOUT = 1.0
READY = "passthrough: serving"


@dataclass
class Inode:
    fd: int  # O_PATH, O_NOFOLLOW
    key: tuple[int, int]  # (st_dev, st_ino) on SRC
    lookups: int = 0


def _sys(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """A system call, its OSError as the FUSEError the kernel expects."""
    try:
        return fn(*args, **kw)
    except OSError as exc:
        raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None


def _proc(fd: int) -> str:
    """A path that opens what an O_PATH descriptor names (as passthrough_ll does)."""
    return f"/proc/self/fd/{fd}"


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, src: str) -> None:
        super().__init__()
        fd = os.open(src, os.O_PATH | os.O_DIRECTORY)
        st = os.fstat(fd)
        root = Inode(fd, (st.st_dev, st.st_ino), lookups=1 << 62)
        self.inodes: dict[int, Inode] = {pyfuse3.ROOT_INODE: root}
        self.by_key: dict[tuple[int, int], int] = {root.key: pyfuse3.ROOT_INODE}
        self._next_ino = itertools.count(pyfuse3.ROOT_INODE + 1)
        self.dirs: dict[int, list[tuple[bytes, int]]] = {}  # opendir handle -> listing
        self._next_dh = itertools.count(1)

    # -- inodes ------------------------------------------------------------

    def _inode(self, ino: int) -> Inode:
        try:
            return self.inodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _attrs(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.generation = 0
        e.entry_timeout = e.attr_timeout = TIMEOUT
        e.st_mode = st.st_mode
        e.st_nlink = st.st_nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _learn(self, fd: int) -> pyfuse3.EntryAttributes:
        """Count a lookup of the file FD (O_PATH, ours to keep or close)."""
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        key = (st.st_dev, st.st_ino)
        ino = self.by_key.get(key)
        if ino is None:
            ino = next(self._next_ino)
            self.inodes[ino] = Inode(fd, key)
            self.by_key[key] = ino
        else:
            os.close(fd)
        self.inodes[ino].lookups += 1
        return self._attrs(ino, st)

    def _child(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        if name == b"." or (name == b".." and parent == pyfuse3.ROOT_INODE):
            # Never above SRC: the root's parent is the root.
            fd = _sys(os.open, _proc(self._inode(parent).fd), os.O_PATH | os.O_DIRECTORY)
        else:
            fd = _sys(os.open, name, os.O_PATH | os.O_NOFOLLOW, dir_fd=self._inode(parent).fd)
        return self._learn(fd)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        return self._child(parent_inode, name)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            node = self.inodes.get(ino)
            if node is None or ino == pyfuse3.ROOT_INODE:
                continue
            node.lookups -= n
            if node.lookups <= 0:
                del self.inodes[ino]
                self.by_key.pop(node.key, None)
                os.close(node.fd)

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._attrs(inode, _sys(os.fstat, self._inode(inode).fd))

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> Any:
        node = self._inode(inode)
        path = _proc(node.fd)
        if fields.update_size:
            if fh is not None:
                _sys(os.ftruncate, fh, attr.st_size)
            else:
                _sys(os.truncate, path, attr.st_size)
        if fields.update_mode:
            _sys(os.chmod, path, statmod.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            _sys(os.chown, path, uid, gid)
        if fields.update_atime or fields.update_mtime:
            st = _sys(os.fstat, node.fd)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            _sys(os.utime, path, ns=(atime, mtime))
        return await self.getattr(inode)

    # -- directories ---------------------------------------------------------

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        _sys(os.mkdir, name, mode & ~ctx.umask, dir_fd=self._inode(parent_inode).fd)
        return self._child(parent_inode, name)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        _sys(os.rmdir, name, dir_fd=self._inode(parent_inode).fd)

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        _sys(os.unlink, name, dir_fd=self._inode(parent_inode).fd)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        if flags:  # RENAME_NOREPLACE, RENAME_EXCHANGE: os.rename has neither
            raise pyfuse3.FUSEError(errno.EINVAL)
        _sys(
            os.rename,
            name_old,
            name_new,
            src_dir_fd=self._inode(parent_inode_old).fd,
            dst_dir_fd=self._inode(parent_inode_new).fd,
        )

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        _sys(os.symlink, target, name, dir_fd=self._inode(parent_inode).fd)
        return self._child(parent_inode, name)

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        # readlinkat(fd, ""): the symlink an O_PATH|O_NOFOLLOW descriptor holds.
        return os.fsencode(_sys(os.readlink, "", dir_fd=self._inode(inode).fd))

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        _sys(
            os.link,
            _proc(self._inode(inode).fd),
            new_name,
            dst_dir_fd=self._inode(new_parent_inode).fd,
            follow_symlinks=True,
        )
        return self._child(new_parent_inode, new_name)

    async def opendir(self, inode: int, ctx: Any) -> int:
        # One listing per open: readdir's ids index it, so a listing resumed
        # at any id neither repeats nor skips an entry.
        fd = _sys(os.open, _proc(self._inode(inode).fd), os.O_RDONLY | os.O_DIRECTORY)
        try:
            with os.scandir(fd) as it:
                names = [os.fsencode(e.name) for e in it]
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        finally:
            os.close(fd)
        dh = next(self._next_dh)
        self.dirs[dh] = [(n, inode) for n in names]
        return dh

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        listing = self.dirs.get(fh, [])
        for i in range(start_id, len(listing)):
            name, parent = listing[i]
            try:
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=self._inode(parent).fd)
                st = os.fstat(fd)
            except OSError:
                continue  # gone since the listing was made
            key = (st.st_dev, st.st_ino)
            ino = self.by_key.get(key)
            new = ino is None
            if new:
                ino = next(self._next_ino)
            if not pyfuse3.readdir_reply(token, name, self._attrs(ino, st), i + 1):
                os.close(fd)
                break
            # readdirplus: the kernel now holds a lookup of the entry.
            if new:
                self.inodes[ino] = Inode(fd, key)
                self.by_key[key] = ino
            else:
                os.close(fd)
            self.inodes[ino].lookups += 1

    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass  # directory changes are the local file system's, as on SRC itself

    # -- files -----------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        fd = _sys(os.open, _proc(self._inode(inode).fd), flags & ~(os.O_CREAT | os.O_NOFOLLOW))
        return pyfuse3.FileInfo(fh=fd)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        dirfd = self._inode(parent_inode).fd
        fd = _sys(os.open, name, flags | os.O_CREAT, mode & ~ctx.umask, dir_fd=dirfd)
        try:
            attrs = self._child(parent_inode, name)
        except BaseException:
            os.close(fd)
            raise
        return pyfuse3.FileInfo(fh=fd), attrs

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return _sys(os.pread, fh, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return _sys(os.pwrite, fh, buf, off)

    async def flush(self, fh: int) -> None:
        pass  # as close(2) on SRC: nothing made durable

    async def fsync(self, fh: int, datasync: bool) -> None:
        try:
            await asyncio.to_thread(os.fdatasync if datasync else os.fsync, fh)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    async def release(self, fh: int) -> None:
        with contextlib.suppress(OSError):
            os.close(fh)

    async def statfs(self, ctx: Any) -> Any:
        sv = _sys(os.statvfs, _proc(self._inode(pyfuse3.ROOT_INODE).fd))
        s = pyfuse3.StatvfsData()
        for attr in (
            "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
            "f_files", "f_ffree", "f_favail", "f_namemax",
        ):  # fmt: skip
            setattr(s, attr, getattr(sv, attr))
        return s


async def serve(src: str, mountpoint: str) -> None:
    ops = Passthrough(src)
    options = {"fsname=passthrough", "subtype=passthrough", "default_permissions"}
    pyfuse3.init(ops, mountpoint, options)
    loop = asyncio.get_running_loop()
    main = asyncio.create_task(pyfuse3.main(), name="fuse")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, pyfuse3.terminate)
    try:
        # Ready once the kernel has the mount answering: stat it from a
        # thread, since this loop is the one that answers.
        probe = asyncio.ensure_future(asyncio.to_thread(os.stat, mountpoint))
        await asyncio.wait({probe, main}, return_when=asyncio.FIRST_COMPLETED)
        if main.done():
            main.result()
            raise RuntimeError(f"{mountpoint}: the FUSE session ended at once")
        probe.result()
        print(f"{READY} {src} at {mountpoint}", file=sys.stderr, flush=True)
        await main
    finally:
        if not main.done():
            pyfuse3.terminate()
            with contextlib.suppress(Exception):
                await main
        pyfuse3.close(unmount=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.passthrough",
        description="Mount SRC at MOUNTPOINT through a plain pyfuse3 passthrough.",
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    args = p.parse_args(argv)
    # One O_PATH descriptor per inode the kernel holds: more than 1,024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pyfuse3.asyncio.enable()
    try:
        asyncio.run(serve(os.path.abspath(args.src), os.path.abspath(args.mountpoint)))
    except RuntimeError as exc:
        print(f"passthrough: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
