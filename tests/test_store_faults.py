"""A store on a bad day, with a real geryon-registryd: a disk that fills up
and empties again, database files it cannot write, and damage found at start.

A full disk is a size-limited tmpfs the test mounts (root), or, where mounting
is not allowed, the registry's RLIMIT_FSIZE set low and raised again with
prlimit(1). Damage is done to the database files between runs with sqlite3
and by overwriting bytes, as a bad disk or a careless hand would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import BIN, Registry, eventually
from grpc_health.v1 import health_pb2, health_pb2_grpc

from geryon.errors import Unavailable
from geryon.store.sqlite import row_crc

Stored = Callable[[], Awaitable[Path]]
BIG = {f"a{i}": "v" * 1000 for i in range(60)}  # about 64 KB an entry


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]
        ).returncode
        == 0
    )


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], check=False)


class Disk:
    """Where the registry's data lives, and a way to fill it up and free it."""

    def __init__(self, root: Path) -> None:
        self.data = root / "disk" / "registry"
        self.tmpfs = _mount_tmpfs(root / "disk", "16m")
        self.filler = root / "disk" / "filler"
        self.registry: Registry | None = None

    def start(self, registry: Registry) -> Registry:
        self.registry = registry
        return registry.start()  # type: ignore[return-value]

    def fill(self) -> None:
        if self.tmpfs:
            with open(self.filler, "wb") as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
        else:
            assert self.registry is not None
            # No write reaches past byte 1 of any file: not even into space
            # the WAL already has.
            subprocess.run(
                ["prlimit", f"--pid={self.registry.pid}", "--fsize=1:unlimited"], check=True
            )

    def free(self) -> None:
        if self.tmpfs:
            self.filler.unlink()
        else:
            assert self.registry is not None
            subprocess.run(
                ["prlimit", f"--pid={self.registry.pid}", "--fsize=unlimited"], check=True
            )

    def close(self) -> None:
        if self.tmpfs:
            _umount(self.data.parent)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    d = Disk(tmp_path)
    try:
        yield d
    finally:
        if d.registry is not None:
            d.registry.kill9()
        d.close()


async def health_of(registry: Registry) -> int:
    async with grpc.aio.insecure_channel(registry.address) as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="geryon.v1.Registry"), timeout=5
        )
    return r.status


async def test_a_full_disk_refuses_writes_serves_reads_and_heals(disk: Disk) -> None:
    registry = disk.start(Registry(disk.data))
    acked: list[str] = []
    async with registry.client(retry_for=0) as c:
        for i in range(3):
            await c.register(f"before{i}", BIG, persist=True)
            acked.append(f"before{i}")
        disk.fill()
        refused = None
        for i in range(300):
            try:
                await c.register(f"full{i}", BIG, persist=True)
            except Unavailable as exc:
                refused = exc
                break
            acked.append(f"full{i}")  # the WAL still had room
        assert refused is not None, "the full disk never refused a write"
        assert "the store cannot write" in str(refused)
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        assert await health_of(registry) == not_serving

        # Reads of what is durable keep working; refused writes keep refusing,
        # each with one line and none in the log.
        svc = await c.get("before0")
        assert svc.attrs == BIG
        found, _ = await c.find({})
        assert [s.name for s in found] == sorted(acked)
        log_before = len(registry.log())
        for i in range(200):
            with pytest.raises(Unavailable, match="the store cannot write"):
                await c.register(f"refused{i}", BIG, persist=True)
        grown = registry.log()[log_before:]
        assert "Traceback" not in registry.log()
        assert len(grown) < 2000, grown

        disk.free()

        async def writes() -> bool:
            try:
                await c.register("after", {"x": "1"}, persist=True)
            except Unavailable:
                return False
            return True

        await eventually(writes, timeout=20, interval=0.2)
        assert await health_of(registry) == health_pb2.HealthCheckResponse.SERVING
        acked.append("after")
    log = registry.log()
    assert log.count("cannot write") <= 3 and "cannot rollback" not in log
    if disk.tmpfs:  # (under RLIMIT_FSIZE the log file cannot grow either)
        assert f"cannot write {disk.data / 'registry.db'}: database or disk is full" in log

    # Everything acknowledged is durable; nothing refused is.
    registry.restart()
    async with registry.client() as c:
        found, _ = await c.find({})
        assert [s.name for s in found] == sorted(acked)


def start_fails(data_dir: Path) -> str:
    """Start a registry on ``data_dir`` that must refuse; its stderr."""
    r = subprocess.run(
        [str(BIN / "geryon-registryd"), "--listen", "127.0.0.1:0", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(data_dir / "registry.db") in lines[0]
    return lines[0]


@pytest.fixture
def stored(tmp_path: Path) -> Callable[[], Awaitable[Path]]:
    """A data dir holding 50 entries, written by a real registry that then
    stopped cleanly (its WAL folded into the database file)."""

    async def make() -> Path:
        registry = Registry(tmp_path / "data")
        registry.start()
        try:
            async with registry.client() as c:
                for i in range(50):
                    await c.register(f"svc{i:02}", {"value": f"value-{i:02}"}, persist=True)
        finally:
            assert registry.stop() == 0
        return registry.data_dir

    return make


async def test_a_damaged_page_is_refused_at_start(stored: Stored) -> None:
    data = await stored()
    db = data / "registry.db"
    with contextlib.closing(sqlite3.connect(db)) as c:
        (page_size,) = c.execute("PRAGMA page_size").fetchone()
        (root,) = c.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_services_1'"
        ).fetchone()
    with open(db, "r+b") as f:
        f.seek((root - 1) * page_size + 100)
        f.write(os.urandom(200))
    assert "damaged" in start_fails(data)


async def test_a_changed_byte_in_a_row_is_refused_at_start(stored: Stored) -> None:
    data = await stored()
    db = data / "registry.db"
    raw = db.read_bytes()
    at = raw.index(b"value-17")
    db.write_bytes(raw[:at] + b"valuE-17" + raw[at + 8 :])
    line = start_fails(data)
    assert "damaged" in line and "checksum" in line


async def test_an_undecodable_row_is_refused_at_start(stored: Stored) -> None:
    data = await stored()
    with contextlib.closing(sqlite3.connect(data / "registry.db")) as c:
        row = c.execute(
            "SELECT name, attrs, lease, owner, create_revision, mod_revision FROM services "
            "WHERE name = 'svc03'"
        ).fetchone()
        bad = (row[0], "{not json", *row[2:])
        c.execute(
            "UPDATE services SET attrs = ?, crc = ? WHERE name = 'svc03'", (bad[1], row_crc(*bad))
        )
        c.commit()
    line = start_fails(data)
    assert "damaged" in line and "svc03" in line


async def test_a_revision_set_back_starts_at_the_newest_held(stored: Stored) -> None:
    data = await stored()
    with contextlib.closing(sqlite3.connect(data / "registry.db")) as c:
        (revision,) = c.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()
        c.execute("UPDATE meta SET value = 3 WHERE key = 'revision'")
        c.commit()
    registry = Registry(data)
    registry.start()
    try:
        assert f"revision {revision} " in registry.log()
        async with registry.client() as c:
            new = await c.register("fresh", {"a": "1"}, persist=True)
        assert new.mod_revision == revision + 1
    finally:
        registry.kill9()


async def test_database_files_it_cannot_write_are_refused_at_start(
    stored: Stored, tmp_path: Path
) -> None:
    data = await stored()
    if os.geteuid() == 0:  # root writes whatever the mode says: make the file system read-only
        ro = tmp_path / "ro"
        if not _mount_tmpfs(ro, "64m"):
            pytest.skip("cannot mount a tmpfs here")
        try:
            shutil.copytree(data, ro / "data")
            subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
            line = start_fails(ro / "data")
        finally:
            _umount(ro)
    else:
        for p in [data, *data.iterdir()]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        line = start_fails(data)
    assert "readonly" in line or "read-only" in line
