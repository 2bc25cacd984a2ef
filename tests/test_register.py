"""geryon register and geryon reglisten, end to end: a real registry, the
real CLI, real commands; we dial the registered address and talk to them."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BIN, Daemon, Registry, eventually, free_port, gone, run_cli

from geryon import announce, tls
from geryon.client import Backoff

ECHO = [sys.executable, str(Path(__file__).parent / "fixtures" / "echo.py")]
# Long enough that only the keepalive stream's end can explain a fast deletion.
LONG_TTL = "30"


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that is gone counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def dial(name: str) -> socket.socket:
    _, host, port = name.split("!")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.settimeout(10)
    return s


def talk(s: socket.socket, line: str) -> str:
    s.sendall(line.encode() + b"\n")
    return s.makefile().readline().strip()


def identities(tmp_path: Path) -> dict[str, Path]:
    """A cluster CA and an identity for each role (test_auth's pki)."""
    ca = tmp_path / "ca"
    tls.init_ca(ca)
    ids = {"ca": ca}
    for name, role in [("registry", "server"), ("host0", "node"), ("viewer", "reader")]:
        ids[name] = tls.issue(ca, name, role=role, out=tmp_path / "id" / name)
    return ids


@pytest.fixture
def announcers(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill9()


def start_cli(
    announcers: list[Daemon], tmp_path: Path, registry: str, *args: str, ready: str
) -> Daemon:
    d = Daemon(
        [
            str(BIN / "geryon"),
            "--registry",
            registry,
            args[0],
            "--host",
            "h0",
            "--advertise",
            "127.0.0.1",
            "--reconnect-max",
            "0.3",
            *args[1:],
        ],
        tmp_path / f"{args[0]}{len(announcers)}.log",
        ready,
    )
    announcers.append(d)
    return d.start()


async def one(client, attrs: dict) -> object:  # type: ignore[no-untyped-def]
    services, _ = await client.find(attrs)
    return services[0] if len(services) == 1 else None


async def test_register_end_to_end(registry: Registry, announcers, tmp_path: Path) -> None:
    reg = start_cli(
        announcers,
        tmp_path,
        registry.address,
        "register",
        "-a",
        "svc",
        "echo",
        "-a",
        "proto",
        "echo",
        "--",
        *ECHO,
        "tcp",
        "{port}",
        ready="lease",
    )
    async with registry.client() as c:
        s = await eventually(lambda: one(c, {"svc": "echo"}))
        attrs = s.attrs
        assert s.name.startswith("tcp!127.0.0.1!")
        assert attrs["proto"] == "echo" and attrs["auth"] == "none"
        assert attrs["name"] == attrs["host"] == "h0"
        assert attrs["started"].isdigit() and attrs["health"] == "passing"
        pid = int(attrs["pid"])
        assert pid != reg.pid and alive(pid)
        with dial(s.name) as conn:
            assert talk(conn, "hi") == f"{pid} hi"
            conn.sendall(b"exit 3\n")
        # The entry goes with the command, and register exits with its status.
        await eventually(lambda: gone(c, "echo"))
        assert reg.proc.wait(10) == 3


async def test_register_kill9_leaves_nothing(registry: Registry, announcers, tmp_path) -> None:
    reg = start_cli(
        announcers,
        tmp_path,
        registry.address,
        "register",
        "--lease-ttl",
        LONG_TTL,
        "-a",
        "svc",
        "sh",
        "--",
        "sh",
        "-c",
        f"sleep 1000 & echo $! > {tmp_path}/bg; exec {' '.join(ECHO)} tcp {{port}}",
        ready="lease",
    )
    async with registry.client() as c:
        s = await eventually(lambda: one(c, {"svc": "sh"}))
        pid, bg = int(s.attrs["pid"]), int((tmp_path / "bg").read_text())
        assert alive(pid) and alive(bg)
        reg.kill9()
        await eventually(lambda: gone(c, "sh"), timeout=10)
    await eventually(lambda: not alive(pid) and not alive(bg), timeout=10)


async def test_register_survives_registry(tmp_path: Path, daemons, announcers) -> None:
    """Registry down at start, then up, then kill -9 and restarted."""
    registry = Registry(tmp_path / "registry", port=free_port())
    daemons.append(registry)
    reg = start_cli(
        announcers,
        tmp_path,
        registry.address,
        "register",
        "-a",
        "svc",
        "late",
        "--",
        *ECHO,
        "tcp",
        "{port}",
        ready="unreachable",
    )
    await asyncio.sleep(0.5)  # more retries; none is logged again
    registry.start()
    async with registry.client() as c:
        s = await eventually(lambda: one(c, {"svc": "late"}))
        await asyncio.to_thread(registry.restart)
        await eventually(lambda: "resumed" in reg.log())
        again = await one(c, {"svc": "late"})
        assert again == s  # same lease, same revisions: nothing was re-sent
    assert reg.log().count("unreachable") == 2  # once at start, once at the restart
    reg.signal(signal.SIGTERM)
    assert reg.proc.wait(10) == 128 + signal.SIGTERM  # what ended echo.py


async def test_reglisten_end_to_end(registry: Registry, announcers, tmp_path: Path) -> None:
    rl = start_cli(
        announcers,
        tmp_path,
        registry.address,
        "reglisten",
        "-u",
        "1",
        "-a",
        "svc",
        "rstyx",
        "tcp!127.0.0.1!0",
        "--",
        *ECHO,
        "stdio",
        ready="lease",
    )
    async with registry.client() as c:
        s = await eventually(lambda: one(c, {"svc": "rstyx"}))
        assert not s.name.endswith("!0")  # the port really got
        assert s.attrs["pid"] == str(rl.pid) and s.attrs["name"] == "h0"
        a = dial(s.name)
        greeting = a.makefile().readline().split()
        assert greeting[0] == "hello"
        first = int(greeting[1])
        assert talk(a, "one") == f"{first} one"
        with dial(s.name) as b:  # over the limit
            assert b.makefile().readline() == "server overloaded\n"
        a.sendall(b"exit 0\n")
        a.close()
        await eventually(lambda: not alive(first))

        def second() -> str:
            try:
                with dial(s.name) as b:
                    return b.makefile().readline()
            except OSError:
                return ""

        line = await eventually(lambda: (x := second()).startswith("hello") and x)
        assert int(str(line).split()[1]) != first  # a process per connection
        rl.signal(signal.SIGTERM)
        assert rl.proc.wait(10) == 0
        assert not (await c.find({"svc": "rstyx"}))[0]


async def test_reglisten_ipv6(registry: Registry, announcers, tmp_path: Path) -> None:
    start_cli(
        announcers,
        tmp_path,
        registry.address,
        "reglisten",
        "-a",
        "svc",
        "six",
        "tcp!::1!0",
        "--",
        *ECHO,
        "stdio",
        ready="lease",
    )
    async with registry.client() as c:
        s = await eventually(lambda: one(c, {"svc": "six"}))
        assert s.name.startswith("tcp!::1!")
        with dial(s.name) as conn:
            assert conn.makefile().readline().startswith("hello ")


def test_reglisten_bad_address() -> None:
    r = subprocess.run(
        [str(BIN / "geryon"), "reglisten", "tcp!*!x", "--", "cat"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "tcp!*!x" in r.stderr
    r = run_cli("reglisten", "-u", "0", "tcp!*!0", "--", "cat")  # would refuse every connection
    assert r.returncode == 2 and "-u/--max-conns: want at least 1" in r.stderr


@pytest.mark.parametrize("ttl", ["nan", "inf", "100000", "0"])
def test_register_bad_durations_are_usage_errors(ttl: str) -> None:
    r = run_cli("register", "--lease-ttl", ttl, "--", "true")
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines()[-1].startswith("geryon register: error: argument --lease-ttl: ")


def test_bad_reconnect_env_fails_only_register(registry: Registry) -> None:
    env = {"GERYON_RECONNECT_MAX": "abc", "GERYON_REGISTRY": registry.address}
    assert run_cli("ls", env=env).returncode == 0  # not every command
    for cmd in (["register", "--", "true"], ["reglisten", "tcp!*!0", "--", "cat"]):
        r = run_cli(*cmd, env=env)
        assert r.returncode == 2 and r.stderr.count("\n") == 1  # one line, no traceback
        assert r.stderr.startswith("geryon: GERYON_RECONNECT_MAX: bad duration 'abc'")
    # Given on the command line, the variable is not read.
    r = run_cli("register", "--reconnect-max", "1", "--", "sh", "-c", "exit 4", env=env)
    assert r.returncode == 4, r.stderr


async def test_refused_for_good_ends_register(start_registry, tmp_path: Path) -> None:
    """A reader may not hold a lease: register says so once and exits 1,
    instead of calling the registry unreachable and retrying forever."""
    ids = identities(tmp_path)
    registry = start_registry(extra=["--tls-dir", str(ids["registry"])])
    pidfile = tmp_path / "pid"
    common = ["--registry", registry.address, "--tls-dir", str(ids["viewer"])]
    r = await asyncio.to_thread(
        run_cli,
        *common,
        "register",
        "--reconnect-max",
        "0.1",
        "--",
        "sh",
        "-c",
        f"echo $$ > {pidfile}; exec {' '.join(ECHO)} tcp {{port}}",
    )
    refused = f"register: registry {registry.address} refused: reader viewer may not grant leases"
    assert r.returncode == 1 and refused in r.stderr.splitlines(), r.stderr
    assert "unreachable" not in r.stderr and "Traceback" not in r.stderr
    if pidfile.exists():  # the command had started: it was stopped
        await eventually(lambda: not alive(int(pidfile.read_text())))
    r = await asyncio.to_thread(run_cli, *common, "reglisten", "tcp!127.0.0.1!0", "--", "cat")
    assert r.returncode == 1 and refused.replace("register", "reglisten", 1) in r.stderr


def test_substitute_leaves_other_braces() -> None:
    argv = announce.substitute(["sh", "-c", "{ echo {port}; } {other}"], {"port": "7"})
    assert argv == ["sh", "-c", "{ echo 7; } {other}"]


def test_backoff_is_jittered_and_capped() -> None:
    b = Backoff(0.1, 1.0)
    delays = [b.next() for _ in range(10)]
    caps = [min(1.0, 0.1 * 2**i) for i in range(10)]
    assert all(cap / 2 <= d <= cap for d, cap in zip(delays, caps, strict=True))
    b.reset()
    assert b.next() <= 0.1


async def test_announcer_registers_in_batches_and_keeps_the_good_ones(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """New names go in RegisterBatch calls of up to 100, one revision each;
    a batch refused for one name is registered name by name, so only that
    name is left out (and logged)."""
    async with registry.client(user="node0") as c, registry.client(user="node1") as other:
        theirs = await other.register("taken", {}, lease=await other.grant(30_000))
        a = announce.Announcer(c, who="test", ttl=30)
        for i in range(150):
            a.put(f"s{i:03}", {"i": str(i)})
        a.put("taken", {"x": "1"})  # sorts last: in the second batch
        a.start()
        try:
            await asyncio.wait_for(a.synced.wait(), 30)
            found, _ = await c.find(prefix="s")
            assert len(found) == 150 and {s.lease for s in found} == {a.lease.id}
            first = {s.mod_revision for s in found[:100]}
            assert len(first) == 1  # the first batch: one revision
            assert len({s.mod_revision for s in found[100:]}) == 50  # then one by one
            assert await c.get("taken") == theirs
            assert "test: cannot register taken: taken is registered by node1" in caplog.text
        finally:
            await a.close(revoke=True)
