"""Shared fixtures: real daemons as subprocesses on free loopback ports.

A daemon is started, its ready line awaited with a timeout, and on a failed
test its data dir and log are kept (pytest's tmp_path survives) and the log
is printed.

Registries run on the embedded SQLite store unless a module asks for both
stores (``backend = both_stores``): ``backend`` is then parametrized, and with
"etcd" every registry of the test is a front of one real three-member etcd
cluster on loopback (shared by the session; each test gets its own key
prefix). A test that kills etcd members gets clusters of its own from
``etcd_cluster_factory``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from geryon import localetcd
from geryon.client import Client, Watch, WatchMessage
from geryon.model import Event

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
READY_TIMEOUT = 20.0

# The seed's /lib/ndb/cluster: disk names and the chunks serving them.
CLUSTER = """\
name=d0.mbox kfs
  master=host0!chunk0
  replica=d0.replica

name=d1.mbox kfs
  master=host0!chunk1
  replica=d1.replica

name=d0.replica kfs
  master=host1!chunk0 replica

name=d1.replica kfs
  master=host1!chunk1 replica
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def eventually(
    check: Callable[[], object], *, timeout: float = 10.0, interval: float = 0.02
) -> object:
    """Poll an (async or plain) check until it returns truthy; fail on timeout."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout}s (last: {last!r})")
        await asyncio.sleep(interval)


class Daemon:
    """One real process with its log in a file, waited for by a ready line."""

    def __init__(self, argv: list[str], log: Path, ready: str, env: dict | None = None) -> None:
        self.argv, self.log_path, self.ready, self.env = argv, log, ready, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> Daemon:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(self.env or {})},
        )
        log.close()
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            if self.ready in text:
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.argv[0]} exited {self.proc.returncode}:\n{text}")
            time.sleep(0.02)
        raise AssertionError(f"{self.argv[0]} not ready in {READY_TIMEOUT}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; return the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Registry(Daemon):
    """A geryon-registryd: on SQLite in ``data_dir``, or, given ``etcd``
    (endpoints) and ``prefix``, a front of that etcd cluster (``data_dir``
    then only names its log)."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        extra: list[str] = (),
        env: dict | None = None,
        *,
        etcd: str | None = None,
        prefix: str = "/geryon/",
    ) -> None:
        self.port = port or free_port()
        self.data_dir = data_dir
        self.extra = list(extra)
        store = ["--etcd", etcd, "--etcd-prefix", prefix] if etcd else ["--data-dir", str(data_dir)]
        super().__init__(
            [
                str(BIN / "geryon-registryd"),
                "--listen",
                f"127.0.0.1:{self.port}",
                *store,
                *self.extra,
            ],
            data_dir.parent / f"{data_dir.name}.log",
            "serving on",
            env,
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **kw: object) -> Client:
        return Client(self.address, retry_for=kw.pop("retry_for", 10.0), **kw)  # type: ignore[arg-type]

    def restart(self) -> Registry:
        self.kill9()
        return self.start()


@pytest.fixture
def daemons(request: pytest.FixtureRequest) -> Iterator[list[Daemon]]:
    """Every daemon a test starts; killed after it, logs shown when it failed."""
    started: list[Daemon] = []
    yield started
    failed = getattr(request.node, "rep_call", None)
    for d in reversed(started):
        d.kill9()
        if failed is not None and failed.failed:
            sys.stderr.write(f"\n---- {d.log_path} ----\n{d.log()[-4000:]}\n")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep


_prefixes = itertools.count()


def _etcd_or_skip() -> None:
    if localetcd.binary() is None:
        pytest.skip("etcd is not installed (make test installs Debian's etcd-server)")


@contextlib.contextmanager
def _running(cluster: localetcd.Cluster) -> Iterator[localetcd.Cluster]:
    """Start ``cluster`` and stop it afterwards, also when the start fails
    half way (members started, no leader in time) or the test fails."""
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[localetcd.Cluster]:
    """One real three-member etcd cluster on loopback for the whole session."""
    _etcd_or_skip()
    with _running(localetcd.Cluster(tmp_path_factory.mktemp("etcd"))) as cluster:
        yield cluster


@pytest.fixture
def etcd_cluster_factory(tmp_path: Path) -> Iterator[Callable[..., localetcd.Cluster]]:
    """Clusters of the test's own (for tests that kill members, need TLS or
    an etcd-wide history): ``etcd_cluster_factory(size=3, tls_dir=None)``
    starts one; every one is stopped after the test, however it ends."""
    _etcd_or_skip()
    with contextlib.ExitStack() as stack:
        names = itertools.count()

        def start(size: int = 3, tls_dir: Path | None = None) -> localetcd.Cluster:
            root = tmp_path / f"etcd{next(names)}"
            return stack.enter_context(_running(localetcd.Cluster(root, size, tls_dir=tls_dir)))

        yield start


@pytest.fixture
def backend() -> str:
    """The store registries use: "sqlite" here; modules that test both
    override it with ``backend = both_stores``."""
    return "sqlite"


@pytest.fixture(params=["sqlite", "etcd"])
def both_stores(request: pytest.FixtureRequest) -> str:
    """Assigned to ``backend`` in a module, runs each of its tests on both stores
    (a test still narrows it with ``@pytest.mark.parametrize("backend", [...])``)."""
    return request.param


@pytest.fixture
def etcd_prefix(backend: str, request: pytest.FixtureRequest) -> tuple[str, str] | None:
    """(endpoints, a prefix no other test uses) with the etcd backend."""
    if backend != "etcd":
        return None
    cluster = request.getfixturevalue("etcd_cluster")
    return cluster.endpoints, f"/test{next(_prefixes)}/"


@pytest.fixture
def start_registry(
    tmp_path: Path, daemons: list[Daemon], backend: str, request: pytest.FixtureRequest
) -> Callable[..., Registry]:
    """Start a registry on the test's store; with etcd, every registry a test
    starts is a front of the same prefix of the session's cluster (unless
    given ``etcd=``: that cluster is then not started for it). The registry
    is in ``daemons`` before it starts, so it is killed however its start ends."""

    def start(name: str = "registry", **kw: object) -> Registry:
        if "etcd" not in kw and backend == "etcd":
            store = request.getfixturevalue("etcd_prefix")
            if store is not None:
                kw["etcd"] = store[0]
                kw.setdefault("prefix", store[1])
        r = Registry(tmp_path / name, **kw)  # type: ignore[arg-type]
        daemons.append(r)
        return r.start()  # type: ignore[return-value]

    return start


@pytest.fixture
def registry(start_registry: Callable[..., Registry]) -> Registry:
    return start_registry()


@pytest.fixture
async def client(registry: Registry) -> AsyncIterator[Client]:
    async with registry.client() as c:
        yield c


# ---- watches ----------------------------------------------------------------


async def collect(watch, until, *, timeout: float = 10.0) -> list[WatchMessage]:  # type: ignore[no-untyped-def]
    """Read a watch (or its iterator) until ``until(messages)`` holds."""
    out: list[WatchMessage] = []

    async def run() -> None:
        async for m in watch:
            out.append(m)
            if until(out):
                return

    await asyncio.wait_for(run(), timeout)
    return out


@contextlib.asynccontextmanager
async def watching(watch: Watch) -> AsyncIterator[list[WatchMessage]]:
    """Read ``watch`` into a list in the background while the block runs;
    after it (however it ends) stop reading and close the watch. The reader's
    own error, if it failed, is raised when the block did not fail first."""
    got: list[WatchMessage] = []

    async def read() -> None:
        async for m in watch:
            got.append(m)

    reader = asyncio.create_task(read(), name="test watch reader")

    async def stop() -> BaseException | None:
        failed = reader.exception() if reader.done() and not reader.cancelled() else None
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await watch.close()
        return failed

    try:
        yield got
    except BaseException as exc:
        if (failed := await stop()) is not None:
            exc.add_note(f"(the watch reader had failed: {failed!r})")
        raise
    if (failed := await stop()) is not None:
        raise failed


def events_of(messages: list[WatchMessage]) -> list[Event]:
    return [e for m in messages if m.kind == "events" for e in m.events]


def progressed(messages: list[WatchMessage]) -> int:
    """The highest revision a progress notice vouched for (0: none yet): every
    event at or below it was delivered before it."""
    return max((m.revision for m in messages if m.kind == "progress"), default=0)


async def gone(c: Client, svc: str) -> bool:
    """No entry with ``svc=SVC`` is left."""
    services, _ = await c.find({"svc": svc})
    return not services


def run_cli(
    *args: str, env: dict | None = None, input: str | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "geryon"), *args],
        capture_output=True,
        text=True,
        input=input,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


@contextlib.contextmanager
def child(argv: list[str], **kw: object) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(argv, **kw)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
