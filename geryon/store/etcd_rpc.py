"""A small asyncio client for etcd's v3 gRPC API: what the etcd store needs.

One channel per member. A call that fails for a reason that says nothing
about the request itself (the member is down or cut off, has no leader, timed
out) moves this client to the next member; reads, and writes that are safe to
repeat, are tried again there until the operation's deadline. etcd's errors
become Geryon's domain errors here, at the boundary, so the store above never
sees grpc.

The generated stubs (``geryon/etcdpb``, from ``proto/geryon/etcdpb/rpc.proto``,
a subset of etcd's API) are imported here and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from geryon import tls
from geryon.errors import (
    FailedPrecondition,
    GeryonError,
    Internal,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
)
from geryon.etcdpb import rpc_pb2 as epb
from geryon.etcdpb import rpc_pb2_grpc as egrpc

__all__ = ["Compacted", "Etcd", "TooLarge", "epb", "prefix_end"]

log = logging.getLogger("geryon.store")

# One attempt at one member; the operation as a whole has its own deadline.
# A member that lost its leader may hold a request unanswered: after an
# election (about a second with etcd's defaults) another member does better.
ATTEMPT_S = 1.0
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 3_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    # A list of 100,000 services comes in pages, but one page can be large.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Each member its own connection, even when two share an address.
    ("grpc.use_local_subchannel_pool", 1),
]
# A watch that has heard nothing for this long asks for a progress report;
# one that then hears nothing for as long again has lost its member.
WATCH_IDLE_S = 2.0
PROGRESS = epb.WatchProgressRequest()
# Streams on a member cut off from its cluster's leader would go quiet, not
# fail: with this, the member ends them (etcd's clientv3 WithRequireLeader).
REQUIRE_LEADER = (("hasleader", "true"),)
# etcd says these when a request did not get through raft in time; whether it
# was applied is unknown, as for a lost connection.
_TRANSIENT_DETAILS = (
    "leader changed",
    "no leader",
    "timed out",
    "too many requests",
    "not capable",
    "server stopped",
    "not started",
)


class Compacted(GeryonError):
    """A watch asked for history etcd no longer holds; ``revision`` is the
    oldest it does."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"etcd: history compacted up to revision {revision}")
        self.revision = revision


def prefix_end(key: bytes) -> bytes:
    """The range end that makes a range cover every key starting with ``key``."""
    end = bytearray(key)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


class TooLarge(ResourceExhausted):
    """An answer bigger than this client takes in one message."""


def error(exc: grpc.aio.AioRpcError, where: str) -> GeryonError:
    """etcd's status as a domain error."""
    code, details = exc.code(), exc.details() or exc.code().name
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        return TooLarge(f"etcd {where}: {details}")
    if code in (
        grpc.StatusCode.UNKNOWN,  # grpc's word for a connection lost under a call
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # a full database, or overload
    ) or any(d in details for d in _TRANSIENT_DETAILS):
        return Unavailable(f"etcd {where}: {details}")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        # etcd's auth refuses this front: no other member or retry will do better.
        return FailedPrecondition(f"etcd {where}: refused: {details}")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"etcd: {details}")
    if code == grpc.StatusCode.OUT_OF_RANGE:
        return OutOfRange(f"etcd: {details}")
    return Internal(f"etcd {where}: {code.name}: {details}")


class _Member:
    """One endpoint: its channel (which connects when first used) and stubs."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None) -> None:
        self.target = target
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        self.kv = egrpc.KVStub(self.channel)
        self.lease = egrpc.LeaseStub(self.channel)
        self.watch = egrpc.WatchStub(self.channel)


class Etcd:
    """A client of one etcd cluster, over any of its members."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        tls_dir: Path | None = None,
        timeout: float = 5.0,
    ) -> None:
        if not targets:
            raise ValueError("etcd: no endpoints")
        self.targets = list(targets)
        self.timeout = timeout
        credentials = tls.channel_credentials(tls_dir) if tls_dir else None
        self._members = [_Member(t, credentials) for t in self.targets]
        # Start on a random member so that many fronts spread over the cluster.
        self._current = random.randrange(len(self._members))
        self._keepalive = _KeepAlives(self)

    def __str__(self) -> str:
        return ",".join(self.targets)

    def member(self) -> _Member:
        return self._members[self._current]

    def failed(self, member: _Member) -> None:
        """``member`` failed us: the next call goes to the next one."""
        if self._members[self._current] is member and len(self._members) > 1:
            self._current = (self._current + 1) % len(self._members)
            log.debug("etcd: %s failed; trying %s", member.target, self.member().target)

    async def close(self) -> None:
        await self._keepalive.close()
        for m in self._members:
            await m.channel.close()

    # ---- unary calls --------------------------------------------------------

    async def _call(
        self, pick: Any, request: Any, *, repeat: bool, where: str, within: float | None = None
    ) -> Any:
        """Call ``pick(member)(request)``; on a transient failure move to the
        next member and, when ``repeat`` (the request is safe to send twice),
        try again until ``within`` seconds (default: this client's timeout)
        have passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if within is None else within)
        delay = 0.05
        while True:
            member = self.member()
            left = deadline - loop.time()
            try:
                return await pick(member)(request, timeout=max(0.05, min(ATTEMPT_S, left)))
            except grpc.aio.AioRpcError as exc:
                err = error(exc, f"{member.target} {where}")
                if not err.transient:
                    raise err from None
                self.failed(member)
                if not repeat or loop.time() + delay >= deadline:
                    raise err from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def range(
        self,
        key: bytes,
        end: bytes = b"",
        *,
        revision: int = 0,
        limit: int = 0,
        count_only: bool = False,
    ) -> epb.RangeResponse:
        request = epb.RangeRequest(
            key=key, range_end=end, revision=revision, limit=limit, count_only=count_only
        )
        return await self._call(lambda m: m.kv.Range, request, repeat=True, where="range")

    async def txn(
        self,
        compare: Sequence[epb.Compare] = (),
        success: Sequence[epb.RequestOp] = (),
        failure: Sequence[epb.RequestOp] = (),
        *,
        repeat: bool = False,
        within: float | None = None,
    ) -> epb.TxnResponse:
        """One transaction. ``repeat`` only when applying it twice is the same
        as once (a read, or a write fenced so that a second try fails)."""
        request = epb.TxnRequest(compare=compare, success=success, failure=failure)
        return await self._call(
            lambda m: m.kv.Txn, request, repeat=repeat, where="txn", within=within
        )

    async def compact(self, revision: int) -> None:
        await self._call(
            lambda m: m.kv.Compact,
            epb.CompactionRequest(revision=revision),
            repeat=True,
            where="compact",
        )

    async def grant(self, ttl_s: int) -> tuple[int, int]:
        """A new lease: (id, the TTL etcd granted, in seconds)."""
        # Repeating is harmless: a lease granted by a lost attempt expires.
        r = await self._call(
            lambda m: m.lease.LeaseGrant,
            epb.LeaseGrantRequest(TTL=ttl_s),
            repeat=True,
            where="lease grant",
        )
        if r.error:
            raise Unavailable(f"etcd: lease grant: {r.error}")
        return r.ID, r.TTL

    async def revoke(self, lease_id: int, *, repeat: bool = False) -> int:
        """End a lease and its keys; the revision after (NotFound: gone).
        With ``repeat``, a try whose answer was lost is sent again (and may
        then answer NotFound)."""
        r = await self._call(
            lambda m: m.lease.LeaseRevoke,
            epb.LeaseRevokeRequest(ID=lease_id),
            repeat=repeat,
            where="lease revoke",
        )
        return r.header.revision

    async def time_to_live(self, lease_id: int) -> int:
        """Seconds left; -1 when the lease is gone."""
        r = await self._call(
            lambda m: m.lease.LeaseTimeToLive,
            epb.LeaseTimeToLiveRequest(ID=lease_id),
            repeat=True,
            where="lease ttl",
        )
        return r.TTL

    async def keepalive(self, lease_id: int) -> int:
        """Renew a lease; seconds left, 0 when it is gone."""
        return await self._keepalive.renew(lease_id)

    # ---- watch --------------------------------------------------------------

    async def watch(
        self, key: bytes, end: bytes, *, start_revision: int, prev_kv: bool = False
    ) -> AsyncIterator[list[epb.Event]]:
        """The events of [key, end) from ``start_revision`` on (with each
        change's previous value when ``prev_kv``), whole revisions at a time;
        the first, empty, says the watch is set up.

        etcd splits an answer too big for one message into fragments; they
        are put back together here. Raises Compacted when the history asked
        for is gone, Unavailable when the stream breaks (the next watch goes
        to the next member)."""
        member = self.member()
        call = member.watch.Watch(metadata=REQUIRE_LEADER)
        create = epb.WatchCreateRequest(
            key=key, range_end=end, start_revision=start_revision, prev_kv=prev_kv, fragment=True
        )
        reading: asyncio.Future[Any] | None = None
        try:
            await call.write(epb.WatchRequest(create_request=create))
            pieces: list[epb.Event] = []
            asked = False  # for a progress report, and heard nothing since
            while True:
                # Not a timeout on the read itself: cancelling a read cancels the call.
                reading = reading or asyncio.ensure_future(call.read())
                done, _ = await asyncio.wait({reading}, timeout=WATCH_IDLE_S)
                if not done:
                    # A quiet prefix, or a member that stopped answering (a
                    # frozen or cut-off machine: the connection may stay up).
                    if asked:
                        raise Unavailable(f"etcd {member.target}: watch stream silent")
                    async with asyncio.timeout(ATTEMPT_S):
                        await call.write(epb.WatchRequest(progress_request=PROGRESS))
                    asked = True
                    continue
                r, reading, asked = reading.result(), None, False
                if r is grpc.aio.EOF:
                    break
                if r.compact_revision:
                    raise Compacted(r.compact_revision)
                if r.canceled:
                    raise Unavailable(f"etcd {member.target}: watch canceled: {r.cancel_reason}")
                pieces.extend(r.events)
                if r.fragment:
                    continue
                events, pieces = pieces, []
                yield events
        except grpc.aio.AioRpcError as exc:
            self.failed(member)
            raise error(exc, f"{member.target} watch") from None
        except TimeoutError:
            self.failed(member)
            raise Unavailable(f"etcd {member.target}: watch stream stuck") from None
        except Unavailable:
            self.failed(member)
            raise
        finally:
            call.cancel()
            if reading is not None:
                reading.cancel()
        self.failed(member)
        raise Unavailable(f"etcd {member.target}: watch stream ended")


class _KeepAlives:
    """One LeaseKeepAlive stream shared by every lease this process renews.

    etcd answers each request with one response naming the lease; renewals of
    one lease asked for while one is already on its way share its answer.
    Requests go out through one writer task: a grpc stream takes one write at
    a time, and a renewal cancelled mid-write would cancel the whole stream.
    """

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        self._call: Any = None
        self._member: _Member | None = None
        self._outbox: asyncio.Queue[int] = asyncio.Queue()
        self._tasks: tuple[asyncio.Task[None], ...] = ()
        self._waiting: dict[int, list[asyncio.Future[int]]] = {}
        self._answered = 0.0  # when the stream last answered anything

    async def renew(self, lease_id: int) -> int:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        joined = lease_id in self._waiting
        self._waiting.setdefault(lease_id, []).append(fut)
        try:
            if not joined:
                self._open()
                self._outbox.put_nowait(lease_id)
            async with asyncio.timeout(ATTEMPT_S):
                return await fut
        except TimeoutError:
            err = Unavailable(f"etcd {self._where()}: keepalive timed out")
            # One slow answer fails its own renewal; a stream silent for
            # everyone is given up, and the next goes to another member.
            if loop.time() - self._answered >= ATTEMPT_S:
                self._broken(err)
            raise err from None
        finally:
            waiting = self._waiting.get(lease_id)
            if waiting is not None and fut in waiting:
                waiting.remove(fut)
                if not waiting:
                    del self._waiting[lease_id]

    def _where(self) -> str:
        return self._member.target if self._member is not None else str(self.etcd)

    def _open(self) -> None:
        if self._call is not None:
            return
        self._answered = asyncio.get_running_loop().time()
        self._member = self.etcd.member()
        self._call = call = self._member.lease.LeaseKeepAlive(metadata=REQUIRE_LEADER)
        self._outbox = asyncio.Queue()
        self._tasks = (
            asyncio.create_task(self._write(call, self._outbox), name="etcd-keepalive-write"),
            asyncio.create_task(self._read(call), name="etcd-keepalive-read"),
        )

    async def _write(self, call: Any, outbox: asyncio.Queue[int]) -> None:
        try:
            while True:
                await call.write(epb.LeaseKeepAliveRequest(ID=await outbox.get()))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            if call is self._call:
                self._broken(Unavailable(f"etcd {self._where()}: keepalive stream: {exc}"))

    async def _read(self, call: Any) -> None:
        try:
            async for r in call:
                self._answered = asyncio.get_running_loop().time()
                for fut in self._waiting.pop(r.ID, []):
                    if not fut.done():
                        fut.set_result(max(r.TTL, 0))
            err: GeryonError = Unavailable(f"etcd {self._where()}: keepalive stream ended")
        except grpc.aio.AioRpcError as exc:
            err = error(exc, f"{self._where()} keepalive")
        if call is self._call:
            self._broken(err)

    def _broken(self, err: GeryonError) -> None:
        """The stream failed: fail whoever waits, reopen on the next member."""
        if self._member is not None:
            self.etcd.failed(self._member)
        self._stop()
        waiting, self._waiting = self._waiting, {}
        for futs in waiting.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(err)

    def _stop(self) -> None:
        if self._call is not None:
            self._call.cancel()
        me = asyncio.current_task()
        for task in self._tasks:
            if task is not me:
                task.cancel()
        self._call = self._member = None
        self._tasks = ()

    async def close(self) -> None:
        tasks = self._tasks
        self._stop()
        await asyncio.gather(*tasks, return_exceptions=True)
