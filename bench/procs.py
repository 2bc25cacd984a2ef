"""The processes a benchmark run starts, and the promise that none outlives it.

Every server and helper is started through ``Proc``, which records it in one
module-level set. ``kill_all`` (run from the benchmark's ``finally`` and from
``atexit``; ``run.py`` turns SIGTERM into the same path as Ctrl-C) kills every
one with SIGKILL and reaps it. Children run in their own session, so a Ctrl-C
in the terminal reaches only the benchmark (which then kills them itself), and
they are started through ``setpriv --pdeathsig KILL`` where util-linux has it,
so even a ``kill -9`` of the benchmark takes them down with it. (setpriv
rather than a preexec_fn: that would make Python fork() a process full of
grpc threads instead of spawning.)

Readiness is a line in the child's log, awaited with a timeout, as
``tests/conftest.py`` does for the registry.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from geryon.localetcd import DIE_WITH_PARENT

READY_TIMEOUT = 30.0

_live: set[subprocess.Popen[bytes]] = set()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_all() -> None:
    """SIGKILL and reap every child still running. Safe to call twice."""
    for proc in list(_live):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        _live.discard(proc)


atexit.register(kill_all)


def adopt(proc: subprocess.Popen[bytes] | None) -> None:
    """Count a child started elsewhere (an etcd member of
    ``geryon.localetcd``, which starts its own through setpriv) among those
    ``kill_all`` kills. Start it from the event loop's thread, as ``Proc``
    does: the death signal follows the thread that forked it, so a child
    forked from a worker thread would die when that thread exits."""
    if proc is not None:
        _live.add(proc)


def forget(proc: subprocess.Popen[bytes] | None) -> None:
    """An adopted child that was killed and reaped."""
    if proc is not None and proc.poll() is not None:
        _live.discard(proc)


class Proc:
    """One child process with its output in a log file.

    ``start`` waits (up to ``READY_TIMEOUT``) for ``ready`` to appear in the
    output written since this start; ``ready=None`` returns at once.
    """

    def __init__(
        self,
        argv: list[str],
        log: Path,
        *,
        ready: str | None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = argv
        self.log_path = log
        self.ready = ready
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> int:
        """Start the process without waiting; return the log offset it starts at."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*DIE_WITH_PARENT, *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env if self.env is not None else os.environ.copy(),
                start_new_session=True,
            )
        _live.add(self.proc)
        return offset

    async def start(self) -> Proc:
        offset = self.spawn()
        if self.ready is not None:
            await self.wait_for(self.ready, offset)
        return self

    async def wait_for(self, text: str, offset: int = 0, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if text in self.output(offset):
                return
            if not self.running:
                code = self.proc.returncode if self.proc else None
                raise RuntimeError(
                    f"bench: {Path(self.argv[0]).name} exited {code} before "
                    f"{text!r}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"bench: {Path(self.argv[0]).name}: no {text!r} in {timeout}s:\n{self.tail()}"
                )
            await asyncio.sleep(0.01)

    def output(self, offset: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def kill9(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        _live.discard(self.proc)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        _live.discard(self.proc)


def wipe(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
