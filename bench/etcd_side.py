"""etcd under test: Debian's etcd 3.4, driven through raw grpc.aio stubs:
``geryon.etcdpb``, which ``make proto`` generates from the subset of etcd's
API that Geryon's etcd store speaks (proto/geryon/etcdpb/rpc.proto).

That subset has no KV.Put method: the benchmark calls etcd's own
``/etcdserverpb.KV/Put`` through the channel with the subset's
``PutRequest``/``PutResponse`` messages (the method, package and field
numbers are etcd's), so etcd is measured on a plain put, as before, and not
on a transaction.

A service is a key ``svc/NAME`` whose value is its attributes as compact JSON;
a leased one is put with the lease. etcd has no attribute index, so Find is
what its users must do: range over the prefix and filter on the client.

etcd runs as one member on loopback ports with its data in the run's temporary
directory and its defaults otherwise: in particular it fsyncs its WAL on every
commit (``--unsafe-no-fsync`` is not given), as Geryon fsyncs SQLite.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import grpc

from bench import procs
from bench.core import ETCD, Conn, KeepAlive, Side, Watch
from geryon import localetcd
from geryon.etcdpb import rpc_pb2 as pb
from geryon.etcdpb import rpc_pb2_grpc as pb_grpc
from geryon.store.etcd_rpc import prefix_end

PREFIX = b"svc/"
DELETE = pb.Event.DELETE
PUT_METHOD = "/etcdserverpb.KV/Put"  # etcd's; not in geryon.etcdpb's subset
CHANNEL_OPTIONS = [
    # As geryon.client.Client(own_connection=True) does: one TCP connection
    # per channel, quick reconnects.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A range over 10,000 services is well over the 4 MiB default.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def version() -> str:
    return f"etcd {localetcd.version()}"


def encode(attrs: Mapping[str, str]) -> bytes:
    return json.dumps(dict(attrs), separators=(",", ":"), sort_keys=True).encode()


def put_method(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:
    """etcd's KV.Put, as a generated stub would call it."""
    return channel.unary_unary(
        PUT_METHOD,
        request_serializer=pb.PutRequest.SerializeToString,
        response_deserializer=pb.PutResponse.FromString,
    )


class EtcdSide(Side):
    name = ETCD
    label = "etcd"

    def __init__(self, tmp: Path) -> None:
        etcd = localetcd.binary()
        if etcd is None:
            raise FileNotFoundError("bench: no etcd binary: run make etcd-deps, or give --no-etcd")
        self.etcd = etcd
        self.tmp = tmp
        self.data = tmp / "etcd-data"
        self.client_port = procs.free_port()
        self.peer_port = procs.free_port()
        self.proc: procs.Proc | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def _argv(self) -> list[str]:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            self.etcd,
            "--name=bench",
            f"--data-dir={self.data}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=bench={peer}",
            "--initial-cluster-state=new",
            "--logger=zap",
            "--log-outputs=stderr",
        ]

    def respawn(self) -> None:
        # ETCD_* variables would override flags; the benchmark sets its own.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        self.proc = procs.Proc(self._argv(), self.tmp / "etcd.log", ready=None, env=env)
        self.proc.spawn()

    async def start(self) -> None:
        self.respawn()
        await self.wait_ready()

    async def wait_ready(self, timeout: float = procs.READY_TIMEOUT) -> None:
        """Until a (linearizable, so leader-backed) read succeeds."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if not self.proc.running:
                raise RuntimeError(f"bench: etcd exited:\n{self.proc.tail()}")
            conn = self.connect()
            try:
                await conn.get("ready-probe", timeout=0.5)
                return
            except (grpc.aio.AioRpcError, TimeoutError):
                pass
            finally:
                await conn.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"bench: etcd not ready in {timeout}s:\n{self.proc.tail()}")
            await asyncio.sleep(0.01)

    async def reset(self) -> None:
        self.stop()
        procs.wipe(self.data)
        await self.start()

    def kill9(self) -> None:
        if self.proc is not None:
            self.proc.kill9()

    def stop(self) -> None:
        self.kill9()

    def connect(self) -> EtcdConn:
        return EtcdConn(self.address)

    def holder_argv(self, name: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bench.holder",
            "etcd",
            self.address,
            name,
        ]


class EtcdConn(Conn):
    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.kv = pb_grpc.KVStub(self.channel)
        self.kv_put = put_method(self.channel)
        self.lease = pb_grpc.LeaseStub(self.channel)
        self.watcher = pb_grpc.WatchStub(self.channel)

    async def put(self, name: str, attrs: Mapping[str, str], lease: int = 0) -> None:
        await self.kv_put(
            pb.PutRequest(key=PREFIX + name.encode(), value=encode(attrs), lease=lease),
            timeout=self.timeout,
        )

    async def put_batch(self, items: Sequence[tuple[str, Mapping[str, str], int]]) -> None:
        r = await self.kv.Txn(
            pb.TxnRequest(
                success=[
                    pb.RequestOp(
                        request_put=pb.PutRequest(
                            key=PREFIX + name.encode(), value=encode(attrs), lease=lease
                        )
                    )
                    for name, attrs, lease in items
                ]
            ),
            timeout=self.timeout,
        )
        if not r.succeeded:
            raise RuntimeError("bench: etcd txn failed")

    async def find(self, attr: str, value: str) -> list[str]:
        r = await self.kv.Range(
            pb.RangeRequest(key=PREFIX, range_end=prefix_end(PREFIX)), timeout=self.timeout
        )
        n = len(PREFIX)
        return [kv.key[n:].decode() for kv in r.kvs if json.loads(kv.value).get(attr) == value]

    async def get(self, name: str, *, timeout: float) -> bool:
        r = await self.kv.Range(pb.RangeRequest(key=PREFIX + name.encode()), timeout=timeout)
        return bool(r.kvs)

    async def grant(self, ttl_s: float) -> tuple[int, float]:
        # etcd's TTL is whole seconds, raised to its minimum (1.5 election
        # timeouts, rounded up: 2 s with the default 1 s election timeout).
        r = await self.lease.LeaseGrant(
            pb.LeaseGrantRequest(TTL=max(1, round(ttl_s))), timeout=self.timeout
        )
        if r.error:
            raise RuntimeError(f"bench: etcd grant: {r.error}")
        return r.ID, float(r.TTL)

    async def revoke(self, lease: int) -> None:
        await self.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=lease), timeout=self.timeout)

    async def keepalive(self) -> EtcdKeepAlive:
        return EtcdKeepAlive(self.lease.LeaseKeepAlive(), self.timeout)

    def watch(self, prefix: str) -> EtcdWatch:
        return EtcdWatch(self.watcher.Watch(), PREFIX + prefix.encode(), self.timeout)

    async def close(self) -> None:
        await self.channel.close()


class EtcdKeepAlive(KeepAlive):
    def __init__(self, call: grpc.aio.StreamStreamCall, timeout: float) -> None:
        self.call, self.timeout = call, timeout

    async def renew(self, lease: int) -> float:
        async def once() -> float:
            await self.call.write(pb.LeaseKeepAliveRequest(ID=lease))
            r = await self.call.read()
            if r is grpc.aio.EOF:
                raise ConnectionError("bench: etcd keepalive stream ended")
            return float(r.TTL)

        return await asyncio.wait_for(once(), self.timeout)

    def close(self) -> None:
        self.call.cancel()


class EtcdWatch(Watch):
    """One etcd watcher on its own Watch stream (etcd could multiplex many
    watchers on one stream; the benchmark gives each its own, as Geryon's)."""

    def __init__(self, call: grpc.aio.StreamStreamCall, key: bytes, timeout: float) -> None:
        self.call, self.key, self.timeout = call, key, timeout
        self.skip = len(PREFIX)

    async def started(self) -> None:
        create = pb.WatchCreateRequest(key=self.key, range_end=prefix_end(self.key))
        await self.call.write(pb.WatchRequest(create_request=create))
        first = await asyncio.wait_for(self.call.read(), self.timeout)
        if first is grpc.aio.EOF or not first.created:
            raise ConnectionError(f"bench: etcd watch did not start: {first}")

    async def batches(self) -> AsyncIterator[list[tuple[str, str]]]:
        skip = self.skip
        while True:
            r = await self.call.read()
            if r is grpc.aio.EOF:
                return
            if r.events:
                yield [
                    ("delete" if e.type == DELETE else "put", e.kv.key[skip:].decode())
                    for e in r.events
                ]

    def close(self) -> None:
        self.call.cancel()
