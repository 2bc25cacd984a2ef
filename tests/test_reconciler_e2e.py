"""The reconciler end to end: a real registry, real reconciler processes (and
the one inside geryon-registryd --ndb), chunk entries registered under leases
as node agents register them."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from conftest import (
    BIN,
    CLUSTER,
    Daemon,
    Registry,
    events_of,
    eventually,
    progressed,
    run_cli,
    watching,
)

from geryon import errors, tls
from geryon.client import Client, Lease, WatchMessage
from geryon.disk import client as styx_client
from geryon.model import Service

M0 = "tcp!127.0.0.1!6701"  # d0.mbox's master, host0!chunk0
R0 = "tcp!127.0.0.1!6702"  # d0.replica's, host1!chunk0


def chunk_attrs(host: str, cid: str, **extra: str) -> dict[str, str]:
    return {"id": cid, "host": host, "name": host, "size": "65536", "kfs": "1", **extra}


def start_reconciler(
    daemons: list[Daemon], tmp_path: Path, registry: Registry, ndb: Path, *extra: str, name="rec"
) -> Daemon:
    d = Daemon(
        [
            str(BIN / "geryon-reconciler"),
            "--registry",
            registry.address,
            "--ndb",
            str(ndb),
            *extra,
        ],
        tmp_path / f"{name}.log",
        "reconciler: watching",
        env={"GERYON_TLS_DIR": "", "GERYON_USER": ""},
    )
    daemons.append(d)
    return d.start()


async def resolve(registry: Registry, name: str) -> subprocess.CompletedProcess[str]:
    # In a thread: the test's own lease must keep being renewed meanwhile.
    env = {"GERYON_REGISTRY": registry.address, "GERYON_TLS_DIR": ""}
    return await asyncio.to_thread(run_cli, "resolve", name, env=env)


async def entry(c: Client, name: str) -> dict[str, str] | None:
    try:
        return dict((await c.get(name)).attrs)
    except errors.NotFound:
        return None


def has(c: Client, name: str, **want: str | None) -> Callable[[], object]:
    """A check for eventually(): ``name``'s attributes include ``want``
    (None: absent; no ``want`` and None from get: the entry is gone)."""

    async def check() -> object:
        attrs = await entry(c, name)
        if attrs is None:
            return None
        return all(attrs.get(k) == v for k, v in want.items()) and attrs

    return check


async def gone(c: Client, name: str) -> bool:
    return await entry(c, name) is None


@contextlib.asynccontextmanager
async def chunk_lease(c: Client) -> AsyncIterator[Lease]:
    lease = c.lease(10_000)  # generous: a loaded test machine stalls
    await lease.start()
    try:
        yield lease
    finally:
        await lease.close(revoke=True)


async def test_names_follow_chunks_fail_over_and_leave_with_the_ndb_file(
    registry: Registry, daemons: list[Daemon], tmp_path: Path
) -> None:
    ndb = tmp_path / "cluster"
    ndb.write_text(CLUSTER)
    rec = start_reconciler(daemons, tmp_path, registry, ndb)
    assert "watching 4 disk names" in rec.log()
    async with registry.client() as c, chunk_lease(c) as lease:
        # Before any chunk: every name is there, down, without an address.
        await eventually(has(c, "d1.mbox", status="down", addr=None, host="host0", chunk="chunk1"))
        assert "down" in (await resolve(registry, "d1.mbox")).stderr
        unknown = await resolve(registry, "d9.mbox")
        assert unknown.returncode == 1 and "no disk named d9.mbox" in unknown.stderr

        # Names appear when chunks register.
        await c.register(M0, chunk_attrs("host0", "chunk0"), lease=lease.id)
        await c.register(R0, chunk_attrs("host1", "chunk0", health="passing"), lease=lease.id)
        d0 = await eventually(
            has(c, "d0.mbox", addr=M0, status="up", serving="master", **{"replica-addr": R0})
        )
        assert d0 == {
            "managed-by": "reconciler",
            "host": "host0",
            "chunk": "chunk0",
            "addr": M0,
            "automount": "1",
            "persist": "1",
            "replica": "d0.replica",
            "status": "up",
            "serving": "master",
            # Replicated: which chunk takes writes at which epoch, and the replica's address.
            "primary": "host0!chunk0",
            "standby": "host1!chunk0",
            "epoch": "1",
            "replica-addr": R0,
        }
        assert (await c.get("d0.mbox")).persistent
        await eventually(has(c, "d0.replica", addr=R0, serving="master"))
        r = await resolve(registry, "d0.mbox")
        assert (r.returncode, r.stdout) == (0, M0 + "\n")

        # The master moves to a new port.
        moved = "tcp!127.0.0.1!6801"
        await c.unregister(M0)
        await c.register(moved, chunk_attrs("host0", "chunk0"), lease=lease.id)
        await eventually(has(c, "d0.mbox", addr=moved, serving="master"))

        # Critical: fail over to the replica's chunk; passing again: back.
        await c.update(moved, {"health": "critical"})
        await eventually(has(c, "d0.mbox", addr=R0, serving="replica", host="host1"))
        await c.update(moved, {"health": "passing"})
        await eventually(has(c, "d0.mbox", addr=moved, serving="master", host="host0"))

        # The master gone: the replica; both gone: down.
        await c.unregister(moved)
        await eventually(has(c, "d0.mbox", addr=R0, serving="replica"))
        await c.unregister(R0)
        await eventually(has(c, "d0.mbox", status="down", addr=None, serving=None))
        down = await resolve(registry, "d0.mbox")
        assert down.returncode == 1 and "d0.mbox is down" in down.stderr

        # A malformed edit keeps the last good state, reported once with file:line;
        # the registry side is still reconciled against it.
        ndb.write_text(CLUSTER + "name=d2.mbox kfs master='host2!chunk0\n")
        await eventually(lambda: f"{ndb}:14: unterminated quote" in rec.log())
        await c.register(M0, chunk_attrs("host0", "chunk0"), lease=lease.id)
        await eventually(has(c, "d0.mbox", addr=M0, status="up"))
        assert await gone(c, "d2.mbox")
        assert rec.log().count("unterminated quote") == 1

        # Names leave with the ndb file; an unmanaged entry is left alone.
        await c.register("d2.mbox", {"addr": "by-hand"}, persist=True)
        ndb.write_text(CLUSTER.split("name=d1.mbox")[0] + "name=d2.mbox kfs master=host0!chunk0\n")
        await eventually(lambda: gone(c, "d1.mbox"))
        await eventually(lambda: gone(c, "d1.replica"))
        await eventually(lambda: "d2.mbox is an entry of admin not managed here" in rec.log())
        assert await entry(c, "d2.mbox") == {"addr": "by-hand"}
        assert await entry(c, "d0.replica") is None  # left the file too
        assert (await entry(c, "d0.mbox") or {}).get("addr") == M0
    assert rec.stop() == 0


async def test_restarts_of_registry_and_reconciler_converge(
    registry: Registry, daemons: list[Daemon], tmp_path: Path
) -> None:
    ndb = tmp_path / "cluster"
    ndb.write_text(CLUSTER)
    rec = start_reconciler(daemons, tmp_path, registry, ndb, "--failback", "never")
    async with registry.client() as c, chunk_lease(c) as lease:
        await c.register(R0, chunk_attrs("host1", "chunk0"), lease=lease.id)
        await eventually(has(c, "d0.mbox", addr=R0, serving="replica"))

        # The registry restarts (kill -9): the reconciler re-lists and carries on.
        await asyncio.to_thread(registry.restart)  # the loop keeps our lease alive
        await c.register(M0, chunk_attrs("host0", "chunk0"), lease=lease.id)
        # d1.mbox going up shows a pass that saw M0 back (it registered first).
        await c.register("tcp!127.0.0.1!6703", chunk_attrs("host0", "chunk1"), lease=lease.id)
        await eventually(has(c, "d1.mbox", status="up"))
        # d0.mbox is replicated: its primary back, it serves, --failback never
        # or not (its replica takes no writes until promoted).
        await eventually(has(c, "d0.mbox", addr=M0, serving="master"))
        await c.unregister(R0)
        await eventually(has(c, "d0.mbox", addr=M0, serving="master", **{"replica-addr": None}))

        # The reconciler is down while things change; a new one converges.
        rec.kill9()
        await c.register(R0, chunk_attrs("host1", "chunk0"), lease=lease.id)
        ndb.write_text(CLUSTER.replace("name=d1.mbox kfs", "name=d1.mbox"))
        rec = await asyncio.to_thread(
            start_reconciler, daemons, tmp_path, registry, ndb, name="rec2"
        )
        assert "watching 3 disk names" in rec.log()
        assert await gone(c, "d1.mbox")  # converged before its ready line
        assert (await entry(c, "d0.replica") or {}).get("addr") == R0
        assert (await entry(c, "d0.mbox") or {}).get("addr") == M0


async def test_two_reconcilers_converge_without_flapping(
    start_registry: Callable[..., Registry], daemons: list[Daemon], tmp_path: Path
) -> None:
    ndb = tmp_path / "cluster"
    ndb.write_text(CLUSTER)
    # One inside the registry, one beside it.
    registry = start_registry(extra=["--ndb", str(ndb)])
    async with registry.client() as c:
        await eventually(lambda: "reconciler: watching 4 disk names" in registry.log())
        await eventually(has(c, "d0.mbox", status="down"))
        assert (await c.get("d0.mbox")).owner == "reconciler"
        await asyncio.to_thread(start_reconciler, daemons, tmp_path, registry, ndb)
        await each_change_once(c)
    assert registry.stop() == 0
    assert "reconciler: watching" in registry.log()


# Every front of an etcd-kept registry may run --ndb: the reconcilers fence
# their writes, so two of them never undo each other.
@pytest.mark.parametrize("backend", ["etcd"])
async def test_every_front_runs_ndb_without_flapping(
    start_registry: Callable[..., Registry], tmp_path: Path
) -> None:
    ndb = tmp_path / "cluster"
    ndb.write_text(CLUSTER)
    fronts = [start_registry(f"front{i}", extra=["--ndb", str(ndb)]) for i in range(2)]
    async with Client(",".join(f.address for f in fronts)) as c:
        for f in fronts:
            await eventually(lambda f=f: "reconciler: watching 4 disk names" in f.log())
        await eventually(has(c, "d0.mbox", status="down"))
        await each_change_once(c)
    for f in fronts:
        assert f.stop() == 0


async def each_change_once(c: Client) -> None:
    """Chunks come, fail over, come back and go: d0.mbox follows, each change
    written once (by whichever reconciler) and never undone."""

    def seen(got: list[WatchMessage]) -> list[tuple[str | None, ...]]:
        return [
            (e.type.name, a.get("status"), a.get("serving"), a.get("addr"))
            for e in events_of(got)
            for a in [e.service.attrs]
        ]

    watch = c.watch(
        {"managed-by": "reconciler"}, prefix="d0.mbox", snapshot=True, progress_interval_ms=100
    )
    async with chunk_lease(c) as lease, watching(watch) as got:
        await eventually(lambda: got)  # the snapshot: the watch is on
        await c.register(M0, chunk_attrs("host0", "chunk0"), lease=lease.id)
        await eventually(has(c, "d0.mbox", addr=M0))
        await c.register(R0, chunk_attrs("host1", "chunk0"), lease=lease.id)
        await eventually(has(c, "d0.replica", addr=R0))
        await c.update(M0, {"health": "critical"})
        await eventually(has(c, "d0.mbox", addr=R0))
        await c.update(M0, {"health": "passing"})
        await eventually(has(c, "d0.mbox", addr=M0))
        await c.unregister(M0)
        await eventually(has(c, "d0.mbox", addr=R0))
        await c.unregister(R0)
        await eventually(has(c, "d0.mbox", status="down"))
        await eventually(lambda: len(seen(got)) >= 6)
        # A flap written by now has shown: the watch vouches (a progress
        # notice) for every revision up to the registry's present one.
        _, now = await c.find()
        await eventually(lambda: progressed(got) >= now)
        assert seen(got) == [
            ("PUT", "up", "master", M0),
            ("PUT", "up", "master", M0),  # the replica's address, once it is live
            ("PUT", "up", "replica", R0),
            ("PUT", "up", "master", M0),
            ("PUT", "up", "replica", R0),
            ("PUT", "down", None, None),
        ]


async def test_inside_registryd_with_tls(
    start_registry: Callable[..., Registry], tmp_path: Path
) -> None:
    tls.init_ca(tmp_path / "ca")
    server = tls.issue(tmp_path / "ca", "registry", role="server", out=tmp_path / "server")
    admin = tls.issue(tmp_path / "ca", "admin", role="admin", out=tmp_path / "admin")
    node = tls.issue(tmp_path / "ca", "host0", role="node", out=tmp_path / "node")
    ndb = tmp_path / "cluster"
    ndb.write_text(CLUSTER)
    registry = start_registry(extra=["--tls-dir", str(server), "--ndb", str(ndb)])
    assert (registry.data_dir.stat().st_mode & 0o777) == 0o700
    async with (
        Client(registry.address, tls_dir=node) as agent,
        Client(registry.address, tls_dir=admin) as c,
        chunk_lease(agent) as lease,
    ):
        await agent.register(M0, chunk_attrs("host0", "chunk0"), lease=lease.id)
        await eventually(has(c, "d0.mbox", addr=M0, status="up"))
        s: Service = await c.get("d0.mbox")
        assert s.owner == "reconciler" and s.persistent
        # The unix socket is the registry's own; TLS callers are still checked.
        with pytest.raises(errors.PermissionDenied):
            await agent.unregister("d0.mbox")
    assert registry.stop() == 0
    log = registry.log()
    assert "reconciler: create d0.mbox" in log and "internal error" not in log
    assert not (registry.data_dir / "reconciler.sock").exists()


def start_agent(daemons: list[Daemon], tmp_path: Path, registry: Registry, host: str) -> Daemon:
    """A real geryon-agent serving one chunk, chunk0, as a disk (geryon disk serve)."""
    config = tmp_path / f"{host}.toml"
    config.write_text(
        f'registry = "{registry.address}"\nhost = "{host}"\nadvertise = "127.0.0.1"\n'
        'restart_delay = "50ms"\nrestart_max_delay = "200ms"\nreconnect_max_delay = "300ms"\n'
        f'\n[[chunk]]\nid = "chunk0"\npath = "{tmp_path / host / "chunk0"}"\nsize = "1MiB"\n'
        'attrs = { kfs = "1" }\n'
    )
    (tmp_path / host).mkdir(exist_ok=True)
    d = Daemon(
        [str(BIN / "geryon-agent"), "--config", str(config)],
        tmp_path / f"agent-{host}.log",
        f"agent {host}: ",
        env={"GERYON_TLS_DIR": ""},
    )
    daemons.append(d)
    return d.start()


async def disk_root(addr: str) -> list[str]:
    """What rmnt would find at the address: a 9P disk, and its root's names."""
    r = await styx_client.connect(addr, uname=getpass.getuser())
    try:
        return [st.name for st in await r.listdir("/")]
    finally:
        await r.conn.close()


async def test_with_real_agents_failover_and_failback(
    registry: Registry, daemons: list[Daemon], tmp_path: Path
) -> None:
    ndb = tmp_path / "cluster"
    ndb.write_text(CLUSTER)
    host0 = start_agent(daemons, tmp_path, registry, "host0")
    start_agent(daemons, tmp_path, registry, "host1")
    start_reconciler(daemons, tmp_path, registry, ndb)
    async with registry.client() as c:
        d0 = await eventually(has(c, "d0.mbox", status="up", serving="master"))
        r = await resolve(registry, "d0.mbox")
        assert r.returncode == 0 and r.stdout.strip() == d0["addr"]  # type: ignore[index]
        assert await disk_root(r.stdout.strip()) == ["adm"]

        # The master's node dies (kill -9): its lease ends with it, the
        # replica's chunk serves d0.mbox.
        host0.kill9()
        replica = await eventually(has(c, "d0.mbox", serving="replica", host="host1"))
        assert replica["addr"] == (await c.get("d0.replica")).attrs["addr"]  # type: ignore[index]
        assert await disk_root((await resolve(registry, "d0.mbox")).stdout.strip()) == ["adm"]

        # It comes back, on a new port: failback.
        host0.start()
        back = await eventually(has(c, "d0.mbox", serving="master", host="host0"))
        chunks, _ = await c.find({"host": "host0", "id": "chunk0"})
        assert [s.name for s in chunks] == [back["addr"]]  # type: ignore[index]
