"""Disks from the outside: `geryon disk ...` against real chunk servers,
kill -9 in the middle of writes, 9P inside TLS, and a disk served by an agent
and found by name through the registry and the reconciler."""

from __future__ import annotations

import asyncio
import getpass
import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import BIN, Daemon, Registry, eventually, free_port, run_cli

from geryon import tls
from geryon.disk import client as styx_client
from geryon.disk import fs

ME = getpass.getuser()


Serve = Callable[..., Daemon]


@pytest.fixture
def serve(tmp_path: Path, daemons: list[Daemon]) -> Serve:
    """Start `geryon disk serve CHUNK` on a free loopback port; killed after the test."""

    def start(chunk: Path, *extra: str) -> Daemon:
        d = _serve(tmp_path, chunk, *extra)
        daemons.append(d)
        return d

    return start


def _serve(tmp_path: Path, chunk: Path, *extra: str, env: dict | None = None) -> Daemon:
    port = free_port()
    d = Daemon(
        [str(BIN / "geryon"), "disk", "serve", str(chunk), "--listen", f"127.0.0.1:{port}", *extra],
        tmp_path / f"disk-{port}.log",
        "disk: serving",
        env=env or {"GERYON_TLS_DIR": ""},
    )
    d.port = port  # type: ignore[attr-defined]
    return d.start()


def addr(d: Daemon) -> str:
    return f"tcp!127.0.0.1!{d.port}"  # type: ignore[attr-defined]


def disk(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return run_cli("disk", *args, env={"GERYON_TLS_DIR": ""}, **kw)  # type: ignore[arg-type]


def test_format_refuses_a_disk_and_data(tmp_path: Path) -> None:
    chunk = tmp_path / "chunk0"
    r = disk("format", str(chunk))
    assert r.returncode == 1 and "no size: give --size" in r.stderr
    # The seed's `zeros 1024 65536 > chunk0`: a file of zeros takes its size.
    chunk.write_bytes(bytes(1 << 20))
    r = disk("format", str(chunk))
    assert r.returncode == 0, r.stderr
    assert f"empty disk of {1 << 20} bytes, owner {ME}" in r.stdout
    r = disk("format", str(chunk), "--size", "2MiB")
    assert r.returncode == 1 and "already holds a file system (--force" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    other = tmp_path / "notes"
    other.write_text("precious")
    r = disk("format", str(other), "--size", "1MiB")
    assert r.returncode == 1 and "holds data that is not a disk" in r.stderr
    assert other.read_text() == "precious"
    assert disk("format", str(chunk), "--size", "2MiB", "--force").returncode == 0
    r = disk("check", str(chunk))
    assert r.returncode == 0 and "ok, 3 files" in r.stdout
    r = disk("format", str(tmp_path / "tiny"), "--size", "1000")
    assert r.returncode == 1 and "below the minimum" in r.stderr
    bad = tmp_path / "users"
    bad.write_text("-1:adm:adm:\nnot a line\n")
    r = disk("format", str(tmp_path / "c1"), "--size", "1MiB", "--users", str(bad))
    assert r.returncode == 1 and "line 2" in r.stderr


def test_file_commands_through_a_real_server(tmp_path: Path, serve: Serve) -> None:
    chunk = tmp_path / "chunk0"
    assert disk("format", str(chunk), "--size", "4MiB").returncode == 0
    d = serve(chunk)
    try:
        a = addr(d)
        local = tmp_path / "report.txt"
        local.write_bytes(os.urandom(200_000))
        assert disk("mkdir", f"{a}:/docs").returncode == 0
        r = disk("put", str(local), f"{a}:/docs/")
        assert r.returncode == 0, r.stderr
        r = disk("ls", "-l", f"{a}:/docs")
        assert r.returncode == 0 and "report.txt" in r.stdout and " 200000 " in r.stdout
        assert r.stdout.startswith(f"--rw-rw-r-- {ME}")
        got = subprocess.run(
            [str(BIN / "geryon"), "disk", "cat", f"{a}:/docs/report.txt"],
            capture_output=True,
            env={**os.environ, "GERYON_TLS_DIR": ""},
        )
        assert got.returncode == 0 and got.stdout == local.read_bytes()
        r = disk("get", f"{a}:/docs/report.txt", str(tmp_path / "back"))
        assert r.returncode == 0 and (tmp_path / "back").read_bytes() == local.read_bytes()
        r = disk("cat", f"{a}:/docs")
        assert r.returncode == 1 and r.stderr.endswith(":/docs: file is a directory\n")
        r = disk("put", "-", f"{a}:/note", input="hello\n")
        assert r.returncode == 0 and disk("cat", f"{a}:/note").stdout == "hello\n"
        r = disk("stat", f"{a}:/note")
        assert r.returncode == 0 and "qid path" in r.stdout
        r = disk("cat", f"{a}:/nosuch")
        assert r.returncode == 1
        assert r.stderr == f"geryon: disk cat: {a}:/nosuch: file does not exist\n"
        r = disk("rm", f"{a}:/docs", f"{a}:/note", f"{a}:/nosuch")
        assert r.returncode == 1 and "docs: directory not empty" in r.stderr
        assert "nosuch: file does not exist" in r.stderr
        assert disk("ls", a).stdout.split() == ["adm/", "docs/"]  # note went, docs stayed
        r = disk("cat", f"{a}:/adm/users", "--uname", "nobody-here")
        assert r.returncode == 1 and "unknown user nobody-here" in r.stderr
        # A second server on the same chunk is refused, not raced.
        r = run_cli("disk", "serve", str(chunk), "--listen", f"127.0.0.1:{free_port()}")
        assert r.returncode == 1 and "in use by another chunk server" in r.stderr
        r = run_cli(
            "disk", "serve", str(chunk), "--listen", "0.0.0.0:0", env={"GERYON_TLS_DIR": ""}
        )
        assert r.returncode == 1 and "refusing plain 9P on non-loopback" in r.stderr
        # Bad input is one line, never a traceback.
        for argv in (
            ["mkdir", "--mode", "999", f"{a}:/x"],
            ["ls", "tcp!127.0.0.1"],
            ["users", a, "--set", str(tmp_path / "missing")],
            ["format", str(tmp_path / "no" / "such" / "dir"), "--size", "1MiB"],
        ):
            r = disk(*argv)
            assert r.returncode in (1, 2), (argv, r.stderr)
            last = r.stderr.splitlines()[-1]
            assert "Traceback" not in r.stderr and last.startswith("geryon"), r.stderr
    finally:
        assert d.stop() == 0
    assert disk("check", str(chunk)).returncode == 0
    assert not Path(f"{chunk}-wal").exists()  # folded back into the chunk at a clean stop


def test_users_file_shown_and_replaced(tmp_path: Path, serve: Serve) -> None:
    chunk = tmp_path / "chunk0"
    assert disk("format", str(chunk), "--size", "1MiB", "--owner", "glenda").returncode == 0
    r = disk("users", str(chunk))
    assert r.returncode == 0 and "10000:glenda:glenda:" in r.stdout
    new = tmp_path / "users"
    new.write_text(r.stdout + "10001:bob:bob:\n")
    d = serve(chunk)
    try:
        # Over 9P: bob is not known yet; glenda (the owner) may replace it.
        r = disk("users", addr(d), "--set", str(new), "--uname", "none")
        assert r.returncode == 1 and "permission denied" in r.stderr
        r = disk("users", addr(d), "--set", str(new), "--uname", "glenda")
        assert r.returncode == 0, r.stderr
        r = disk("ls", addr(d), "--uname", "bob")
        assert r.returncode == 0 and "adm/" in r.stdout
        # Offline replacement needs the server gone (it holds the chunk).
        r = disk("users", str(chunk), "--set", str(new))
        assert r.returncode == 1 and "in use by another chunk server" in r.stderr
    finally:
        d.stop()
    new.write_text("-1:adm:adm:\n0:none::\n10000:glenda:glenda:\n")
    assert disk("users", str(chunk), "--set", str(new)).returncode == 0
    assert "bob" not in disk("users", str(chunk)).stdout


async def _writer(a: str, acked: dict[str, bytes], stop: asyncio.Event, seed: int) -> None:
    """Write files until the server dies; a file counts once its clunk is answered."""
    rng = random.Random(seed)
    r = await styx_client.connect(a, uname=ME)
    try:
        i = 0
        while not stop.is_set():
            name = f"/w{seed}-{i}"
            data = rng.randbytes(rng.choice([10, 5000, 70_000, 200_000]))
            await r.write_file(name, data)
            acked[name] = data
            i += 1
    except (styx_client.Gone, styx_client.StyxError):
        pass
    finally:
        await r.conn.close()


async def test_kill9_during_writes_loses_nothing_acknowledged(
    tmp_path: Path, serve: Serve
) -> None:
    chunk = tmp_path / "chunk0"
    fs.format(chunk, 64 << 20, owner=ME)
    acked: dict[str, bytes] = {}
    for rnd in range(4):
        d = serve(chunk)
        stop = asyncio.Event()
        writers = [
            asyncio.create_task(_writer(addr(d), acked, stop, seed=rnd * 10 + k))
            for k in range(3)
        ]
        want = len(acked) + 5 + rnd * 3  # kill at a different point each round
        await eventually(lambda want=want: len(acked) >= want)
        d.kill9()  # mid-write: three writers have requests in flight
        stop.set()
        await asyncio.gather(*writers)
        # The chunk reopens to a consistent tree holding every acknowledged file.
        disk_ = fs.Disk(chunk)
        try:
            assert disk_.check() == []
        finally:
            disk_.close()
    d = serve(chunk)
    try:
        r = await styx_client.connect(addr(d), uname=ME)
        for name, data in acked.items():
            assert await r.read_file(name) == data, name
        await r.conn.close()
    finally:
        d.stop()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca = tmp_path / "ca"
    tls.init_ca(ca)
    out = {}
    for name, role in [("h0", "node"), ("glenda", "node"), ("ops", "admin"), ("auditor", "reader")]:
        out[name] = tls.issue(ca, name, role=role, out=tmp_path / "id" / name)
    return out


async def test_9p_in_tls_uses_certificate_identities(
    tmp_path: Path, pki: dict[str, Path], serve: Serve
) -> None:
    chunk = tmp_path / "chunk0"
    users = "-1:adm:adm:\n0:none::\n10000:glenda:glenda:\n10001:auditor:auditor:\n"
    fs.format(chunk, 1 << 20, owner="glenda", users_text=users)
    d = serve(chunk, "--tls-dir", str(pki["h0"]))
    try:
        a = addr(d)
        # The attach name is ignored: glenda's certificate makes her the owner.
        r = await styx_client.connect(a, uname="someone-else", tls_dir=pki["glenda"])
        assert r.conn.peer is not None and r.conn.peer.name == "h0"
        await r.write_file("/hers", b"mine")
        assert (await r.stat("/hers")).uid == "glenda"
        await r.conn.close()
        # A reader identity reads, and may change nothing, whatever the modes say.
        r = await styx_client.connect(a, uname="glenda", tls_dir=pki["auditor"])
        assert await r.read_file("/hers") == b"mine"
        with pytest.raises(styx_client.StyxError, match="permission denied"):
            await r.write_file("/x", b"no")
        await r.conn.close()
        # An admin is a member of adm: it may replace /adm/users.
        r = await styx_client.connect(a, uname="", tls_dir=pki["ops"])
        await r.write_file("/adm/users", (users + "10002:h0:h0:\n").encode())
        await r.conn.close()
        # Plain 9P against the TLS server fails at once, with a clear error.
        with pytest.raises(styx_client.Gone):
            await styx_client.connect(a, uname="glenda", limit=5)
        # As does a certificate from another CA.
        tls.init_ca(tmp_path / "evil")
        evil = tls.issue(tmp_path / "evil", "glenda", role="admin", out=tmp_path / "evil-id")
        with pytest.raises(styx_client.Gone):
            await styx_client.connect(a, uname="glenda", tls_dir=evil, limit=5)
    finally:
        d.stop()


async def test_agent_disk_found_by_name(
    registry: Registry, daemons: list[Daemon], tmp_path: Path
) -> None:
    """The seed's path: an agent serves chunk0 as a disk, the reconciler names
    it d0.mbox, and `geryon disk` reaches it by that name."""
    ndb = tmp_path / "cluster"
    ndb.write_text("name=d0.mbox kfs\n  master=host0!chunk0\n")
    config = tmp_path / "host0.toml"
    config.write_text(
        f'registry = "{registry.address}"\nhost = "host0"\nadvertise = "127.0.0.1"\n'
        f'[[chunk]]\nid = "chunk0"\npath = "{tmp_path / "chunk0"}"\nsize = "2MiB"\n'
        'attrs = { kfs = "1" }\n'
    )
    for argv, log, ready in [
        ([str(BIN / "geryon-agent"), "--config", str(config)], "agent.log", "services announced"),
        ([str(BIN / "geryon-reconciler"), "--ndb", str(ndb)], "rec.log", "reconciler: watching"),
    ]:
        d = Daemon(argv, tmp_path / log, ready, env={"GERYON_REGISTRY": registry.address,
                                                     "GERYON_TLS_DIR": ""})  # fmt: skip
        daemons.append(d.start())
    env = {"GERYON_REGISTRY": registry.address, "GERYON_TLS_DIR": ""}
    async with registry.client() as c:
        await eventually(lambda: c.get("d0.mbox"), timeout=15)
    r = run_cli("disk", "put", "-", "d0.mbox:/hello", input="from host0\n", env=env)
    assert r.returncode == 0, r.stderr
    assert run_cli("disk", "cat", "d0.mbox:/hello", env=env).stdout == "from host0\n"
    r = run_cli("disk", "cat", "d9.nosuch:/hello", env=env)
    assert r.returncode == 1 and r.stderr == "geryon: disk cat: no disk named d9.nosuch\n"
    # Unreplicated: its entry names the chunk that takes its writes, and no replica.
    st = run_cli("disk", "status", "d0.mbox", env=env)
    assert st.returncode == 0, st.stderr
    assert "primary  host0!chunk0" in st.stdout and "writable" in st.stdout
    assert "standby" not in st.stdout
    pr = run_cli("disk", "promote", "d0.mbox", env=env)
    assert (pr.returncode, pr.stderr) == (
        1, "geryon: disk promote: d0.mbox has no replica (its ndb entry names none)\n"
    )  # fmt: skip

    async def df_shows_use() -> str:
        out = run_cli("disk", "df", "d0.mbox", env=env).stdout
        return out if "2.0MiB" in out and "d0.mbox" in out else ""

    await eventually(df_shows_use, timeout=15)
