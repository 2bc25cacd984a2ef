"""The asyncio client every other part of Geryon uses (CLI, agent, reconciler).

It hides the stubs: callers get model objects and geryon.errors exceptions,
never grpc types. Transient failures (UNAVAILABLE, DEADLINE_EXCEEDED,
CANCELLED) are retried with exponential backoff and jitter; terminal ones are
raised at once.

A registry may have several endpoints (fronts over one etcd cluster,
``A:P,B:P``): the client uses the first, and moves to the next whenever one
fails with a transient error or leaves it unanswered too long (a call's
attempt, a watch's first answer, a keepalive's renewal); calls are retried
there within their one deadline, and the streams below resume there.

Two long-lived helpers carry the registry's streaming contracts:
- ``Lease`` keeps a lease alive in the background across registry restarts
  and says explicitly (``lost``) when the registry declares it gone.
- ``Watch`` is List+Watch: it resumes from its last revision after the stream
  breaks, and re-lists (yielding a fresh snapshot to replace the caller's
  state) when the history it needs was compacted away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import grpc
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_before_delay,
    wait_exponential_jitter,
)

from geryon import endpoints, errors
from geryon.convert import RESUME_KEY, event_from_pb, pb, pb_grpc, service_from_pb
from geryon.model import Event, LeaseID, Registration, Revision, Service

log = logging.getLogger("geryon.client")

T = TypeVar("T")
DEFAULT_REGISTRY = "127.0.0.1:6675"
# With several endpoints, one attempt at one of them (a call, or a watch's
# first answer): a front that accepts and never answers must cost this, not
# the call's whole deadline. Each pass over the endpoints doubles it, so an
# answer that is merely slow (a large Find) still gets through. Longer than a
# front over etcd needs to ride out an etcd leader's death (its own 1 s
# attempt at the dead member, then an election): leaving it sooner restarts
# the write elsewhere (measured: 2.2 s to the next ack at 1 s, 1.3 s at 2.5 s).
ATTEMPT_S = 2.5


def error_from_rpc(exc: grpc.aio.AioRpcError) -> errors.GeryonError:
    """Map a gRPC status back to the domain error it stands for."""
    cls = errors.BY_CODE.get(exc.code().name, errors.Internal)
    if exc.code() == grpc.StatusCode.UNKNOWN and (exc.details() or "").startswith("Stream removed"):
        # grpc's word for a connection lost under a call (a server killed).
        cls = errors.Unavailable
    resume = 0
    for key, value in exc.trailing_metadata() or ():
        if key == RESUME_KEY:
            with contextlib.suppress(ValueError):
                resume = int(value)
    details = exc.details() or exc.code().name.lower()
    return cls(details, resume_revision=resume)


def build(kind: type, **fields: object) -> object:
    """A request message, or InvalidArgument for what protobuf cannot carry
    (text that is not UTF-8, a number beyond int64)."""
    try:
        return kind(**fields)
    except (ValueError, TypeError) as exc:
        raise errors.InvalidArgument(f"{kind.__name__}: {exc}") from None


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, errors.GeryonError) and exc.transient


class Backoff:
    """Exponential backoff with equal jitter: each delay is drawn from
    [cap/2, cap], the cap doubling from ``initial`` up to ``maximum``."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = min(initial, maximum)
        self.maximum = maximum
        self.attempt = 0

    def next(self) -> float:
        cap = min(self.maximum, self.initial * 2**self.attempt)
        self.attempt += 1
        return cap / 2 + random.uniform(0, cap / 2)

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    id: LeaseID
    ttl_ms: int
    remaining_ms: int
    owner: str
    services: int


@dataclass(frozen=True, slots=True)
class WatchMessage:
    """What a Watch yields.

    - ``snapshot``: ``services`` is the whole matching state as of
      ``revision``; replace what you had (sent first when asked for, and after
      a re-list).
    - ``events``: changes of whole revisions, in order, up to ``revision``.
    - ``progress``: nothing changed for you up to ``revision``.
    """

    kind: Literal["snapshot", "events", "progress"]
    revision: Revision
    events: list[Event] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)


class Client:
    """A connection to one registry, at any of its endpoints.

    ``target`` is ``HOST:PORT[,HOST:PORT...]`` or ``unix:PATH`` (default
    $GERYON_REGISTRY). ``retry_for`` bounds how long a call keeps retrying
    transient failures before it raises them.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        tls_dir: Path | str | None = None,
        user: str | None = None,
        retry_for: float = 10.0,
        own_connection: bool = False,
    ) -> None:
        self.target = target or os.environ.get("GERYON_REGISTRY") or DEFAULT_REGISTRY
        self.targets = endpoints.split(self.target) or [self.target]
        if tls_dir is None:
            tls_dir = os.environ.get("GERYON_TLS_DIR")
        self.tls_dir = Path(tls_dir) if tls_dir else None  # "" forces plain text
        self.retry_for = retry_for
        user = user or os.environ.get("GERYON_USER")
        self.metadata: tuple[tuple[str, str], ...] = (("geryon-user", user),) if user else ()
        options = [
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # Reconnect quickly when a registry restarts.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ]
        if own_connection:
            # grpc shares one TCP connection between channels to one address
            # unless each channel keeps its own subchannel pool.
            options.append(("grpc.use_local_subchannel_pool", 1))
        self._options = options
        self._credentials: grpc.ChannelCredentials | None = None
        if self.tls_dir is not None:
            from geryon import tls

            self._credentials = tls.channel_credentials(self.tls_dir)
        # Per endpoint, made when first used: its channel and a stub on it
        # (a stub costs more to make than a call's own overhead).
        self._channels: dict[int, tuple[grpc.aio.Channel, pb_grpc.RegistryStub]] = {}
        self._current = 0

    def endpoint(self) -> tuple[int, pb_grpc.RegistryStub]:
        """The endpoint in use: (its index, a stub on it)."""
        i = self._current
        return i, self._connect(i)[1]

    def _connect(self, i: int) -> tuple[grpc.aio.Channel, pb_grpc.RegistryStub]:
        pair = self._channels.get(i)
        if pair is None:
            target = self.targets[i]
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(target, self._credentials, options=self._options)
            else:
                channel = grpc.aio.insecure_channel(target, options=self._options)
            pair = self._channels[i] = (channel, pb_grpc.RegistryStub(channel))
        return pair

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel to the endpoint in use."""
        return self._connect(self._current)[0]

    @property
    def stub(self) -> pb_grpc.RegistryStub:
        """A stub on the endpoint in use (no retries, no failover)."""
        return self.endpoint()[1]

    def failed(self, i: int, exc: BaseException) -> None:
        """Endpoint ``i`` failed with ``exc``: after a transient failure the
        next call goes to the next endpoint."""
        if (
            len(self.targets) > 1
            and i == self._current
            and isinstance(exc, errors.GeryonError)
            and exc.transient
        ):
            self._current = (i + 1) % len(self.targets)
            log.info(
                "registry %s: %s; trying %s", self.targets[i], exc, self.targets[self._current]
            )

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for channel, _ in self._channels.values():
            await channel.close()
        self._channels.clear()

    # ---- plumbing -----------------------------------------------------------

    async def _once(self, method: str, request: object, within: float) -> T:
        i, stub = self.endpoint()
        call: Callable[..., Awaitable[T]] = getattr(stub, method)
        try:
            return await call(request, metadata=self.metadata, timeout=within)
        except grpc.aio.AioRpcError as exc:
            err = error_from_rpc(exc)
            self.failed(i, err)
            raise err from exc

    async def _call(self, method: str, kind: type, **fields: object) -> T:
        return await self._send(method, build(kind, **fields))

    async def _send(self, method: str, request: object) -> T:
        """Send ``request``, retrying transient failures until the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_for  # for the first try and every retry
        many, tries = len(self.targets), 0

        def within() -> float:
            nonlocal tries
            left = deadline - loop.time()
            if many > 1:  # an attempt that runs out moves us to the next endpoint
                left = min(left, ATTEMPT_S * 2 ** (tries // many))
            tries += 1
            return max(left, 0.05)

        # The first try runs outside tenacity: its per-call machinery would
        # cost more than the RPC itself on the common, successful path.
        try:
            return await self._once(method, request, within())
        except errors.GeryonError as exc:
            if not exc.transient:
                raise
            first = exc
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_transient),
                wait=wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.2),
                stop=stop_before_delay(max(deadline - loop.time(), 0)),
                reraise=True,
            ):
                with attempt:
                    return await self._once(method, request, within())
        except errors.DeadlineExceeded:
            # A last try cut short by our own deadline says less than what
            # the registry answered before (UNAVAILABLE: and why).
            if isinstance(first, errors.DeadlineExceeded):
                raise
            raise first from None
        raise AssertionError("unreachable")

    # ---- services -----------------------------------------------------------

    async def register(
        self,
        name: str,
        attrs: Mapping[str, str] | None = None,
        *,
        lease: LeaseID = 0,
        persist: bool = False,
        create_only: bool = False,
    ) -> Service:
        # With create_only, a retry after a lost reply may find the entry its
        # first try made: FailedPrecondition then means "re-read", as any fence.
        r = await self._call(
            "Register",
            pb.RegisterRequest,
            name=name,
            attrs=attrs or {},
            lease=lease,
            persist=persist,
            create_only=create_only,
        )
        return service_from_pb(r.service)

    async def register_batch(self, services: Iterable[Registration]) -> list[Service]:
        """Register every one of ``services`` (at most 100) in one revision,
        or none: a refusal names each refused entry by index and name.
        Return them as stored (``owner`` is left empty: the registry does not
        send back what the caller is)."""
        services = list(services)
        request = build(
            pb.RegisterBatchRequest,
            services=[build(pb.RegisterRequest, **r._asdict()) for r in services],
        )
        r = await self._send("RegisterBatch", request)
        return [
            Service(s.name, dict(s.attrs), s.lease, "", create, mod)
            for s, create, mod in zip(services, r.create_revisions, r.mod_revisions, strict=True)
        ]

    async def update(
        self,
        name: str,
        set_attrs: Mapping[str, str] | None = None,
        *,
        remove_attrs: Iterable[str] = (),
        expected_mod_revision: Revision = 0,
    ) -> Service:
        r = await self._call(
            "Update",
            pb.UpdateRequest,
            name=name,
            set_attrs=set_attrs or {},
            remove_attrs=list(remove_attrs),
            expected_mod_revision=expected_mod_revision,
        )
        return service_from_pb(r.service)

    async def unregister(self, name: str, *, expected_mod_revision: Revision = 0) -> Service:
        r = await self._call(
            "Unregister",
            pb.UnregisterRequest,
            name=name,
            expected_mod_revision=expected_mod_revision,
        )
        return service_from_pb(r.service)

    async def get(self, name: str) -> Service:
        r = await self._call("Get", pb.GetRequest, name=name)
        return service_from_pb(r.service)

    async def find(
        self, attrs: Mapping[str, str] | None = None, *, prefix: str = ""
    ) -> tuple[list[Service], Revision]:
        """Services matching every attr (``*`` any value) and the prefix,
        sorted by name, with the revision they were read at."""
        r = await self._call("Find", pb.FindRequest, attrs=attrs or {}, prefix=prefix)
        return [service_from_pb(s) for s in r.services], r.header.revision

    # ---- leases -------------------------------------------------------------

    async def grant(self, ttl_ms: int) -> LeaseID:
        r = await self._call("Grant", pb.GrantRequest, ttl_ms=ttl_ms)
        return r.lease

    async def revoke(self, lease: LeaseID) -> int:
        r = await self._call("Revoke", pb.RevokeRequest, lease=lease)
        return r.deleted

    async def leases(self) -> list[LeaseInfo]:
        r = await self._call("Leases", pb.LeasesRequest)
        return [LeaseInfo(x.lease, x.ttl_ms, x.remaining_ms, x.owner, x.services) for x in r.leases]

    def lease(self, ttl_ms: int = 5000) -> Lease:
        """A lease kept alive in the background: ``async with client.lease() as l``."""
        return Lease(self, ttl_ms)

    # ---- watch --------------------------------------------------------------

    def watch(
        self,
        attrs: Mapping[str, str] | None = None,
        *,
        prefix: str = "",
        start_revision: Revision = 0,
        snapshot: bool = False,
        progress_interval_ms: int = 0,
    ) -> Watch:
        return Watch(
            self,
            dict(attrs or {}),
            prefix,
            start_revision=start_revision,
            snapshot=snapshot,
            progress_interval_ms=progress_interval_ms,
        )


class Lease:
    """A lease that keeps itself alive.

    ``lost`` is set when the registry says the lease is gone (it expired, was
    revoked, or the registry lost it); the owner must then grant a new one and
    re-register. A registry that is merely unreachable is not a lost lease:
    the keepalive reconnects with backoff (a restarted SQLite registry gives
    the lease a fresh TTL; with etcd the lease lives by its TTL meanwhile),
    and with several endpoints it moves to the next one as soon as the one in
    use fails or stops answering.
    """

    def __init__(self, client: Client, ttl_ms: int) -> None:
        self.client = client
        self.ttl_ms = ttl_ms
        self.id: LeaseID = 0
        self.lost = asyncio.Event()
        self.connected = asyncio.Event()
        # How often the keepalive stream broke after working, and an event set
        # on every change of connected/breaks/lost: a watcher of the lease
        # misses no outage, however short.
        self.breaks = 0
        self.changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Lease:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close(revoke=True)

    async def start(self, lease_id: LeaseID = 0) -> None:
        """Grant a lease (or adopt ``lease_id``) and start keeping it alive."""
        self.id = lease_id or await self.client.grant(self.ttl_ms)
        self.lost.clear()
        self._task = asyncio.create_task(self._keep(), name=f"lease-{self.id}")
        # The first renewal makes this stream the lease's holder, so a crash
        # from here on ends the lease at once.
        connected = asyncio.ensure_future(self.connected.wait())
        try:
            await asyncio.wait(
                [connected, self._task],
                timeout=self.ttl_ms / 1000,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            connected.cancel()

    async def close(self, *, revoke: bool) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if revoke and self.id and not self.lost.is_set():
            with contextlib.suppress(errors.GeryonError):
                await self.client.revoke(self.id)

    async def _keep(self) -> None:
        backoff = Backoff(0.05, 2.0)
        interval = self.ttl_ms / 3000
        while True:
            try:
                await self._stream(interval)
                return  # lost
            except errors.GeryonError as exc:
                # Over a quota is a reason to slow down, not a lost lease.
                if not exc.transient and not isinstance(exc, errors.ResourceExhausted):
                    log.warning("lease %d: %s", self.id, exc)
                    self.lost.set()
                    self.changed.set()
                    return
            if self.connected.is_set():  # it had worked: start backing off afresh
                backoff.reset()
                self.breaks += 1
                self.changed.set()
            self.connected.clear()
            await asyncio.sleep(backoff.next())

    async def _stream(self, interval: float) -> None:
        # Writes from a task rather than a request generator: grpc closing a
        # generator that is mid-sleep makes asyncio log noise on every reconnect.
        endpoint, stub = self.client.endpoint()
        call = stub.KeepAlive(metadata=self.client.metadata)
        loop = asyncio.get_running_loop()
        answered = loop.time()
        moving = len(self.client.targets) > 1
        stalled = False

        async def renew() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                while True:
                    await call.write(pb.KeepAliveRequest(lease=self.id))
                    await asyncio.sleep(interval)

        async def watchdog() -> None:
            # A front that stopped answering (frozen, cut off) may keep its
            # connection for a minute: leave it while the lease still has
            # time to be renewed at another. (With one registry, wait for
            # it: it forgives its own stalls, and a stream we end is a
            # client gone.)
            nonlocal stalled
            while True:
                await asyncio.sleep(interval / 4)
                if loop.time() - answered > max(1.5 * interval, 1.0):
                    stalled = True
                    call.cancel()
                    return

        writer = asyncio.create_task(renew(), name=f"lease-{self.id}-renew")
        if moving:
            watcher = asyncio.create_task(watchdog(), name=f"lease-{self.id}-watchdog")
        try:
            async for response in call:
                answered = loop.time()
                if response.ttl_ms == 0:
                    log.warning("lease %d: the registry says it is gone", self.id)
                    self.lost.set()
                    self.changed.set()
                    return
                if not self.connected.is_set():
                    self.connected.set()
                    self.changed.set()
        except asyncio.CancelledError:
            # Our own watchdog's cancel, unless close() cancelled us too (maybe
            # in the same turn): that one must go through.
            task = asyncio.current_task()
            if not stalled or (task is not None and task.cancelling()):
                raise
            # renew() gave up on the front: move on, as from a failure.
            err = errors.Unavailable(f"registry {self.client.targets[endpoint]} stopped answering")
            self.client.failed(endpoint, err)
            raise err from None
        except grpc.aio.AioRpcError as exc:
            err = error_from_rpc(exc)
            self.client.failed(endpoint, err)
            raise err from exc
        finally:
            writer.cancel()
            if moving:
                watcher.cancel()
            call.cancel()
        err = errors.Unavailable("keepalive stream ended")
        self.client.failed(endpoint, err)
        raise err


class Watch:
    """List+Watch over one filter; iterate it for WatchMessages."""

    def __init__(
        self,
        client: Client,
        attrs: dict[str, str],
        prefix: str,
        *,
        start_revision: Revision,
        snapshot: bool,
        progress_interval_ms: int,
    ) -> None:
        self.client = client
        self.attrs = attrs
        self.prefix = prefix
        self.progress_interval_ms = progress_interval_ms
        self.want_snapshot = snapshot
        # The next revision this watcher needs; 0 before the first message.
        self.next_revision = start_revision
        self._requests: asyncio.Queue[pb.WatchRequest | None] = asyncio.Queue()
        self._call: grpc.aio.StreamStreamCall | None = None
        self._closed = False
        # First answers waited for in vain in a row (see _once).
        self._stalls = 0

    def request_progress(self) -> None:
        self._requests.put_nowait(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))

    async def close(self) -> None:
        self._closed = True
        if self._call is not None:
            self._call.cancel()

    def __aiter__(self) -> AsyncIterator[WatchMessage]:
        return self._run()

    async def _run(self) -> AsyncIterator[WatchMessage]:
        backoff = Backoff(0.05, 2.0)
        while not self._closed:
            snapshot = self.want_snapshot
            try:
                async for message in self._once(snapshot):
                    backoff.reset()
                    yield message
                if self._closed:
                    return
                raise errors.Unavailable("watch stream ended")
            except errors.OutOfRange as exc:
                log.info("watch: %s; re-listing", exc)
                self.want_snapshot = True
                self.next_revision = 0
                continue
            except errors.ResourceExhausted as exc:
                if not exc.resume_revision:
                    raise
                log.info("watch: %s", exc)
            except errors.GeryonError as exc:
                if not exc.transient:
                    raise
            await asyncio.sleep(backoff.next())

    async def _once(self, snapshot: bool) -> AsyncIterator[WatchMessage]:
        create = build(
            pb.WatchCreateRequest,
            attrs=self.attrs,
            prefix=self.prefix,
            start_revision=0 if snapshot else self.next_revision,
            snapshot=snapshot,
            progress_interval_ms=self.progress_interval_ms,
        )
        requests = self._requests
        many = len(self.client.targets)

        endpoint, stub = self.client.endpoint()
        call = stub.Watch(metadata=self.client.metadata)
        self._call = call

        async def send() -> None:  # a task, not a request generator (see Lease)
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.write(pb.WatchRequest(create_request=create))
                if many > 1:
                    # A live front answers this at once, even a watch resumed
                    # where nothing has happened since: silence is a stall.
                    await call.write(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))
                while (request := await requests.get()) is not None:
                    await call.write(request)

        listed: list[Service] = []

        def message(r: pb.WatchResponse) -> WatchMessage | None:
            if r.type == pb.WatchResponse.TYPE_SNAPSHOT:
                listed.extend(service_from_pb(e.service) for e in r.events)
                return None
            if r.type == pb.WatchResponse.TYPE_SNAPSHOT_COMPLETE:
                self.want_snapshot = False
                self.next_revision = r.revision + 1
                services = listed.copy()
                listed.clear()
                return WatchMessage("snapshot", r.revision, services=services)
            if r.type == pb.WatchResponse.TYPE_PROGRESS:
                self.next_revision = r.revision + 1
                return WatchMessage("progress", r.revision)
            events = [event_from_pb(e) for e in r.events]
            if not events:
                return None
            self.next_revision = events[-1].revision + 1
            return WatchMessage("events", events[-1].revision, events=events)

        writer = asyncio.create_task(send(), name="watch-requests")
        responses = aiter(call)
        try:
            if many > 1:
                # A front that accepts and never answers (frozen, half cut
                # off) would hold the watch for good: give up on it after an
                # attempt's time, and resume at the next from next_revision.
                try:
                    async with asyncio.timeout(ATTEMPT_S * 2 ** (self._stalls // many)):
                        first = await anext(responses, None)
                except TimeoutError:
                    self._stalls += 1
                    err = errors.Unavailable(
                        f"registry {self.client.targets[endpoint]} did not answer the watch"
                    )
                    self.client.failed(endpoint, err)
                    raise err from None
                self._stalls = 0
                if first is not None and (m := message(first)) is not None:
                    yield m
            async for r in responses:
                if (m := message(r)) is not None:
                    yield m
            if not self._closed:  # ended by the registry without a status
                self.client.failed(endpoint, errors.Unavailable("watch stream ended"))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and self._closed:
                return
            err = error_from_rpc(exc)
            self.client.failed(endpoint, err)
            raise err from exc
        finally:
            writer.cancel()
            call.cancel()
            self._call = None
