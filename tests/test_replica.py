"""Replicated disks end to end: a master and a replica chunk served by real
agents on two "hosts", named by the reconciler from the seed's ndb file;
continuous replication, kill -9 of either side, reads from the replica,
failover, promotion (by hand and automatic), the old master's return and
what it had that the new primary did not."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from conftest import BIN, Daemon, Registry, eventually, free_port, run_cli

from geryon.client import Client
from geryon.disk import client as styx_client
from geryon.disk import styx

NDB = """\
name=d0.mbox kfs
  master=host0!chunk0
  replica=d0.replica

name=d0.replica kfs
  master=host1!chunk0 replica
"""


class Cluster:
    """A registry, a reconciler and one agent per host, each serving chunk0."""

    def __init__(self, tmp: Path, registry: Registry, daemons: list[Daemon]) -> None:
        self.tmp, self.registry, self.daemons = tmp, registry, daemons
        self.env = {"GERYON_REGISTRY": registry.address, "GERYON_TLS_DIR": ""}
        self.agents: dict[str, Daemon] = {}
        self.mounts: list[Path] = []

    def agent(self, host: str, *, sync: bool = False) -> Daemon:
        config = self.tmp / f"{host}.toml"
        config.write_text(
            f'registry = "{self.registry.address}"\nhost = "{host}"\nadvertise = "127.0.0.1"\n'
            f'[[chunk]]\nid = "chunk0"\npath = "{self.tmp / host / "chunk0"}"\n'
            f'size = "64MiB"\nattrs = {{ kfs = "1" }}\n' + ("sync = true\n" if sync else "")
        )
        (self.tmp / host).mkdir(exist_ok=True)
        d = Daemon([str(BIN / "geryon-agent"), "--config", str(config)],
                   self.tmp / f"{host}.log", "services announced", env=self.env)  # fmt: skip
        self.daemons.append(d.start())
        self.agents[host] = d
        return d

    def reconciler(self, *extra: str) -> Daemon:
        ndb = self.tmp / "cluster"
        ndb.write_text(NDB)
        d = Daemon([str(BIN / "geryon-reconciler"), "--ndb", str(ndb), *extra],
                   self.tmp / "rec.log", "reconciler: watching", env=self.env)  # fmt: skip
        self.daemons.append(d.start())
        return d

    def mount(self, point: Path, *args: str) -> bool:
        """`geryon mount --at POINT ARGS...`; False without FUSE here."""
        r = self.cli("mount", "--at", str(point), *args)
        if r.returncode != 0 and "FUSE is not available" in r.stderr:
            return False
        assert r.returncode == 0, r.stderr
        self.mounts.append(point)
        return True

    def cli(self, *args: str, input: str | None = None):
        return run_cli(*args, env=self.env, input=input, timeout=60)

    def client(self) -> Client:
        return self.registry.client()

    async def entry(self, name: str = "d0.mbox") -> dict[str, str]:
        async with self.client() as c:
            return dict((await c.get(name)).attrs)

    async def chunk(self, host: str) -> dict[str, str]:
        async with self.client() as c:
            found, _ = await c.find({"host": host, "id": "chunk0"})
            return {**found[0].attrs, "addr": found[0].name} if found else {}

    async def status(self) -> dict:
        r = self.cli("disk", "status", "--json", "d0.mbox")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    async def caught_up(self) -> dict:
        """The status once the replica follows with nothing left to apply."""

        async def check() -> dict | None:
            st = await self.status()
            prim, rep = st["chunks"]
            ok = (isinstance(prim.get("seq"), int) and prim["writable"] and rep.get("following")
                  and not rep.get("error") and rep.get("lag") == 0
                  and rep.get("seq") == prim["seq"])  # fmt: skip
            return st if ok else None

        return await eventually(check, timeout=30, interval=0.2)  # type: ignore[return-value]

    async def remote(self, addr: str) -> styx_client.Remote:
        return await styx_client.connect(addr, uname=os.environ.get("USER", "root") or "root")


@pytest.fixture
async def cluster(
    registry: Registry, daemons: list[Daemon], tmp_path: Path
) -> AsyncIterator[Cluster]:
    cl = Cluster(tmp_path, registry, daemons)
    yield cl
    for point in cl.mounts:  # a test that failed half way leaves no mount behind
        cl.cli("umount", "--lazy", str(point))


async def start(cl: Cluster, *, sync: bool = False, promote: str = "never") -> None:
    cl.agent("host0", sync=sync)
    cl.agent("host1")
    cl.reconciler("--promote", promote)

    async def ready() -> bool:
        e = await cl.entry()
        return e.get("serving") == "master" and bool(e.get("replica-addr"))

    await eventually(lambda: _try(ready), timeout=30, interval=0.1)
    await cl.caught_up()


async def _try(check: Callable) -> object:
    try:
        return await check()
    except Exception:
        return None


def tree(rng: random.Random, n: int) -> dict[str, bytes]:
    sizes = [0, 1, 100, 4096, 65_535, 65_536, 65_537, 300_000]
    return {f"/t/d{i % 4}/f{i}": rng.randbytes(rng.choice(sizes)) for i in range(n)}


async def write_tree(r: styx_client.Remote, files: dict[str, bytes]) -> None:
    for d in sorted({p.rsplit("/", 1)[0] for p in files}):
        parts = d.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            try:
                await r.mkdir("/" + "/".join(parts[:i]))
            except styx_client.StyxError:
                pass
    for p, data in files.items():
        await r.write_file(p, data)


async def read_tree(r: styx_client.Remote, root: str = "/t") -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for st in await r.listdir(root):
        p = f"{root}/{st.name}"
        if st.mode & 0x80000000:
            out.update(await read_tree(r, p))
        else:
            out[p] = await r.read_file(p)
    return out


async def test_tree_appears_on_the_replica_byte_for_byte(cluster: Cluster) -> None:
    await start(cluster)
    e = await cluster.entry()
    assert (e["primary"], e["standby"], e["epoch"]) == ("host0!chunk0", "host1!chunk0", "1")
    files = tree(random.Random(1), 40)
    r = await cluster.remote(e["addr"])
    try:
        await write_tree(r, files)  # every file clunked: durable
        await r.write_file("/hello", b"from host0\n")
    finally:
        await r.conn.close()
    st = await cluster.caught_up()
    rep = await cluster.remote(e["replica-addr"])
    try:
        assert await read_tree(rep) == files
        with pytest.raises(styx_client.StyxError, match=r"read-only: replica of d0\.mbox"):
            await rep.write_file("/nope", b"x")
    finally:
        await rep.conn.close()
    # Both chunks' entries carry their position, and the status shows no lag.
    prim, repl = st["chunks"]
    assert repl["lag"] == 0 and repl["seq"] == prim["seq"] and prim["writable"]
    assert not repl["writable"]

    async def positions() -> bool:
        a, b = await cluster.chunk("host0"), await cluster.chunk("host1")
        return a.get("applied") == b.get("applied") == str(prim["seq"])

    await eventually(positions, timeout=15, interval=0.2)
    # The CLI reads the replica by name, and refuses the replica's writes.
    r2 = cluster.cli("disk", "cat", "--replica", "d0.mbox:/hello")
    assert (r2.returncode, r2.stdout) == (0, "from host0\n"), r2.stderr
    r2 = cluster.cli("disk", "put", "-", "--replica", "d0.mbox:/x", input="x")
    assert r2.returncode == 2  # put has no --replica: writes go to the primary
    text = cluster.cli("disk", "status", "d0.mbox").stdout
    assert "d0.mbox: epoch 1, asynchronous, serving master" in text
    assert "standby  host1!chunk0" in text and "lag 0 changes" in text


async def _compare(cluster: Cluster) -> dict[str, bytes]:
    """Wait until the replica has everything; both trees, which must agree."""
    await cluster.caught_up()
    e = await cluster.entry()
    a, b = await cluster.remote(e["addr"]), await cluster.remote(e["replica-addr"])
    try:
        mine, theirs = await read_tree(a), await read_tree(b)
    finally:
        await a.conn.close()
        await b.conn.close()
    assert mine == theirs
    return mine


async def test_replication_resumes_after_kill9_of_either_side_and_the_registry(
    cluster: Cluster,
) -> None:
    await start(cluster)
    rng = random.Random(2)
    files = tree(rng, 12)
    e = await cluster.entry()
    r = await cluster.remote(e["addr"])
    try:
        await write_tree(r, files)
        # The replica's server dies mid-stream; its agent starts it again.
        os.kill(int((await cluster.chunk("host1"))["pid"]), signal.SIGKILL)
        more = {f"/t/d1/k{i}": rng.randbytes(70_000) for i in range(10)}
        await write_tree(r, more)
        files.update(more)
    finally:
        await r.conn.close()
    assert await _compare(cluster) == files
    # Now the master's server: it comes back on a new port, and the replica follows it there.
    os.kill(int((await cluster.chunk("host0"))["pid"]), signal.SIGKILL)

    async def master_back() -> dict[str, str] | None:
        e2 = await cluster.entry()
        return e2 if e2.get("serving") == "master" and e2["addr"] != e["addr"] else None

    e2 = await eventually(lambda: _try(master_back), timeout=30, interval=0.1)
    r = await cluster.remote(e2["addr"])  # type: ignore[index]
    try:
        again = {f"/t/d2/m{i}": rng.randbytes(5000) for i in range(10)}
        await write_tree(r, again)
        files.update(again)
        # And the registry (kill -9, restarted): replication does not need it.
        cluster.registry.restart()
        last = {f"/t/d3/r{i}": rng.randbytes(20_000) for i in range(10)}
        await write_tree(r, last)
        files.update(last)
    finally:
        await r.conn.close()
    assert await _compare(cluster) == files


async def test_reads_from_the_replica_during_writes(cluster: Cluster, tmp_path: Path) -> None:
    await start(cluster)
    e = await cluster.entry()
    rng = random.Random(3)
    files = {f"/t/f{i}": rng.randbytes(rng.choice([10, 30_000, 200_000])) for i in range(60)}
    done = asyncio.Event()

    async def writer() -> None:
        r = await cluster.remote(e["addr"])
        try:
            await write_tree(r, files)
        finally:
            await r.conn.close()
            done.set()

    seen = 0
    task = asyncio.create_task(writer())
    rep = await cluster.remote(e["replica-addr"])
    try:
        while not done.is_set():
            try:
                now = await read_tree(rep)
            except styx_client.StyxError:  # no /t yet
                now = {}
            for p, data in now.items():
                # A file is created, then written in one Twrite: whole or empty.
                assert data in (b"", files[p]), p
                seen += bool(data)
            await asyncio.sleep(0.01)
        await task
    finally:
        await rep.conn.close()
    assert seen > 0  # the replica was read while the master wrote
    assert await _compare(cluster) == files
    # The replica through FUSE, read-only: the seed's "use replicas during computation".
    point = tmp_path / "ro"
    if not cluster.mount(point, "--replica", "d0.mbox"):
        pytest.skip("FUSE is not available here")
    try:
        assert (point / "t" / "f7").read_bytes() == files["/t/f7"]
        with pytest.raises(OSError) as exc:
            (point / "t" / "new").write_bytes(b"x")
        assert exc.value.errno == 30  # EROFS
    finally:
        assert cluster.cli("umount", str(point)).returncode == 0


async def test_failover_promotion_and_the_old_masters_return(cluster: Cluster) -> None:
    await start(cluster)
    before = {f"/t/a{i}": os.urandom(40_000) for i in range(10)}
    e = await cluster.entry()
    r = await cluster.remote(e["addr"])
    try:
        await write_tree(r, before)
    finally:
        await r.conn.close()
    await cluster.caught_up()
    point = cluster.tmp / "n"  # a mount made before, as a user's would be
    mounted = cluster.mount(point, "d0.mbox")
    cluster.agents["host0"].kill9()  # the master's node is gone, its server with it

    async def failed_over() -> bool:
        e2 = await cluster.entry()
        return e2.get("serving") == "replica" and e2.get("host") == "host1"

    await eventually(lambda: _try(failed_over), timeout=30, interval=0.1)
    if mounted:  # (without FUSE the same is checked through geryon disk below)
        assert await asyncio.to_thread((point / "t" / "a1").read_bytes) == before["/t/a1"]
        with pytest.raises(OSError) as exc:
            await asyncio.to_thread((point / "t" / "new").write_bytes, b"x")
        assert exc.value.errno == 30  # EROFS until promoted
    # Reads at once; writes refused, saying what to do.
    got = cluster.cli("disk", "get", "d0.mbox:/t/a3", str(cluster.tmp / "a3"))
    assert got.returncode == 0, got.stderr
    assert (cluster.tmp / "a3").read_bytes() == before["/t/a3"]
    put = cluster.cli("disk", "put", "-", "d0.mbox:/t/new", input="x")
    assert put.returncode == 1
    assert "read-only: replica of d0.mbox" in put.stderr
    assert "geryon disk promote d0.mbox" in put.stderr
    assert len(put.stderr.strip().splitlines()) == 1
    pr = cluster.cli("disk", "promote", "d0.mbox")
    assert pr.returncode == 0, pr.stderr
    assert pr.stdout == "d0.mbox: host1!chunk0 is the primary at epoch 2\n"
    e = await cluster.entry()
    assert (e["primary"], e["standby"], e["epoch"]) == ("host1!chunk0", "host0!chunk0", "2")
    after = {f"/t/b{i}": os.urandom(3000) for i in range(10)}
    put = cluster.cli("disk", "put", "-", "d0.mbox:/t/b0", input="first after promotion\n")
    assert put.returncode == 0, put.stderr
    after["/t/b0"] = b"first after promotion\n"
    if mounted:  # the mount follows the name to the new primary, and writes
        await asyncio.to_thread((point / "t" / "b1").write_bytes, after["/t/b1"])
        assert cluster.cli("umount", str(point)).returncode == 0
    r = await cluster.remote((await cluster.entry())["addr"])
    try:
        done = ("/t/b0", "/t/b1") if mounted else ("/t/b0",)
        await write_tree(r, {k: v for k, v in after.items() if k not in done})
    finally:
        await r.conn.close()
    # The old master returns: it refuses writes, follows the new primary, catches up.
    cluster.agent("host0")

    async def old_master_up() -> str | None:
        return (await cluster.chunk("host0")).get("addr")

    old = await eventually(lambda: _try(old_master_up), timeout=30, interval=0.1)
    r = await cluster.remote(old)  # type: ignore[arg-type]
    try:
        with pytest.raises(styx_client.StyxError, match="read-only"):
            await r.write_file("/t/stale", b"never")
    finally:
        await r.conn.close()
    assert await _compare(cluster) == {**before, **after}
    e = await cluster.entry()
    assert e["addr"] != old and e["replica-addr"] == old and e["epoch"] == "2"


async def test_diverged_changes_are_kept_in_recovered(cluster: Cluster) -> None:
    await start(cluster)
    e = await cluster.entry()
    r = await cluster.remote(e["addr"])
    try:
        await write_tree(r, {"/t/shared": b"both have this"})
        await cluster.caught_up()
        assert cluster.agents["host1"].stop() == 0  # the replica goes away
        # Acknowledged by the master alone (asynchronous mode).
        await write_tree(r, {"/t/only-old/x": b"written while alone", "/t/shared": b"changed"})
    finally:
        await r.conn.close()
    cluster.agents["host0"].kill9()
    cluster.agent("host1")

    async def failed_over() -> bool:
        return (await cluster.entry()).get("serving") == "replica"

    await eventually(lambda: _try(failed_over), timeout=30, interval=0.1)
    pr = cluster.cli("disk", "promote", "d0.mbox")
    assert pr.returncode == 1 and "--force" in pr.stderr
    pr = cluster.cli("disk", "promote", "--force", "d0.mbox")
    assert pr.returncode == 0, pr.stderr
    put = cluster.cli("disk", "put", "-", "d0.mbox:/t/new", input="new primary\n")
    assert put.returncode == 0, put.stderr
    cluster.agent("host0")
    final = await _compare(cluster)
    assert final["/t/shared"] == b"both have this"
    assert final["/t/new"] == b"new primary\n"
    kept = {p: d for p, d in (await _read_recovered(cluster)).items()}
    assert sorted(p.split("/", 3)[3] for p in kept) == ["t/only-old/x", "t/shared"], kept
    assert sorted(kept.values()) == [b"changed", b"written while alone"]


async def _read_recovered(cluster: Cluster) -> dict[str, bytes]:
    e = await cluster.entry()
    r = await cluster.remote(e["addr"])
    try:
        [folder] = await r.listdir("/recovered")
        assert folder.name.startswith("host0!chunk0-") and "-epoch1-after" in folder.name
        return await read_tree(r, f"/recovered/{folder.name}")
    finally:
        await r.conn.close()


async def test_sync_mode_loses_nothing_on_kill9_with_automatic_promotion(
    cluster: Cluster,
) -> None:
    await start(cluster, sync=True, promote="auto")
    st = await cluster.status()
    assert st["sync"] is True and st["in_sync"] is True
    e = await cluster.entry()
    acked: dict[str, bytes] = {}
    stop = asyncio.Event()

    async def writer() -> None:
        r = await cluster.remote(e["addr"])
        i = 0
        try:
            while not stop.is_set():
                data = os.urandom(random.choice([100, 20_000, 70_000]))
                await r.write_file(f"/w{i}", data)
                acked[f"/w{i}"] = data  # the clunk returned: acknowledged
                i += 1
        except (styx_client.Gone, styx_client.StyxError, OSError):
            pass
        finally:
            await r.conn.close()

    task = asyncio.create_task(writer())
    await eventually(lambda: len(acked) >= 30, timeout=30)
    cluster.agents["host0"].kill9()
    stop.set()
    await task

    async def promoted() -> dict[str, str] | None:
        e2 = await cluster.entry()
        return e2 if e2.get("epoch") == "2" and e2.get("serving") == "master" else None

    e2 = await eventually(lambda: _try(promoted), timeout=30, interval=0.1)
    assert e2["primary"] == "host1!chunk0"  # type: ignore[index]
    r = await cluster.remote(e2["addr"])  # type: ignore[index]
    try:
        for p, data in acked.items():
            assert await r.read_file(p) == data, p
        await r.write_file("/after", b"writable at once")
    finally:
        await r.conn.close()


async def test_sync_mode_falls_back_when_the_replica_is_gone(cluster: Cluster) -> None:
    await start(cluster, sync=True)
    assert cluster.agents["host1"].stop() == 0
    put = cluster.cli("disk", "put", "-", "d0.mbox:/alone", input="still written\n")
    assert put.returncode == 0, put.stderr
    st = await cluster.status()
    assert st["in_sync"] is False
    assert "OUT OF SYNC" in cluster.cli("disk", "status", "d0.mbox").stdout
    cluster.agent("host1")

    async def in_sync() -> bool:
        return (await cluster.status())["in_sync"] is True

    await eventually(in_sync, timeout=30, interval=0.2)


async def test_bad_input_to_the_log_tree_is_refused_and_harms_nothing(tmp_path: Path) -> None:
    """A client writing nonsense to a chunk server's log tree gets an error
    for each request; the server lives on and its status still reads."""
    chunk = tmp_path / "chunk"
    port = free_port()
    d = Daemon(
        [str(BIN / "geryon"), "disk", "serve", str(chunk), "--listen", f"127.0.0.1:{port}",
         "--create", "1MiB"],
        tmp_path / "serve.log", "disk: serving", env={"GERYON_TLS_DIR": ""},
    )  # fmt: skip
    d.start()
    try:
        r = await styx_client.connect(f"127.0.0.1:{port}", uname="x", aname="log")
        try:
            fid = await r.open("changes", styx.ORDWR)
            bad_follows = [
                b"follow x \xc2\xb2 -",  # a digit isdigit() takes and int() does not
                b"follow x 1 -\nnot json",
                b"follow x 1 -\n[[1, 2]]",
                b"follow x 99999999999999999999999 -",
                b"hello",
            ]
            for data in bad_follows:
                with pytest.raises(styx_client.StyxError, match=r"bad follow|want"):
                    await r.conn.rpc(styx.Fcall(styx.Twrite, fid=fid, offset=0, data=data))
            with pytest.raises(styx_client.StyxError, match="write follow first"):
                await r.read_fid(fid, 0, 100)
            rfid = await r.open("recover", styx.OWRITE)
            for data in (b"no newline", b"[1]\n", b'{"path": "x"}\n', b"{}\n",
                         b'{"path": "a/b", "mode": 420, "offset": -5}\nxx'):  # fmt: skip
                with pytest.raises(styx_client.StyxError, match="bad recovery record"):
                    await r.conn.rpc(styx.Fcall(styx.Twrite, fid=rfid, offset=0, data=data))
            st = json.loads(await r.read_file("status"))
            assert st["followers"] == [] and st["seq"] >= 0
        finally:
            await r.conn.close()
        assert d.running
        assert "Traceback" not in d.log()
    finally:
        d.stop()
