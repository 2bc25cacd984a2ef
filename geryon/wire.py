"""Malformed requests: INVALID_ARGUMENT, whatever the bytes, and a log line
now and then rather than a traceback each.

grpc.aio hands a request's bytes to the method's deserializer (the generated
``FromString``) before any servicer code runs. When that raises, grpc logs
"Unexpected [DecodeError] raised by servicer method" with a traceback, and
answers UNKNOWN ("Unexpected <class '...DecodeError'>: ..."); in a stream, the
exception comes out of the handler's request iterator (or
``context.read()``), and unless the handler catches it, ends the same way.

``guard(server, who)`` makes every method registered on ``server`` from then
on (as the generated ``add_*Servicer_to_server`` functions and
grpc_reflection do) take its request bytes through a deserializer that
returns a ``Malformed`` marker instead of raising. A unary request's handler
answers the marker with INVALID_ARGUMENT before the servicer is called; a
stream's handler gets requests (from its iterator and from
``context.read()``) through a reader that ends the call with
INVALID_ARGUMENT when the marker comes. A response the handler made bytes
itself passes the serializer as it is. The handlers are rewritten once, when
they are registered: a well-formed call costs one Python call around
``FromString`` and one around the servicer's method (and, in a stream, one
per message), and no interceptor.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, NoReturn

import grpc

__all__ = ["REPORT_EVERY_S", "Malformed", "guard"]

# At most one log line about malformed requests per server this often.
REPORT_EVERY_S = 10.0
# Generic handlers (methods not registered by name) rewritten, remembered.
_GENERIC_CACHE = 256
_DETAILS_MAX = 200


class Malformed:
    """What a guarded deserializer returns for bytes its type cannot parse."""

    __slots__ = ("details",)

    def __init__(self, details: str) -> None:
        self.details = details


def _reason(exc: Exception) -> str:
    """One line on why parsing failed, without the type name upb repeats
    ("Error parsing message with type 'T': Wire format was corrupt")."""
    text = str(exc)
    if text.startswith("Error parsing message"):
        _, sep, rest = text.partition("': ")
        text = rest if sep else ""
    text = " ".join(text.split()) or type(exc).__name__
    text = text.encode("ascii", "backslashreplace").decode("ascii")[:_DETAILS_MAX]
    return text[:1].lower() + text[1:]


def _type_name(deserialize: Callable[[bytes], Any], method: str) -> str:
    owner = getattr(deserialize, "__self__", None)  # Message.FromString: a class method
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", None) or f"request of {method}"


def _lenient(deserialize: Callable[[bytes], Any], name: str) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, and anything else FromString raises
            return Malformed(f"malformed {name}: {_reason(exc)}")

    return parse


class _Report:
    """Log lines about malformed requests: one per ``every`` seconds at
    most, saying how many were left out since the last."""

    def __init__(
        self,
        who: str,
        every: float = REPORT_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = logging.getLogger(f"geryon.{who}")
        self.prefix = f"{who}: "
        self.every = every
        self.clock = clock
        self.last: float | None = None
        self.left_out = 0

    def __call__(self, method: str, peer: str, details: str) -> None:
        now = self.clock()
        if self.last is not None and now - self.last < self.every:
            self.left_out += 1
            return
        more = ""
        if self.left_out:
            more = f" ({self.left_out} more in the {now - self.last:.0f} s before, not logged)"
        self.last, self.left_out = now, 0
        self.log.warning("%s%s from %s: %s%s", self.prefix, method, peer, details, more)


class _Guard:
    def __init__(self, who: str) -> None:
        self.report = _Report(who)

    async def reject(self, method: str, context: Any, malformed: Malformed) -> NoReturn:
        self.report(method, context.peer(), malformed.details)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, malformed.details)
        raise AssertionError("unreachable")  # abort raises

    def handler(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """``handler`` with a lenient deserializer and a behaviour that
        answers its marker; unchanged when it takes raw bytes, or its
        behaviour is not async (it would run in grpc's thread pool)."""
        deserialize = handler.request_deserializer
        if deserialize is None:
            return handler
        kind = ("stream_" if handler.request_streaming else "unary_") + (
            "stream" if handler.response_streaming else "unary"
        )
        behaviour = getattr(handler, kind)  # e.g. handler.unary_unary
        generator = inspect.isasyncgenfunction(behaviour)
        if not (generator or inspect.iscoroutinefunction(behaviour)):
            return handler
        lenient = _lenient(deserialize, _type_name(deserialize, method))
        wrap = _stream_request if handler.request_streaming else _unary_request
        guarded = wrap(behaviour, generator, self.reject, method)
        factory = getattr(grpc, f"{kind}_rpc_method_handler")  # e.g. unary_unary_rpc_...
        return factory(
            guarded,
            request_deserializer=lenient,
            response_serializer=_passing_bytes(handler.response_serializer),
        )


def _passing_bytes(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """``serialize``, but a response a handler already serialized (bytes: a
    watch message many streams send alike) goes out as it is."""
    if serialize is None:
        return None

    def serialized(message: Any) -> bytes:
        return message if message.__class__ is bytes else serialize(message)

    return serialized


_Reject = Callable[[str, Any, Malformed], Any]


def _unary_request(behaviour: Any, generator: bool, reject: _Reject, method: str) -> Any:
    if generator:

        async def guarded_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if request.__class__ is Malformed:
                await reject(method, context, request)
            async with contextlib.aclosing(behaviour(request, context)) as responses:
                async for response in responses:
                    yield response

        return guarded_stream

    async def guarded(request: Any, context: Any) -> Any:
        if request.__class__ is Malformed:
            await reject(method, context, request)
        return await behaviour(request, context)

    return guarded


class _Call:
    """A stream's servicer context as its handler sees it: requests read
    through it (``read()``, or iterating ``requests()``) end the call with
    INVALID_ARGUMENT at a malformed one. Everything else is the context's."""

    def __init__(self, context: Any, reject: _Reject, method: str) -> None:
        self._context = context
        self._reject = reject
        self._method = method
        # The call's AbortError once a malformed request ended it: what the
        # handler raises in the end, whatever it made of it meanwhile.
        self.aborted: BaseException | None = None

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._context, name)
        if callable(value):  # the context's methods: looked up here once
            setattr(self, name, value)
        return value

    async def read(self) -> Any:
        message = await self._context.read()
        if message.__class__ is Malformed:
            if self.aborted is None:
                try:
                    await self._reject(self._method, self._context, message)
                except grpc.aio.AbortError as exc:
                    self.aborted = exc
                    raise
            raise self.aborted
        return message

    async def requests(self) -> AsyncIterator[Any]:
        while (message := await self.read()) is not grpc.aio.EOF:
            yield message

    def ended(self) -> None:
        """After the handler: grpc logs an abort the handler swallowed (or
        turned into another error, e.g. in an ExceptionGroup) with a
        traceback; the call ended as INVALID_ARGUMENT, so say just that."""
        if self.aborted is not None:
            raise self.aborted from None


def _stream_request(behaviour: Any, generator: bool, reject: _Reject, method: str) -> Any:
    if generator:

        async def guarded_stream(request_iterator: Any, context: Any) -> AsyncIterator[Any]:
            # grpc's request_iterator reads only when iterated: left alone.
            call = _Call(context, reject, method)
            try:
                async with contextlib.aclosing(behaviour(call.requests(), call)) as responses:
                    async for response in responses:
                        yield response
            except Exception:
                call.ended()
                raise
            call.ended()

        return guarded_stream

    async def guarded(request_iterator: Any, context: Any) -> Any:
        call = _Call(context, reject, method)
        try:
            response = await behaviour(call.requests(), call)
        except Exception:
            call.ended()
            raise
        call.ended()
        return response

    return guarded


class _GuardedGeneric(grpc.GenericRpcHandler):
    """A generic handler (methods looked up per call, not registered by
    name): what it finds, rewritten, the rewriting remembered."""

    def __init__(self, inner: grpc.GenericRpcHandler, guard: _Guard) -> None:
        self._inner = inner
        self._guard = guard
        self._seen: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(details)
        if handler is None:
            return None
        method = details.method  # type: ignore[attr-defined]
        seen = self._seen.get(method)
        if seen is not None and seen[0] is handler:
            return seen[1]
        guarded = self._guard.handler(handler, method)
        if len(self._seen) < _GENERIC_CACHE:
            self._seen[method] = (handler, guarded)
        return guarded

    def __getattr__(self, name: str) -> Any:  # service_name(), and the like
        return getattr(self._inner, name)


def guard(server: grpc.aio.Server, who: str) -> None:
    """Make ``server`` answer malformed requests to every method registered
    on it from now on with INVALID_ARGUMENT (details "malformed TYPE:
    REASON"), and log them as ``who`` (logger geryon.WHO), one line per
    REPORT_EVERY_S at most.

    It takes over the server's two registration methods, so the generated
    ``add_*Servicer_to_server`` functions and grpc_reflection (which wants
    the server itself, not a stand-in) need no change.
    """
    g = _Guard(who)
    add_generic = server.add_generic_rpc_handlers
    add_registered = server.add_registered_method_handlers

    def add_generic_rpc_handlers(handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        add_generic(tuple(_GuardedGeneric(h, g) for h in handlers))

    def add_registered_method_handlers(
        service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        add_registered(
            service, {name: g.handler(h, f"/{service}/{name}") for name, h in handlers.items()}
        )

    server.add_generic_rpc_handlers = add_generic_rpc_handlers  # type: ignore[method-assign]
    server.add_registered_method_handlers = add_registered_method_handlers  # type: ignore[method-assign]
