"""geryon.disk.fs and geryon.disk.users without a network: formatting a
chunk, the tree's reads and writes, capacity, Plan 9 permissions, the users
file, and the fsck (Disk.check) finding a tree damaged by hand."""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from geryon.disk import fs, users
from geryon.disk.fs import Caller, Disk, FSError
from geryon.disk.styx import DMAPPEND, DMDIR, ORCLOSE, ORDWR, OREAD, OTRUNC, OWRITE, Stat

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
ALICE, BOB, CAROL, ERIN, NONE = (Caller(n) for n in ("alice", "bob", "carol", "erin", "none"))


@pytest.fixture
def chunk(tmp_path: Path) -> Path:
    p = tmp_path / "chunk"
    fs.format(p, 4 << 20, owner="alice", users_text=USERS)
    return p


@pytest.fixture
def disk(chunk: Path) -> Iterator[Disk]:
    d = Disk(chunk)
    yield d
    d.close()


def touch(**changes: object) -> Stat:
    st = Stat.dont_touch()
    for k, v in changes.items():
        setattr(st, k, v)
    return st


def mkfile(d: Disk, parent: fs.Entry, name: str, data: bytes = b"", perm: int = 0o664,
           who: Caller = ALICE) -> fs.Entry:  # fmt: skip
    e = d.create(parent, name, perm, OWRITE, who)
    if data:
        d.write(e, 0, data, who)
    return d.entry(e.path)


def root(d: Disk) -> fs.Entry:
    return d.entry(fs.ROOT)


def whole(d: Disk, e: fs.Entry) -> bytes:
    e = d.entry(e.path)
    return d.read(e, 0, e.length)


# -- format ----------------------------------------------------------------------


def test_format_makes_an_empty_disk(chunk: Path, disk: Disk) -> None:
    assert fs.is_disk(chunk)
    r = root(disk)
    assert (r.name, r.parent, r.mode, r.uid) == ("/", fs.ROOT, DMDIR | 0o775, "alice")
    assert [c.name for c in disk.children(fs.ROOT)] == ["adm"]
    users_file = disk.walk1(disk.walk1(r, "adm", ALICE), "users", ALICE)
    assert whole(disk, users_file) == USERS.encode()
    assert (users_file.uid, users_file.gid, users_file.mode) == ("alice", "adm", 0o664)
    assert disk.check() == []
    assert disk.usage().files == 3 and disk.usage().capacity == 4 << 20


def test_format_default_users(tmp_path: Path) -> None:
    p = tmp_path / "chunk"
    fs.format(p, 1 << 20, owner="glenda")
    d = Disk(p)
    try:
        assert d.users_text() == users.default("glenda")
        assert d.users.exists("glenda") and d.users.member("glenda", "adm")
    finally:
        d.close()


def test_format_refuses_an_existing_disk(chunk: Path) -> None:
    d = Disk(chunk)
    mkfile(d, root(d), "precious", b"data")
    d.close()
    with pytest.raises(FileExistsError, match="already holds a file system"):
        fs.format(chunk, 4 << 20, owner="alice")
    d = Disk(chunk)
    assert d.child(fs.ROOT, "precious") is not None  # untouched
    d.close()
    # --force wipes it.
    fs.format(chunk, 4 << 20, owner="alice", force=True)
    d = Disk(chunk)
    try:
        assert d.child(fs.ROOT, "precious") is None
    finally:
        d.close()


def test_force_format_leaves_no_old_log_behind(chunk: Path) -> None:
    """A server killed with -9 leaves CHUNK-wal: formatting over it must not
    let SQLite replay the old disk's log into the new one."""
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from geryon.disk.fs import Disk, Caller, ROOT\n"
        "d = Disk(Path(sys.argv[1]))\n"
        "e = d.create(d.entry(ROOT), 'old', 0o664, 1, Caller('alice'))\n"
        "d.write(e, 0, b'x' * 100000, Caller('alice'))\n"
        "d.sync()\n"
        "os._exit(0)  # as kill -9: no checkpoint, the log stays\n"
    )
    subprocess.run([sys.executable, "-c", code, str(chunk)], check=True)
    assert Path(f"{chunk}-wal").stat().st_size > 0
    fs.format(chunk, 4 << 20, owner="alice", users_text=USERS, force=True)
    d = Disk(chunk)
    try:
        assert [c.name for c in d.children(fs.ROOT)] == ["adm"]
        assert d.check() == []
    finally:
        d.close()


def test_format_in_a_missing_directory_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        fs.format(tmp_path / "no" / "chunk", 1 << 20, owner="alice")


def test_format_refuses_a_served_disk(chunk: Path, disk: Disk) -> None:
    with pytest.raises(fs.NotADisk, match="in use"):
        fs.format(chunk, 4 << 20, owner="alice", force=True)


@pytest.mark.parametrize(
    "content",
    [b"x", b"\0" * 5000 + b"\1", b"SQLite format 3\0" + bytes(100)],
    ids=["one byte", "a byte after zeros", "a foreign SQLite header"],
)
def test_format_refuses_a_file_with_data(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "chunk"
    p.write_bytes(content)
    with pytest.raises(FileExistsError, match="holds data that is not a disk"):
        fs.format(p, 1 << 20, owner="alice")
    assert p.read_bytes() == content


def test_format_refuses_data_after_a_hole(tmp_path: Path) -> None:
    p = tmp_path / "chunk"
    with open(p, "wb") as f:
        f.truncate(8 << 20)
        f.seek(5 << 20)
        f.write(b"\7")
    with pytest.raises(FileExistsError):
        fs.format(p, 1 << 20, owner="alice")


@pytest.mark.parametrize("kind", ["sparse", "dense", "empty"])
def test_format_accepts_a_zero_file(tmp_path: Path, kind: str) -> None:
    # A preallocated chunk (truncate or dd from /dev/zero) holds nothing yet.
    p = tmp_path / "chunk"
    with open(p, "wb") as f:
        if kind == "sparse":
            f.truncate(64 << 20)
        elif kind == "dense":
            f.write(bytes(1 << 20))
    fs.format(p, 1 << 20, owner="alice")
    assert fs.is_disk(p)


def test_format_refusals(tmp_path: Path) -> None:
    p = tmp_path / "chunk"
    with pytest.raises(ValueError, match="below the minimum"):
        fs.format(p, fs.MIN_CAPACITY - 1, owner="alice")
    with pytest.raises(ValueError, match="does not name the owner"):
        fs.format(p, 1 << 20, owner="zed", users_text=USERS)
    with pytest.raises(users.UsersError, match="line 2"):
        fs.format(p, 1 << 20, owner="alice", users_text="0:none::\nbroken\n")
    assert not p.exists()
    # Nothing is left beside it either.
    assert sorted(os.listdir(tmp_path)) == []


def test_open_refusals(tmp_path: Path, chunk: Path, disk: Disk) -> None:
    with pytest.raises(fs.NotADisk, match="no such file"):
        Disk(tmp_path / "missing")
    other = tmp_path / "other"
    other.write_bytes(b"hello")
    with pytest.raises(fs.NotADisk, match="not a disk"):
        Disk(other)
    assert not fs.is_disk(other)
    # One server per chunk: the flock refuses a second.
    with pytest.raises(fs.NotADisk, match="in use by another chunk server"):
        Disk(chunk)
    # Reading beside it is fine.
    assert fs.usage(chunk).files == 3


# -- reading and writing -----------------------------------------------------------


def test_read_write_against_a_model(disk: Disk) -> None:
    # Random writes at offsets around block edges, compared with a bytearray.
    rnd = random.Random(7)
    e = mkfile(disk, root(disk), "f")
    model = bytearray()
    edges = [0, 1, fs.BLOCK - 3, fs.BLOCK, 2 * fs.BLOCK + 5, 3 * fs.BLOCK - 1]
    for _ in range(60):
        if rnd.random() < 0.7:
            off = max(rnd.choice(edges) + rnd.randrange(-2, 3), 0)
        else:
            off = rnd.randrange(4 * fs.BLOCK)
        data = rnd.randbytes(rnd.choice([1, 7, 100, fs.BLOCK, fs.BLOCK + 3]))
        assert disk.write(e, off, data, ALICE) == len(data)
        if len(model) < off:
            model.extend(bytes(off - len(model)))
        model[off : off + len(data)] = data
        if rnd.random() < 0.1:
            cut = rnd.randrange(len(model) + 1)
            disk.wstat(e, touch(length=cut), ALICE)
            del model[cut:]
        assert disk.entry(e.path).length == len(model)
    assert whole(disk, e) == bytes(model)
    for off, n in [(0, 10), (fs.BLOCK - 2, 4), (len(model) - 1, 10), (len(model), 5)]:
        assert disk.read(disk.entry(e.path), off, n) == bytes(model[off : off + n])
    assert disk.check() == []


def test_truncate_then_grow_reads_zeros(disk: Disk) -> None:
    e = mkfile(disk, root(disk), "f", b"A" * (fs.BLOCK + 10))
    disk.wstat(e, touch(length=5), ALICE)
    disk.wstat(e, touch(length=fs.BLOCK + 10), ALICE)
    assert whole(disk, e) == b"A" * 5 + bytes(fs.BLOCK + 5)
    disk.wstat(e, touch(length=fs.BLOCK), ALICE)  # exactly a block edge
    assert whole(disk, e) == b"A" * 5 + bytes(fs.BLOCK - 5)
    assert disk.check() == []


def test_append_only_and_trunc(disk: Disk) -> None:
    e = disk.create(root(disk), "log", DMAPPEND | 0o664, OWRITE, ALICE)
    disk.write(e, 0, b"one ", ALICE)
    disk.write(e, 0, b"two", ALICE)
    assert whole(disk, e) == b"one two"
    # OTRUNC leaves an append-only file alone; it empties an ordinary one.
    disk.opened(disk.entry(e.path), OWRITE | OTRUNC, ALICE)
    assert whole(disk, e) == b"one two"
    f = mkfile(disk, root(disk), "f", b"data")
    disk.opened(f, OWRITE | OTRUNC, ALICE)
    assert disk.entry(f.path).length == 0
    # Nor may a wstat shorten an append-only file.
    with pytest.raises(FSError, match=fs.EPERM):
        disk.wstat(e, touch(length=0), ALICE)


def test_failed_wstat_changes_nothing(disk: Disk) -> None:
    # The rename runs inside the transaction before the length is refused:
    # the rollback takes it back too.
    e = mkfile(disk, root(disk), "f", b"x")
    with pytest.raises(FSError, match="file too large"):
        disk.wstat(e, touch(name="g", length=1 << 63), ALICE)
    after = disk.entry(e.path)
    assert (after.name, after.length, after.vers) == ("f", 1, e.vers)


def test_names(disk: Disk) -> None:
    for bad in ("", ".", "..", "a/b", "nul\0", "x" * 256):
        with pytest.raises(FSError, match=fs.ENAME):
            disk.create(root(disk), bad, 0o644, OWRITE, ALICE)
    disk.create(root(disk), "é" * 127, 0o644, OWRITE, ALICE)  # 254 bytes
    with pytest.raises(FSError, match=fs.ENAME):
        disk.create(root(disk), "é" * 128, 0o644, OWRITE, ALICE)


def test_walk1(disk: Disk) -> None:
    r = root(disk)
    assert disk.walk1(r, "..", ALICE).path == fs.ROOT
    adm = disk.walk1(r, "adm", BOB)
    assert disk.walk1(adm, "..", BOB).path == fs.ROOT
    f = disk.walk1(adm, "users", BOB)
    with pytest.raises(FSError, match=fs.ENOTDIR):
        disk.walk1(f, "x", ALICE)
    for missing in ("nope", ".", ""):
        with pytest.raises(FSError, match=fs.ENONEXIST):
            disk.walk1(r, missing, ALICE)
    d = disk.create(r, "private", DMDIR | 0o700, OREAD, ALICE)
    with pytest.raises(FSError, match=fs.EPERM):
        disk.walk1(d, "..", BOB)  # searching needs x, even to go up


def test_remove(disk: Disk) -> None:
    d = disk.create(root(disk), "d", DMDIR | 0o775, OREAD, ALICE)
    f = mkfile(disk, d, "f", b"x" * (3 * fs.BLOCK))
    with pytest.raises(FSError, match=fs.ENOTEMPTY):
        disk.remove(d, ALICE)
    with pytest.raises(FSError, match=fs.EPERM):
        disk.remove(f, BOB)
    with pytest.raises(FSError, match=fs.EPERM):
        disk.remove(root(disk), ALICE)
    disk.remove(f, ALICE)
    disk.remove(d, ALICE)
    # Its blocks go with it.
    (n,) = disk.db.execute("SELECT count(*) FROM block WHERE file = ?", (f.path,)).fetchone()
    assert n == 0 and disk.check() == []


# -- capacity --------------------------------------------------------------------


def test_capacity_is_respected(tmp_path: Path) -> None:
    p = tmp_path / "chunk"
    cap = fs.MIN_CAPACITY
    fs.format(p, cap, owner="alice")
    d = Disk(p)
    try:
        r = root(d)
        kept: dict[int, bytes] = {}
        with pytest.raises(FSError, match=fs.EFULL):
            for i in range(1000):
                e = d.create(r, f"f{i}", 0o644, OWRITE, ALICE)
                data = bytes([i % 251 + 1]) * 9000
                before = d.entry(e.path)
                try:
                    d.write(e, 0, data, ALICE)
                except FSError:
                    # A refused write is undone whole.
                    after = d.entry(e.path)
                    assert (after.length, after.vers) == (before.length, before.vers)
                    raise
                kept[e.path] = data
        assert len(kept) >= 5
        assert d.usage().used <= cap
        for path, data in kept.items():
            assert whole(d, d.entry(path)) == data
        assert d.check() == []
        # Removing files makes room again.
        for path in sorted(kept)[:2]:
            d.remove(d.entry(path), ALICE)
        e = d.create(r, "again", 0o644, OWRITE, ALICE)
        d.write(e, 0, b"y" * 9000, ALICE)
    finally:
        d.close()
    assert p.stat().st_size <= cap


# -- permissions -----------------------------------------------------------------


@pytest.fixture
def perm_file(disk: Disk) -> fs.Entry:
    e = mkfile(disk, root(disk), "f")
    disk.wstat(e, touch(gid="staff"), ALICE)
    return disk.entry(e.path)


def with_mode(disk: Disk, e: fs.Entry, mode: int) -> fs.Entry:
    disk.wstat(e, touch(mode=mode), ALICE)
    return disk.entry(e.path)


@pytest.mark.parametrize(
    ("mode", "who", "granted"),
    [
        (0o750, ALICE, 7),  # owner class
        (0o750, CAROL, 5),  # group class: carol is in staff
        (0o750, BOB, 0),  # nothing for other
        (0o754, BOB, 4),
        (0o007, ALICE, 7),  # a bit granted to anyone is granted to the owner too
        (0o070, ALICE, 7),  # and the owner is a member of staff
        (0o707, NONE, 7),  # none: the other class
        (0o770, NONE, 0),  # and only it
        (0o070, ERIN, 0),
        (0o070, Caller("host1", admin=True), 0),  # an admin is in adm, not staff
    ],
)
def test_allowed(disk: Disk, perm_file: fs.Entry, mode: int, who: Caller, granted: int) -> None:
    e = with_mode(disk, perm_file, mode)
    got = sum(bit for bit in (4, 2, 1) if disk.allowed(e, who, bit))
    assert got == granted
    # Asking for several bits needs each of them.
    assert disk.allowed(e, who, 6) == (granted & 6 == 6)


def test_admin_is_a_member_of_adm(disk: Disk) -> None:
    users_file = disk.walk1(disk.walk1(root(disk), "adm", ALICE), "users", ALICE)
    admin, stranger = Caller("host1", admin=True), Caller("host1")
    assert disk.allowed(users_file, admin, 6)
    assert not disk.allowed(users_file, stranger, 2)
    disk.check_open(users_file, OWRITE, admin)
    with pytest.raises(FSError, match=fs.EPERM):
        disk.check_open(users_file, OWRITE, stranger)


def test_none_owns_nothing(disk: Disk) -> None:
    d = disk.create(root(disk), "pub", DMDIR | 0o775, OREAD, ALICE)
    disk.wstat(d, touch(mode=DMDIR | 0o777), ALICE)
    e = disk.create(disk.entry(d.path), "mine", 0o600, OWRITE, NONE)
    assert e.uid == "none" and not disk.allowed(e, NONE, 4)
    with pytest.raises(FSError, match=fs.EPERM):
        disk.wstat(e, touch(mode=0o666), NONE)


def test_open_checks(disk: Disk, perm_file: fs.Entry) -> None:
    e = with_mode(disk, perm_file, 0o640)
    disk.check_open(e, OREAD, CAROL)
    for mode in (OWRITE, ORDWR, OREAD | OTRUNC):
        with pytest.raises(FSError, match=fs.EPERM):
            disk.check_open(e, mode, CAROL)
    with pytest.raises(FSError, match=fs.EBADMODE):
        disk.check_open(e, 0x80, ALICE)
    # ORCLOSE needs write in the parent (root: alice's 0775).
    disk.check_open(e, OREAD | ORCLOSE, ALICE)
    with pytest.raises(FSError, match=fs.EPERM):
        disk.check_open(e, OREAD | ORCLOSE, CAROL)
    d = disk.entry(fs.ROOT)
    for mode in (OWRITE, OREAD | OTRUNC, OREAD | ORCLOSE):
        with pytest.raises(FSError, match=fs.EISDIR):
            disk.check_open(d, mode, ALICE)


def test_create_masks_perm(disk: Disk) -> None:
    d = disk.create(root(disk), "d", DMDIR | 0o750, OREAD, ALICE)
    assert d.mode == DMDIR | 0o750
    f = disk.create(d, "f", 0o777, OWRITE, ALICE)
    assert f.mode == 0o751  # 0777 & (~0666 | 0640)
    sub = disk.create(d, "sub", DMDIR | 0o777, OREAD, ALICE)
    assert sub.mode == DMDIR | 0o750
    assert (f.uid, f.gid, f.muid) == ("alice", d.gid, "alice")
    with pytest.raises(FSError, match=fs.EPERM):
        disk.create(d, "g", 0o644, OWRITE, BOB)
    with pytest.raises(FSError, match=fs.EEXIST):
        disk.create(d, "f", 0o644, OWRITE, ALICE)
    with pytest.raises(FSError, match=fs.ENOTDIR):
        disk.create(f, "g", 0o644, OWRITE, ALICE)
    with pytest.raises(FSError, match=fs.EISDIR):
        disk.create(d, "e", DMDIR | 0o755, OWRITE, ALICE)


def test_wstat_rules(disk: Disk, perm_file: fs.Entry) -> None:
    e = perm_file
    with pytest.raises(FSError, match="change owner"):
        disk.wstat(e, touch(uid="bob"), ALICE)
    with pytest.raises(FSError, match="directory bit"):
        disk.wstat(e, touch(mode=DMDIR | 0o644), ALICE)
    with pytest.raises(FSError, match=fs.EPERM):
        disk.wstat(e, touch(mode=0o600), BOB)
    # alice leads staff: as leader she may chmod carol's file in it; bob may not.
    d = disk.create(root(disk), "shared", DMDIR | 0o775, OREAD, ALICE)
    disk.wstat(d, touch(gid="staff"), ALICE)
    c = disk.create(disk.entry(d.path), "c", 0o664, OWRITE, CAROL)
    assert (c.uid, c.gid) == ("carol", "staff")
    disk.wstat(c, touch(mode=0o600), ALICE)
    with pytest.raises(FSError, match=fs.EPERM):
        disk.wstat(c, touch(mode=0o666), BOB)
    with pytest.raises(FSError, match="unknown group"):
        disk.wstat(e, touch(gid="none"), ALICE)
    # An admin caller counts as a member of adm: the owner may give a file to it.
    disk.wstat(e, touch(gid="adm"), Caller("alice", admin=True))
    assert disk.entry(e.path).gid == "adm"
    with pytest.raises(FSError, match=fs.EPERM):
        disk.wstat(e, touch(gid="staff"), ERIN)  # neither owner nor adm's leader


def test_read_only(chunk: Path) -> None:
    d = Disk(chunk)
    mkfile(d, root(d), "f", b"x")
    d.close()
    d = Disk(chunk, read_only=True)
    try:
        f = d.child(fs.ROOT, "f")
        assert f is not None and d.read(f, 0, 10) == b"x"
        for attempt in (
            lambda: d.create(root(d), "g", 0o644, OWRITE, ALICE),
            lambda: d.write(f, 0, b"y", ALICE),
            lambda: d.remove(f, ALICE),
            lambda: d.wstat(f, touch(mode=0o600), ALICE),
            lambda: d.check_open(f, OWRITE, ALICE),
        ):
            with pytest.raises(FSError, match=fs.ERDONLY):
                attempt()
        d.sync()  # nothing to make durable: a no-op
    finally:
        d.close()


# -- /adm/users --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("0:none::\nonly:three:fields\n", "line 2: want id:name:leader:members"),
        ("\n# c\n\nx:alice::\n", "line 4: id 'x' is not a number"),
        ("1:al ice::\n", "line 1: bad user name 'al ice'"),
        ("1:alice:bad!:\n", "line 1: bad user name 'bad!'"),
        ("1:alice::\n2:bob::a:b\n", "line 2: want"),
        ("1:::\n", "line 1: empty name"),
        ("1:alice::\n2:alice::\n", "line 2: alice given twice"),
        ("1:alice::\n1:bob::\n", "line 2: id 1 already used by alice"),
        ("1:alice::ghost\n", "group alice names unknown user ghost"),
        ("1:alice:ghost:\n", "group alice names unknown user ghost"),
    ],
)
def test_users_errors_name_the_line(text: str, want: str) -> None:
    with pytest.raises(users.UsersError) as exc:
        users.parse(text)
    assert want in str(exc.value)


def test_users_table() -> None:
    t = users.parse(USERS)
    assert t.exists("none") and t.exists("bob") and not t.exists("zed")
    # A user is a member of its own group, even without a line naming it.
    assert t.member("bob", "bob") and t.member("carol", "staff") and not t.member("bob", "staff")
    assert t.member("zed", "zed")
    # none is nobody's member, not even of a group called none.
    assert not t.member("none", "none") and not t.member("none", "staff")
    assert t.leader("alice", "staff") and not t.leader("carol", "staff")
    # No leader named: every member leads.
    assert t.leader("erin", "adm") is False  # adm names adm as leader
    t2 = users.parse("1:g::a,b\n2:a::\n3:b::\n")
    assert t2.leader("a", "g") and t2.leader("b", "g") and not t2.leader("c", "g")
    # text() writes a table that parses to the same thing.
    assert users.parse(t.text()) == t
    assert users.parse("") == users.Users()
    assert "none" in users.parse("0:none::\n").groups  # none may also be listed


@pytest.mark.parametrize("owner", ["glenda", "adm", "none"])
def test_default_users(owner: str) -> None:
    t = users.parse(users.default(owner))
    assert t.exists(owner) and t.exists("adm") and t.exists("none")
    if owner not in ("adm", "none"):
        assert t.member(owner, "adm") and t.leader(owner, owner)


def _users_entry(d: Disk) -> fs.Entry:
    return d.walk1(d.walk1(root(d), "adm", ALICE), "users", ALICE)


def _rewrite_users(d: Disk, text: str, who: Caller = ALICE) -> None:
    e = d.opened(_users_entry(d), OWRITE | OTRUNC, who)
    d.write(e, 0, text.encode(), who)


def test_users_file_changes_take_effect(disk: Disk) -> None:
    _rewrite_users(disk, USERS + "10010:dave:dave:\n")
    assert disk.users.exists("dave") and disk.users_error == ""


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("nonsense\n", "line 1"),
        ("-1:adm:adm:\n0:none::\n1:bob::\n", "does not name the disk's owner alice"),
        ("", "does not name the disk's owner alice"),
        ("\udcff", "utf-8"),
    ],
    ids=["unparsable", "owner missing", "empty", "not utf-8"],
)
def test_bad_users_file_keeps_the_table(disk: Disk, text: str, want: str) -> None:
    before = disk.users
    raw = text.encode(errors="surrogateescape")
    e = disk.opened(_users_entry(disk), OWRITE | OTRUNC, ALICE)
    if raw:
        disk.write(e, 0, raw, ALICE)
    else:
        disk.reload_users()  # an empty write changes nothing, so nothing reloads
    assert disk.users is before
    assert disk.users_error.startswith("/adm/users:") and want in disk.users_error


def test_bad_users_file_at_open_gives_the_default_table(chunk: Path) -> None:
    d = Disk(chunk)
    _rewrite_users(d, "garbage\n")
    d.close()
    d = Disk(chunk)
    try:
        # Like fossil: the owner can still get in to repair the file.
        assert "line 1" in d.users_error
        assert d.users == users.parse(users.default("alice"))
        assert not d.users.exists("bob")
    finally:
        d.close()


def test_removing_the_users_file_falls_back_to_the_default(disk: Disk) -> None:
    disk.remove(_users_entry(disk), ERIN)  # erin is in adm, the directory's group
    assert disk.users == users.parse(users.default("alice")) and disk.users_error == ""


# -- fsck ------------------------------------------------------------------------


def damage(chunk: Path, *sql: str) -> list[str]:
    """Run SQL on the chunk behind the file system's back, then fsck it."""
    db = sqlite3.connect(chunk, isolation_level=None)
    try:
        for s in sql:
            db.execute(s)
    finally:
        db.close()
    d = Disk(chunk)
    try:
        return d.check()
    finally:
        d.close()


def _filled(chunk: Path) -> tuple[int, int]:
    d = Disk(chunk)
    try:
        dd = d.create(root(d), "d", DMDIR | 0o775, OREAD, ALICE)
        f = mkfile(d, dd, "f", b"x" * 100)
        return dd.path, f.path
    finally:
        d.close()


def test_check_finds_a_missing_parent(chunk: Path) -> None:
    dpath, fpath = _filled(chunk)
    problems = damage(chunk, f"DELETE FROM file WHERE path = {dpath}")
    assert problems == [f"file {fpath} has no parent directory"]


def test_check_finds_a_file_as_parent(chunk: Path) -> None:
    _, fpath = _filled(chunk)
    problems = damage(
        chunk,
        "INSERT INTO file(parent, name, mode, uid, gid, muid, atime, mtime, vers, length) "
        f"VALUES ({fpath}, 'child', 420, 'alice', 'alice', 'alice', 0, 0, 0, 0)",
    )
    assert len(problems) == 1 and problems[0].endswith("has no parent directory")


def test_check_finds_orphan_blocks(chunk: Path) -> None:
    _, fpath = _filled(chunk)
    problems = damage(chunk, f"DELETE FROM file WHERE path = {fpath}")
    assert problems == [f"blocks of removed file {fpath}"]


def test_check_finds_data_past_length(chunk: Path) -> None:
    _, fpath = _filled(chunk)
    problems = damage(chunk, f"UPDATE file SET length = 10 WHERE path = {fpath}")
    assert problems == [f"file {fpath} holds data past its length"]


def test_check_finds_a_damaged_root(chunk: Path) -> None:
    problems = damage(chunk, f"UPDATE file SET mode = 509 WHERE path = {fs.ROOT}")
    assert "root directory missing or damaged" in problems
    # adm's parent is no longer a directory, so it is an orphan too.
    assert "file 2 has no parent directory" in problems
