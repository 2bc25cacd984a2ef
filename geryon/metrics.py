"""Prometheus metrics for the registry, served on --metrics HOST:PORT.

RPCs are counted by an interceptor, so the servicer stays plumbing; the
gauges are read from the store and hub when scraped, never kept in step by
hand.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from geryon.store import Store
from geryon.watch import Hub


class Metrics:
    def __init__(self, store: Store, hub: Hub) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("geryon_services", "Services in the registry", registry=r).set_function(
            lambda: len(store.services)
        )
        Gauge("geryon_leases", "Live leases", registry=r).set_function(lambda: len(store.leases))
        Gauge("geryon_watchers", "Open watch streams", registry=r).set_function(
            lambda: len(hub.watchers)
        )
        Gauge("geryon_revision", "Current durable revision", registry=r).set_function(
            lambda: store.durable_revision
        )
        self.rpcs = Counter(
            "geryon_rpcs", "RPCs by method and status code", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "geryon_rpc_seconds", "RPC latency (a stream: its whole life)", ["method"], registry=r
        )
        self.commit = Histogram(
            "geryon_commit_seconds",
            "Store commit latency (SQLite: transaction + fsync; etcd: its transaction)",
            registry=r,
        )
        store.commit_latency = self.commit.observe

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        return _Interceptor(self)


class _Interceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by method and final status code, and times it (a
    stream from open to close)."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def _done(
        self, method: str, context: grpc.aio.ServicerContext, started: float, failed: bool
    ) -> None:
        code = "OK"
        if failed:
            c = context.code()
            code = c.name if isinstance(c, grpc.StatusCode) else "CANCELLED"
        self.m.rpcs.labels(method, code).inc()
        self.m.latency.labels(method).observe(time.perf_counter() - started)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def measured(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started, failed = time.perf_counter(), True
                try:
                    response = await unary(request, context)
                    failed = False
                    return response
                finally:
                    self._done(method, context, started, failed)

            return grpc.unary_unary_rpc_method_handler(measured, **codec)
        streaming = handler.unary_stream or handler.stream_stream
        if streaming is None:
            return handler

        async def measured_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started, failed = time.perf_counter(), True
            try:
                async for response in streaming(request, context):
                    yield response
                failed = False
            finally:
                self._done(method, context, started, failed)

        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(measured_stream, **codec)
        return grpc.stream_stream_rpc_method_handler(measured_stream, **codec)
