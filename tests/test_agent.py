"""geryon-agent: the config checked before anything starts (unit tests), then
real agents with real services, real signals and a registry that dies."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BIN, Daemon, Registry, eventually, free_port
from test_register import alive, dial, identities

from geryon import agent_config, health, procs
from geryon.agent_config import ConfigError, parse_duration, parse_listen_addr, parse_size
from geryon.client import Client
from geryon.disk import client as styx_client
from geryon.model import Service

PY = sys.executable
ECHO = [PY, str(Path(__file__).parent / "fixtures" / "echo.py")]
# A plain TCP server standing in for a chunk server of your own (command = ...).
CHUNKSERVE = [PY, "-m", "http.server", "--bind", "127.0.0.1", "{port}"]
# Restarts and reconnects fast, so the tests are quick.
FAST = {"restart_delay": "50ms", "restart_max_delay": "200ms", "reconnect_max_delay": "300ms"}


# ---- the config, without processes -------------------------------------------


def toml_value(v: object) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


def toml(top: dict, chunks: list[dict] = (), listeners: list[dict] = ()) -> str:  # type: ignore[assignment]
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for kind, tables in (("chunk", chunks), ("listener", listeners)):
        for t in tables:
            lines.append(f"\n[[{kind}]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in t.items()]
    return "\n".join(lines) + "\n"


def chunk(cid: str, tmp_path: Path, **kw: object) -> dict:
    return {"id": cid, "path": str(tmp_path / cid), "size": "1MiB", "command": CHUNKSERVE, **kw}


def disk(cid: str, tmp_path: Path, **kw: object) -> dict:
    """A chunk without a command: the agent serves it as a 9P disk."""
    return {"id": cid, "path": str(tmp_path / cid), "size": "1MiB", **kw}


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "node.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        agent_config.load(path)
    return e.value.problems


def test_sizes_and_durations() -> None:
    assert parse_size("64MiB") == parse_size("64M") == 64 << 20
    assert parse_size(65536) == 65536 and parse_size("1GB") == 10**9
    assert parse_duration("250ms") == 0.25 and parse_duration("2m") == 120
    assert parse_listen_addr("tcp!*!0").bind_host == "0.0.0.0"
    for bad in ("64XB", "-1", "0", "", "1.5G"):
        with pytest.raises(ValueError):
            parse_size(bad)
    for bad in ("udp!*!0", "tcp!*!70000", "tcp!!1", "tcp!h"):
        with pytest.raises(ValueError):
            parse_listen_addr(bad)


def test_config_errors_name_file_key_and_problem(tmp_path: Path) -> None:
    text = toml(
        {"host": "host0", "colour": "blue"},
        [
            chunk("c0", tmp_path),
            chunk("c0", tmp_path, size="12XB", path=str(tmp_path / "x")),
            {"id": "c2", "path": "p", "size": 1},
        ],
        [{"addr": "tcp!*!nope", "command": ["cat"]}],
    )
    got = problems(tmp_path, text)
    f = str(tmp_path / "node.toml")
    want = [
        f"{f}: colour: unknown key",
        f"{f}: chunk[1].size: bad size '12XB'",
        f"{f}: chunk[1].id: duplicate chunk id 'c0' (also chunk[0].id)",
        f"{f}: chunk[2].size: a disk needs at least 262144 bytes",
        f"{f}: listener[0].addr: bad address 'tcp!*!nope'",
    ]
    for w in want:
        assert any(p.startswith(w) for p in got), (w, got)
    assert len(got) == len(want)


def test_sync_is_a_disk_key(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(toml({}, [disk("c0", tmp_path, sync=True)]))
    assert agent_config.load(path).chunks[0].sync is True
    text = toml({}, [chunk("c0", tmp_path, sync=True)])
    assert problems(tmp_path, text) == [
        f"{path}: chunk[0].sync: only for a disk (a chunk without command)"
    ]


def test_registry_is_one_address_or_a_list_of_fronts(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(toml({"registry": ["10.0.0.1:6675", "10.0.0.2:6675"]}))
    assert agent_config.load(path).registry == "10.0.0.1:6675,10.0.0.2:6675"
    path.write_text(toml({"registry": "10.0.0.1:6675, 10.0.0.2:6675"}))
    assert agent_config.load(path).registry == "10.0.0.1:6675,10.0.0.2:6675"
    f = str(path)
    assert problems(tmp_path, toml({"registry": ["10.0.0.1:6675", "nope"]})) == [
        f"{f}: registry: bad address 'nope' (want HOST:PORT)"
    ]
    assert problems(tmp_path, toml({"registry": []})) == [
        f"{f}: registry: want a non-empty array of HOST:PORT strings"
    ]
    assert problems(tmp_path, toml({"registry": ["a:1", "a:1"]})) == [
        f"{f}: registry: ['a:1', 'a:1'] names an address twice"
    ]
    # Each element is one address: none hides a list, none is blank.
    for element in ("a:1,b:2", ""):
        assert problems(tmp_path, toml({"registry": [element, "c:3"]})) == [
            f"{f}: registry: bad address {element!r} (want one HOST:PORT an element)"
        ]


def test_config_refuses_agent_attrs_and_bad_toml(tmp_path: Path) -> None:
    got = problems(tmp_path, toml({}, [chunk("c0", tmp_path, attrs={"host": "x"})]))
    assert got == [
        f"{tmp_path / 'node.toml'}: chunk[0].attrs.host: set by the agent itself; "
        "choose another name"
    ]
    got = problems(tmp_path, "host = \n")
    assert got[0].startswith(f"{tmp_path / 'node.toml'}: bad TOML: ")


def test_config_reports_every_bad_value(tmp_path: Path) -> None:
    f = tmp_path / "node.toml"
    got = problems(
        tmp_path,
        'stop_grace = "abc"\nreconnect_max_delay = 0\nlease_ttl = inf\nready_timeout = nan\n'
        'restart_max_delay = "25h"\n',
    )
    assert got == [
        f"{f}: lease_ttl: bad duration inf: at most 86400s (a day)",
        f"{f}: reconnect_max_delay: bad duration 0: must be positive",
        f"{f}: stop_grace: bad duration 'abc' (want e.g. 250ms, 1.5s, 2m, 1h)",
        f"{f}: restart_max_delay: bad duration '25h': at most 86400s (a day)",
        f"{f}: ready_timeout: bad duration nan: not a number",
    ]
    got = problems(tmp_path, toml({}, [chunk("c0", tmp_path, health={"interval": 1e300})]))
    assert got == [f"{f}: chunk[0].health.interval: bad duration 1e+300: at most 86400s (a day)"]
    f.write_bytes(b'host = "h\xe9te"\n')  # Latin-1
    with pytest.raises(ConfigError) as e:
        agent_config.load(f)
    assert e.value.problems == [f"{f}: not UTF-8 text (byte 9)"]


def test_listeners_on_one_address_are_all_kept(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        toml(
            {},
            listeners=[
                {"addr": "tcp!*!0", "command": ["cat"], "attrs": {"svc": "a"}},
                {"addr": "tcp!*!0", "command": ["cat"], "attrs": {"svc": "b"}},
                {"addr": "tcp!*!0", "command": ["cat"], "attrs": {"svc": "a"}},
            ],
        )
    )
    services = agent_config.load(path).services
    assert [s.attrs["svc"] for s in services.values()] == ["a", "b", "a"]


def test_check_prints_the_plan_and_errors_start_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        toml(
            {"host": "host0", "advertise": "127.0.0.1"},
            [chunk("c0", tmp_path)],
            [{"addr": "tcp!*!0", "command": ["cat"], "attrs": {"svc": "rstyx"}}],
        )
    )
    r = subprocess.run(
        [BIN / "geryon-agent", "--config", cfg, "--check"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "chunk c0:" in r.stdout and "will be created" in r.stdout
    assert "listener tcp!*!0:" in r.stdout and "svc=rstyx" in r.stdout
    assert not (tmp_path / "c0").exists()
    cfg.write_text(toml({"host": "host0"}, [chunk("c0", tmp_path, size="big")]))
    r = subprocess.run([BIN / "geryon-agent", "--config", cfg], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith(f"{cfg}: chunk[0].size: bad size 'big'")
    assert not (tmp_path / "c0").exists()


def test_bad_identity_is_reported_before_anything_starts(tmp_path: Path) -> None:
    empty = tmp_path / "id"
    empty.mkdir()
    cfg = tmp_path / "node.toml"
    cfg.write_text(toml({"host": "host0", "tls_dir": str(empty)}, [chunk("c0", tmp_path)]))
    agent = [BIN / "geryon-agent", "--config", cfg]
    r = subprocess.run(agent, capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (2, f"{cfg}: tls_dir: {empty}/ca.crt: no such file\n")
    r = subprocess.run([*agent, "--tls-dir", tmp_path / "nowhere"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr == f"geryon-agent: --tls-dir: {tmp_path}/nowhere/ca.crt: no such file\n"
    assert not (tmp_path / "c0").exists()


# ---- real agents ---------------------------------------------------------------


class Agent(Daemon):
    def __init__(
        self, tmp_path: Path, registry: Registry, chunks, listeners=(), args=(), **top
    ) -> None:  # type: ignore[no-untyped-def]
        host = top.pop("host", "host0")
        self.config = tmp_path / f"{host}.toml"
        self.top = {
            "registry": registry.address,
            "host": host,
            "advertise": "127.0.0.1",
            **FAST,
            **top,
        }
        self.write(chunks, listeners)
        super().__init__(
            [str(BIN / "geryon-agent"), "--config", str(self.config), *args],
            tmp_path / f"{host}.log",
            f"agent {host}: ",
        )

    def write(self, chunks, listeners=()) -> None:  # type: ignore[no-untyped-def]
        self.config.write_text(toml(self.top, chunks, listeners))

    def wait_log(self, text: str, count: int = 1) -> object:
        return eventually(lambda: self.log().count(text) >= count)


@pytest.fixture
def start_agent(daemons: list[Daemon], tmp_path: Path):  # type: ignore[no-untyped-def]
    def start(registry: Registry, chunks, listeners=(), ready="services announced", args=(), **top):  # type: ignore[no-untyped-def]
        a = Agent(tmp_path, registry, chunks, listeners, args, **top)
        a.ready = ready
        daemons.append(a)
        return a.start()

    return start


async def entries(c: Client, **attrs: str) -> dict[str, Service]:
    services, _ = await c.find(attrs)
    return {s.attrs.get("id") or s.attrs.get("svc", s.name): s for s in services}


async def test_agent_serves_restarts_and_dies_cleanly(
    registry: Registry, start_agent, tmp_path: Path
) -> None:
    bg = tmp_path / "bg"
    shell = ["sh", "-c", f"sleep 1000 & echo $! > {bg}; exec {' '.join(CHUNKSERVE)}"]
    agent = start_agent(
        registry,
        [disk("c0", tmp_path, attrs={"kfs": "1"}), chunk("c1", tmp_path, command=shell)],
        [{"addr": "tcp!*!0", "command": [*ECHO, "stdio"], "attrs": {"svc": "rstyx"}}],
        lease_ttl="30s",  # only the keepalive stream's end explains a fast deletion
    )
    assert "agent host0: 3 services announced" in agent.log()
    # Another node on the same machine, advertising 127.0.0.1 too.
    other = start_agent(registry, [chunk("h1c0", tmp_path)], host="host1")
    async with registry.client() as c:
        got = await entries(c, host="host0")
        assert set(got) == {"c0", "c1", "rstyx"}
        c0 = got["c0"]
        assert c0.attrs["kfs"] == "1" and c0.attrs["size"] == str(1 << 20)
        assert c0.attrs["path"] == str(tmp_path / "c0") and c0.attrs["name"] == "host0"
        assert c0.attrs["health"] == "passing" and got["rstyx"].attrs["pid"] == str(agent.pid)
        assert c0.attrs["proto"] == "9p"
        assert len({s.lease for s in got.values()}) == 1
        # c0 is a disk, formatted when new, and its entry says how full it is.
        r = await styx_client.connect(c0.name, uname=getpass.getuser())
        try:
            assert [st.name for st in await r.listdir("/")] == ["adm"]
            await r.write_file("/big", os.urandom(300_000))
        finally:
            await r.conn.close()

        async def used_grew() -> bool:
            s = (await entries(c, host="host0"))["c0"]
            return int(s.attrs.get("used", "0")) > 300_000

        await eventually(used_grew, timeout=15)
        # c1 has a command: its file is made sparse at its size for it.
        stat = (tmp_path / "c1").stat()
        assert stat.st_size == 1 << 20 and stat.st_blocks * 512 < stat.st_size
        with dial(got["rstyx"].name) as conn:
            assert conn.makefile().readline().startswith("hello ")

        # A service that dies is unregistered and comes back on a new port.
        old = int(c0.attrs["pid"])
        os.kill(old, signal.SIGKILL)

        async def restarted() -> bool:
            s = (await entries(c, host="host0")).get("c0")
            return s is not None and s.attrs["pid"] != str(old)

        await eventually(restarted)
        assert "c0: killed by SIGKILL; restarting in" in agent.log()

        # kill -9 of the agent: its entries go with its keepalive stream, and
        # every process it ran, grandchildren included, goes with it.
        got = await entries(c, host="host0")
        pids = [int(s.attrs["pid"]) for k, s in got.items() if k != "rstyx"]
        pids.append(int(bg.read_text()))
        assert all(alive(p) for p in pids)
        agent.kill9()
        await eventually(lambda: _no_entries(c), timeout=10)
        assert set(await entries(c, host="host1")) == {"h1c0"}  # the other node's stay
        assert other.running
    await eventually(lambda: not any(alive(p) for p in pids), timeout=10)


async def _no_entries(c: Client) -> bool:
    return not (await c.find({"host": "host0"}))[0]


async def test_registry_restart_keeps_the_lease_without_churn(
    registry: Registry, start_agent, tmp_path: Path
) -> None:
    agent = start_agent(
        registry,
        [chunk("c0", tmp_path), chunk("c1", tmp_path)],
        [{"addr": "tcp!*!0", "command": ["cat"], "attrs": {"svc": "rstyx"}}],
        lease_ttl="6s",  # a revoked lease is noticed at the next keepalive, ttl/3
    )
    async with registry.client() as c:
        before = await entries(c, host="host0")
        watch = c.watch({"host": "host0"})
        seen: list = []

        async def consume() -> None:
            async for m in watch:
                seen.append(m)

        task = asyncio.create_task(consume())
        await eventually(lambda: seen)  # the watch's opening progress notice
        await asyncio.to_thread(registry.restart)
        await agent.wait_log("lease 1 resumed, 3 services kept")
        assert await entries(c, host="host0") == before  # same revisions: nothing re-sent
        revision = (await c.find({}))[1]
        watch.request_progress()
        await eventually(lambda: seen[-1].kind == "progress" and seen[-1].revision >= revision)
        assert not [m for m in seen if m.kind == "events"]

        # A lost lease (here revoked by an admin) is replaced, everything re-registered.
        await c.revoke(before["c0"].lease)
        after = await eventually(lambda: _all_back(c, before))
        assert len({s.lease for s in after.values()}) == 1  # type: ignore[union-attr]
        task.cancel()
        await watch.close()
    assert agent.log().count("unreachable") == 1
    assert "lease 1 lost; registering 3 services under lease 2" in agent.log()


async def _all_back(c: Client, before: dict[str, Service]) -> object:
    now = await entries(c, host="host0")
    if set(now) != set(before) or any(s.lease == before["c0"].lease for s in now.values()):
        return None
    return now


async def test_registry_down_when_the_agent_starts(
    tmp_path: Path, daemons: list[Daemon], start_agent
) -> None:
    registry = Registry(tmp_path / "registry", port=free_port())
    daemons.append(registry)
    agent = start_agent(registry, [chunk("c0", tmp_path)], ready="unreachable")
    await asyncio.sleep(0.5)  # more retries; none is logged again
    registry.start()
    await agent.wait_log("services announced")
    async with registry.client() as c:
        assert set(await entries(c, host="host0")) == {"c0"}
    assert agent.log().count("unreachable") == 1


async def test_failing_health_check_flips_health(registry: Registry, start_agent, tmp_path):  # type: ignore[no-untyped-def]
    ok = tmp_path / "ok"
    ok.touch()
    health = {
        "type": "command",
        "command": ["test", "-e", str(ok)],
        "interval": "100ms",
        "failure_threshold": 2,
        "success_threshold": 1,
    }
    start_agent(registry, [chunk("c0", tmp_path, health=health)])
    async with registry.client() as c:

        async def health_is(value: str) -> bool:
            return (await entries(c, host="host0"))["c0"].attrs["health"] == value

        assert await health_is("passing")
        ok.unlink()
        await eventually(lambda: health_is("critical"))
        ok.touch()
        await eventually(lambda: health_is("passing"))


async def test_sighup_applies_only_the_difference(
    registry: Registry, start_agent, tmp_path: Path
) -> None:
    agent = start_agent(registry, [chunk("c0", tmp_path), chunk("c1", tmp_path)])
    async with registry.client() as c:
        before = await entries(c, host="host0")
        c1_pid = int(before["c1"].attrs["pid"])
        agent.write(
            [chunk("c0", tmp_path), chunk("c2", tmp_path)],
            [{"addr": "tcp!*!0", "command": ["cat"], "attrs": {"svc": "rstyx"}}],
        )
        agent.signal(signal.SIGHUP)
        await agent.wait_log("services announced", 2)
        after = await entries(c, host="host0")
        assert set(after) == {"c0", "c2", "rstyx"}
        assert after["c0"] == before["c0"]  # untouched: same pid, same revision
        await eventually(lambda: not alive(c1_pid))

        # A broken file is reported and the running config kept.
        agent.config.write_text("host = \n")
        agent.signal(signal.SIGHUP)
        await agent.wait_log("keeping the running config")

        # SIGTERM: entries gone at once (lease revoked), services stopped, exit 0.
        pids = [int(s.attrs["pid"]) for k, s in after.items() if k != "rstyx"]
        agent.signal(signal.SIGTERM)
        assert await asyncio.to_thread(agent.proc.wait, 10) == 0
        assert not (await c.find({"host": "host0"}))[0]
        assert (await c.leases()) == []
    assert not any(alive(p) for p in pids)


async def test_health_checks_against_real_servers(registry: Registry) -> None:
    """The registry serves the gRPC health protocol: a real server to ask."""
    ok, why = await health.check_grpc("127.0.0.1", registry.port, "geryon.v1.Registry", 5)
    assert ok, why
    ok, why = await health.check_grpc("127.0.0.1", registry.port, "no.such.Service", 5)
    assert not ok and "not_found" in why
    assert (await procs.check_tcp("127.0.0.1", registry.port, 5))[0]
    assert not (await procs.check_tcp("127.0.0.1", free_port(), 5))[0]


async def test_listeners_on_one_address_all_run_and_reload(
    registry: Registry, start_agent, tmp_path: Path
) -> None:
    def listeners(*svcs: str) -> list[dict]:
        return [{"addr": "tcp!*!0", "command": ["cat"], "attrs": {"svc": s}} for s in svcs]

    agent = start_agent(registry, [], listeners("a", "b"))
    async with registry.client() as c:
        before = await entries(c, host="host0")
        assert set(before) == {"a", "b"}
        agent.write([], listeners("a", "c"))
        agent.signal(signal.SIGHUP)
        await agent.wait_log("services announced", 2)
        after = await entries(c, host="host0")
        assert set(after) == {"a", "c"}
        assert after["a"] == before["a"]  # the first listener was left alone
    assert "reload: 0 added, 0 removed, 1 restarted" in agent.log()


async def test_tls_dir_flag_holds_across_reloads(
    start_registry, start_agent, tmp_path: Path
) -> None:
    ids = identities(tmp_path)
    registry = start_registry(extra=["--tls-dir", str(ids["registry"])])
    agent = start_agent(registry, [chunk("c0", tmp_path)], args=["--tls-dir", str(ids["host0"])])
    agent.write([chunk("c0", tmp_path), chunk("c1", tmp_path)])
    agent.signal(signal.SIGHUP)
    await agent.wait_log("services announced", 2)
    async with Client(registry.address, tls_dir=ids["host0"]) as c:
        assert {s.owner for s in (await c.find({"host": "host0"}))[0]} == {"host0"}
    assert "reload: 1 added" in agent.log() and "restart the agent" not in agent.log()


async def test_refused_lease_is_no_outage(start_registry, start_agent, tmp_path: Path) -> None:
    ids = identities(tmp_path)
    registry = start_registry(extra=["--tls-dir", str(ids["registry"])])
    agent = start_agent(
        registry, [chunk("c0", tmp_path)], ready="refused", tls_dir=str(ids["viewer"])
    )
    await asyncio.sleep(1)  # more retries (every 300ms); none is logged again
    log = agent.log()
    refused = f"agent host0: registry {registry.address} refused: reader viewer may not grant"
    assert log.count(refused) == 1, log
    assert "leases; services keep running, retrying every 0.3s" in log
    assert "unreachable" not in log and "Traceback" not in log
    assert agent.running and (tmp_path / "c0").exists()  # the chunk server was started
