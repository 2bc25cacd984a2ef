"""The change log and its application (geryon.disk.log), without a network:
a follower's disk reaches the primary's state row for row, a batch travels
in parts and commits whole, positions and epochs say who may go on from
where, and a diverged follower's files are kept."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from geryon.disk import fs
from geryon.disk import log as dlog
from geryon.disk.fs import Caller, Disk

GLENDA = Caller("glenda")


def new_disk(path: Path) -> Disk:
    fs.format(path, 16 << 20, owner="glenda")
    return Disk(path)


def follow(primary: Disk, follower: Disk, seq: int | None = None) -> None:
    """The primary's check of a follower at its own position (or SEQ)."""
    dlog.check_follow(
        primary, follower.uuid, follower.seq if seq is None else seq, dlog.terms(follower.db)
    )


def rows(d: Disk) -> tuple[list, list]:
    return (
        d.db.execute(f"SELECT {fs._COLS} FROM file ORDER BY path").fetchall(),
        d.db.execute("SELECT file, n, data FROM block ORDER BY file, n").fetchall(),
    )


def sync(primary: Disk, follower: Disk, *, limit: int = 1 << 20, wipe: bool = False) -> int:
    """Ship everything from PRIMARY to FOLLOWER as a real follower would;
    the number of parts it took."""
    p = dlog.Producer(dlog.reader(primary.path), 0 if wipe else follower.seq, wipe=wipe)
    a = dlog.Applier(follower)
    parts = 0
    try:
        while True:
            parts += 1
            if a.apply(p.part(limit, acked=primary.seq)) is not None:
                return parts
    finally:
        a.close()


def put(d: Disk, name: str, data: bytes, parent: int = fs.ROOT) -> fs.Entry:
    e = d.child(parent, name) or d.create(d.entry(parent), name, 0o664, fs.OWRITE, GLENDA)
    d.write(e, 0, data, GLENDA)
    return e


@pytest.fixture
def pair(tmp_path: Path):
    a, b = new_disk(tmp_path / "a"), new_disk(tmp_path / "b")
    b.frozen = "replica"
    yield a, b
    a.close()
    b.close()


def test_a_follower_reaches_the_primarys_state_row_for_row(pair: tuple[Disk, Disk]) -> None:
    a, b = pair
    with pytest.raises(dlog.Resync, match="another disk"):
        follow(a, b)
    sync(a, b, wipe=True)  # a new replica starts from a snapshot
    assert rows(a) == rows(b) and b.uuid == a.uuid and b.seq == a.seq
    d = a.create(a.entry(fs.ROOT), "dir", fs.DMDIR | 0o775, fs.OREAD, GLENDA)
    for i in range(20):
        put(a, f"f{i}", bytes([i]) * (i * 9000), d.path)
    a.remove(a.child(d.path, "f3"), GLENDA)
    a.wstat(a.child(d.path, "f4"), _rename("g4"), GLENDA)
    put(a, "f5", b"short", d.path)  # truncates nothing: overwrites the start
    follow(a, b)  # a follower at a's old seq may go on
    sync(a, b)
    assert rows(a) == rows(b) and b.seq == a.seq
    assert b.check() == []


def _rename(name: str) -> fs.Stat:
    keep = fs.Qid(0xFF, fs.NOTOUCH32, fs.NOTOUCH64)
    n32, n64 = fs.NOTOUCH32, fs.NOTOUCH64
    return fs.Stat(0xFFFF, n32, keep, n32, n32, n32, n64, name, "", "", "")


def test_a_block_written_many_times_travels_once(pair: tuple[Disk, Disk]) -> None:
    a, b = pair
    sync(a, b, wipe=True)
    e = put(a, "log", b"")
    for i in range(200):
        a.write(e, i * 10, b"0123456789", GLENDA)  # all in block 0
    p = dlog.Producer(dlog.reader(a.path), b.seq)
    body = p.part(1 << 20, acked=0)
    assert p.header.seq - p.header.start == 201
    assert body.count(b"0123456789" * 200) == 1
    p.close()


def test_a_batch_travels_in_parts_and_commits_whole(pair: tuple[Disk, Disk]) -> None:
    a, b = pair
    sync(a, b, wipe=True)
    for i in range(8):
        put(a, f"big{i}", bytes([65 + i]) * (3 * fs.BLOCK))
    p = dlog.Producer(dlog.reader(a.path), b.seq)
    ap = dlog.Applier(b)
    parts = 0
    while True:
        parts += 1
        done = ap.apply(p.part(200_000, acked=a.seq))
        # Readers of the follower (its server's connection) see no half batch.
        assert (b.child(fs.ROOT, "big0") is None) == (done is None)
        if done is not None:
            break
    ap.close()
    assert parts > 5 and rows(a) == rows(b)


def test_positions_terms_and_divergence(pair: tuple[Disk, Disk]) -> None:
    a, b = pair
    dlog.begin_term(a, 1)  # a's server takes the primary role
    sync(a, b, wipe=True)
    put(a, "x", b"1")
    sync(a, b)
    shared = a.seq
    put(a, "lost", b"written after the replica was promoted")  # a keeps writing...
    # ...but b is promoted at epoch 2 and writes on.
    b.frozen = ""
    dlog.begin_term(b, 2)
    put(b, "y", b"2")
    a.frozen = "replica"
    with pytest.raises(dlog.Resync) as exc:
        follow(b, a)
    assert exc.value.diverged == shared
    # What a has that b never saw: the file written after the last shared seq.
    assert [name for name, _ in dlog.diverged_files(a, shared)] == ["lost"]
    for rec in dlog.recovery_records(a, shared, "host0!chunk0-epoch1", 1 << 20):
        dlog.recover(b, rec)
    kept = b.child(b.child(b.child(fs.ROOT, "recovered").path, "host0!chunk0-epoch1").path, "lost")
    assert kept is not None and b.read(kept, 0, 100) == b"written after the replica was promoted"
    # a starts over from b, and from then on follows b from its position.
    sync(b, a, wipe=True)
    assert rows(a) == rows(b) and (a.epoch, a.seq) == (2, b.seq)
    put(b, "z", b"3")
    follow(b, a)
    sync(b, a)
    assert rows(a) == rows(b)
    # A follower that had not diverged (at the shared seq, in term 1) may go on.
    follow(b, b, seq=shared)


def test_two_primaries_with_one_epoch_number_are_told_apart(pair: tuple[Disk, Disk]) -> None:
    """A recreated disk entry can hand out an epoch number twice; the terms'
    ids still tell the two histories apart."""
    a, b = pair
    dlog.begin_term(a, 1)
    sync(a, b, wipe=True)
    b.frozen = ""
    dlog.begin_term(b, 2)
    put(b, "b-only", b"b's epoch 2")
    dlog.begin_term(a, 2)  # a, too, made primary at "epoch 2"
    put(a, "a1", b"a's epoch 2")
    put(a, "a2", b"a's epoch 2")
    assert b.seq <= a.seq  # by seq alone b would look behind a
    with pytest.raises(dlog.Resync) as exc:
        follow(a, b)
    assert [n for n, _ in dlog.diverged_files(b, exc.value.diverged)] == ["b-only"]


def test_a_primary_that_lost_its_tail_is_not_followed_blindly(tmp_path: Path) -> None:
    """Commits a follower applied, lost by the primary (an OS crash before
    they were flushed): the primary's next start is a new term, so the
    follower's copies of the lost commits are seen as diverged."""
    a, b = new_disk(tmp_path / "a"), new_disk(tmp_path / "b")
    dlog.begin_term(a, 1)
    sync(a, b, wipe=True)
    a.close()
    saved = (tmp_path / "a").read_bytes()
    a = Disk(tmp_path / "a")
    put(a, "gone", b"applied by b, then lost by a")
    sync(a, b)
    a.close()
    (tmp_path / "a").write_bytes(saved)  # the tail is gone
    a = Disk(tmp_path / "a")
    dlog.begin_term(a, 1)  # started again as the primary
    put(a, "new", b"written after the crash")
    put(a, "new2", b"written after the crash")
    assert b.seq <= a.seq
    with pytest.raises(dlog.Resync) as exc:
        follow(a, b)
    assert [n for n, _ in dlog.diverged_files(b, exc.value.diverged)] == ["gone"]
    a.close()
    b.close()


def test_a_promoted_followers_log_serves_its_own_followers(tmp_path: Path) -> None:
    a, b, c = (new_disk(tmp_path / n) for n in "abc")
    sync(a, b, wipe=True)
    sync(a, c, wipe=True)
    d = a.create(a.entry(fs.ROOT), "d", fs.DMDIR | 0o775, fs.OREAD, GLENDA)
    put(a, "one", b"1", d.path)
    sync(a, b)  # c lags behind at the snapshot
    put(a, "two", b"2", d.path)
    a.remove(a.child(d.path, "one"), GLENDA)
    sync(a, b)
    dlog.begin_term(b, 2)  # b is promoted; c goes on from its own position
    follow(b, c)
    sync(b, c)
    assert rows(c) == rows(a) == rows(b)
    for x in (a, b, c):
        x.close()


def test_trimming_tombstones_moves_the_horizon(pair: tuple[Disk, Disk]) -> None:
    a, b = pair
    sync(a, b, wipe=True)
    old = b.seq
    for i in range(5):
        a.remove(put(a, f"t{i}", b"x" * 10), GLENDA)
    assert dlog.trim(a, keep=2) > 0
    with pytest.raises(dlog.Resync, match="horizon"):
        follow(a, b, seq=old)
    sync(a, b, wipe=True)
    assert rows(a) == rows(b)


def test_a_version_1_disk_gains_the_log_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "old"
    fs.format(path, 1 << 20, owner="glenda")
    db = sqlite3.connect(path, isolation_level=None)
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        db.execute(f"DROP TRIGGER {name}")
    db.execute("DROP TABLE changed")
    db.execute("DROP TABLE epochs")
    db.execute("DELETE FROM meta WHERE k IN ('seq', 'epoch', 'horizon', 'uuid')")
    db.execute("UPDATE meta SET v = 1 WHERE k = 'version'")
    db.close()
    d = Disk(path)
    try:
        # Its rows count as written (seq 1), not as format made them (seq 0):
        # a diverged follower keeps them.
        assert (d.seq, d.epoch) == (1, 1) and len(d.uuid) == 32
        put(d, "new", b"after the upgrade")
        logged = d.db.execute("SELECT kind, file FROM changed WHERE seq > 0").fetchall()
        new = d.child(fs.ROOT, "new")
        assert {(0, fs.ROOT), (0, new.path), (1, new.path)} <= set(logged)
    finally:
        d.close()
