"""The client over several endpoints: a first front that accepts and never
answers (frozen, half cut off) costs an attempt, not the call's deadline."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
from conftest import BIN, Registry, collect, events_of, run_cli

from geryon.client import Client, Lease

# Generous: the calls below must succeed well within it (an attempt at the
# silent front is about a second), and fail the test rather than hang it.
TIMEOUT = 20.0


@pytest.fixture
def silent() -> Iterator[str]:
    """An address whose connections the kernel accepts and nobody answers."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as s:
        yield f"127.0.0.1:{s.getsockname()[1]}"


def env(*fronts: str) -> dict[str, str]:
    return {"GERYON_REGISTRY": ",".join(fronts), "GERYON_TLS_DIR": ""}


async def test_unary_calls_move_past_a_silent_front(silent: str, registry: Registry) -> None:
    async with Client(f"{silent},{registry.address}", tls_dir="", retry_for=TIMEOUT) as c:
        assert c.endpoint()[1] is c.endpoint()[1]  # one stub per endpoint
        made = await c.register("tcp!h0!1", {"svc": "x"}, persist=True)
        assert c.targets[c._current] == registry.address
        assert (await c.get("tcp!h0!1")).mod_revision == made.mod_revision
    r = run_cli("--timeout", str(TIMEOUT), "ls", "-n", env=env(silent, registry.address))
    assert r.returncode == 0 and r.stdout == "tcp!h0!1\n", r.stderr


async def test_a_watch_resumes_past_a_silent_front(silent: str, registry: Registry) -> None:
    async with registry.client() as good:
        first = await good.register("a", {"svc": "x"}, persist=True)
        await good.register("b", {"svc": "x"}, persist=True)
    async with Client(f"{silent},{registry.address}", tls_dir="", retry_for=TIMEOUT) as c:
        # Resumed from a revision: the good front replays from there.
        watch = c.watch({"svc": "x"}, start_revision=first.mod_revision)
        got = await collect(watch, lambda ms: len(events_of(ms)) >= 2, timeout=TIMEOUT)
        await watch.close()
        assert [e.service.name for e in events_of(got)] == ["a", "b"]
        assert c.targets[c._current] == registry.address


def test_geryon_watch_moves_past_a_silent_front(silent: str, registry: Registry) -> None:
    assert run_cli("set", "a", "svc=x", "--persist", env=env(registry.address)).returncode == 0
    argv = [str(BIN / "geryon"), "--timeout", str(TIMEOUT), "watch", "--snapshot", "--attr", "svc"]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env(silent, registry.address)},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("SNAPSHOT ")
        assert proc.stdout.readline().startswith("SYNCED ")
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    assert "unreachable" not in err, err


class SilentKeepAlive:
    """A KeepAlive call that never answers; cancel() ends it as grpc does."""

    def __init__(self, on_cancel: Callable[[], None]) -> None:
        self.ended = asyncio.get_running_loop().create_future()
        self.on_cancel = on_cancel

    async def write(self, request: object) -> None:
        await asyncio.Event().wait()

    def __aiter__(self) -> SilentKeepAlive:
        return self

    async def __anext__(self) -> object:
        return await self.ended

    def cancel(self) -> None:
        if not self.ended.done():
            self.ended.cancel()
            self.on_cancel()


async def test_a_lease_closed_as_its_watchdog_gives_up_stops() -> None:
    # The watchdog cancels the silent call, and in the same turn close()
    # cancels the lease's task: that cancel must not become "move on".
    closed: list[bool] = []

    def close_now() -> None:
        if not closed:
            closed.append(True)
            task.cancel()

    stub = SimpleNamespace(KeepAlive=lambda metadata: SilentKeepAlive(close_now))
    client = SimpleNamespace(
        targets=["127.0.0.1:1", "127.0.0.1:2"],
        metadata=(),
        endpoint=lambda: (0, stub),
        failed=lambda i, exc: None,
    )
    lease = Lease(client, 300)  # type: ignore[arg-type]
    lease.id = 1
    task = asyncio.create_task(lease._keep())
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, TIMEOUT)
    assert closed
