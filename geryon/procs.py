"""Child processes that never outlive the process that started them.

Every command Geryon runs for a service (a chunk server, a reglisten
connection, a health check) goes through ``spawn``, which guarantees:

- the command runs in a process group of its own (pgid = its pid), so
  stopping it stops its shell jobs and pipelines too, and a Ctrl-C meant for
  the agent does not reach it;
- the kernel sends it SIGKILL if we die (PR_SET_PDEATHSIG, armed by the exec
  wrapper in geryon/keeper.py, which then checks we did not die before);
- its group is known to our keeper (geryon/keeper.py) before the command
  runs, so if we die, kill -9 included, the whole group is killed, not only
  the direct child.

PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so
``spawn`` must run on the event loop's thread, which lives as long as we do
(asyncio forks there).

``check_tcp`` asks whether a service's port accepts connections: the one
probe both announcing (is it ready?) and health checks (is it still up?)
use, kept here, below both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from geryon import keeper as keeper_module

log = logging.getLogger("geryon.procs")

# The wrapper runs isolated (-I) and without site (-S): it needs only the
# standard library, and starts in a few tens of milliseconds.
WRAPPER = [sys.executable, "-I", "-S", keeper_module.__file__]


class Keeper:
    """Our keeper process and the process groups it must kill if we die."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self.groups: set[int] = set()

    def ensure(self) -> None:
        """Start the keeper, or restart it if someone killed it."""
        if self._proc is not None and self._proc.poll() is None:
            return
        if self._proc is not None:
            log.warning("keeper exited %s; starting another", self._proc.returncode)
            with contextlib.suppress(OSError):
                self._proc.stdin.close()  # type: ignore[union-attr]
        self._proc = subprocess.Popen(
            [*WRAPPER],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            close_fds=True,
            bufsize=0,
            # Not in our process group: a kill -9 of the whole group must
            # leave the keeper to clean up after it.
            start_new_session=True,
        )
        for pgid in self.groups:
            self._write(b"+%d\n" % pgid)

    @property
    def fd(self) -> int:
        assert self._proc is not None and self._proc.stdin is not None
        return self._proc.stdin.fileno()

    def watch(self, pgid: int) -> None:
        """Kill group PGID if we die (for a child not started by ``spawn``)."""
        self.groups.add(pgid)
        self._write(b"+%d\n" % pgid)

    def forget(self, pgid: int) -> None:
        self.groups.discard(pgid)
        self._write(b"-%d\n" % pgid)

    def _write(self, line: bytes) -> None:
        if self._proc is None or self._proc.stdin is None:
            return
        try:
            os.write(self._proc.stdin.fileno(), line)
        except OSError as exc:
            log.warning("keeper: %s", exc)

    def close(self) -> None:
        """Let the keeper go (it kills any group still listed, normally none)."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        with contextlib.suppress(OSError):
            proc.stdin.close()  # type: ignore[union-attr]
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def spawn(
    argv: Sequence[str],
    *,
    keeper: Keeper,
    env: Mapping[str, str] | None = None,
    stdin: Any = subprocess.DEVNULL,
    stdout: Any = None,
    stderr: Any = None,
) -> asyncio.subprocess.Process:
    """Start ``argv`` in its own process group, tied to our life (see above)."""
    keeper.ensure()
    fd = keeper.fd
    # No preexec_fn: that would make subprocess fork() instead of vfork(),
    # and a fork of a process running grpc runs grpc's fork handlers.
    proc = await asyncio.create_subprocess_exec(
        *WRAPPER,
        "--exec",
        str(os.getpid()),
        str(fd),
        "--",
        *argv,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=dict(env) if env is not None else None,
        process_group=0,
        close_fds=True,
        pass_fds=(fd,),
    )
    keeper.groups.add(proc.pid)
    return proc


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def reap_group(proc: asyncio.subprocess.Process, keeper: Keeper) -> None:
    """The leader has exited: kill what is left of its group and forget it."""
    _killpg(proc.pid, signal.SIGKILL)
    keeper.forget(proc.pid)


async def stop(proc: asyncio.subprocess.Process, keeper: Keeper, *, grace: float) -> int:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds; return
    the leader's exit status."""
    if proc.returncode is None:
        _killpg(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                await proc.wait()
        except TimeoutError:
            _killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    reap_group(proc, keeper)
    return exit_status(proc.returncode)


def exit_status(returncode: int | None) -> int:
    """A shell's view of a status: 128+N for death by signal N."""
    if returncode is None:
        return -1
    return 128 - returncode if returncode < 0 else returncode


def describe(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit status {returncode}"


async def check_tcp(host: str, port: int, limit: float) -> tuple[bool, str]:
    """Whether ``host``:``port`` accepts a connection within ``limit`` seconds, and why not."""
    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
    # cancellation that lands as the connection completes, and the caller
    # (a command being stopped) would then run on.
    try:
        async with asyncio.timeout(limit):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return False, f"connect to {host}:{port} timed out"
    except OSError as exc:
        return False, f"connect to {host}:{port}: {exc.strerror or exc}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True, "connected"
