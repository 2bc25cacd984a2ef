"""The CpuService gRPC servicer: plumbing between a session's stream and its
Process (geryon.cpu.process).

A session: authenticate the caller, read its Start, check it (the runas map,
the limits, the request's fields), start the command, then pump. Output goes
out only inside the caller's window (it acknowledges what it has written out),
so a slow reader stops the command's writes instead of filling our memory;
input is read one message at a time and acknowledged once the command's pipe
took it. Whatever ends the handler -- the Exit sent, the caller gone, an error,
the server stopping -- kills the session's processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from geryon import procs
from geryon.convert import cpu_pb, cpu_pb_grpc
from geryon.cpu import process
from geryon.cpu.runas import RunAs
from geryon.errors import (
    FailedPrecondition,
    GeryonError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from geryon.model import Caller

log = logging.getLogger("geryon.cpu")

Authenticate = Callable[[grpc.aio.ServicerContext], Caller]
# Mount wrapper for a session: (disk names, caller) -> argv prefix; raises
# FailedPrecondition when this server cannot mount, NotFound for a bad name.
Mounter = Callable[[Sequence[str], Caller], Awaitable[tuple[str, ...]]]

DEFAULT_OUTPUT_WINDOW = 1 << 20
MAX_OUTPUT_WINDOW = 8 << 20
STDIN_WINDOW = 1 << 20
MAX_ARGS = 4096
MAX_MOUNTS = 16
# How long a session waits, after sending the exit, for its caller to hang up.
EXIT_LINGER_S = 5.0


def plaintext_caller(context: grpc.aio.ServicerContext) -> Caller:
    """Without TLS the caller is the local admin (Caller.plain_text)."""
    return Caller.plain_text(context.invocation_metadata(), context.peer())


class Limits:
    """Sessions open, in all and per identity."""

    def __init__(self, total: int, per_identity: int) -> None:
        self.total = total
        self.per_identity = per_identity
        self.open: Counter[str] = Counter()

    @property
    def sessions(self) -> int:
        return sum(self.open.values())

    def take(self, name: str) -> None:
        if self.sessions >= self.total:
            raise ResourceExhausted(f"cpu: {self.total} sessions open, the most this cpu runs")
        if self.open[name] >= self.per_identity:
            raise ResourceExhausted(
                f"cpu: {name} has {self.per_identity} sessions open, the most for one identity"
            )
        self.open[name] += 1

    def give(self, name: str) -> None:
        self.open[name] -= 1
        if self.open[name] <= 0:
            del self.open[name]


class OutputWindow:
    """Bytes sent beyond the caller's acknowledgement, at most ``size``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent = 0
        self.consumed = 0
        self._moved = asyncio.Event()

    async def reserve(self, n: int) -> None:
        # A chunk may overshoot the window once the caller has taken all
        # before it: a window smaller than one chunk still moves.
        while self.sent - self.consumed >= self.size:
            self._moved.clear()
            await self._moved.wait()
        self.sent += n

    def ack(self, consumed: int) -> None:
        if consumed > self.sent:
            raise InvalidArgument(f"output_consumed {consumed} is more than was sent ({self.sent})")
        self.consumed = max(self.consumed, consumed)
        self._moved.set()

    def open_up(self) -> None:
        """The caller stopped sending: it acknowledges nothing any more."""
        self.size = 1 << 62
        self._moved.set()


def _window(w: cpu_pb.WindowSize) -> process.Window | None:
    """The size, or None for one a terminal cannot have (0x0: nobody sized
    the caller's terminal), which leaves the size as it is."""
    if not (0 < w.rows <= 10000 and 0 < w.cols <= 10000):
        return None
    return process.Window(w.rows, w.cols, min(w.width_px, 65535), min(w.height_px, 65535))


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The first domain error in a (nested) exception group, else its first leaf."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            exc = _first_error(exc)
        if isinstance(exc, GeryonError):
            return exc
    first = group.exceptions[0]
    return _first_error(first) if isinstance(first, BaseExceptionGroup) else first


class CpuService(cpu_pb_grpc.CpuServiceServicer):
    def __init__(
        self,
        *,
        node: str,
        runas: RunAs,
        limits: Limits,
        keeper: procs.Keeper,
        authenticate: Authenticate = plaintext_caller,
        mounter: Mounter | None = None,
        plain_text: bool = False,
    ) -> None:
        self.node = node
        self.runas = runas
        self.limits = limits
        self.keeper = keeper
        self.authenticate = authenticate
        self.mounter = mounter
        self.plain_text = plain_text
        self.tools = process.helpers()
        self.sessions: dict[str, process.Process] = {}
        self.stopping = False
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(4)  # ids differ across restarts and servers

    async def Status(
        self, request: cpu_pb.StatusRequest, context: grpc.aio.ServicerContext
    ) -> cpu_pb.StatusResponse:
        try:
            self.authenticate(context)
        except GeryonError as exc:
            await context.abort(grpc.StatusCode[exc.code], exc.message)
        return cpu_pb.StatusResponse(
            node=self.node,
            ncpu=ncpu(),
            load=os.getloadavg()[0],
            sessions=len(self.sessions),
            max_sessions=self.limits.total,
            max_sessions_per_identity=self.limits.per_identity,
        )

    async def Session(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        caller: Caller | None = None
        try:
            caller = self.authenticate(context)
            if self.plain_text:
                # Over plain text a name is the caller's own say-so: it names
                # nothing that matters (account, a mount's 9P user); limits
                # count per connection.
                caller = Caller("admin", "admin", connection=caller.connection)
            if self.stopping:
                raise Unavailable(f"cpu: {self.node} is stopping")
            first = await context.read()
            if first is grpc.aio.EOF or first.WhichOneof("kind") != "start":
                raise InvalidArgument("cpu: a session begins with a start message")
            spec = await self._spec(first.start, caller)
            self.limits.take(caller.limited_as)
        except GeryonError as exc:
            await context.abort(grpc.StatusCode[exc.code], exc.message)
            return
        try:
            await self._run(context, caller, spec, first.start.output_window)
        except GeryonError as exc:
            await context.abort(grpc.StatusCode[exc.code], exc.message)
        finally:
            self.limits.give(caller.limited_as)

    async def _spec(self, start: cpu_pb.Start, caller: Caller) -> process.Spec:
        # The passwd lookup may go to NSS (LDAP, NFS): off the loop.
        account = await asyncio.to_thread(self.runas.resolve, caller)
        argv = tuple(start.argv)
        if len(argv) > MAX_ARGS:
            raise InvalidArgument(f"cpu: argv: {len(argv)} arguments, at most {MAX_ARGS}")
        why = process.check_argv(argv) or process.check_env(start.env)
        if why:
            raise InvalidArgument(f"cpu: {why}")
        if start.dir and (not os.path.isabs(start.dir) or "\0" in start.dir):
            raise InvalidArgument(f"cpu: dir {start.dir!r}: want an absolute path")
        term = window = None
        if start.HasField("terminal"):
            term = start.terminal.term
            if any(not (c.isalnum() or c in "-_.+") for c in term):
                raise InvalidArgument(f"cpu: terminal type {term!r}")
            window = _window(start.terminal.size)
        wrapper: tuple[str, ...] = ()
        if start.mounts:
            if len(start.mounts) > MAX_MOUNTS:
                raise InvalidArgument(f"cpu: at most {MAX_MOUNTS} mounts")
            if self.mounter is None:
                raise FailedPrecondition("cpu: this cpu cannot mount disks (it has no registry)")
            wrapper = await self.mounter(list(start.mounts), caller)
        return process.Spec(
            argv, account, env=dict(start.env), dir=start.dir, term=term,
            window=window or process.Window(), wrapper=wrapper,
        )  # fmt: skip

    async def _run(
        self, context: grpc.aio.ServicerContext, caller: Caller, spec: process.Spec, want: int
    ) -> None:
        sid = f"{self._prefix}{next(self._ids)}"
        lock = asyncio.Lock()

        async def send(**kind: Any) -> None:
            async with lock:  # one write at a time on a stream
                await context.write(cpu_pb.SessionResponse(**kind))

        extra = {"GERYON_NODE": self.node, "GERYON_CALLER": caller.name, "GERYON_SESSION": sid}
        try:
            proc = await process.Process.start(
                spec, keeper=self.keeper, extra_env=extra, tools=self.tools
            )
        except OSError as exc:
            if exc.errno == errno.E2BIG:
                raise InvalidArgument("cpu: argv and env: too long for exec") from None
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM):
                why = exc.strerror
                raise ResourceExhausted(f"cpu: cannot start a session now: {why}") from None
            raise Unavailable(f"cpu: cannot start a session: {exc.strerror or exc}") from None
        self.sessions[sid] = proc
        expired = ""
        ending: asyncio.Task[None] | None = None

        def expire() -> None:  # a session ends with its caller's certificate
            nonlocal expired, ending
            expired = f"cpu: {caller.name}: certificate expired: the session was ended"
            ending = asyncio.create_task(proc.end())

        left = caller.expires_in(time.time())
        expiry = asyncio.get_running_loop().call_later(left, expire) if left is not None else None
        window = OutputWindow(min(want or DEFAULT_OUTPUT_WINDOW, MAX_OUTPUT_WINDOW))
        log.info("cpu: session %s: %s %s as %s: pid %d: %s", sid, caller.role, caller.name,
                 spec.account.name, proc.pid, " ".join(spec.argv) or "(shell)")  # fmt: skip
        try:
            await send(started=cpu_pb.Started(
                session=sid, node=self.node, account=spec.account.name, pid=proc.pid,
                stdin_window=STDIN_WINDOW, output_window=window.size,
            ))  # fmt: skip
            try:
                async with asyncio.TaskGroup() as tg:
                    inbound = tg.create_task(self._inbound(context, proc, window, send))
                    async for which, data in proc.output():
                        await window.reserve(len(data))
                        if which == process.STDOUT:
                            await send(stdout=data)
                        else:
                            await send(stderr=data)
                    status = await proc.wait()
                    why = expired if status.signal == "KILL" else ""
                    if self.stopping and status.signal == "KILL":
                        why = f"cpu: {self.node} is stopping: the session was ended"
                    # In the stream, not as the call's status: a caller still
                    # writing would see its write fail and lose the status.
                    await send(exit=cpu_pb.Exit(
                        code=status.code, signal=status.signal, ended_by_service=why
                    ))  # fmt: skip
                    # The caller half-closes once it has read the exit. Ending
                    # the call before would fail its acknowledgements still in
                    # flight, and with them the output it has not read yet.
                    await asyncio.wait({inbound}, timeout=EXIT_LINGER_S)
                    inbound.cancel()
            except* GeryonError as group:
                raise _first_error(group) from None
            log.info("cpu: session %s: %s", sid, status)
        finally:
            if expiry is not None:
                expiry.cancel()
            if ending is not None:
                await asyncio.gather(ending, return_exceptions=True)
            del self.sessions[sid]
            await proc.kill()

    @staticmethod
    async def _inbound(
        context: grpc.aio.ServicerContext,
        proc: process.Process,
        window: OutputWindow,
        send: Callable[..., Awaitable[None]],
    ) -> None:
        """Read the caller's messages as they come. Input goes through a
        queue to its own task: a command that does not read its stdin must
        not hold up the acknowledgements and signals behind it."""
        stdin: asyncio.Queue[bytes | None] = asyncio.Queue()
        pending = 0  # bytes queued, not yet handed to the command

        async def feed() -> None:
            nonlocal pending
            consumed = 0
            while (data := await stdin.get()) is not None:
                await proc.write(data)
                pending -= len(data)
                consumed += len(data)
                await send(stdin_consumed=consumed)
            await proc.close_stdin()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(feed())
            while True:
                req = await context.read()
                if req is grpc.aio.EOF:
                    # The caller has nothing more to say, acknowledgements included.
                    window.open_up()
                    stdin.put_nowait(None)
                    return
                kind = req.WhichOneof("kind")
                if kind == "stdin":
                    pending += len(req.stdin)
                    if pending > STDIN_WINDOW:
                        raise InvalidArgument(
                            f"cpu: stdin: {pending} bytes unacknowledged, past the window "
                            f"of {STDIN_WINDOW}"
                        )
                    stdin.put_nowait(req.stdin)
                elif kind == "output_consumed":
                    window.ack(req.output_consumed)
                elif kind == "close_stdin":
                    stdin.put_nowait(None)
                elif kind == "signal":
                    if req.signal not in process.SIGNALS:
                        names = " ".join(sorted(process.SIGNALS))
                        raise InvalidArgument(f"cpu: signal {req.signal!r}: want one of {names}")
                    proc.signal(req.signal)
                elif kind == "window":
                    if (size := _window(req.window)) is not None:
                        proc.resize(size)
                else:
                    raise InvalidArgument(f"cpu: unexpected {kind or 'empty'} message in a session")

    async def stop(self) -> None:
        """The server stops: kill every session's processes; their callers
        hear UNAVAILABLE, not an exit status the command never chose."""
        self.stopping = True
        # Only the processes: each session's handler closes its own ends.
        with contextlib.suppress(Exception):
            await asyncio.gather(*(p.end() for p in list(self.sessions.values())))


def ncpu() -> int:
    """Processors this process may run on (a container's cpuset, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count() or 1
