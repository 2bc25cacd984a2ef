"""The reconciler's pure parts (desired state, the difference) and one pass
against an in-memory registry: no network."""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Mapping
from pathlib import Path

import pytest
from conftest import CLUSTER

from geryon import errors
from geryon.model import Service
from geryon.ndb import Database
from geryon.reconciler import (
    FAILBACKS,
    MANAGED_ATTR,
    MANAGED_VALUE,
    Action,
    Disk,
    Reconciler,
    desired_entries,
    live_chunks,
    plan,
    read_disks,
)

M = {MANAGED_ATTR: MANAGED_VALUE}


def chunk(host: str, cid: str, port: int, *, rev: int = 1, **attrs: str) -> Service:
    return Service(
        f"tcp!{host}!{port}",
        {"id": cid, "host": host, "name": host, "kfs": "1", **attrs},
        lease=7,
        owner=host,
        create_revision=rev,
        mod_revision=rev,
    )


def disks_of(text: str) -> dict[str, Disk]:
    disks, problems = read_disks(Database.from_text(text, "cluster"))
    assert problems == []
    return disks


def managed(name: str, attrs: Mapping[str, str], rev: int = 5) -> Service:
    return Service(name, {**M, **attrs}, owner="reconciler", create_revision=1, mod_revision=rev)


# ---- read_disks ------------------------------------------------------------


def test_read_disks_from_the_seeds_cluster_file() -> None:
    disks = disks_of(CLUSTER)
    assert list(disks) == ["d0.mbox", "d1.mbox", "d0.replica", "d1.replica"]
    assert disks["d0.mbox"] == Disk("d0.mbox", "host0", "chunk0", "d0.replica", "cluster:1")
    # A bare `replica` marks a replica disk; it names no replica of its own.
    assert disks["d1.replica"].replica == ""
    assert (disks["d1.replica"].host, disks["d1.replica"].chunk) == ("host1", "chunk1")
    # The seed's copy ends its lines in blanks; they change nothing.
    assert disks_of(CLUSTER.replace("\n", " \n")) == disks


def test_read_disks_line_binding_and_non_kfs_entries() -> None:
    text = (
        "name=a name=b name=c kfs\n"
        "\tname=b master=h1!c1\n"
        "\tmaster=h9!c9\n"
        "\tname=a master=h0!c0 replica=b\n"
        "name=notadisk master=h!c\n"
        "name='q uoted' kfs=1 master=h1!c1\n"
    )
    disks, problems = read_disks(Database.from_text(text, "f"))
    # Line binding, as `ndb/query name N master`: the value on N's own line
    # first, else the entry's first in file order (so b is its own replica).
    assert [(d.name, d.host, d.replica) for d in disks.values()] == [
        ("a", "h0", "b"),
        ("b", "h1", "b"),
        ("c", "h1", "b"),
    ]
    assert len(problems) == 2 and problems[0].startswith("f:6: disk name:")
    # b and c both name h1!c1: one chunk cannot hold two disks.
    assert problems[1] == "f:1: disk c: chunk h1!c1 is also disk b's (one chunk holds one disk)"


def test_read_disks_reports_problems_with_file_and_line() -> None:
    text = (
        "name=d0 kfs master=h0!c0\n"
        "name=d0 kfs master=h1!c1\n"
        "name=d1 kfs\n"
        "name=d2 kfs master=nobang replica=ghost\n"
    )
    disks, problems = read_disks(Database.from_text(text, "cluster"))
    assert disks["d0"].host == "h0"  # the first definition wins
    assert (disks["d1"].host, disks["d2"].host) == ("", "")  # kept: they will be down
    assert problems == [
        "cluster:2: disk name d0 already defined at cluster:1; ignored",
        "cluster:3: disk d1: want master=HOST!CHUNK, got 'none'",
        "cluster:4: disk d2: want master=HOST!CHUNK, got 'nobang'",
        "cluster:4: disk d2: replica ghost is not a disk name",
    ]


# ---- live chunks and desired state -----------------------------------------


def test_live_chunks_health_and_the_newest_registration() -> None:
    old = chunk("h0", "c0", 1, rev=3)
    new = chunk("h0", "c0", 2, rev=9)
    sick = chunk("h1", "c0", 3, health="critical")
    unchecked = chunk("h2", "c0", 4)  # no health yet: passing
    passing = chunk("h3", "c0", 5, health="passing")
    noid = Service("tcp!x!1", {"host": "h0"})
    live = live_chunks([new, old, sick, unchecked, passing, noid])
    assert live == {("h0", "c0"): new, ("h2", "c0"): unchecked, ("h3", "c0"): passing}
    # A newer registration that is critical does not hide a healthy one.
    assert live_chunks([old, chunk("h0", "c0", 2, rev=9, health="critical")]) == {("h0", "c0"): old}


def test_desired_master_up_down_and_failover() -> None:
    disks = disks_of(CLUSTER)
    m0, r0 = chunk("host0", "chunk0", 6701), chunk("host1", "chunk0", 6702)
    base = {**M, "automount": "1", "persist": "1"}

    d = desired_entries(disks, [m0, r0])
    # A disk with a replica is fenced: its primary, standby and epoch, and
    # where its replica is read (geryon mount --replica).
    assert d["d0.mbox"] == {
        **base,
        "replica": "d0.replica",
        "host": "host0",
        "chunk": "chunk0",
        "addr": "tcp!host0!6701",
        "status": "up",
        "serving": "master",
        "primary": "host0!chunk0",
        "standby": "host1!chunk0",
        "epoch": "1",
        "replica-addr": "tcp!host1!6702",
    }
    assert d["d0.replica"] == {
        **base,
        "host": "host1",
        "chunk": "chunk0",
        "addr": "tcp!host1!6702",
        "status": "up",
        "serving": "master",
    }
    # Nothing for d1: down, no addr, pointing at its master.
    assert d["d1.mbox"] == {
        **base,
        "replica": "d1.replica",
        "host": "host0",
        "chunk": "chunk1",
        "status": "down",
        "primary": "host0!chunk1",
        "standby": "host1!chunk1",
        "epoch": "1",
    }

    # The master gone or critical: the replica's chunk serves.
    for chunks in ([r0], [r0, chunk("host0", "chunk0", 6701, health="critical")]):
        d = desired_entries(disks, chunks)
        assert d["d0.mbox"]["addr"] == "tcp!host1!6702"
        assert (d["d0.mbox"]["serving"], d["d0.mbox"]["host"]) == ("replica", "host1")
        assert d["d0.mbox"]["status"] == "up"


def test_promotion_swaps_primary_and_standby_at_the_next_epoch() -> None:
    disks = disks_of(CLUSTER)
    m0, r0 = chunk("host0", "chunk0", 6701), chunk("host1", "chunk0", 6702)
    on_replica = desired_entries(disks, [r0])
    actual = {n: managed(n, a) for n, a in on_replica.items()}
    # Promotion only takes a live standby in a dead primary's place.
    assert desired_entries(disks, [m0, r0], actual=actual, promote=["d0.mbox"])["d0.mbox"][
        "epoch"
    ] == "1"
    d = desired_entries(disks, [r0], actual=actual, promote=["d0.mbox"])["d0.mbox"]
    assert (d["primary"], d["standby"], d["epoch"], d["serving"]) == (
        "host1!chunk0", "host0!chunk0", "2", "master",
    )  # fmt: skip
    # The entry carries it from then on: the old master back is the replica.
    actual = {"d0.mbox": managed("d0.mbox", d)}
    d = desired_entries(disks, [m0, r0], actual=actual)["d0.mbox"]
    assert (d["primary"], d["epoch"], d["addr"], d["replica-addr"]) == (
        "host1!chunk0", "2", "tcp!host1!6702", "tcp!host0!6701",
    )  # fmt: skip
    # An agent reporting a later epoch than the entry's (a registry that lost
    # it) raises the entry's: epochs never go back.
    reported = chunk("host1", "chunk0", 6702)
    reported = Service(reported.name, {**reported.attrs, "epoch": "7"})
    assert desired_entries(disks, [m0, reported], actual=actual)["d0.mbox"]["epoch"] == "7"


def test_failback_never_does_not_hold_a_replicated_disk_on_its_standby() -> None:
    """A replica serves reads only until it is promoted: when the primary is
    back the name goes back to it, whatever --failback says (keeping the
    replica is what `geryon disk promote` is for)."""
    disks = disks_of(CLUSTER)
    m0, r0 = chunk("host0", "chunk0", 6701), chunk("host1", "chunk0", 6702)
    on_replica = desired_entries(disks, [r0])
    assert on_replica["d0.mbox"]["serving"] == "replica"
    actual = {n: managed(n, a) for n, a in on_replica.items()}
    for failback in FAILBACKS:
        back = desired_entries(disks, [m0, r0], failback=failback, actual=actual)  # type: ignore[arg-type]
        assert back["d0.mbox"]["serving"] == "master"


def test_desired_state_is_deterministic() -> None:
    disks = disks_of(CLUSTER)
    chunks = [
        chunk("host0", "chunk0", 1, rev=1),
        chunk("host0", "chunk0", 2, rev=1),  # same revision: the name decides
        chunk("host1", "chunk0", 3),
        chunk("host1", "chunk1", 4, health="critical"),
    ]
    want = desired_entries(disks, chunks)
    for order in itertools.permutations(chunks):
        assert desired_entries(disks, list(order)) == want
    assert want["d0.mbox"]["addr"] == "tcp!host0!2"


# ---- plan ------------------------------------------------------------------


def test_plan_create_update_delete_and_noop() -> None:
    want = {"a": {**M, "addr": "x", "status": "up"}, "b": {**M, "status": "down"}, "c": {**M}}
    actual = {
        "b": managed("b", {"status": "up", "addr": "old", "serving": "master"}, rev=11),
        "c": managed("c", {}, rev=12),
        "gone": managed("gone", {"status": "up"}, rev=13),
    }
    assert plan(want, actual) == [
        Action("create", "a", want["a"]),
        Action("update", "b", {"status": "down"}, ("addr", "serving"), expected=11),
        Action("delete", "gone", expected=13),
    ]
    assert plan(want, {n: managed(n, a, rev=3) for n, a in want.items()}) == []


def test_plan_never_touches_unmanaged_entries() -> None:
    want = {"d0": {**M, "status": "down"}}
    mine = Service("d0", {"addr": "hand-made"}, owner="alice", mod_revision=4)
    other = Service("other", {"addr": "x"}, owner="bob", mod_revision=5)
    assert plan(want, {"d0": mine, "other": other}) == [Action("clash", "d0", owner="alice")]
    assert "alice" in str(Action("clash", "d0", owner="alice"))


# ---- one pass against an in-memory registry ---------------------------------


class FakeRegistry:
    """The parts of geryon.client.Client a pass uses, with the store's rules
    for owners and fences (enough to run passes without a network)."""

    def __init__(self) -> None:
        self.services: dict[str, Service] = {}
        self.revision = 0
        self.writes = 0
        self.target = "fake"
        # Called before each write: lets a test interleave another writer.
        self.before_write: list = []

    def _put(self, s: Service) -> Service:
        self.revision += 1
        prev = self.services.get(s.name)
        s = Service(
            s.name,
            dict(s.attrs),
            s.lease,
            s.owner,
            prev.create_revision if prev else self.revision,
            self.revision,
        )
        self.services[s.name] = s
        return s

    def add(self, name: str, attrs: Mapping[str, str], owner: str = "node") -> Service:
        return self._put(Service(name, dict(attrs), lease=1, owner=owner))

    def remove(self, name: str) -> None:
        self.revision += 1
        del self.services[name]

    async def find(self, attrs: Mapping[str, str]) -> tuple[list[Service], int]:
        out = [
            s
            for _, s in sorted(self.services.items())
            if all(k in s.attrs and v in ("*", s.attrs[k]) for k, v in attrs.items())
        ]
        return out, self.revision

    async def get(self, name: str) -> Service:
        if name not in self.services:
            raise errors.NotFound(f"no service {name!r}")
        return self.services[name]

    async def _write(self) -> None:
        self.writes += 1
        while self.before_write:
            await self.before_write.pop(0)()

    async def register(
        self, name: str, attrs: Mapping[str, str], *, persist: bool, create_only: bool = False
    ) -> Service:
        await self._write()
        prev = self.services.get(name)
        if prev is not None and prev.owner != "reconciler":
            raise errors.AlreadyExists(f"{name} is registered by {prev.owner}")
        if prev is not None and create_only:
            raise errors.FailedPrecondition(f"{name}: create_only, but it exists")
        return self._put(Service(name, dict(attrs), owner="reconciler"))

    def _fenced(self, name: str, expected: int) -> Service:
        if name not in self.services:
            raise errors.NotFound(f"no service {name!r}")
        s = self.services[name]
        if expected and s.mod_revision != expected:
            raise errors.FailedPrecondition(f"{name} changed")
        return s

    async def update(
        self, name: str, set_attrs: Mapping[str, str], *, remove_attrs=(), expected_mod_revision=0
    ) -> Service:
        await self._write()
        s = self._fenced(name, expected_mod_revision)
        attrs = {k: v for k, v in s.attrs.items() if k not in remove_attrs} | dict(set_attrs)
        return self._put(Service(name, attrs, s.lease, s.owner))

    async def unregister(self, name: str, *, expected_mod_revision: int = 0) -> Service:
        await self._write()
        s = self._fenced(name, expected_mod_revision)
        self.remove(name)
        return s


def ndb_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster"
    path.write_text(text)
    return path


def disk_view(reg: FakeRegistry) -> dict[str, dict[str, str]]:
    return {n: dict(s.attrs) for n, s in reg.services.items() if s.attrs.get(MANAGED_ATTR)}


async def converge(rec: Reconciler) -> None:
    for _ in range(10):
        result = await rec.reconcile()
        if not result.conflict and not result.changes:
            return
    raise AssertionError("no convergence in 10 passes")


async def test_pass_writes_the_difference_and_then_nothing(tmp_path: Path) -> None:
    reg = FakeRegistry()
    reg.add("tcp!host0!6701", {"id": "chunk0", "host": "host0"})
    rec = Reconciler(reg, ndb_file(tmp_path, CLUSTER), failback="auto")  # type: ignore[arg-type]
    first = await rec.reconcile()
    assert (first.disks, first.changes, first.conflict) == (4, 4, False)
    assert disk_view(reg)["d0.mbox"]["addr"] == "tcp!host0!6701"
    writes = reg.writes
    again = await rec.reconcile()
    assert (again.changes, reg.writes) == (0, writes)

    # The chunk moves to a new port: one update, to the new address.
    reg.remove("tcp!host0!6701")
    reg.add("tcp!host0!7000", {"id": "chunk0", "host": "host0"})
    assert (await rec.reconcile()).changes == 1
    assert disk_view(reg)["d0.mbox"]["addr"] == "tcp!host0!7000"

    # A name leaves the ndb file: its entry goes (and d1.replica, no longer a
    # replica, takes its own writes: primary and epoch); others' entries are not ours.
    reg.add("d9.other", {"addr": "x"}, owner="alice")
    ndb_file(tmp_path, CLUSTER.replace("name=d1.mbox kfs", "name=d1.mbox"))
    assert (await rec.reconcile()).changes == 2
    assert sorted(disk_view(reg)) == ["d0.mbox", "d0.replica", "d1.replica"]
    assert reg.services["d9.other"].attrs == {"addr": "x"}


async def test_clash_is_reported_once_and_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reg = FakeRegistry()
    reg.add("d0.mbox", {"addr": "by-hand"}, owner="alice")
    rec = Reconciler(reg, ndb_file(tmp_path, CLUSTER), failback="auto")  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, "geryon.reconciler"):
        for _ in range(3):
            result = await rec.reconcile()
    assert result.clashes == 1
    assert reg.services["d0.mbox"].attrs == {"addr": "by-hand"}
    assert [r.getMessage() for r in caplog.records if "d0.mbox" in r.getMessage()] == [
        "reconciler: d0.mbox is an entry of alice not managed here; left alone"
    ]


async def test_a_lost_race_is_a_conflict_and_the_next_pass_fixes_it(tmp_path: Path) -> None:
    reg = FakeRegistry()
    reg.add("tcp!host0!6701", {"id": "chunk0", "host": "host0"})
    rec = Reconciler(reg, ndb_file(tmp_path, CLUSTER), failback="auto")  # type: ignore[arg-type]
    await rec.reconcile()

    async def meddle() -> None:  # someone edits d0.mbox between our read and write
        await reg.update("d0.mbox", {"addr": "meddled"})

    reg.remove("tcp!host0!6701")  # d0.mbox must go down
    reg.before_write.append(meddle)
    result = await rec.reconcile()
    assert result.conflict and reg.services["d0.mbox"].attrs["addr"] == "meddled"
    await converge(rec)
    assert disk_view(reg)["d0.mbox"]["status"] == "down"
    assert "addr" not in disk_view(reg)["d0.mbox"]


async def test_a_create_that_lost_a_race_overwrites_nothing(tmp_path: Path) -> None:
    reg = FakeRegistry()
    rec = Reconciler(reg, ndb_file(tmp_path, CLUSTER), failback="auto")  # type: ignore[arg-type]

    async def meddle() -> None:  # another reconciler creates d0.mbox first
        if "d0.mbox" not in reg.services:
            reg._put(Service("d0.mbox", {"addr": "theirs", **M}, owner="reconciler"))

    reg.before_write.append(meddle)
    result = await rec.reconcile()
    assert result.conflict and reg.services["d0.mbox"].attrs == {"addr": "theirs", **M}
    await converge(rec)
    assert disk_view(reg)["d0.mbox"]["status"] == "down"


async def test_two_reconcilers_converge_without_flapping(tmp_path: Path) -> None:
    reg = FakeRegistry()
    path = ndb_file(tmp_path, CLUSTER)
    a = Reconciler(reg, path, failback="never")  # type: ignore[arg-type]
    b = Reconciler(reg, path, failback="never")  # type: ignore[arg-type]
    rng = random.Random(7)
    chunks = {
        "tcp!host0!1": {"id": "chunk0", "host": "host0"},
        "tcp!host1!2": {"id": "chunk0", "host": "host1"},
        "tcp!host0!3": {"id": "chunk1", "host": "host0"},
    }
    for _ in range(30):
        # Chunks come and go; the two interleave passes in random order.
        name = rng.choice(sorted(chunks))
        if name in reg.services:
            reg.remove(name)
        else:
            reg.add(name, chunks[name])
        for rec in rng.sample([a, b, a, b], k=rng.randint(1, 4)):
            await rec.reconcile()
        await converge(a)
        view = disk_view(reg)
        # Once converged, neither finds anything to do.
        assert (await b.reconcile()).changes == 0
        assert (await a.reconcile()).changes == 0
        assert disk_view(reg) == view


async def test_malformed_edit_keeps_the_last_good_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reg = FakeRegistry()
    path = ndb_file(tmp_path, CLUSTER)
    rec = Reconciler(reg, path, failback="auto")  # type: ignore[arg-type]
    await rec.reconcile()
    before = disk_view(reg)
    path.write_text("name=d0.mbox kfs\n\tmaster='host0!chunk0\n")  # unterminated quote
    assert rec.ndb_changed()
    with caplog.at_level(logging.ERROR, "geryon.reconciler"):
        for _ in range(3):
            assert (await rec.reconcile(force_read=True)).changes == 0
    assert disk_view(reg) == before
    errors_logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors_logged == [
        f"reconciler: {path}:2: unterminated quote; keeping the last good state"
    ]
    assert not rec.ndb_changed()  # the bad file is not re-read until it changes
    path.write_text(CLUSTER.replace("name=d1.mbox kfs", "name=d1.mbox"))
    assert rec.ndb_changed()
    assert (await rec.reconcile()).changes == 2  # d1.mbox goes, d1.replica stands alone
    assert "d1.mbox" not in disk_view(reg)


async def test_nothing_is_written_before_a_first_good_read(tmp_path: Path) -> None:
    reg = FakeRegistry()
    managed_entry = reg._put(managed("d0.mbox", {"status": "up"}))
    path = ndb_file(tmp_path, "name=d0.mbox kfs master='x\n")
    rec = Reconciler(reg, path, failback="auto")  # type: ignore[arg-type]
    assert (await rec.reconcile()).disks == 0
    assert reg.services["d0.mbox"] == managed_entry and reg.writes == 0


def test_failback_must_be_known() -> None:
    with pytest.raises(ValueError):
        Reconciler(FakeRegistry(), "x", failback="sometimes")  # type: ignore[arg-type]


def test_main_refuses_a_file_that_does_not_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from geryon.reconciler import main

    bad = ndb_file(tmp_path, "name=d0 kfs\n\tmaster='h0!c0\n")
    with pytest.raises(SystemExit) as e:
        main(["--registry", "127.0.0.1:1", "--ndb", str(bad)])
    assert e.value.code == 1
    assert capsys.readouterr().err == f"geryon-reconciler: {bad}:2: unterminated quote\n"


def test_main_refuses_a_registry_address_that_is_not_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from geryon.reconciler import main

    with pytest.raises(SystemExit) as e:  # not a retry loop against nothing
        main(["--registry", "no:such:addr", "--ndb", str(ndb_file(tmp_path, CLUSTER))])
    assert e.value.code == 2
    assert "argument --registry" in capsys.readouterr().err
