"""Replication: Inferno's updatelog and applylog, inside the chunk's database.

The primary's change log is the ``changed`` table (geryon.disk.fs): for every
file row and block ever written, the seq of its last change. A follower at
seq S asks for the rows changed after S; the primary answers from one read
transaction with those rows as they are now (a row that is gone is a delete)
and the seq B they are current to. Applying that in one transaction moves
the follower from the primary's state at S to its state at B exactly: rows
changed between S and B are set to their value at B, no other row differs.
A block written a thousand times between two reads travels once.

A position is a seq within a history of terms (the ``epochs`` table, copied
to followers with every batch): each time a server takes the primary role
(a promotion, and every start) it begins a term at its next seq, with the
registry's epoch number and a random id. A follower's history agrees with
the primary's up to the end, in both, of the latest term both tables hold
(``shared_until``); a follower holding changes past that point -- an old
primary that wrote after its replica was promoted, or a follower that
applied commits its primary lost in an OS crash -- has diverged: the files
those changes touched are copied to the primary's ``/recovered`` directory,
then the follower starts over from a snapshot.

A batch travels in parts that fit one 9P read, each a JSON header line
followed by records; the follower applies the parts in one transaction,
committed (durably) at the part whose header says ``more: false``.
"""

from __future__ import annotations

import json
import sqlite3
import struct
import uuid as uuid_mod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from geryon.disk import fs
from geryon.disk.fs import BLOCK, ROOT, Caller, Disk, Entry, FSError

RECOVERED = "recovered"  # the top directory that keeps a diverged follower's changes
# Tombstones older than this many changes are dropped; a follower further
# behind starts over from a snapshot (checked at its follow and at each batch).
KEEP_TOMBSTONES = 100_000

_FILE = struct.Struct("<BQQIIIQQ")  # 'F', path, parent, mode, atime, mtime, vers, length
_BLOCK = struct.Struct("<BQQI")  # 'B', file, n, len(data)
_GONE = struct.Struct("<BQQ")  # 'f' or 'b', file, n


class Resync(Exception):
    """The follower cannot go on from its position: ``diverged`` is the last
    seq it shares with the primary when it holds changes past it, else -1."""

    def __init__(self, reason: str, diverged: int = -1) -> None:
        super().__init__(reason)
        self.diverged = diverged


Term = tuple[int, int, str]  # (first seq, epoch, id): one row of the epochs table


def terms(db: sqlite3.Connection) -> list[Term]:
    return [(int(s), int(e), str(i)) for s, e, i in db.execute("SELECT * FROM epochs ORDER BY 1")]


def meta(db: sqlite3.Connection) -> dict[str, object]:
    return dict(db.execute("SELECT k, v FROM meta"))


def shared_until(mine: list[Term], mine_seq: int, theirs: list[Term]) -> int:
    """The last seq of THEIRS' history that MINE (at MINE_SEQ) shares: up to
    the end, in both, of the latest term both have; -1 when they share none.
    A term is a primary's run of writes; its random id tells two primaries
    apart even when the registry gave them the same epoch number."""
    index = {t: k for k, t in enumerate(mine)}
    for j in range(len(theirs) - 1, -1, -1):
        k = index.get(theirs[j])
        if k is None:
            continue
        end_mine = mine[k + 1][0] - 1 if k + 1 < len(mine) else mine_seq
        end_theirs = theirs[j + 1][0] - 1 if j + 1 < len(theirs) else end_mine
        return min(end_mine, end_theirs)
    return -1


def check_follow(disk: Disk, uuid: str, seq: int, their_terms: list[Term]) -> None:
    """Whether a follower of DISK at SEQ of disk UUID, whose epochs table is
    THEIR_TERMS, can go on from SEQ; Resync saying why not. (The primary's
    side of a follow.)"""
    m = meta(disk.db)
    if uuid != m["uuid"]:
        raise Resync("another disk")
    # Checked before the horizon: what a diverged follower holds must be
    # kept, however far behind it is.
    end = shared_until(terms(disk.db), disk.seq, their_terms)
    if seq > end:
        raise Resync(f"diverged after seq {end}", diverged=max(end, 0))
    check_horizon(disk, seq)


def check_horizon(disk: Disk, seq: int) -> None:
    horizon = _meta_int(disk.db, "horizon")
    if seq < horizon:
        raise Resync(f"seq {seq} is older than the log's horizon {horizon}")


@dataclass
class Header:
    """What each part of a batch says about it and about the primary."""

    uuid: str
    start: int  # the follower's seq the batch applies to (0 with wipe)
    seq: int  # the seq the batch brings the follower to
    epoch: int  # the primary's epoch
    epochs: list[Term]
    owner: str
    maxpath: int  # the primary's highest qid path ever used: never reused
    horizon: int
    acked: int = 0  # the highest seq the primary has acknowledged as durable
    in_sync: bool | None = None  # synchronous mode: whether acknowledgements wait for us
    wipe: bool = False  # a snapshot: drop everything first
    more: bool = False  # another part follows

    def encode(self) -> bytes:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return json.dumps(d, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def decode(cls, raw: bytes) -> Header:
        d = json.loads(raw)
        d["epochs"] = [tuple(x) for x in d["epochs"]]
        return cls(**d)


def reader(path: Path) -> sqlite3.Connection:
    """A read-only connection for Producers: one per follower, kept."""
    return sqlite3.connect(
        f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
    )


@dataclass
class Producer:
    """One batch for a follower at seq SINCE (a snapshot when WIPE), read on
    DB (the follower's own connection: see ``reader``) in one read
    transaction, handed out in parts."""

    db: sqlite3.Connection
    since: int
    wipe: bool = False
    header: Header = field(init=False)
    _rows: Iterator[bytes] | None = field(init=False, default=None)
    _pending: bytes = field(init=False, default=b"")

    def __post_init__(self) -> None:
        db = self.db
        db.execute("BEGIN")  # one snapshot for every part
        m = meta(db)
        seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'file'").fetchone()
        self.header = Header(
            uuid=str(m["uuid"]),
            start=0 if self.wipe else self.since,
            seq=int(str(m["seq"])),
            epoch=int(str(m["epoch"])),
            epochs=terms(db),
            owner=str(m["owner"]),
            maxpath=int(seq[0]) if seq else 0,
            horizon=int(str(m["horizon"])),
            wipe=self.wipe,
        )
        self._rows = self._records(db)

    def _records(self, db: sqlite3.Connection) -> Iterator[bytes]:
        if self.wipe:
            files = db.execute(f"SELECT {fs._COLS} FROM file")
            blocks = db.execute("SELECT file, n, data FROM block")
        else:
            s = self.since
            for (path,) in db.execute(
                "SELECT c.file FROM changed c LEFT JOIN file f ON f.path = c.file "
                "WHERE c.kind = 0 AND c.seq > ? AND f.path IS NULL",
                (s,),
            ):
                yield _GONE.pack(ord("f"), path, 0)
            for file, n in db.execute(
                "SELECT c.file, c.n FROM changed c LEFT JOIN block b ON b.file = c.file "
                "AND b.n = c.n WHERE c.kind = 1 AND c.seq > ? AND b.file IS NULL",
                (s,),
            ):
                yield _GONE.pack(ord("b"), file, n)
            files = db.execute(
                f"SELECT {', '.join('f.' + c for c in fs._COLS.split(', '))} FROM changed c "
                "JOIN file f ON f.path = c.file WHERE c.kind = 0 AND c.seq > ?",
                (s,),
            )
            blocks = db.execute(
                "SELECT b.file, b.n, b.data FROM changed c JOIN block b "
                "ON b.file = c.file AND b.n = c.n WHERE c.kind = 1 AND c.seq > ?",
                (s,),
            )
        for path, parent, name, mode, uid, gid, muid, atime, mtime, vers, length in files:
            strings = b"".join(
                len(b).to_bytes(2, "little") + b
                for b in (x.encode() for x in (name, uid, gid, muid))
            )
            yield _FILE.pack(ord("F"), path, parent, mode, atime, mtime, vers, length) + strings
        for file, n, data in blocks:
            yield _BLOCK.pack(ord("B"), file, n, len(data)) + data

    def part(self, limit: int, *, acked: int, in_sync: bool | None = None) -> bytes:
        """The next part, at most LIMIT bytes (the last one says more=False)."""
        if self._rows is None:
            raise ValueError("the batch was closed")
        out: list[bytes] = []
        size = 0
        budget = limit - 512 - len(self.header.encode())
        while True:
            rec = self._pending or next(self._rows, b"")
            self._pending = b""
            if not rec:
                self.header.more = False
                break
            if size + len(rec) > budget and out:
                self._pending = rec
                self.header.more = True
                break
            out.append(rec)
            size += len(rec)
        self.header.acked, self.header.in_sync = acked, in_sync
        if not self.header.more:
            self.close()
        return self.header.encode() + b"".join(out)

    def close(self) -> None:
        """End the read transaction (the connection stays the follower's)."""
        self._rows = None
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")


def _records(body: memoryview) -> Iterator[tuple[str, tuple]]:
    i = 0
    while i < len(body):
        kind = chr(body[i])
        if kind == "F":
            _, path, parent, mode, atime, mtime, vers, length = _FILE.unpack_from(body, i)
            i += _FILE.size
            strings = []
            for _ in range(4):
                n = int.from_bytes(body[i : i + 2], "little")
                strings.append(bytes(body[i + 2 : i + 2 + n]).decode())
                i += 2 + n
            name, uid, gid, muid = strings
            yield "F", (path, parent, name, mode, uid, gid, muid, atime, mtime, vers, length)
        elif kind == "B":
            _, file, n, size = _BLOCK.unpack_from(body, i)
            i += _BLOCK.size
            yield "B", (file, n, bytes(body[i : i + size]))
            i += size
        elif kind in "fb":
            _, file, n = _GONE.unpack_from(body, i)
            i += _GONE.size
            yield kind, (file, n)
        else:
            raise ValueError(f"bad record {kind!r} in a batch")


class Applier:
    """The follower's side: parts in, one transaction per batch, on a
    connection of its own so that readers of the disk see whole batches."""

    def __init__(self, disk: Disk) -> None:
        self.disk = disk
        self.db = fs._connect(disk.path)
        self.db.execute("PRAGMA synchronous = FULL")  # an applied seq is acknowledged
        page = self.db.execute("PRAGMA page_size").fetchone()[0]
        self.db.execute(f"PRAGMA max_page_count = {disk.capacity // page}")
        self.header: Header | None = None

    def close(self) -> None:
        self.abort()
        self.db.close()

    def abort(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        self.header = None

    def apply(self, part: bytes) -> Header | None:
        """Apply one part; the batch's header once it is committed, else None."""
        nl = part.index(b"\n")
        h = Header.decode(part[:nl])
        db = self.db
        try:
            if self.header is None:
                if h.start != (0 if h.wipe else self.disk.seq):
                    raise ValueError(f"batch for seq {h.start}, follower at {self.disk.seq}")
                db.execute("BEGIN IMMEDIATE")
                # The rows' triggers log them at the batch's seq: a follower's
                # log serves its own followers once it is promoted.
                db.execute("UPDATE meta SET v = ? WHERE k = 'seq'", (h.seq,))
                if h.wipe:
                    for table in ("file", "block", "changed"):
                        db.execute(f"DELETE FROM {table}")
                self.header = h
            for kind, row in _records(memoryview(part)[nl + 1 :]):
                if kind == "F":
                    db.execute(
                        f"INSERT OR REPLACE INTO file({fs._COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        row,
                    )
                elif kind == "B":
                    db.execute("INSERT OR REPLACE INTO block VALUES (?, ?, ?)", row)
                elif kind == "f":
                    db.execute("DELETE FROM file WHERE path = ?", (row[0],))
                else:
                    db.execute("DELETE FROM block WHERE file = ? AND n = ?", row)
            if h.more:
                return None
            db.execute("DELETE FROM epochs")
            db.executemany("INSERT INTO epochs VALUES (?, ?, ?)", h.epochs)
            horizon = h.seq if h.wipe else max(h.horizon, _meta_int(db, "horizon"))
            for k, v in (
                ("epoch", h.epoch),
                ("owner", h.owner),
                ("uuid", h.uuid),
                ("horizon", horizon),
            ):
                db.execute("UPDATE meta SET v = ? WHERE k = ?", (v, k))
            db.execute(
                "UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'file'", (h.maxpath,)
            )
            db.execute("COMMIT")
        except BaseException:
            self.abort()
            raise
        self.header = None
        d = self.disk
        d.seq, d.epoch, d.uuid, d.owner = h.seq, h.epoch, h.uuid, h.owner
        d.reload_users()
        return h


def _meta_int(db: sqlite3.Connection, k: str) -> int:
    row = db.execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()
    return int(row[0]) if row else 0


# -- the primary's side of epochs and the log's upkeep ------------------------


def begin_term(disk: Disk, epoch: int) -> None:
    """DISK's server takes the primary role at EPOCH: its writes from the
    next seq on are a new term. (Every time, a restart too: a primary that
    lost commits it had sent -- the OS crashed before they were flushed --
    writes new ones under a new id, and a follower holding the lost ones is
    seen to have diverged.)"""
    with fs._tx(disk.db):
        disk.db.execute(
            "INSERT OR REPLACE INTO epochs VALUES (?, ?, ?)",
            (disk.seq + 1, epoch, uuid_mod.uuid4().hex[:16]),
        )
        disk.db.execute("UPDATE meta SET v = ? WHERE k = 'epoch'", (epoch,))
    disk.epoch = epoch


def trim(disk: Disk, keep: int = KEEP_TOMBSTONES) -> int:
    """Drop tombstones more than KEEP changes old; the tombstones dropped."""
    horizon = disk.seq - keep
    if horizon <= _meta_int(disk.db, "horizon"):
        return 0
    with fs._tx(disk.db):
        cur = disk.db.execute(
            "DELETE FROM changed WHERE seq <= ? AND ("
            "(kind = 0 AND file NOT IN (SELECT path FROM file)) OR (kind = 1 AND NOT EXISTS "
            "(SELECT 1 FROM block b WHERE b.file = changed.file AND b.n = changed.n)))",
            (horizon,),
        )
        disk.db.execute("UPDATE meta SET v = ? WHERE k = 'horizon'", (horizon,))
    return cur.rowcount


# -- divergence: what a follower keeps before it starts over ------------------


def path_of(disk: Disk, e: Entry) -> str:
    names: list[str] = []
    while e.path != ROOT:
        names.append(e.name)
        e = disk.entry(e.parent)
    return "/".join(reversed(names))


def diverged_files(disk: Disk, after: int) -> list[tuple[str, Entry]]:
    """The files (not directories) changed on DISK after seq AFTER that
    still exist, by path name: what the primary never saw."""
    out = []
    for (path,) in disk.db.execute(
        "SELECT DISTINCT file FROM changed WHERE seq > ? ORDER BY file", (after,)
    ).fetchall():
        try:
            e = disk.entry(path)
        except FSError:
            continue  # removed since: nothing to keep
        if e.is_dir:
            continue
        name = path_of(disk, e)
        if not name.startswith(RECOVERED + "/"):
            out.append((name, e))
    return out


def recovery_records(disk: Disk, after: int, folder: str, limit: int) -> Iterator[bytes]:
    """The diverged files as records for the primary's ``recover`` file:
    a JSON line (path under /recovered, mode, mtime, offset) and data."""
    for name, e in diverged_files(disk, after):
        offset = 0
        while True:
            head = (
                json.dumps(
                    {
                        "path": f"{folder}/{name}",
                        "mode": e.mode & 0o777,
                        "mtime": e.mtime,
                        "offset": offset,
                    }
                ).encode()
                + b"\n"
            )
            data = disk.read(e, offset, min(limit - len(head), BLOCK * 8))
            yield head + data
            offset += len(data)
            if offset >= e.length:
                break


def recover(disk: Disk, record: bytes) -> None:
    """The primary's side: write one recovery record under /recovered as
    the disk's owner, making the directories it needs."""
    nl = record.index(b"\n")  # ValueError, KeyError, TypeError: a malformed record
    r = json.loads(record[:nl])
    if not isinstance(r, dict):
        raise ValueError("want a JSON object")
    data = record[nl + 1 :]
    names = [n for n in str(r["path"]).split("/") if n]
    offset, mode = int(r["offset"]), int(r["mode"])
    if not 0 <= offset <= fs.MAX_LENGTH - len(data):
        raise ValueError(f"bad offset {offset}")
    if not names or any(n in (".", "..") for n in names):
        raise FSError(fs.ENAME)
    who = Caller(disk.owner)
    d = disk.entry(ROOT)
    for name in [RECOVERED, *names[:-1]]:
        nxt = disk.child(d.path, name)
        if nxt is None:
            nxt = disk.create(d, name, fs.DMDIR | 0o775, fs.OREAD, who)
        elif not nxt.is_dir:
            raise FSError(fs.ENOTDIR)
        d = nxt
    e = disk.child(d.path, names[-1])
    if e is None:
        e = disk.create(d, names[-1], mode & 0o777, fs.OWRITE, who)
    if data:
        disk.write(e, offset, bytes(data), who)


__all__ = [
    "Applier",
    "Header",
    "Producer",
    "Resync",
    "begin_term",
    "check_follow",
    "check_horizon",
    "diverged_files",
    "reader",
    "recover",
    "recovery_records",
    "shared_until",
    "terms",
    "trim",
]
