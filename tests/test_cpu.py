"""cpus end to end: `geryon cpu` against real cpu services (run by a real
agent from a [[cpu]] section, or by `geryon cpu serve`), found through a real
registry: exit statuses and signals, streams kept apart and byte-exact, a
terminal session driven through a local pseudo-terminal, kill -9 of the
caller, who may run what (over TLS), picking a cpu, and --mount.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import getpass
import hashlib
import os
import re
import shutil
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest
from conftest import BIN, Daemon, Registry, eventually, free_port, run_cli
from test_agent import toml_value
from test_mount import ChunkServer, needs_fuse, set_entry

from geryon import errors, tls
from geryon.cpu import client as cpu_client
from geryon.cpu import process
from geryon.cpu.runas import RunAs
from geryon.model import Caller

ROOT = os.geteuid() == 0
# Commands run as nobody when the tests run as root (runas never needs root).
ACCOUNT = "nobody" if ROOT else getpass.getuser()
EVIL = Path("/tmp") / f"geryon-test-evil-{os.getpid()}"


def cpu_toml(registry: Registry, host: str, cpu: dict, **top: object) -> str:
    lines = [f'registry = "{registry.address}"', f'host = "{host}"', 'advertise = "127.0.0.1"']
    lines += [f"{k} = {toml_value(v)}" for k, v in top.items()]
    lines += ["[[cpu]]"] + [f"{k} = {toml_value(v)}" for k, v in cpu.items()]
    return "\n".join(lines) + "\n"


def agent(daemons: list[Daemon], tmp_path: Path, registry: Registry, host: str, cpu: dict,
          **top: object) -> Daemon:  # fmt: skip
    cfg = tmp_path / f"{host}.toml"
    cfg.write_text(cpu_toml(registry, host, cpu, **top))
    d = Daemon([str(BIN / "geryon-agent"), "--config", str(cfg)], tmp_path / f"{host}.log",
               "services announced")  # fmt: skip
    daemons.append(d)
    return d.start()


def cpu(registry: Registry, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return run_cli("--registry", registry.address, "cpu", *args, **kw)  # type: ignore[arg-type]


def live(mark: str) -> list[int]:
    """Live `sleep MARK...` processes."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if len(argv) > 1 and argv[0].endswith(b"sleep") and argv[1].startswith(mark.encode()):
                pids.append(int(d))
    return pids


# ---- without a network ---------------------------------------------------------


def test_runas_map_rules() -> None:
    runas = RunAs({"alice": ACCOUNT, "@node": ACCOUNT, "@admin": "$user"})
    assert runas.resolve(Caller("alice", "admin")).name == ACCOUNT  # the name beats the role
    assert runas.resolve(Caller("host3", "node")).name == ACCOUNT
    with pytest.raises(errors.PermissionDenied, match="reader viewer may not run commands"):
        runas.resolve(Caller("viewer", "reader"))
    with pytest.raises(errors.PermissionDenied, match="neither bob nor @server"):
        runas.resolve(Caller("bob", "server"))
    with pytest.raises(errors.PermissionDenied, match="no local account 'no-such-account'"):
        runas.resolve(Caller("no-such-account", "admin"))
    # Root only when allowed: named directly, or reached through $user.
    with pytest.raises(errors.PermissionDenied, match="would run as root"):
        runas.resolve(Caller("root", "admin"))
    assert RunAs({"@admin": "$user"}, allow_root=True).resolve(Caller("root", "admin")).uid == 0
    assert RunAs({"alice": "root"}).check() == ["alice: runs as root; only with allow_root"]
    assert RunAs({"@reader": ACCOUNT, "@boss": ACCOUNT, "x": "no-such-account"}).check() == [
        "@reader: a reader never runs commands",
        "@boss: no such role (want @server, @admin, @node, @reader)",
        "x: no local account 'no-such-account'",
    ]


def test_rank_prefers_the_least_loaded_and_spreads_ties() -> None:
    def c(name: str, load: float, ncpu: int = 1, sessions: int = 0) -> cpu_client.Cpu:
        return cpu_client.Cpu(f"tcp!h!{name}", name, "x", ncpu, load, sessions)

    # Load per processor: 3.0 on 8 is less loaded than 1.0 on 1.
    assert [x.node for x in cpu_client.rank([c("a", 1.0), c("b", 3.0, 8)])] == ["b", "a"]
    assert [x.node for x in cpu_client.rank([c("a", 0, sessions=2), c("b", 0)])] == ["b", "a"]
    firsts = {cpu_client.rank([c("a", 0.5), c("b", 0.5), c("z", 9)])[0].node for _ in range(60)}
    assert firsts == {"a", "b"}


async def test_a_session_is_killed_whole_without_a_network(tmp_path: Path) -> None:
    """The domain part alone: a process group and session of its own, output
    read, and kill takes a background job and a shell's job-control group."""
    from geryon import procs
    from geryon.cpu.runas import account

    keeper = procs.Keeper()
    marker = f"{os.getpid() % 1000 + 6000}"
    script = f"sleep {marker}1 & (set -m; sleep {marker}2 &) ; echo ready; exec sleep {marker}3"
    spec = process.Spec(("sh", "-c", script), account(ACCOUNT))
    p = await process.Process.start(
        spec, keeper=keeper, extra_env={"GERYON_SESSION": "t"}, tools=process.helpers()
    )
    try:
        out = process.Process.output(p)
        assert await anext(out) == (process.STDOUT, b"ready\n")
        assert os.getpgid(p.pid) == os.getsid(p.pid) == p.pid
        await eventually(lambda: len(live(marker)) == 3)
        await p.kill()
        await eventually(lambda: not live(marker))
    finally:
        await p.kill()
        keeper.close()


# ---- one cpu, plain text, run by the agent ---------------------------------------


@pytest.fixture
def node(start_registry, daemons: list[Daemon], tmp_path: Path):  # type: ignore[no-untyped-def]
    EVIL.mkdir(exist_ok=True)
    for tool in ("setpriv", "env", "setsid"):  # would leave a mark if run
        (EVIL / tool).write_text(f"#!/bin/sh\ntouch {EVIL}/ran\n")
        (EVIL / tool).chmod(0o755)
    registry = start_registry()
    agent(daemons, tmp_path, registry, "host0",
          {"runas": {"@admin": ACCOUNT}, "attrs": {"arch": "test"}})  # fmt: skip
    yield registry
    shutil.rmtree(EVIL, ignore_errors=True)


async def test_the_agent_registers_a_cpu_the_seeds_way(node: Registry) -> None:
    # regquery -n svc rstyx
    names = run_cli("--registry", node.address, "ls", "-n", "-a", "svc=rstyx").stdout.split()
    assert len(names) == 1 and re.fullmatch(r"tcp!127\.0\.0\.1!\d+", names[0])
    async with node.client() as c:
        entry = await eventually(lambda: _with_figures(c, names[0]))
    assert entry.attrs["host"] == "host0" and entry.attrs["arch"] == "test"
    assert entry.attrs["ncpu"] == str(len(os.sched_getaffinity(0)))
    assert float(entry.attrs["load"]) >= 0 and entry.attrs["sessions"] == "0"
    # An open session shows in `sessions` (the agent reads it every few seconds).
    with subprocess.Popen([str(BIN / "geryon"), "--registry", node.address, "cpu", "--",
                           "sleep", "30"], stdin=subprocess.DEVNULL) as p:  # fmt: skip
        async with node.client() as c:
            await eventually(lambda: _attr(c, names[0], "sessions", "1"), timeout=15)
        p.kill()
    async with node.client() as c:
        await eventually(lambda: _attr(c, names[0], "sessions", "0"), timeout=15)


async def _with_figures(c, name):  # type: ignore[no-untyped-def]
    s = await c.get(name)
    return s if "load" in s.attrs else None


async def _attr(c, name, attr, value):  # type: ignore[no-untyped-def]
    return (await c.get(name)).attrs.get(attr) == value


def test_exit_statuses_signals_and_streams(node: Registry) -> None:
    r = cpu(node, "--", "sh", "-c", "echo out; echo err >&2; echo more; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\nmore\n", "err\n")
    assert cpu(node, "--", "sh", "-c", "kill -KILL $$").returncode == 128 + 9
    assert cpu(node, "--", "sh", "-c", "kill -TERM $$").returncode == 128 + 15
    r = cpu(node, "--", "no-such-command", "x")  # as env(1) and the shells say it
    assert r.returncode == 127 and "no-such-command" in r.stderr and r.stderr.count("\n") == 1
    r = cpu(node, "--env", "GREETING=hi there", "--dir", "/tmp", "--", "sh", "-c",
            'echo "$GREETING|$PWD|$USER|$GERYON_NODE|$GERYON_CALLER"')  # fmt: skip
    assert r.stdout == f"hi there|/tmp|{ACCOUNT}|host0|admin\n"
    r = cpu(node, "--dir", "/no/such/dir", "--", "true")
    assert r.returncode == 125 and "/no/such/dir" in r.stderr and r.stderr.count("\n") == 1
    # Nothing of the caller's environment reaches what runs as root before
    # the switch to the account: not a PATH holding a fake setpriv or env.
    assert cpu(node, "--env", f"PATH={EVIL}:/usr/bin:/bin", "--", "true").returncode == 0
    assert not (EVIL / "ran").exists()
    r = cpu(node, "--env", "1BAD=x", "--", "true")
    assert r.returncode == 255 and "bad environment variable '1BAD'" in r.stderr
    # A cpu nobody registered: one line, and geryon's own status.
    r = cpu(node, "-h", "nosuch", "--", "true")
    assert (r.returncode, r.stderr) == (
        255, "geryon: cpu: no cpu on nosuch (svc=rstyx) is registered and healthy\n"
    )  # fmt: skip


def test_stdin_streams_100_mb_byte_exact(node: Registry, tmp_path: Path) -> None:
    data = tmp_path / "in"
    with open(data, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))
    with open(data, "rb") as f:
        r = subprocess.run([str(BIN / "geryon"), "--registry", node.address, "cpu", "--",
                            "sh", "-c", "tee /dev/stderr | wc -c"], stdin=f,
                           capture_output=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and r.stdout == b"104857600\n"
    assert hashlib.sha256(r.stderr).digest() == hashlib.sha256(data.read_bytes()).digest()


def test_killing_the_caller_kills_the_remote_tree(node: Registry) -> None:
    mark = str(7000 + os.getpid() % 1000)
    script = f"sleep {mark}1 & (sleep {mark}2 &); setsid sleep {mark}3 & sleep {mark}4"
    with subprocess.Popen([str(BIN / "geryon"), "--registry", node.address, "cpu", "--",
                           "sh", "-c", script], stdin=subprocess.DEVNULL) as p:  # fmt: skip
        asyncio.run(eventually(lambda: len(live(mark)) == 4, timeout=15))
        p.send_signal(signal.SIGKILL)
    asyncio.run(eventually(lambda: not live(mark), timeout=30))


def test_ctrl_c_is_forwarded_without_a_terminal(node: Registry) -> None:
    with subprocess.Popen(
        [str(BIN / "geryon"), "--registry", node.address, "cpu", "--", "sh", "-c",
         "trap 'echo got INT; exit 4' INT; echo ready; while :; do sleep 0.05; done"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
    ) as p:  # fmt: skip
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        p.send_signal(signal.SIGINT)
        assert p.wait(30) == 4 and p.stdout.read() == "got INT\n"


def test_a_terminal_session(node: Registry) -> None:
    """Driven as a user at a terminal would: the CLI on a local pty, keys
    typed, Ctrl-C, a window change."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    p = subprocess.Popen([str(BIN / "geryon"), "--registry", node.address, "cpu", "-t", "--",
                          "sh"], stdin=slave, stdout=slave, stderr=slave,
                         start_new_session=True)  # fmt: skip
    os.close(slave)
    seen = b""

    def expect(pattern: bytes, timeout: float = 20) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while not re.search(pattern, seen):
            assert time.monotonic() < deadline, f"no {pattern!r} in {seen[-500:]!r}"
            try:
                seen += os.read(master, 65536)
            except BlockingIOError:
                time.sleep(0.02)
        seen = seen[re.search(pattern, seen).end() :]  # type: ignore[union-attr]

    os.set_blocking(master, False)
    try:
        expect(rb"\$ ")  # the remote shell's prompt: a user types after it
        os.write(master, b"stty size; tty\n")
        expect(rb"30 100\r\n/dev/pts/\d+")
        os.write(master, b"sleep 50; echo slept\n")
        time.sleep(0.5)
        os.write(master, b"\x03")  # Ctrl-C, through the remote terminal's line discipline
        os.write(master, b"echo after-$((6*7))\n")
        expect(rb"after-42")
        assert b"slept" not in seen
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        p.send_signal(signal.SIGWINCH)
        time.sleep(0.3)
        os.write(master, b"stty size\n")
        expect(rb"40 120")
        os.write(master, b"exit 3\n")
        assert p.wait(30) == 3
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)


# ---- who may run what, over TLS ------------------------------------------------


def identities(tmp_path: Path) -> dict[str, Path]:
    ca = tmp_path / "ca"
    tls.init_ca(ca)
    roles = {"registry": "server", "host0": "node", "alice": "admin", "viewer": "reader",
             "host9": "node"}  # fmt: skip
    return {n: tls.issue(ca, n, role=r, out=tmp_path / "id" / n) for n, r in roles.items()}


async def test_runas_roles_and_limits_over_tls(
    start_registry, daemons: list[Daemon], tmp_path: Path
) -> None:
    ids = identities(tmp_path)
    registry = start_registry(extra=["--tls-dir", str(ids["registry"])])
    agent(daemons, tmp_path, registry, "host0",
          {"runas": {"alice": ACCOUNT, "bob": ACCOUNT}, "max_sessions_per_identity": 1},
          tls_dir=str(ids["host0"]))  # fmt: skip

    def as_(who: str, *argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return run_cli("--registry", registry.address, "--tls-dir", str(ids[who]), "cpu",
                       *argv, **kw)  # type: ignore[arg-type]  # fmt: skip

    async with registry.client(tls_dir=ids["alice"]) as c:
        await eventually(lambda: _found(c), timeout=15)
        [entry] = (await c.find({"svc": "rstyx"}))[0]
        assert entry.owner == "host0" and entry.attrs["proto"] == "grpc"
        found = cpu_client.Cpu.from_service(entry)

    r = as_("alice", "--", "id", "-un")
    assert (r.returncode, r.stdout) == (0, f"{ACCOUNT}\n")
    r = as_("viewer", "--", "id")
    assert r.returncode == 255 and "reader viewer may not run commands" in r.stderr
    r = as_("host9", "--", "id")
    assert r.returncode == 255 and "node host9 has no account here" in r.stderr

    # The codes themselves, from the service.
    async def opened(who: str, argv: list[str]) -> cpu_client.Session:
        s = cpu_client.Session(cpu_client.channel(found, tls_dir=ids[who]),
                               cpu_client.start_message(argv))  # fmt: skip
        await s.open()
        return s

    with pytest.raises(errors.PermissionDenied):
        await opened("viewer", ["true"])
    with pytest.raises(errors.PermissionDenied):
        await opened("host9", ["true"])
    first = await opened("alice", ["sleep", "30"])
    with pytest.raises(errors.ResourceExhausted, match="alice has 1 sessions open"):
        await opened("alice", ["true"])
    first.cancel()
    r = await asyncio.to_thread(as_, "alice", "--", "true")
    assert r.returncode == 0, r.stderr

    # A session ends with its caller's certificate, and says why.
    now = dt.datetime.now(dt.UTC)
    ids["bob"] = tls.issue(tmp_path / "ca", "bob", role="admin", out=tmp_path / "id" / "bob",
                           _not_before=now - dt.timedelta(hours=1),
                           _not_after=now + dt.timedelta(seconds=6))  # fmt: skip
    s = await opened("bob", ["sleep", "120"])
    with pytest.raises(errors.Unavailable, match="bob: certificate expired: the session was"):
        async with asyncio.timeout(60):
            async for _fd, piece in s.output():
                await s.consumed(len(piece))
    assert s.exit is not None and s.exit.signal == "KILL"

    # Root only with allow_root: the agent refuses the file before anything runs.
    cfg = tmp_path / "root.toml"
    cfg.write_text(cpu_toml(registry, "host0", {"runas": {"alice": "root"}}))
    r = subprocess.run([str(BIN / "geryon-agent"), "--config", str(cfg), "--check"],
                       capture_output=True, text=True)  # fmt: skip
    assert (r.returncode, r.stderr) == (
        2, f"{cfg}: cpu[0].runas.alice: runs as root; only with allow_root\n"
    )  # fmt: skip


async def _found(c):  # type: ignore[no-untyped-def]
    return (await c.find({"svc": "rstyx"}))[0]


# ---- picking a cpu -------------------------------------------------------------------


def serve_cpu(daemons: list[Daemon], tmp_path: Path, registry: Registry, node: str) -> int:
    port = free_port()
    d = Daemon([str(BIN / "geryon"), "--registry", registry.address, "cpu", "serve",
                "--listen", f"127.0.0.1:{port}", "--node", node, "--runas", f"@admin={ACCOUNT}"],
               tmp_path / f"cpu-{node}.log", "serving on")  # fmt: skip
    daemons.append(d)
    d.start()
    return port


def test_picking_by_attribute_and_by_load(
    start_registry, daemons: list[Daemon], tmp_path: Path
) -> None:
    registry = start_registry()
    a = serve_cpu(daemons, tmp_path, registry, "a")
    b = serve_cpu(daemons, tmp_path, registry, "b")
    set_entry(registry, f"tcp!127.0.0.1!{a}", svc="rstyx", host="a", load="1.50", ncpu="2",
              zone="z1")  # fmt: skip
    set_entry(registry, f"tcp!127.0.0.1!{b}", svc="rstyx", host="b", load="0.20", ncpu="1",
              zone="z2")  # fmt: skip
    where = ["--", "sh", "-c", "echo $GERYON_NODE"]
    assert {cpu(registry, *where).stdout for _ in range(4)} == {"b\n"}  # 0.2 < 0.75 per cpu
    assert cpu(registry, "--attr", "zone=z1", *where).stdout == "a\n"
    assert cpu(registry, "-h", "a", *where).stdout == "a\n"
    # A cpu that went away is passed over for the next; named, it is an error.
    daemons[-1].kill9()  # b
    assert cpu(registry, *where).stdout == "a\n"
    r = cpu(registry, "-h", "b", *where)
    assert r.returncode == 255 and r.stderr.startswith(f"geryon: cpu: tcp!127.0.0.1!{b} (b): ")
    assert "unreachable" in r.stderr and len(r.stderr.splitlines()) == 1


# ---- --mount ---------------------------------------------------------------------------


@needs_fuse
@pytest.mark.skipif(not ROOT, reason="a session's mounts need a cpu server running as root")
def test_mount_a_disk_written_on_another_node(
    start_registry, daemons: list[Daemon], tmp_path: Path
) -> None:
    registry = start_registry()
    # Over plain text a session is the local admin: its mounts attach as admin.
    server = ChunkServer(tmp_path / "chunk0", free_port(), "4MiB")  # on "another node"
    server.argv += ["--owner", "admin"]
    daemons.append(server)
    server.start()
    set_entry(registry, "d0", addr=server.addr, size=str(4 << 20))
    (tmp_path / "hello").write_text("written elsewhere\n")
    g = ["--registry", registry.address]
    put = run_cli(*g, "disk", "put", "--uname", "admin", str(tmp_path / "hello"), "d0:/hello")
    assert put.returncode == 0, put.stderr
    port = serve_cpu(daemons, tmp_path, registry, "c1")
    set_entry(registry, f"tcp!127.0.0.1!{port}", svc="rstyx", host="c1")
    r = run_cli(*g, "cpu", "--mount", "d0", "--", "sh", "-c",
                "cat /n/d0/hello; echo from-the-cpu > /n/d0/back; ls /n")  # fmt: skip
    assert (r.returncode, r.stdout) == (0, "written elsewhere\nd0\n"), r.stderr
    assert run_cli(*g, "disk", "cat", "--uname", "admin", "d0:/back").stdout == "from-the-cpu\n"
    assert "d0" not in os.listdir("/n") if os.path.isdir("/n") else True  # the node's /n untouched
    r = run_cli(*g, "cpu", "--mount", "nosuch", "--", "true")
    assert r.returncode == 255 and "no disk named 'nosuch'" in r.stderr


# ---- flow control and the service's end --------------------------------------------


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


async def test_a_slow_reader_holds_the_command_back_not_the_servers_memory(
    start_registry, daemons: list[Daemon], tmp_path: Path
) -> None:
    registry = start_registry()
    port = serve_cpu(daemons, tmp_path, registry, "c1")
    server = daemons[-1].pid
    found = cpu_client.Cpu(f"tcp!127.0.0.1!{port}", "c1", "", 1, 0, 0)
    total = 300 << 20
    ch = cpu_client.channel(found, tls_dir=None)
    s = cpu_client.Session(ch, cpu_client.start_message(["head", "-c", str(total), "/dev/zero"]))
    await s.open()
    await s.close_stdin()
    before, peak, got, zeros = rss_kb(server), 0, 0, True
    async for _fd, data in s.output():
        got += len(data)
        zeros = zeros and not data.strip(b"\0")
        if got % (16 << 20) < len(data):
            await asyncio.sleep(0.2)  # a slow reader: the command waits for it
            peak = max(peak, rss_kb(server))
        await s.consumed(len(data))
    await ch.close()
    assert (got, zeros, s.exit) == (total, True, cpu_client.Exit(0))
    # The service holds at most a window (1 MiB here, 4 MiB asked) beyond its
    # own buffers, whatever the command prints.
    assert peak - before < 48 << 10, f"RSS grew from {before} kB to {peak} kB"


def test_stopping_the_service_ends_every_session(
    start_registry, daemons: list[Daemon], tmp_path: Path
) -> None:
    registry = start_registry()
    for stop in ("term", "kill"):
        port = serve_cpu(daemons, tmp_path, registry, stop)
        set_entry(registry, f"tcp!127.0.0.1!{port}", svc="rstyx", host=stop)
        mark = str(8000 + os.getpid() % 1000) + ("1" if stop == "term" else "2")
        # Input streaming all the while: the end must not be lost to a write.
        script = f"sleep {mark}1 & sleep {mark}2 & cat > /dev/null"
        with open("/dev/zero", "rb") as zero, subprocess.Popen(
            [str(BIN / "geryon"), "--registry", registry.address, "cpu", "-h", stop, "--",
             "sh", "-c", script], stdin=zero, stderr=subprocess.PIPE, text=True,
        ) as p:  # fmt: skip
            asyncio.run(eventually(lambda mark=mark: len(live(mark)) == 2, timeout=15))
            if stop == "term":
                assert daemons[-1].stop() == 0
            else:
                daemons[-1].kill9()  # its keeper kills the sessions' groups
            asyncio.run(eventually(lambda mark=mark: not live(mark), timeout=15))
            assert p.wait(15) == 255
            err = p.stderr.read()  # type: ignore[union-attr]
            assert err.startswith(f"geryon: cpu: tcp!127.0.0.1!{port}: ") and err.count("\n") == 1
            if stop == "term":
                assert err.endswith(": cpu: term is stopping: the session was ended\n"), err


@pytest.mark.skipif(not ROOT, reason="the account must differ from the server's")
def test_the_working_directory_is_entered_as_the_account(node: Registry, tmp_path: Path) -> None:
    private = tmp_path / "private"  # root's, 0700: nobody may not pass
    (private / "sub").mkdir(parents=True)
    private.chmod(0o700)
    r = cpu(node, "--dir", str(private / "sub"), "--", "pwd")
    assert r.returncode == 125 and "Permission denied" in r.stderr and r.stdout == ""


def test_a_closed_stdout_ends_the_session_as_sigpipe_would(node: Registry) -> None:
    p = subprocess.Popen([str(BIN / "geryon"), "--registry", node.address, "cpu", "-n", "--",
                          "yes"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert p.stdout is not None and p.stdout.read(5) == b"y\ny\ny"
    p.stdout.close()
    assert p.wait(30) == 128 + signal.SIGPIPE
    assert p.stderr is not None and p.stderr.read() == b""
    asyncio.run(eventually(lambda: not [q for q in live_argv0(b"yes")], timeout=15))


def live_argv0(name: bytes) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")[0].endswith(name):
                    out.append(int(d))
            except OSError:
                pass
    return out


async def test_a_bad_message_is_invalid_argument(node: Registry) -> None:
    async with node.client() as c:
        [entry] = (await c.find({"svc": "rstyx"}))[0]
    found = cpu_client.Cpu.from_service(entry)
    ch = cpu_client.channel(found, tls_dir=None)
    s = cpu_client.Session(ch, cpu_client.start_message(["sleep", "30"]))
    await s.open()
    await s.signal("BOGUS")
    with pytest.raises(errors.InvalidArgument, match="signal 'BOGUS'"):
        async for _ in s.output():
            pass
    await ch.close()


def test_a_terminal_nobody_sized_gets_24_by_80(node: Registry) -> None:
    master, slave = os.openpty()  # 0x0
    with subprocess.Popen([str(BIN / "geryon"), "--registry", node.address, "cpu", "-t", "--",
                           "stty", "size"], stdin=slave, stdout=slave, stderr=slave) as p:
        os.close(slave)
        assert p.wait(30) == 0
    out = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(master, 4096):
            out += chunk
    os.close(master)
    assert b"24 80" in out
