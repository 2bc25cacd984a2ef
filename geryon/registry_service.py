"""The Registry gRPC servicer: plumbing over the store, the lease keeper and
the watch hub.

Each method checks its request, calls the domain, maps a domain error to a
status code (the one table: ``GeryonError.code``) and converts the answer.
Nothing here decides what the registry means; that lives in the store and
watch.py, which are tested without a network, and the servicer does not know
which store backend runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from geryon.convert import (
    RESUME_KEY,
    attrs_from_pb,
    event_to_pb,
    header,
    pb,
    pb_grpc,
    service_to_pb,
    snapshot_response,
)
from geryon.errors import (
    GeryonError,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from geryon.fair import FairQueue
from geryon.model import Caller, Event, Filter, Registration, Revision, validate_filter
from geryon.quota import Quota
from geryon.store import Store, Written
from geryon.watch import Hub, Watcher

log = logging.getLogger("geryon.registryd")

T = TypeVar("T")
Authenticate = Callable[[grpc.aio.ServicerContext], Caller]

DEFAULT_PROGRESS_S = 10.0
MAX_EVENTS_PER_MESSAGE = 1000
# How long a write over its identity's quota may wait for its token before
# it is refused.
QUOTA_WAIT_S = 1.0
SNAPSHOT_CHUNK = 1000

# Who may do what, beyond ownership (which the store checks). Deny by default.
WRITERS = frozenset({"admin", "node"})


# A connection sends the same metadata with every call: its Caller is made
# once, not per request (a Caller is immutable; a caller whose metadata
# changes per call only misses the cache).
_plain_text = functools.lru_cache(maxsize=4096)(Caller.plain_text)


def plaintext_caller(context: grpc.aio.ServicerContext) -> Caller:
    """Without TLS every caller is a local admin (Caller.plain_text)."""
    return _plain_text(context.invocation_metadata(), context.peer())


def local_admin_on_unix(authenticate: Authenticate, name: str) -> Authenticate:
    """Callers on a unix socket are the local admin ``name``; others go to
    ``authenticate``. Only for registryd's private socket, in a 0700 data dir
    that nobody but the daemon's own user (its in-process reconciler) reaches."""

    def local_or(context: grpc.aio.ServicerContext) -> Caller:
        # gRPC names a unix-socket peer "unix:PATH" (TCP peers are ipv4:/ipv6:).
        if context.peer().startswith("unix:"):
            return Caller(name, "admin")
        return authenticate(context)

    return local_or


def expire_with_certificate(
    caller: Caller, end: Callable[[GeryonError], None]
) -> asyncio.TimerHandle | None:
    """End a stream with UNAUTHENTICATED when its caller's certificate
    expires: the handshake checked it once, and a stream can outlive it."""
    left = caller.expires_in(time.time())
    if left is None:
        return None
    expired = Unauthenticated(f"{caller.name}: certificate expired")
    return asyncio.get_running_loop().call_later(left, end, expired)


async def _abort(context: grpc.aio.ServicerContext, exc: GeryonError) -> None:
    if exc.resume_revision:
        context.set_trailing_metadata(((RESUME_KEY, str(exc.resume_revision)),))
    await context.abort(grpc.StatusCode[exc.code], exc.message)


class RegistryService(pb_grpc.RegistryServicer):
    def __init__(
        self,
        store: Store,
        hub: Hub,
        *,
        authenticate: Authenticate = plaintext_caller,
        progress_interval: float = DEFAULT_PROGRESS_S,
        max_watches_per_caller: int = 1000,
        writes: Quota | None = None,
        fair: FairQueue | None = None,
        keepalive_rate: float = 0,
    ) -> None:
        self.store = store
        self.hub = hub
        self.authenticate = authenticate
        self.progress_interval = progress_interval
        self.max_watches = max_watches_per_caller
        self.writes = writes or Quota(0)
        self.fair = fair or FairQueue()
        self.keepalive_rate = keepalive_rate
        # Open streams by caller, so a newly denied identity can be cut off.
        self._wire_cache: dict[int, tuple[Event, pb.Event]] = {}
        self._message_cache: dict[tuple[int, ...], tuple[list[Event], bytes]] = {}
        self.streams: dict[object, tuple[Caller, Callable[[GeryonError], None]]] = {}
        self._releases: set[asyncio.Task[None]] = set()
        # Cleared while the store loads: only Get and Find are answered
        # then, every other call waits (registryd sets it once the state is in memory).
        self.serving = asyncio.Event()
        self.serving.set()
        # Set before the server stops, so streams it ends do not look like
        # clients that went away (which would end their leases).
        self.stopping = False

    async def _call(
        self,
        context: grpc.aio.ServicerContext,
        fn: Callable[[Caller], Awaitable[T]],
        *,
        early: bool = False,
    ) -> T:
        """Run ``fn`` for the caller once the registry serves (``early``: at
        once, for what the store answers while it loads)."""
        try:
            caller = self.authenticate(context)
            if not early:
                await self.serving.wait()
            return await fn(caller)
        except GeryonError as exc:
            await _abort(context, exc)
        except Exception:
            log.exception("registryd: internal error")
            await context.abort(grpc.StatusCode.INTERNAL, "registryd: internal error")
        raise AssertionError("unreachable")  # abort always raises

    def _may_write(self, caller: Caller, what: str) -> None:
        if caller.role not in WRITERS:
            raise PermissionDenied(f"{caller.role} {caller.name} may not {what}")

    async def _mutated(
        self,
        caller: Caller,
        what: str,
        target: object,
        write: Callable[[], Awaitable[Written[T]]],
        cost: int = 1,
    ) -> Written[T]:
        """Run ``write()`` once its identity's quota (``cost`` writes) and
        turn allow."""
        who = caller.limited_as
        wait = self.writes.take(who, what, max_wait=QUOTA_WAIT_S, cost=cost)
        if wait:
            await asyncio.sleep(wait)
        flow = self.fair.enter(who) or await self.fair.wait(who, what)
        try:
            written = await write()
        finally:
            self.fair.done(who, flow)
        # DEBUG, not INFO: at thousands of writes a second the log line would
        # cost more than the write's own work.
        log.debug("registryd: %s %s by %s %s", what, target, caller.role, caller.name)
        return written

    # ---- services -----------------------------------------------------------

    async def Register(self, request: pb.RegisterRequest, context: Any) -> pb.RegisterResponse:
        async def do(caller: Caller) -> pb.RegisterResponse:
            self._may_write(caller, "register")
            if request.persist and not caller.admin:
                raise PermissionDenied(
                    f"{caller.role} {caller.name} may not create persistent entries"
                )
            # A no-op (the same entry again) makes no revision: its header is
            # the revision it was decided at, not the entry's older mod_revision.
            s, revision = await self._mutated(
                caller,
                "register",
                request.name,
                lambda: self.store.register(
                    request.name,
                    attrs_from_pb(request.attrs),
                    lease=request.lease,
                    persist=request.persist,
                    caller=caller,
                    create_only=request.create_only,
                ),
            )
            return pb.RegisterResponse(header=header(revision), service=service_to_pb(s))

        return await self._call(context, do)

    async def RegisterBatch(
        self, request: pb.RegisterBatchRequest, context: Any
    ) -> pb.RegisterBatchResponse:
        async def do(caller: Caller) -> pb.RegisterBatchResponse:
            self._may_write(caller, "register")
            if not caller.admin and any(r.persist for r in request.services):
                raise PermissionDenied(
                    f"{caller.role} {caller.name} may not create persistent entries"
                )
            batch = [
                Registration(r.name, attrs_from_pb(r.attrs), r.lease, r.persist, r.create_only)
                for r in request.services
            ]
            services, revision = await self._mutated(
                caller,
                "register",
                f"{len(batch)} services",
                lambda: self.store.register_batch(batch, caller=caller),
                cost=len(batch),
            )
            return pb.RegisterBatchResponse(
                header=header(revision),
                create_revisions=[s.create_revision for s in services],
                mod_revisions=[s.mod_revision for s in services],
            )

        return await self._call(context, do)

    async def Update(self, request: pb.UpdateRequest, context: Any) -> pb.UpdateResponse:
        async def do(caller: Caller) -> pb.UpdateResponse:
            self._may_write(caller, "update")
            s, revision = await self._mutated(
                caller,
                "update",
                request.name,
                lambda: self.store.update(
                    request.name,
                    attrs_from_pb(request.set_attrs),
                    request.remove_attrs,
                    expected_mod_revision=request.expected_mod_revision,
                    caller=caller,
                ),
            )
            return pb.UpdateResponse(header=header(revision), service=service_to_pb(s))

        return await self._call(context, do)

    async def Unregister(
        self, request: pb.UnregisterRequest, context: Any
    ) -> pb.UnregisterResponse:
        async def do(caller: Caller) -> pb.UnregisterResponse:
            self._may_write(caller, "unregister")
            s, revision = await self._mutated(
                caller,
                "unregister",
                request.name,
                lambda: self.store.unregister(
                    request.name,
                    expected_mod_revision=request.expected_mod_revision,
                    caller=caller,
                ),
            )
            # The header is the revision that removed it.
            return pb.UnregisterResponse(header=header(revision), service=service_to_pb(s))

        return await self._call(context, do)

    async def Get(self, request: pb.GetRequest, context: Any) -> pb.GetResponse:
        async def do(caller: Caller) -> pb.GetResponse:
            s, revision = await self.store.lookup(request.name)
            return pb.GetResponse(header=header(revision), service=service_to_pb(s))

        return await self._call(context, do, early=True)

    async def Find(self, request: pb.FindRequest, context: Any) -> pb.FindResponse:
        async def do(caller: Caller) -> pb.FindResponse:
            flt = validate_filter(request.attrs, request.prefix)
            found, revision = await self.store.search(flt)
            return pb.FindResponse(
                header=header(revision), services=[service_to_pb(s) for s in found]
            )

        return await self._call(context, do, early=True)

    # ---- leases -------------------------------------------------------------

    async def Grant(self, request: pb.GrantRequest, context: Any) -> pb.GrantResponse:
        async def do(caller: Caller) -> pb.GrantResponse:
            self._may_write(caller, "grant leases")
            lease, _ = await self._mutated(
                caller,
                "grant lease with ttl_ms",
                request.ttl_ms,
                lambda: self.store.grant(request.ttl_ms, caller=caller),
            )
            return pb.GrantResponse(
                header=header(self.store.durable_revision), lease=lease.id, ttl_ms=lease.ttl_ms
            )

        return await self._call(context, do)

    async def Revoke(self, request: pb.RevokeRequest, context: Any) -> pb.RevokeResponse:
        async def do(caller: Caller) -> pb.RevokeResponse:
            self._may_write(caller, "revoke leases")
            deleted, revision = await self._mutated(
                caller,
                "revoke lease",
                request.lease,
                lambda: self.store.revoke(request.lease, caller=caller),
            )
            # The header is the revision that deleted its services.
            return pb.RevokeResponse(header=header(revision), deleted=deleted)

        return await self._call(context, do)

    async def Leases(self, request: pb.LeasesRequest, context: Any) -> pb.LeasesResponse:
        async def do(caller: Caller) -> pb.LeasesResponse:
            leases, revision = await self.store.read(
                lambda: [(lease, len(lease.services)) for lease in self.store.lease_list(caller)]
            )
            remaining = await self.store.remaining_ms([lease for lease, _ in leases])
            infos = [
                pb.LeaseInfo(
                    lease=lease.id,
                    ttl_ms=lease.ttl_ms,
                    remaining_ms=left,
                    owner=lease.owner,
                    services=services,
                )
                for (lease, services), left in zip(leases, remaining, strict=True)
            ]
            return pb.LeasesResponse(header=header(revision), leases=infos)

        return await self._call(context, do)

    async def KeepAlive(
        self, request_iterator: AsyncIterator[pb.KeepAliveRequest], context: Any
    ) -> AsyncIterator[pb.KeepAliveResponse]:
        # The stream holds every lease it renews; a lease renewed later on
        # another stream moves there, so only the newest holder's end counts.
        token = secrets.token_hex(8)
        held: set[int] = set()
        rate = Quota(self.keepalive_rate)  # per stream
        # The registry ends a stream (shutdown, a denied caller) through this,
        # with a status the client sees, rather than by cancelling the handler.
        ended: asyncio.Future[GeryonError] = asyncio.get_running_loop().create_future()
        expiry: asyncio.TimerHandle | None = None
        client_gone = False
        try:
            caller = self.authenticate(context)
            if caller.role not in WRITERS:
                raise PermissionDenied(f"{caller.role} {caller.name} may not keep leases alive")
            await self.serving.wait()

            def end(error: GeryonError) -> None:
                if not ended.done():
                    ended.set_result(error)

            self.streams[token] = (caller, end)
            expiry = expire_with_certificate(caller, end)
            requests = aiter(request_iterator)
            while True:
                nxt = asyncio.ensure_future(anext(requests, None))
                await asyncio.wait((nxt, ended), return_when=asyncio.FIRST_COMPLETED)
                if ended.done():
                    nxt.cancel()
                    raise ended.result()
                request = nxt.result()
                if request is None:
                    client_gone = True  # the client closed its side
                    break
                rate.take(caller.name, "keepalive")
                ttl = await self.store.keepalive(request.lease, caller=caller, holder=token)
                if ttl:
                    held.add(request.lease)
                yield pb.KeepAliveResponse(
                    header=header(self.store.durable_revision), lease=request.lease, ttl_ms=ttl
                )
        except (asyncio.CancelledError, GeneratorExit):
            client_gone = True  # cancelled, or its connection went away
            raise
        except GeryonError as exc:
            # Our refusal is not the client going away: its leases live on
            # until it reconnects or their TTL passes.
            await _abort(context, exc)
        finally:
            if expiry is not None:
                expiry.cancel()
            self.streams.pop(token, None)
            if client_gone and held and not self.stopping:
                # A task: this handler is being torn down, and ending a lease
                # may mean a round trip to the store.
                task = asyncio.create_task(self._release(held, token), name="lease-release")
                self._releases.add(task)
                task.add_done_callback(self._releases.discard)

    async def _release(self, held: set[int], token: str) -> None:
        """The client side of a KeepAlive stream went away: end its leases now
        (those it still holds: a lease renewed on a newer stream since lives)."""
        for lid in held:
            try:
                deleted = await self.store.release(lid, holder=token)
            except Exception as exc:  # the store failed or is out of reach: the TTL ends it
                log.warning("registryd: lease %d outlived its stream: %s", lid, exc)
                continue
            if deleted is not None:
                log.info("registryd: lease %d ended with its stream (%d services)", lid, deleted)

    # ---- watch --------------------------------------------------------------

    async def Watch(
        self, request_iterator: AsyncIterator[pb.WatchRequest], context: Any
    ) -> AsyncIterator[pb.WatchResponse | bytes]:
        watcher: Watcher | None = None
        reader: asyncio.Task[None] | None = None
        expiry: asyncio.TimerHandle | None = None
        try:
            caller = self.authenticate(context)
            await self.serving.wait()
            first = await anext(aiter(request_iterator), None)
            if first is None or not first.HasField("create_request"):
                raise InvalidArgument("watch: the first request must be a create_request")
            create = first.create_request
            flt = validate_filter(create.attrs, create.prefix)
            interval = self._progress_interval(create)
            if (why := self.store.unavailable()) is not None:
                raise Unavailable(f"registryd: {why}")
            if self.hub.count(caller.limited_as) >= self.max_watches:
                raise ResourceExhausted(
                    f"watch: {caller.limited_as} already has {self.max_watches} watches open"
                )
            snapshot: list | None = None
            if create.snapshot:
                # Taken and subscribed in one step, so no change falls between.
                def take() -> list:
                    nonlocal watcher
                    at = self.store.revision
                    watcher = self.hub.subscribe(flt, after=at, owner=caller.limited_as)
                    return self.store.find(flt)

                snapshot, revision = await self.store.read(take)
                assert watcher is not None
            else:
                watcher = self._subscribe_from(flt, create.start_revision, caller)
            self.streams[watcher] = (caller, watcher.fail)
            expiry = expire_with_certificate(caller, watcher.fail)
            progress = asyncio.Event()
            if not create.snapshot and not create.start_revision:
                # Tell the client where it starts, so it can resume from there.
                progress.set()
            reader = asyncio.create_task(self._read_progress(request_iterator, progress, watcher))
            if snapshot is not None:
                for i in range(0, len(snapshot), SNAPSHOT_CHUNK):
                    yield snapshot_response(revision, snapshot[i : i + SNAPSHOT_CHUNK])
                yield pb.WatchResponse(
                    header=header(revision),
                    type=pb.WatchResponse.TYPE_SNAPSHOT_COMPLETE,
                    revision=watcher.seen,
                )
            async for message in self._stream(watcher, progress, interval):
                yield message
        except GeryonError as exc:
            await _abort(context, exc)
        finally:
            if expiry is not None:
                expiry.cancel()
            self.streams.pop(watcher, None)
            if reader is not None:
                reader.cancel()
            if watcher is not None:
                self.hub.unsubscribe(watcher)

    def _progress_interval(self, create: pb.WatchCreateRequest) -> float:
        if create.start_revision < 0:
            raise InvalidArgument("start_revision: negative")
        if create.start_revision and create.snapshot:
            raise InvalidArgument("start_revision: cannot be combined with snapshot")
        ms = create.progress_interval_ms
        if ms and not 100 <= ms <= 86_400_000:
            raise InvalidArgument("progress_interval_ms: want 0 or 100..86400000")
        return ms / 1000 if ms else self.progress_interval

    def _subscribe_from(self, flt: Filter, start: Revision, caller: Caller) -> Watcher:
        durable = self.store.durable_revision
        if not start:
            return self.hub.subscribe(flt, after=durable, owner=caller.limited_as)
        # Replay the held history, then live events: both taken in one step
        # of the event loop, so nothing falls between them.
        backlog = self.store.history_since(start)
        watcher = self.hub.subscribe(flt, after=max(start - 1, 0), owner=caller.limited_as)
        for revision, events in backlog:
            watcher.offer(revision, events, replay=True)
        watcher.seen = max(watcher.seen, durable)
        return watcher

    async def _read_progress(
        self,
        requests: AsyncIterator[pb.WatchRequest],
        progress: asyncio.Event,
        watcher: Watcher,
    ) -> None:
        # A client that closes its side still gets events (as etcd does): the
        # watch ends when the call is cancelled.
        try:
            async for request in requests:
                if request.HasField("progress_request"):
                    progress.set()
                    watcher.wakeup.set()
                else:
                    watcher.fail(InvalidArgument("watch: only one create_request per stream"))
                    return
        except grpc.aio.AbortError:
            # A malformed request ended the call with INVALID_ARGUMENT (wire.py):
            # end the watch now, not at its next event, which may be a day away.
            watcher.fail(InvalidArgument("watch: malformed request"))
        except Exception:  # the connection went: the call's cancellation ends it
            pass

    async def _stream(
        self, watcher: Watcher, progress: asyncio.Event, interval: float
    ) -> AsyncIterator[pb.WatchResponse | bytes]:
        loop = asyncio.get_running_loop()
        next_progress = loop.time() + interval
        while True:
            if watcher.error is not None:
                raise watcher.error
            # Woken (by the hub's round, a replay or a progress request)
            # with events: send them, whole revisions, in order.
            if watcher.pending and watcher.wakeup.is_set():
                events = watcher.take(MAX_EVENTS_PER_MESSAGE)
                rest = bool(watcher.pending)  # past one message: send on
                yield self._events(events)
                if not rest:
                    self.hub.sent(watcher)
                next_progress = loop.time() + interval
                continue
            # Events held for the hub's next round come before any notice.
            if not watcher.pending and (progress.is_set() or loop.time() >= next_progress):
                progress.clear()
                # Nothing pending: every revision up to the durable one was
                # offered (a revision none of its events touch, or with no
                # service events at all, still counts as seen).
                watcher.seen = max(watcher.seen, self.store.durable_revision)
                watcher.delivered = max(watcher.delivered, watcher.seen)
                yield pb.WatchResponse(
                    header=header(self.store.durable_revision),
                    type=pb.WatchResponse.TYPE_PROGRESS,
                    revision=watcher.seen,
                )
                next_progress = loop.time() + interval
                continue
            watcher.wakeup.clear()
            # asyncio.timeout, not wait_for: no task per wakeup. Held events
            # are due within a round, so no notice is waited for meanwhile.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(None if watcher.pending else next_progress):
                    await watcher.wakeup.wait()

    def _events(self, events: list[Event]) -> bytes:
        """The message for ``events``, serialized once however many watchers
        get the same events in the same round (grpc sends bytes as they are:
        wire.py)."""
        durable = self.store.durable_revision
        key = (durable, *map(id, events))
        hit = self._message_cache.get(key)
        if hit is not None:
            return hit[1]
        data = pb.WatchResponse(
            header=header(durable),
            type=pb.WatchResponse.TYPE_EVENTS,
            events=[self._wire(e) for e in events],
        ).SerializeToString()
        if len(self._message_cache) >= 1024:
            self._message_cache.clear()
        # Holding the events keeps their ids from being reused while cached.
        self._message_cache[key] = (events, data)
        return data

    def _wire(self, e: Event) -> pb.Event:
        """An event's protobuf form, built once however many watchers get it."""
        hit = self._wire_cache.get(id(e))
        if hit is not None and hit[0] is e:
            return hit[1]
        m = event_to_pb(e)
        if len(self._wire_cache) >= 8192:
            self._wire_cache.clear()
        # Holding the event keeps its id from being reused while cached.
        self._wire_cache[id(e)] = (e, m)
        return m

    # ---- shutdown -----------------------------------------------------------

    def cut_off(self, denied: Callable[[Caller], bool]) -> int:
        """End every open stream of a caller ``denied`` now says is refused.
        Its leases are left to their TTL: a refusal is not the client leaving."""
        n = 0
        for caller, end in list(self.streams.values()):
            if denied(caller):
                end(Unauthenticated(f"{caller.name}: certificate denied"))
                n += 1
        return n

    def store_lost(self, error: GeryonError) -> None:
        """The store can no longer serve these streams in order: watches end
        with ``error`` (OutOfRange: re-list; Unavailable: go elsewhere), and
        with Unavailable KeepAlive streams too. No lease ends for it."""
        for key, (_, end) in list(self.streams.items()):
            if error.transient or isinstance(key, Watcher):
                end(error)

    def shutdown(self) -> None:
        """End every stream with UNAVAILABLE, leaving leases alone."""
        self.stopping = True
        for _, end in list(self.streams.values()):
            end(Unavailable("registryd: shutting down"))
