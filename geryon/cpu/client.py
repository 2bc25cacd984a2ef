"""The caller's side of the cpu service: find a cpu in the registry and run
one session on it.

``find`` lists the cpu services (svc=rstyx) a caller may pick from and
``rank`` orders them least loaded first (load per processor, then open
sessions; ties in random order, so callers spread out). ``Session`` drives
one stream: its ``output()`` yields what the command writes, and the caller
acknowledges each piece with ``consumed`` once it has written it out, which
is what lets the service send more; ``send_stdin`` waits for the service's
window. A cpu is dialled by the name of the identity that registered it: its
TLS certificate must be that identity's.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from geryon import errors
from geryon.client import Client, error_from_rpc
from geryon.convert import cpu_pb, cpu_pb_grpc
from geryon.model import Service

SVC = "rstyx"
STDIN_CHUNK = 256 * 1024
# What the caller asks to be sent ahead of what it has written out.
OUTPUT_WINDOW = 4 << 20
CONNECT_TIMEOUT_S = 10.0
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 << 20),
]


@dataclass(frozen=True, slots=True)
class Cpu:
    """A cpu service as its registry entry describes it."""

    name: str  # tcp!HOST!PORT
    node: str
    owner: str  # the identity that registered it: its certificate's name
    ncpu: int
    load: float
    sessions: int

    @property
    def address(self) -> str:
        parts = self.name.split("!")
        if len(parts) != 3 or parts[0] != "tcp":
            raise errors.InvalidArgument(f"cpu: {self.name}: not a tcp!HOST!PORT address")
        host = parts[1]
        return f"[{host}]:{parts[2]}" if ":" in host else f"{host}:{parts[2]}"

    @classmethod
    def from_service(cls, s: Service) -> Cpu:
        def number(attr: str, kind: type, default: float) -> float:
            try:
                return kind(s.attrs.get(attr, default))
            except ValueError:
                return default

        return cls(
            s.name,
            s.attrs.get("host", ""),
            s.owner,
            max(1, int(number("ncpu", int, 1))),
            number("load", float, 0.0),
            int(number("sessions", int, 0)),
        )


async def find(
    client: Client, *, node: str | None = None, attrs: Mapping[str, str] = {}
) -> list[Cpu]:
    """The cpus matching ATTRS (and on NODE), leaving out those whose health
    check fails."""
    want = {**attrs, "svc": SVC}
    if node is not None:
        want["host"] = node
    services, _ = await client.find(want)
    return [Cpu.from_service(s) for s in services if s.attrs.get("health") != "critical"]


def rank(cpus: Sequence[Cpu]) -> list[Cpu]:
    """Least loaded first: load per processor, then sessions; equals shuffled."""
    shuffled = list(cpus)
    random.shuffle(shuffled)
    return sorted(shuffled, key=lambda c: (round(c.load / c.ncpu, 2), c.sessions))


def channel(cpu: Cpu, *, tls_dir: Path | str | None) -> grpc.aio.Channel:
    if not tls_dir:
        return grpc.aio.insecure_channel(cpu.address, options=CHANNEL_OPTIONS)
    from geryon import tls  # cryptography: only when TLS is used

    creds = tls.channel_credentials(Path(tls_dir))
    options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", tls.dial_name(cpu.owner))]
    return grpc.aio.secure_channel(cpu.address, creds, options=options)


async def status(
    cpu: Cpu, *, tls_dir: Path | str | None, within: float = 2.0
) -> cpu_pb.StatusResponse:
    async with channel(cpu, tls_dir=tls_dir) as ch:
        try:
            return await cpu_pb_grpc.CpuServiceStub(ch).Status(
                cpu_pb.StatusRequest(), timeout=within
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None


@dataclass(frozen=True, slots=True)
class Exit:
    code: int = 0
    signal: str = ""

    @property
    def shell_status(self) -> int:
        """What a shell would say: 128+N for signal N."""
        if not self.signal:
            return self.code
        import signal as signals

        try:
            return 128 + signals.Signals[f"SIG{self.signal}"]
        except KeyError:
            return 255


class Session:
    """One command on a cpu, from Start to Exit."""

    def __init__(
        self,
        ch: grpc.aio.Channel,
        start: cpu_pb.Start,
        *,
        user: str | None = None,
    ) -> None:
        metadata = (("geryon-user", user),) if user else None
        start.output_window = start.output_window or OUTPUT_WINDOW
        self._start = start
        self._call = cpu_pb_grpc.CpuServiceStub(ch).Session(metadata=metadata)
        self._lock = asyncio.Lock()
        self.started: cpu_pb.Started | None = None
        self.exit: Exit | None = None
        self._stdin_sent = 0
        self._stdin_acked = 0
        self._stdin_moved = asyncio.Event()
        self._consumed = 0
        self._acked = 0
        self._ack_every = 1

    async def _send(self, **kind: object) -> None:
        # Never once the call is over: a send that fails would replace the
        # status (and the output not read yet) with an internal error.
        if self.exit is not None or self._call.done():
            return
        async with self._lock:
            # A failed send means the call has ended: reading it says how.
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self._call.write(cpu_pb.SessionRequest(**kind))

    async def open(self, within: float = CONNECT_TIMEOUT_S) -> cpu_pb.Started:
        """Send the Start and wait for Started; GeryonError when refused."""
        try:
            async with asyncio.timeout(within):
                await self._call.write(cpu_pb.SessionRequest(start=self._start))
                first = await self._call.read()
        except TimeoutError:
            self._call.cancel()
            raise errors.DeadlineExceeded(f"no answer in {within:g}s") from None
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        if first is grpc.aio.EOF:
            raise errors.Unavailable("the cpu ended the session before it started")
        if first.WhichOneof("kind") != "started":
            self._call.cancel()
            raise errors.Internal("cpu: the service answered a start without starting")
        self.started = first.started
        self._ack_every = max(1, first.started.output_window // 4)
        return first.started

    async def output(self) -> AsyncIterator[tuple[int, bytes]]:
        """(1 or 2, bytes) until the command's exit (then ``self.exit`` is set).
        Call ``consumed`` for each piece once it is written out."""
        while True:
            try:
                msg = await self._call.read()
            except grpc.aio.AioRpcError as exc:
                raise error_from_rpc(exc) from None
            if msg is grpc.aio.EOF:
                raise errors.Unavailable("the session ended without an exit status")
            kind = msg.WhichOneof("kind")
            if kind == "stdout":
                yield 1, msg.stdout
            elif kind == "stderr":
                yield 2, msg.stderr
            elif kind == "stdin_consumed":
                self._stdin_acked = max(self._stdin_acked, msg.stdin_consumed)
                self._stdin_moved.set()
            elif kind == "exit":
                self._stdin_moved.set()
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    async with self._lock:
                        await self._call.done_writing()
                self.exit = Exit(msg.exit.code, msg.exit.signal)
                if msg.exit.ended_by_service:
                    raise errors.Unavailable(msg.exit.ended_by_service)
                return

    async def consumed(self, n: int) -> None:
        """N more bytes of output were written out: acknowledge in quarters
        of the window, so the service keeps sending while we write."""
        self._consumed += n
        # The service waits only once a whole window is unacknowledged, and
        # by then a quarter of it has been written out: no ack is missed.
        if self._consumed - self._acked >= self._ack_every:
            self._acked = self._consumed
            await self._send(output_consumed=self._consumed)

    async def send_stdin(self, data: bytes) -> None:
        """Send DATA as the service's window allows (never past it)."""
        window = self.started.stdin_window if self.started else 1 << 20
        view = memoryview(data)
        while view and self.exit is None:
            room = window - (self._stdin_sent - self._stdin_acked)
            if room <= 0:
                self._stdin_moved.clear()
                await self._stdin_moved.wait()
                continue
            piece, view = view[: min(room, STDIN_CHUNK)], view[min(room, STDIN_CHUNK) :]
            self._stdin_sent += len(piece)
            await self._send(stdin=bytes(piece))

    async def close_stdin(self) -> None:
        await self._send(close_stdin=True)

    async def signal(self, name: str) -> None:
        await self._send(signal=name)

    async def resize(self, rows: int, cols: int) -> None:
        await self._send(window=cpu_pb.WindowSize(rows=rows, cols=cols))

    def cancel(self) -> None:
        self._call.cancel()


def start_message(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] = {},
    dir: str = "",
    term: str | None = None,
    size: tuple[int, int] | None = None,
    mounts: Sequence[str] = (),
) -> cpu_pb.Start:
    start = cpu_pb.Start(argv=list(argv), env=dict(env), dir=dir, mounts=list(mounts))
    if term is not None:
        start.terminal.SetInParent()
        start.terminal.term = term
        if size is not None:
            start.terminal.size.rows, start.terminal.size.cols = size
    return start


__all__ = ["Cpu", "Exit", "Session", "channel", "find", "rank", "start_message", "status"]
