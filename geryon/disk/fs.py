"""The file system inside a chunk file: Inferno's kfs, kept in one SQLite database.

Why SQLite: its transactions give the crash safety a disk needs for free --
every 9P request that changes the tree is one transaction, so a server killed
with ``kill -9`` at any moment reopens to the tree as it was after some
request, never between two; ``PRAGMA max_page_count`` caps the file at the
chunk's capacity, so a write past it fails (SQLITE_FULL, rolled back) and
damages nothing; and ``PRAGMA integrity_check`` is a ready-made fsck. The
database runs in WAL mode: commits are atomic but not flushed
(synchronous=NORMAL) until a client asks for durability (a clunk after a
write, or a sync wstat), when one FULL commit flushes the log. The log
(``CHUNK-wal``) is the disk's journal while it is served and is folded back
into the chunk file when the server stops.

Tables:
    meta(k, v)                 magic, version, capacity, owner, created, and
                               for replication (geryon.disk.log): uuid, seq (the
                               last change's number), epoch, horizon
    file(path, parent, name, mode, uid, gid, muid, atime, mtime, vers, length)
                               one row per file; path is the qid path (never
                               reused: AUTOINCREMENT); the root is its own parent
    block(file, n, data)       bytes [n*BLOCK, n*BLOCK+len(data)) of a file; a
                               missing block, or bytes past its data, read as zeros
    changed(kind, file, n, seq)  the change log: for each file row (kind 0) and
                               block (kind 1) ever written, the seq of its last
                               change, kept by triggers; a row that is gone is a
                               tombstone. A follower at seq S needs the rows
                               changed after S, as they are now.
    epochs(start, epoch, id)   terms: each time a server took the primary role,
                               the first seq it wrote, the registry's epoch
                               then, and a random id (geryon.disk.log)

Permissions are Plan 9's (stat(5), fossil's permFile): a bit is granted if
the owner's, a group member's or anyone's class grants it; the user ``none``
gets only the last. Users and groups are the disk's own /adm/users
(geryon.disk.users), read when the disk opens and again whenever that file
changes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from geryon.disk import users as users_mod
from geryon.disk.styx import (
    DMAPPEND,
    DMDIR,
    DMEXCL,
    DMTMP,
    OEXEC,
    ORCLOSE,
    ORDWR,
    OREAD,
    OTRUNC,
    OWRITE,
    PERM_MASK,
    Qid,
    Stat,
)

MAGIC = "geryon-disk"
FORMAT_VERSION = 2
BLOCK = 64 * 1024
PAGE = 4096
MIN_CAPACITY = 256 * 1024
ROOT = 1
NOTOUCH32 = 0xFFFFFFFF
NOTOUCH64 = 0xFFFFFFFFFFFFFFFF
MAX_LENGTH = 1 << 62

# Plan 9's error strings (the kernel's error.h and kfs), which 9P clients
# know: Linux's v9fs maps most of them to an errno.
ENONEXIST = "file does not exist"
EEXIST = "file already exists"
EPERM = "permission denied"
ENOTDIR = "not a directory"
EISDIR = "file is a directory"
ENOTEMPTY = "directory not empty"
EFULL = "file system full"
ERDONLY = "file system is read-only"
# A follower's refusal (the detail follows the colon; mount maps it to EROFS).
EREPLICA = ERDONLY + ": "
ENAME = "bad character in file name"
EINUSE = "exclusive use file already open"
EBADMODE = "bad open mode"
ENOTOPEN = "file not open for that"


class FSError(Exception):
    """A refusal 9P returns as Rerror: the message is the error string."""


class NotADisk(Exception):
    """The chunk file holds no file system (or one this version cannot read)."""


@dataclass(slots=True)
class Entry:
    path: int
    parent: int
    name: str
    mode: int
    uid: str
    gid: str
    muid: str
    atime: int
    mtime: int
    vers: int
    length: int

    @property
    def is_dir(self) -> bool:
        return bool(self.mode & DMDIR)

    @property
    def qid(self) -> Qid:
        return Qid((self.mode >> 24) & 0xFF, self.vers & 0xFFFFFFFF, self.path)

    def stat(self) -> Stat:
        return Stat(0, 0, self.qid, self.mode, self.atime, self.mtime,
                    0 if self.is_dir else self.length, self.name, self.uid, self.gid,
                    self.muid)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks: a user name the disk knows, and whether an admin role vouches
    for it (a TLS identity with the admin role counts as a member of adm)."""

    name: str
    admin: bool = False


_COLS = "path, parent, name, mode, uid, gid, muid, atime, mtime, vers, length"
_SCHEMA = """
CREATE TABLE meta(k TEXT PRIMARY KEY, v) WITHOUT ROWID;
CREATE TABLE file(
    path INTEGER PRIMARY KEY AUTOINCREMENT,
    parent INTEGER NOT NULL,
    name TEXT NOT NULL,
    mode INTEGER NOT NULL,
    uid TEXT NOT NULL, gid TEXT NOT NULL, muid TEXT NOT NULL,
    atime INTEGER NOT NULL, mtime INTEGER NOT NULL,
    vers INTEGER NOT NULL, length INTEGER NOT NULL,
    UNIQUE(parent, name)
);
CREATE TABLE block(file INTEGER NOT NULL, n INTEGER NOT NULL, data BLOB NOT NULL,
                   PRIMARY KEY(file, n));
"""
# Version 2: the change log, kept by triggers so no path that writes can miss it.
_LOG_SCHEMA = [
    "CREATE TABLE changed(kind INTEGER NOT NULL, file INTEGER NOT NULL, n INTEGER NOT NULL,"
    " seq INTEGER NOT NULL, PRIMARY KEY(kind, file, n)) WITHOUT ROWID",
    "CREATE INDEX changed_seq ON changed(seq)",
    "CREATE TABLE epochs(start INTEGER PRIMARY KEY, epoch INTEGER NOT NULL, id TEXT NOT NULL)",
] + [
    f"CREATE TRIGGER {table}_{op.lower()} AFTER {op} ON {table} BEGIN INSERT OR REPLACE "
    f"INTO changed VALUES ({key.format(r=r)}, (SELECT v FROM meta WHERE k = 'seq')); END"
    for table, key in (("file", "0, {r}.path, 0"), ("block", "1, {r}.file, {r}.n"))
    for op, r in (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD"))
]


def _add_log(db: sqlite3.Connection) -> None:
    """Version 1 -> 2 (and format): the change log. A new disk's rows are at
    seq 0 (what format wrote); an upgraded disk's at seq 1 (written by someone)."""
    for statement in _LOG_SCHEMA:  # (executescript would commit the transaction)
        db.execute(statement)
    seq = 1 if db.execute("SELECT 1 FROM file LIMIT 1").fetchone() else 0
    db.execute("INSERT OR IGNORE INTO meta VALUES ('seq', ?)", (seq,))
    db.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', 1)")
    db.execute("INSERT OR IGNORE INTO meta VALUES ('horizon', 0)")
    db.execute("INSERT OR IGNORE INTO meta VALUES ('uuid', ?)", (uuid.uuid4().hex,))
    db.execute("INSERT OR IGNORE INTO epochs VALUES (0, 1, ?)", (uuid.uuid4().hex[:16],))
    db.execute("INSERT OR IGNORE INTO changed SELECT 0, path, 0, ? FROM file", (seq,))
    db.execute("INSERT OR IGNORE INTO changed SELECT 1, file, n, ? FROM block", (seq,))
    db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (FORMAT_VERSION,))


def _now() -> int:
    return int(time.time()) & 0xFFFFFFFF


def check_name(name: str) -> None:
    if name in ("", ".", "..") or "/" in name or "\0" in name or len(name.encode()) > 255:
        raise FSError(ENAME)


def _connect(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    uri = f"file:{path}?mode={'ro' if read_only else 'rw'}"
    db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 5000")
    return db


def holds_data(path: Path) -> bool:
    """Whether the file has a byte that is not zero (holes are zeros)."""
    with open(path, "rb") as f:
        fd = f.fileno()
        end = os.fstat(fd).st_size
        off = 0
        while off < end:
            try:
                off = os.lseek(fd, off, os.SEEK_DATA)
                hole = os.lseek(fd, off, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    return False
                hole = end
            f.seek(off)
            while off < hole:
                buf = f.read(min(1 << 20, hole - off))
                if not buf:
                    return False
                if buf.count(0) != len(buf):
                    return True
                off += len(buf)
    return False


def is_disk(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            if f.read(16) != b"SQLite format 3\0":
                return False
        db = _connect(path, read_only=True)
        try:
            row = db.execute("SELECT v FROM meta WHERE k = 'magic'").fetchone()
        finally:
            db.close()
        return bool(row and row[0] == MAGIC)
    except (OSError, sqlite3.Error):
        return False


def _lock(path: Path) -> int:
    """An exclusive flock on the chunk file for as long as it is served: a
    second server on the same chunk is refused, not raced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise NotADisk(f"{path}: in use by another chunk server") from None
    return fd


def format(
    path: Path,
    capacity: int,
    *,
    owner: str,
    users_text: str | None = None,
    force: bool = False,
) -> None:
    """Make PATH an empty file system of CAPACITY bytes owned by OWNER.

    Refuses a chunk that already holds a disk, or any other data, unless
    FORCE. The new database is built beside PATH and renamed over it, so a
    crash mid-format leaves the old file as it was."""
    path = Path(path)
    if capacity < MIN_CAPACITY:
        raise ValueError(f"capacity {capacity} bytes is below the minimum {MIN_CAPACITY}")
    users_text = users_text if users_text is not None else users_mod.default(owner)
    table = users_mod.parse(users_text)  # UsersError says which line
    if not table.exists(owner):
        raise ValueError(f"the users file does not name the owner {owner}")
    if path.exists():
        lock = _lock(path)  # refuses while served
        os.close(lock)
        if not force:
            if is_disk(path):
                raise FileExistsError(f"{path} already holds a file system (--force to wipe it)")
            if holds_data(path):
                raise FileExistsError(f"{path} holds data that is not a disk (--force to wipe it)")
    tmp = path.with_name(path.name + ".format")
    for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm"), Path(f"{tmp}-journal")):
        leftover.unlink(missing_ok=True)
    open(tmp, "xb").close()  # OSError, not SQLite's "unable to open", for a bad directory
    db = sqlite3.connect(tmp, isolation_level=None)
    try:
        db.execute(f"PRAGMA page_size = {PAGE}")
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript("BEGIN;" + _SCHEMA + "COMMIT;")
        now = _now()
        with _tx(db):
            _add_log(db)
            db.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [("magic", MAGIC), ("capacity", capacity),
                 ("owner", owner), ("created", now), ("syncs", 0)],
            )  # fmt: skip
            ins = f"INSERT INTO file({_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
            adm = users_mod.ADM if table.exists(users_mod.ADM) else owner
            db.execute(ins, (ROOT, ROOT, "/", DMDIR | 0o775, owner, owner, owner, now, now, 0, 0))
            db.execute(ins, (2, ROOT, "adm", DMDIR | 0o775, adm, adm, owner, now, now, 0, 0))
            data = users_text.encode()
            db.execute(ins, (3, 2, "users", 0o664, owner, adm, owner, now, now, 0, len(data)))
            db.execute("INSERT INTO block VALUES (3, 0, ?)", (data,))
        used = _pages_used(db)
        if used > capacity:
            raise ValueError(f"capacity {capacity} bytes cannot hold an empty disk ({used})")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    # The old disk's log (left by a server killed with -9) must not outlive
    # it: SQLite would replay it into the new database.
    for stale in (Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
        stale.unlink(missing_ok=True)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@contextlib.contextmanager
def _tx(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.in_transaction:  # SQLITE_FULL has already rolled it back
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _pages_used(db: sqlite3.Connection) -> int:
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    free = db.execute("PRAGMA freelist_count").fetchone()[0]
    return (pages - free) * db.execute("PRAGMA page_size").fetchone()[0]


@dataclass(frozen=True, slots=True)
class Usage:
    capacity: int
    used: int
    files: int
    seq: int = 0  # the last change's number: the disk's position
    epoch: int = 1


def usage(path: Path) -> Usage:
    """What a disk holds, read beside a running server (WAL readers do not block)."""
    db = _connect(Path(path), read_only=True)
    try:
        return _usage(db)
    finally:
        db.close()


def _usage(db: sqlite3.Connection) -> Usage:
    meta = dict(db.execute("SELECT k, v FROM meta WHERE k IN ('capacity', 'seq', 'epoch')"))
    (files,) = db.execute("SELECT count(*) FROM file").fetchone()
    return Usage(int(meta["capacity"]), _pages_used(db), files, int(meta.get("seq", 0)),
                 int(meta.get("epoch", 1)))  # fmt: skip


class Disk:
    """One open disk. Not thread-safe: the server calls it from one thread."""

    def __init__(self, path: Path, *, read_only: bool = False, lock: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise NotADisk(f"{path}: no such file")
        if not is_disk(self.path):
            raise NotADisk(f"{path}: not a disk (geryon disk format makes one)")
        self._lockfd = _lock(self.path) if lock else -1
        try:
            self.db = _connect(self.path, read_only=read_only)
            self.read_only = read_only
            self.unsynced = False  # a change committed but not yet flushed
            meta = dict(self.db.execute("SELECT k, v FROM meta"))
            if int(meta.get("version", 0)) == 1 and not read_only:
                with _tx(self.db):
                    _add_log(self.db)
                meta = dict(self.db.execute("SELECT k, v FROM meta"))
            if int(meta.get("version", 0)) != FORMAT_VERSION:
                raise NotADisk(f"{path}: disk format {meta.get('version')} is not {FORMAT_VERSION}")
            self.capacity = int(meta["capacity"])
            self.owner = str(meta["owner"])
            self.uuid = str(meta["uuid"])
            self.seq = int(meta["seq"])  # the last change's number
            self.epoch = int(meta["epoch"])
            # Why writes are refused now ("" when they are not): a follower,
            # or a server not (yet) named by its disk's entry at its epoch.
            self.frozen = ""
            # Called with the seq after each commit (the server wakes followers).
            self.on_commit: Callable[[int], None] | None = None
            if not read_only:
                self.db.execute("PRAGMA journal_mode = WAL")
                self.db.execute("PRAGMA synchronous = NORMAL")
            page = self.db.execute("PRAGMA page_size").fetchone()[0]
            self.db.execute(f"PRAGMA max_page_count = {self.capacity // page}")
            self.users = users_mod.Users()
            self.users_error = ""
            self._users_path = 0
            self.reload_users()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        db = getattr(self, "db", None)
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                if not self.read_only:
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                db.close()
            self.db = None  # type: ignore[assignment]
        if self._lockfd >= 0:
            os.close(self._lockfd)
            self._lockfd = -1

    # -- reading -----------------------------------------------------------
    def entry(self, path: int) -> Entry:
        row = self.db.execute(f"SELECT {_COLS} FROM file WHERE path = ?", (path,)).fetchone()
        if row is None:
            raise FSError(ENONEXIST)
        return Entry(*row)

    def child(self, parent: int, name: str) -> Entry | None:
        row = self.db.execute(
            f"SELECT {_COLS} FROM file WHERE parent = ? AND name = ?", (parent, name)
        ).fetchone()
        return Entry(*row) if row else None

    def children(self, parent: int) -> list[Entry]:
        rows = self.db.execute(
            f"SELECT {_COLS} FROM file WHERE parent = ? AND path != ? ORDER BY name",
            (parent, parent),
        ).fetchall()
        return [Entry(*r) for r in rows]

    def usage(self) -> Usage:
        return _usage(self.db)

    def walk1(self, d: Entry, name: str, who: Caller) -> Entry:
        """One step of a walk: needs search (x) permission on the directory."""
        if not d.is_dir:
            raise FSError(ENOTDIR)
        if not self.allowed(d, who, 1):
            raise FSError(EPERM)
        if name == "..":
            return self.entry(d.parent)
        e = self.child(d.path, name) if name not in ("", ".") and "/" not in name else None
        if e is None:
            raise FSError(ENONEXIST)
        return e

    def read(self, e: Entry, offset: int, count: int) -> bytes:
        if e.is_dir:
            raise FSError(EISDIR)
        end = min(e.length, offset + count)
        if offset >= end:
            return b""
        first, last = offset // BLOCK, (end - 1) // BLOCK
        out = bytearray(end - offset)
        for n, data in self.db.execute(
            "SELECT n, data FROM block WHERE file = ? AND n BETWEEN ? AND ?",
            (e.path, first, last),
        ):
            base = n * BLOCK
            lo, hi = max(offset, base), min(end, base + len(data))
            if lo < hi:
                out[lo - offset : hi - offset] = data[lo - base : hi - base]
        return bytes(out)

    # -- permissions -------------------------------------------------------
    def member(self, who: Caller, group: str) -> bool:
        if who.admin and group == users_mod.ADM:
            return True
        return self.users.member(who.name, group)

    def allowed(self, e: Entry, who: Caller, bits: int) -> bool:
        """Each of BITS (4 r, 2 w, 1 x) granted by some class (fossil's permFile)."""
        for bit in (4, 2, 1):
            if not bits & bit:
                continue
            ok = bool(e.mode & bit)
            if not ok and who.name != users_mod.NONE:
                ok = (who.name == e.uid and bool(e.mode & (bit << 6))) or (
                    bool(e.mode & (bit << 3)) and self.member(who, e.gid)
                )
            if not ok:
                return False
        return True

    def open_bits(self, e: Entry, mode: int) -> int:
        """The permission bits an open MODE needs; FSError if it makes no sense."""
        if mode & ~(3 | OTRUNC | ORCLOSE | 0x20):
            raise FSError(EBADMODE)
        bits = {OREAD: 4, OWRITE: 2, ORDWR: 6, OEXEC: 1}[mode & 3]
        if mode & OTRUNC:
            bits |= 2
        if e.is_dir and (bits & 2 or mode & ORCLOSE):
            raise FSError(EISDIR)
        return bits

    def check_open(self, e: Entry, mode: int, who: Caller) -> None:
        bits = self.open_bits(e, mode)
        if bits & 2:
            self.check_writable()
        if not self.allowed(e, who, bits):
            raise FSError(EPERM)
        if mode & ORCLOSE:
            self._check_remove(e, who)

    # -- changing ----------------------------------------------------------
    def check_writable(self) -> None:
        if self.read_only:
            raise FSError(ERDONLY)
        if self.frozen:
            raise FSError(EREPLICA + self.frozen)

    @contextlib.contextmanager
    def _change(self, *, durable: bool = True) -> Iterator[None]:
        """One request's changes, as the next seq: all or nothing; a full disk
        is ENOSPC's string. Unless DURABLE is False (an access time), the next
        sync must flush."""
        self.check_writable()
        try:
            with _tx(self.db):
                self.db.execute("UPDATE meta SET v = ? WHERE k = 'seq'", (self.seq + 1,))
                yield
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
                raise FSError(EFULL) from None
            raise
        self.seq += 1
        if durable:
            self.unsynced = True
        if self.on_commit is not None:
            self.on_commit(self.seq)

    def opened(self, e: Entry, mode: int, who: Caller) -> Entry:
        """After check_open: truncate on OTRUNC; note the access time."""
        if self.read_only or self.frozen:
            return e
        # An access time alone is not worth a flush: a crash may lose it.
        with self._change(durable=bool(mode & OTRUNC)):
            if mode & OTRUNC and not e.is_dir and not e.mode & DMAPPEND:
                self._truncate(e, 0, who)
            e.atime = _now()
            self.db.execute("UPDATE file SET atime = ? WHERE path = ?", (e.atime, e.path))
        return e

    def create(self, d: Entry, name: str, perm: int, mode: int, who: Caller) -> Entry:
        if not d.is_dir:
            raise FSError(ENOTDIR)
        check_name(name)
        if not self.allowed(d, who, 2):
            raise FSError(EPERM)
        if self.child(d.path, name) is not None:
            raise FSError(EEXIST)
        if perm & DMDIR:
            if mode & 3 != OREAD or mode & (OTRUNC | ORCLOSE):
                raise FSError(EISDIR)
            # create(5): the parent's permission bits mask the new ones.
            mode_bits = (perm & (~0o777 | (d.mode & 0o777))) & (DMDIR | DMEXCL | DMAPPEND | 0o777)
        else:
            self.open_bits(Entry(0, 0, "", 0, "", "", "", 0, 0, 0, 0), mode)
            mode_bits = (perm & (~0o666 | (d.mode & 0o666))) & (DMEXCL | DMAPPEND | DMTMP | 0o777)
        now = _now()
        with self._change():
            cur = self.db.execute(
                f"INSERT INTO file({_COLS}) VALUES (NULL,?,?,?,?,?,?,?,?,0,0)",
                (d.path, name, mode_bits, who.name, d.gid, who.name, now, now),
            )
            self._touch_dir(d, who, now)
        e = self.entry(int(cur.lastrowid or 0))
        return e

    def write(self, e: Entry, offset: int, data: bytes, who: Caller) -> int:
        if e.is_dir:
            raise FSError(EISDIR)
        fresh = self.entry(e.path)  # another fid may have grown it
        if fresh.mode & DMAPPEND:
            offset = fresh.length
        if offset + len(data) > MAX_LENGTH:
            raise FSError("file too large")
        if not data:
            return 0
        with self._change():
            end = offset + len(data)
            pos = offset
            while pos < end:
                n, within = divmod(pos, BLOCK)
                take = min(BLOCK - within, end - pos)
                piece = data[pos - offset : pos - offset + take]
                if within == 0 and take == BLOCK:
                    block = piece
                else:
                    row = self.db.execute(
                        "SELECT data FROM block WHERE file = ? AND n = ?", (e.path, n)
                    ).fetchone()
                    old = row[0] if row else b""
                    if len(old) < within:
                        old = old + bytes(within - len(old))
                    block = old[:within] + piece + old[within + take :]
                self.db.execute(
                    "INSERT OR REPLACE INTO block(file, n, data) VALUES (?, ?, ?)",
                    (e.path, n, block),
                )
                pos += take
            length = max(fresh.length, end)
            now = _now()
            self.db.execute(
                "UPDATE file SET length = ?, mtime = ?, muid = ?, vers = vers + 1 WHERE path = ?",
                (length, now, who.name, e.path),
            )
        if e.path == self._users_path:
            self.reload_users()
        return len(data)

    def _truncate(self, e: Entry, length: int, who: Caller) -> None:
        n, within = divmod(length, BLOCK)
        self.db.execute(
            "DELETE FROM block WHERE file = ? AND n >= ?", (e.path, n + (1 if within else 0))
        )
        if within:
            self.db.execute(
                "UPDATE block SET data = substr(data, 1, ?) WHERE file = ? AND n = ? "
                "AND length(data) > ?",
                (within, e.path, n, within),
            )
        now = _now()
        self.db.execute(
            "UPDATE file SET length = ?, mtime = ?, muid = ?, vers = vers + 1 WHERE path = ?",
            (length, now, who.name, e.path),
        )

    def _touch_dir(self, d: Entry, who: Caller, now: int) -> None:
        self.db.execute(
            "UPDATE file SET mtime = ?, muid = ?, vers = vers + 1 WHERE path = ?",
            (now, who.name, d.path),
        )

    def _check_remove(self, e: Entry, who: Caller) -> None:
        if e.path == ROOT:
            raise FSError(EPERM)
        if not self.allowed(self.entry(e.parent), who, 2):
            raise FSError(EPERM)

    def remove(self, e: Entry, who: Caller, *, checked: bool = False) -> None:
        """Remove E; CHECKED when permission was already granted (an ORCLOSE open)."""
        e = self.entry(e.path)
        if not checked:
            self._check_remove(e, who)
        if e.is_dir and self.db.execute(
            "SELECT 1 FROM file WHERE parent = ? AND path != ? LIMIT 1", (e.path, e.path)
        ).fetchone():
            raise FSError(ENOTEMPTY)
        with self._change():
            self.db.execute("DELETE FROM block WHERE file = ?", (e.path,))
            self.db.execute("DELETE FROM file WHERE path = ?", (e.path,))
            self._touch_dir(self.entry(e.parent), who, _now())
        if e.path == self._users_path or e.path == self._users_dir():
            self.reload_users()

    def wstat(self, e: Entry, st: Stat, who: Caller) -> None:
        """Change what ST touches, all or nothing (stat(5)'s rules)."""
        e = self.entry(e.path)
        name = st.name if st.name and st.name != e.name else None
        length = st.length if st.length != NOTOUCH64 else None
        mode = st.mode if st.mode != NOTOUCH32 else None
        mtime = st.mtime if st.mtime != NOTOUCH32 else None
        gid = st.gid if st.gid and st.gid != e.gid else None
        if st.uid and st.uid != e.uid:
            raise FSError("wstat -- attempt to change owner")
        # muid and atime are the server's to keep: a value for them is
        # ignored, as Inferno's kfs does, not refused -- Linux's v9fs sends
        # muid=uname with every rename and an atime with every utimes.
        if (st.qid.path != NOTOUCH64 and st.qid.path != e.path) or (
            st.qid.type != 0xFF and st.qid.type != e.qid.type
        ):
            raise FSError("wstat -- attempt to change qid")
        if (st.type not in (0xFFFF, 0)) or (st.dev not in (NOTOUCH32, 0)):
            raise FSError("wstat -- attempt to change type or dev")
        if all(v is None for v in (name, length, mode, mtime, gid)):
            return
        self.check_writable()
        owner = who.name == e.uid and who.name != users_mod.NONE
        leader = self.users.leader(who.name, e.gid) or (who.admin and e.gid == users_mod.ADM)
        parent = self.entry(e.parent)
        if name is not None:
            check_name(name)
            if e.path == ROOT or not self.allowed(parent, who, 2):
                raise FSError(EPERM)
            if self.child(parent.path, name) is not None:
                raise FSError(EEXIST)
        if length is not None:
            if e.is_dir:
                if length != 0:
                    raise FSError(EISDIR)
                length = None
            elif not self.allowed(e, who, 2):
                raise FSError(EPERM)
            elif e.mode & DMAPPEND and length != e.length:
                raise FSError(EPERM)
        if mode is not None:
            if (mode & DMDIR) != (e.mode & DMDIR):
                raise FSError("wstat -- attempt to change directory bit")
            if not (owner or leader):
                raise FSError(EPERM)
        if mtime is not None and not (owner or leader):
            raise FSError(EPERM)
        if gid is not None:
            if not self.users.exists(gid) or gid == users_mod.NONE:
                raise FSError(f"unknown group {gid}")
            may = (owner and self.member(who, gid)) or (
                leader and self.users.leader(who.name, gid)
            )
            if not may:
                raise FSError(EPERM)
        now = _now()
        with self._change():
            if name is not None:
                self.db.execute("UPDATE file SET name = ? WHERE path = ?", (name, e.path))
                self._touch_dir(parent, who, now)
            if length is not None:
                if length > MAX_LENGTH:
                    raise FSError("file too large")
                self._truncate(e, length, who)
            if mode is not None:
                keep = e.mode & DMDIR
                self.db.execute(
                    "UPDATE file SET mode = ? WHERE path = ?",
                    (keep | (mode & (DMAPPEND | DMEXCL | DMTMP | PERM_MASK)), e.path),
                )
            if mtime is not None:
                self.db.execute("UPDATE file SET mtime = ? WHERE path = ?", (mtime, e.path))
            if gid is not None:
                self.db.execute("UPDATE file SET gid = ? WHERE path = ?", (gid, e.path))
            if mode is not None or gid is not None or name is not None:
                self.db.execute("UPDATE file SET vers = vers + 1 WHERE path = ?", (e.path,))
        if e.path in (self._users_path, self._users_dir()) or (
            name is not None and parent.path == self._users_dir()
        ):
            self.reload_users()

    def sync(self) -> None:
        """Make every change so far durable: one FULL commit flushes the log
        (and every commit before it). Nothing to do when nothing changed."""
        if self.read_only or not self.unsynced or self.frozen:
            return  # (a follower's applier makes its own commits durable)
        self.db.execute("PRAGMA synchronous = FULL")
        try:
            with _tx(self.db):
                self.db.execute("UPDATE meta SET v = v + 1 WHERE k = 'syncs'")
        finally:
            self.db.execute("PRAGMA synchronous = NORMAL")
        self.unsynced = False

    # -- users -------------------------------------------------------------
    def _users_dir(self) -> int:
        adm = self.child(ROOT, "adm")
        return adm.path if adm is not None and adm.is_dir else -1

    def reload_users(self) -> str:
        """Read /adm/users again; on a parse error (or a table without the
        disk's owner) keep the table in force -- the default one if none is yet
        -- and return the error (also kept in users_error)."""
        adm = self._users_dir()
        e = self.child(adm, "users") if adm > 0 else None
        self._users_path = e.path if e is not None else 0
        if e is None:
            self.users, self.users_error = users_mod.parse(users_mod.default(self.owner)), ""
            return ""
        try:
            table = users_mod.parse(self.read(e, 0, e.length).decode())
            if not table.exists(self.owner):
                raise users_mod.UsersError(f"does not name the disk's owner {self.owner}")
            self.users, self.users_error = table, ""
        except (users_mod.UsersError, UnicodeDecodeError) as exc:
            self.users_error = f"/adm/users: {exc}"
            if not self.users.groups:
                # Opening with a bad file: the default table, as fossil does,
                # so the owner can attach and repair it.
                self.users = users_mod.parse(users_mod.default(self.owner))
        return self.users_error

    def users_text(self) -> str:
        adm = self._users_dir()
        e = self.child(adm, "users") if adm > 0 else None
        return self.read(e, 0, e.length).decode(errors="replace") if e else ""

    def is_users_file(self, path: int) -> bool:
        return path == self._users_path and path != 0

    # -- checking ----------------------------------------------------------
    def check(self) -> list[str]:
        """fsck: SQLite's integrity check, then the tree's own invariants."""
        problems = [r[0] for r in self.db.execute("PRAGMA integrity_check") if r[0] != "ok"]
        root = self.db.execute("SELECT parent, mode FROM file WHERE path = ?", (ROOT,)).fetchone()
        if root is None or root[0] != ROOT or not root[1] & DMDIR:
            problems.append("root directory missing or damaged")
        for (path,) in self.db.execute(
            "SELECT f.path FROM file f LEFT JOIN file p ON f.parent = p.path "
            "WHERE p.path IS NULL OR (p.mode & ?) = 0",
            (DMDIR,),
        ):
            problems.append(f"file {path} has no parent directory")
        for path, length, top in self.db.execute(
            "SELECT f.path, f.length, max(b.n * ? + length(b.data)) FROM file f "
            "JOIN block b ON b.file = f.path GROUP BY f.path",
            (BLOCK,),
        ):
            if top > length:
                problems.append(f"file {path} holds data past its length")
        for (file,) in self.db.execute(
            "SELECT DISTINCT b.file FROM block b LEFT JOIN file f ON f.path = b.file "
            "WHERE f.path IS NULL"
        ):
            problems.append(f"blocks of removed file {file}")
        return problems


__all__ = [
    "BLOCK",
    "Caller",
    "Disk",
    "Entry",
    "FSError",
    "NotADisk",
    "Usage",
    "format",
    "is_disk",
    "usage",
]
