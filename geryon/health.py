"""Health checks: tell a running-but-broken service from a healthy one.

A check runs every ``interval``; ``failure_threshold`` failures in a row turn
a passing service critical, ``success_threshold`` successes in a row turn it
back. The result is the ``health`` attribute of the service's entry
(``passing`` or ``critical``), so users and the reconciler can filter on it.
A service starts passing: it is announced only once its port accepts
connections.

Checks: ``tcp`` (connect to the port: procs.check_tcp, the probe readiness
uses too), ``command`` (exits 0 within the timeout; run like a service, in its
own process group and tied to our life), ``grpc`` (grpc.health.v1.Health/Check
answers SERVING).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping, Sequence

from geryon import procs
from geryon.agent_config import HealthSpec

log = logging.getLogger("geryon.health")

PASSING = "passing"
CRITICAL = "critical"


async def check_command(
    argv: Sequence[str], limit: float, *, keeper: procs.Keeper, env: Mapping[str, str]
) -> tuple[bool, str]:
    proc = await procs.spawn(
        argv,
        keeper=keeper,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(limit):
            await proc.wait()
    except TimeoutError:
        await procs.stop(proc, keeper, grace=0.1)
        return False, f"{argv[0]} timed out after {limit:g}s"
    finally:
        if proc.returncode is None:
            await procs.stop(proc, keeper, grace=0.1)
        else:
            procs.reap_group(proc, keeper)
    ok = proc.returncode == 0
    return ok, f"{argv[0]}: {procs.describe(proc.returncode)}"


async def check_grpc(host: str, port: int, service: str, limit: float) -> tuple[bool, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            r = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=limit)
        except grpc.aio.AioRpcError as exc:
            return False, f"grpc health: {exc.code().name.lower()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    return r.status == health_pb2.HealthCheckResponse.SERVING, f"grpc health: {status.lower()}"


class Checker:
    """Runs one service's check and reports each change of its health."""

    def __init__(
        self,
        spec: HealthSpec,
        *,
        host: str,
        port: int,
        keeper: procs.Keeper,
        command: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self.host, self.port = host, port
        self.keeper = keeper
        self.command = list(command)
        self.env = dict(env or {})

    async def once(self) -> tuple[bool, str]:
        spec = self.spec
        if spec.type == "tcp":
            return await procs.check_tcp(self.host, self.port, spec.timeout)
        if spec.type == "command":
            return await check_command(self.command, spec.timeout, keeper=self.keeper, env=self.env)
        if spec.type == "grpc":
            return await check_grpc(self.host, self.port, spec.service, spec.timeout)
        return True, "no check"

    async def run(self, report: Callable[[str, str], None], health: str = PASSING) -> None:
        """Check forever; call ``report(health, why)`` on each change."""
        if self.spec.type == "none":
            return
        spec = self.spec
        streak = 0  # consecutive results disagreeing with the current health
        while True:
            await asyncio.sleep(spec.interval)
            ok, why = await self.once()
            if ok == (health == PASSING):
                streak = 0
                continue
            streak += 1
            if streak >= (spec.success_threshold if ok else spec.failure_threshold):
                health, streak = (PASSING if ok else CRITICAL), 0
                report(health, why)
