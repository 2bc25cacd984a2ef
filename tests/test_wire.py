"""Malformed requests (geryon.wire): whatever bytes arrive where a request
should be, a real registry and a real cpu service answer INVALID_ARGUMENT,
keep serving, and log a line now and then, never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator

import grpc
import pytest
from conftest import Daemon, Registry, eventually
from test_cpu import live, serve_cpu

from geryon import wire
from geryon.convert import cpu_pb, pb
from geryon.cpu import client as cpu_client

SERVICE = pb.DESCRIPTOR.services_by_name["Registry"]
VALID = pb.RegisterRequest(name="svc", attrs={"a": "b"}, lease=5).SerializeToString()
GARBAGE = {
    "0xff": b"\xff\xff\xff",
    "truncated": VALID[:3],  # name: 3 bytes long, 1 there
    "wire type 7": b"\x0f\x01",
    "end of a group never begun": b"\x0c",
    "varint of 11 bytes": b"\x18" + b"\xff" * 10 + b"\x01",
    "bad UTF-8 in a string": b"\x0a\x02\xff\xfe",
    **{f"random {i}": random.Random(i).randbytes(1 + i * 7) for i in range(1, 16)},
}
# Parses (a field in a wire type not its own is kept as an unknown field):
# the request is then empty, and the servicer finds its name missing.
WRONG_WIRE_TYPE = b"\x08\x01"  # name (a string) as a varint
TIMEOUT = 10


def new_lines(daemon: Daemon, before: str) -> list[str]:
    return daemon.log()[len(before) :].splitlines()


async def unary(ch: grpc.aio.Channel, method: str, data: bytes) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await ch.unary_unary(method)(data, timeout=TIMEOUT)
    return info.value


async def stream_status(call: grpc.aio.StreamStreamCall) -> tuple[grpc.StatusCode, str]:
    """Read to the end of a stream; its status (read() raises it unless OK)."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        while await asyncio.wait_for(call.read(), TIMEOUT) is not grpc.aio.EOF:
            pass
    return await call.code(), await call.details()


@pytest.fixture
async def channel(registry: Registry) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(registry.address) as ch:
        yield ch


async def test_garbage_to_every_unary_method_is_invalid_argument(
    registry: Registry, channel: grpc.aio.Channel
) -> None:
    before = registry.log()
    register = "/geryon.v1.Registry/Register"
    for what, data in GARBAGE.items():
        err = await unary(channel, register, data)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, err)
        assert err.details().startswith("malformed geryon.v1.RegisterRequest: "), what
    err = await unary(channel, register, WRONG_WIRE_TYPE)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not err.details().startswith("malformed")  # the servicer's own answer
    for m in SERVICE.methods:
        if not m.client_streaming:
            err = await unary(channel, f"/{SERVICE.full_name}/{m.name}", b"\xff\xff\xff")
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (m.name, err)
            assert err.details() == (f"malformed {m.input_type.full_name}: wire format was corrupt")
    for data in (b"\xff\xff\xff", b"\x0a\x01\xff"):
        err = await unary(channel, "/grpc.health.v1.Health/Check", data)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith("malformed grpc.health.v1.HealthCheckRequest: ")
    watch = channel.unary_stream("/grpc.health.v1.Health/Watch")(b"\xff", timeout=TIMEOUT)
    assert await watch.code() == grpc.StatusCode.INVALID_ARGUMENT

    # Still serving, and one line said it all (the lot took under 10 s).
    async with registry.client() as c:
        await c.register("tcp!host0!1", {"svc": "x"}, persist=True)
        assert (await c.get("tcp!host0!1")).attrs == {"svc": "x"}
        assert (await c.find({"svc": "x"}))[0][0].name == "tcp!host0!1"
    lines = new_lines(registry, before)
    assert not any("Traceback" in line or "Unexpected" in line for line in lines), lines
    malformed = [line for line in lines if "malformed" in line]
    assert 1 <= len(malformed) <= 2 and len(lines) <= 3, lines
    assert "registryd: /geryon.v1.Registry/Register from ipv4:127.0.0.1:" in malformed[0]
    assert malformed[0].endswith(": malformed geryon.v1.RegisterRequest: wire format was corrupt")


@pytest.mark.parametrize("method", ["Watch", "KeepAlive"])
async def test_garbage_opening_a_stream_ends_it_invalid_argument(
    registry: Registry, channel: grpc.aio.Channel, method: str
) -> None:
    before = registry.log()
    for data in (b"\xff\xff\xff", b"\x0a\x80\x80\x80\x80\x10"):
        call = channel.stream_stream(f"/geryon.v1.Registry/{method}")(timeout=TIMEOUT)
        await call.write(data)
        code, details = await stream_status(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert details == f"malformed geryon.v1.{method}Request: wire format was corrupt"
    call = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")(
        timeout=TIMEOUT
    )
    await call.write(b"\xff")
    assert (await stream_status(call))[0] == grpc.StatusCode.INVALID_ARGUMENT
    async with registry.client() as c:
        await c.register("tcp!host0!1", persist=True)
    lines = new_lines(registry, before)
    assert not any("Traceback" in line for line in lines) and len(lines) <= 2, lines


async def test_garbage_later_in_a_watch_ends_it_invalid_argument(
    registry: Registry, channel: grpc.aio.Channel
) -> None:
    before = registry.log()
    call = channel.stream_stream("/geryon.v1.Registry/Watch")(timeout=TIMEOUT)
    await call.write(pb.WatchRequest(create_request=pb.WatchCreateRequest()).SerializeToString())
    first = pb.WatchResponse.FromString(await asyncio.wait_for(call.read(), TIMEOUT))
    assert first.type == pb.WatchResponse.TYPE_PROGRESS
    await call.write(b"\x12\x05\xff")  # progress_request, cut short
    code, details = await stream_status(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "malformed geryon.v1.WatchRequest: wire format was corrupt"
    async with registry.client() as c:
        await c.register("tcp!host0!1", persist=True)  # wakes the watch: its handler ends
        await asyncio.sleep(0.5)
        await c.register("tcp!host0!2", persist=True)
    lines = new_lines(registry, before)
    assert not any("Traceback" in line for line in lines) and len(lines) <= 1, lines


async def test_garbage_on_a_keepalive_stream_is_a_refusal_not_a_goodbye(
    registry: Registry, channel: grpc.aio.Channel
) -> None:
    before = registry.log()
    async with registry.client() as c:
        lease = await c.grant(30_000)
        await c.register("tcp!host0!1", lease=lease)
        call = channel.stream_stream("/geryon.v1.Registry/KeepAlive")(timeout=TIMEOUT)
        await call.write(pb.KeepAliveRequest(lease=lease).SerializeToString())
        reply = pb.KeepAliveResponse.FromString(await asyncio.wait_for(call.read(), TIMEOUT))
        assert reply.lease == lease and reply.ttl_ms > 0
        await call.write(b"\x08")  # lease: no value
        assert (await stream_status(call))[0] == grpc.StatusCode.INVALID_ARGUMENT
        # As for any refusal, the lease lives on until its TTL (a client that
        # went away would have taken its services with it).
        await asyncio.sleep(0.5)
        assert (await c.get("tcp!host0!1")).lease == lease
    lines = new_lines(registry, before)
    assert not any("Traceback" in line for line in lines) and len(lines) <= 1, lines


async def test_a_cpu_answers_garbage_with_invalid_argument(
    start_registry, daemons: list[Daemon], tmp_path
) -> None:
    registry = start_registry()
    port = serve_cpu(daemons, tmp_path, registry, "wire0")
    cpu = daemons[-1]
    before = cpu.log()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        for what, data in GARBAGE.items():
            if what == "bad UTF-8 in a string":
                continue  # StatusRequest has no fields: an unknown one, well formed
            err = await unary(ch, "/geryon.v1.CpuService/Status", data)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.details().startswith("malformed geryon.v1.StatusRequest: ")
        session = "/geryon.v1.CpuService/Session"
        call = ch.stream_stream(session)(timeout=TIMEOUT)
        await call.write(b"\xff\xff\xff")
        code, details = await stream_status(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details == "malformed geryon.v1.SessionRequest: wire format was corrupt"

        # Half way through a session: it ends, and so does its command.
        start = cpu_client.start_message(["sleep", "3021"])
        call = ch.stream_stream(session)(timeout=TIMEOUT)
        await call.write(cpu_pb.SessionRequest(start=start).SerializeToString())
        started = cpu_pb.SessionResponse.FromString(await asyncio.wait_for(call.read(), TIMEOUT))
        assert started.WhichOneof("kind") == "started"
        await eventually(lambda: live("3021"))
        await call.write(b"\x12\x09ab")  # stdin: 9 bytes long, 2 there
        code, details = await stream_status(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details == "malformed geryon.v1.SessionRequest: wire format was corrupt"
        await eventually(lambda: not live("3021"))

        status = cpu_pb.StatusResponse.FromString(
            await ch.unary_unary("/geryon.v1.CpuService/Status")(b"", timeout=TIMEOUT)
        )
        assert status.node == "wire0"
    lines = new_lines(cpu, before)
    assert not any("Traceback" in line or "Unexpected" in line for line in lines), lines
    malformed = [line for line in lines if "malformed" in line]
    assert 1 <= len(malformed) <= 2, lines
    assert malformed[0].startswith("cpu: /geryon.v1.CpuService/Status from ipv4:127.0.0.1:")


def test_one_line_per_interval_counts_the_ones_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    report = wire._Report("registryd", every=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="geryon.registryd"):
        for t in (100.0, 101.0, 105.0, 109.9, 112.5, 113.0, 130.0):
            now[0] = t
            report("/geryon.v1.Registry/Get", "ipv4:127.0.0.1:1", "malformed X: y")
    assert [r.getMessage() for r in caplog.records] == [
        "registryd: /geryon.v1.Registry/Get from ipv4:127.0.0.1:1: malformed X: y",
        "registryd: /geryon.v1.Registry/Get from ipv4:127.0.0.1:1: malformed X: y "
        "(3 more in the 12 s before, not logged)",
        "registryd: /geryon.v1.Registry/Get from ipv4:127.0.0.1:1: malformed X: y "
        "(1 more in the 18 s before, not logged)",
    ]
