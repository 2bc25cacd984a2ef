"""Geryon under test: a real geryon-registryd and raw grpc.aio stub calls.

Channels come from ``geryon.client.Client(own_connection=True)``, so they carry
the options real clients use and each has its own TCP connection; the calls
go straight to ``client.stub``, as the etcd side calls its stubs, so neither
side pays for a heavier client library (no retries, no model conversion).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import grpc

from bench import procs
from bench.core import GERYON, Conn, KeepAlive, Side, Watch
from geryon.client import Client
from geryon.convert import pb

BIN = Path(sys.executable).parent
READY = "serving on"
# The per-identity write and keepalive quotas would measure the quota, not
# the registry (over plain text each connection has its own).
QUOTAS_OFF = ["--write-rate", "0", "--keepalive-rate", "0"]


class GeryonSide(Side):
    name = GERYON
    label = "Geryon"
    profile_stem = "registryd"  # the --profile files: registryd-NNN.prof

    def __init__(
        self,
        tmp: Path,
        *,
        profile_dir: Path | None = None,
        extra_args: list[str] = (),
        log_name: str = "geryon.log",
    ) -> None:
        self.tmp = tmp
        self.extra_args = list(extra_args)
        self.port = procs.free_port()
        self.data = tmp / "geryon-data"
        self.profile_dir = profile_dir
        self.log_path = tmp / log_name
        self.generation = 0
        self.proc: procs.Proc | None = None
        # With profile_dir: (profile file, workload) per registry process.
        self.profiles: list[tuple[Path, str]] = []
        self.tag = "start"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def store_args(self) -> list[str]:
        """Where the registry keeps its state."""
        return ["--data-dir", str(self.data)]

    def _argv(self, address: str) -> list[str]:
        args = [
            "--listen",
            address,
            *self.store_args(),
            *QUOTAS_OFF,
            *self.extra_args,
        ]
        if self.profile_dir is None:
            return [str(BIN / "geryon-registryd"), *args]
        out = self.profile_dir / f"{self.profile_stem}-{self.generation:03d}.prof"
        self.profiles.append((out, self.tag))
        return [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "geryon.registryd", *args]

    def _new_proc(self, address: str) -> procs.Proc:
        self.generation += 1
        return procs.Proc(self._argv(address), self.log_path, ready=READY)

    def _proc(self) -> procs.Proc:
        self.proc = self._new_proc(self.address)
        return self.proc

    async def start(self) -> None:
        await self._proc().start()

    async def reset(self) -> None:
        self.stop()
        procs.wipe(self.data)
        await self.start()

    def kill9(self) -> None:
        if self.proc is not None:
            self.proc.kill9()

    def respawn(self) -> None:
        self._proc().spawn()

    def _end(self, proc: procs.Proc | None) -> None:
        # A profiled server must exit cleanly for cProfile to write its file.
        if proc is not None:
            if self.profile_dir is not None:
                proc.stop()
            else:
                proc.kill9()

    def stop(self) -> None:
        self._end(self.proc)

    def connect(self) -> GeryonConn:
        return GeryonConn(self.address)

    def holder_argv(self, name: str) -> list[str]:
        return [sys.executable, "-m", "bench.holder", "geryon", self.address, name]


class GeryonConn(Conn):
    def __init__(self, address: str) -> None:
        self.client = Client(address, own_connection=True, retry_for=self.timeout)
        self.stub = self.client.stub

    async def put(self, name: str, attrs: Mapping[str, str], lease: int = 0) -> None:
        await self.stub.Register(
            pb.RegisterRequest(name=name, attrs=attrs, lease=lease, persist=not lease),
            timeout=self.timeout,
        )

    async def put_batch(self, items: Sequence[tuple[str, Mapping[str, str], int]]) -> None:
        await self.stub.RegisterBatch(
            pb.RegisterBatchRequest(
                services=[
                    pb.RegisterRequest(name=name, attrs=attrs, lease=lease, persist=not lease)
                    for name, attrs, lease in items
                ]
            ),
            timeout=self.timeout,
        )

    async def find(self, attr: str, value: str) -> list[str]:
        r = await self.stub.Find(pb.FindRequest(attrs={attr: value}), timeout=self.timeout)
        return [s.name for s in r.services]

    async def get(self, name: str, *, timeout: float) -> bool:
        try:
            await self.stub.Get(pb.GetRequest(name=name), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True

    async def grant(self, ttl_s: float) -> tuple[int, float]:
        r = await self.stub.Grant(pb.GrantRequest(ttl_ms=round(ttl_s * 1000)), timeout=self.timeout)
        return r.lease, r.ttl_ms / 1000

    async def revoke(self, lease: int) -> None:
        await self.stub.Revoke(pb.RevokeRequest(lease=lease), timeout=self.timeout)

    async def keepalive(self) -> GeryonKeepAlive:
        return GeryonKeepAlive(self.stub.KeepAlive(), self.timeout)

    def watch(self, prefix: str) -> GeryonWatch:
        return GeryonWatch(self.stub.Watch(), prefix, self.timeout)

    async def close(self) -> None:
        await self.client.close()


class GeryonKeepAlive(KeepAlive):
    """One KeepAlive stream. Geryon ends every lease a stream holds when the
    stream goes away, so a stream stays open while its leases are wanted."""

    def __init__(self, call: grpc.aio.StreamStreamCall, timeout: float) -> None:
        self.call = call
        self.timeout = timeout

    async def renew(self, lease: int) -> float:
        async def once() -> float:
            await self.call.write(pb.KeepAliveRequest(lease=lease))
            r = await self.call.read()
            if r is grpc.aio.EOF:
                raise ConnectionError("bench: geryon keepalive stream ended")
            return r.ttl_ms / 1000

        return await asyncio.wait_for(once(), self.timeout)

    def close(self) -> None:
        self.call.cancel()


class GeryonWatch(Watch):
    def __init__(self, call: grpc.aio.StreamStreamCall, prefix: str, timeout: float) -> None:
        self.call = call
        self.prefix = prefix
        self.timeout = timeout

    async def started(self) -> None:
        create = pb.WatchCreateRequest(prefix=self.prefix)
        await self.call.write(pb.WatchRequest(create_request=create))
        # A watch from "now" opens with a progress notice naming where it starts.
        first = await asyncio.wait_for(self.call.read(), self.timeout)
        if first is grpc.aio.EOF or first.type != pb.WatchResponse.TYPE_PROGRESS:
            raise ConnectionError(f"bench: geryon watch did not start: {first}")

    async def batches(self) -> AsyncIterator[list[tuple[str, str]]]:
        while True:
            r = await self.call.read()
            if r is grpc.aio.EOF:
                return
            if r.type == pb.WatchResponse.TYPE_EVENTS:
                yield [
                    ("delete" if e.type == pb.Event.TYPE_DELETE else "put", e.service.name)
                    for e in r.events
                ]

    def close(self) -> None:
        self.call.cancel()


def version() -> str:
    from importlib.metadata import version as v

    return f"geryon {v('geryon')} (grpcio {grpc.__version__})"
