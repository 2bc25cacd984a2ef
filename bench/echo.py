"""A bare grpc.aio unary echo: the Python limit on this machine.

Run as ``python -m bench.echo --listen 127.0.0.1:PORT``, it serves one method,
``/bench.Echo/Echo``, through a generic handler with no proto and no
(de)serialisation: it returns the request bytes. A Geryon figure is read as a
fraction of this one, measured in the same run with the same kind of client.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import grpc

from bench import procs
from bench.core import ECHO, Side

METHOD = "/bench.Echo/Echo"
READY = "echo: serving on"


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def serve(listen: str) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
            ),
        )
    )
    port = server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"{READY} port {port}", file=sys.stderr, flush=True)
    await stop.wait()
    await server.stop(0.5)


class EchoConn:
    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self.call = self.channel.unary_unary(METHOD)

    async def echo(self, payload: bytes) -> bytes:
        return await self.call(payload, timeout=10.0)

    async def close(self) -> None:
        await self.channel.close()


class EchoSide(Side):
    """The echo server as a side the framework can start and stop; it has no
    registry calls, only ``connect()`` → ``EchoConn``."""

    name = ECHO
    label = "grpc.aio echo"

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = procs.free_port()
        self.proc: procs.Proc | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        argv = [sys.executable, "-m", "bench.echo", "--listen", self.address]
        self.proc = procs.Proc(argv, self.tmp / "echo.log", ready=READY)
        await self.proc.start()

    async def reset(self) -> None:
        if self.proc is None or not self.proc.running:
            await self.start()

    def kill9(self) -> None:
        if self.proc is not None:
            self.proc.kill9()

    def respawn(self) -> None:
        raise NotImplementedError("echo: no respawn")

    def stop(self) -> None:
        self.kill9()

    def connect(self) -> EchoConn:
        return EchoConn(self.address)

    def holder_argv(self, name: str) -> list[str]:
        raise NotImplementedError("echo: holds no leases")


def main() -> None:
    p = argparse.ArgumentParser(prog="bench.echo", description=__doc__)
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    asyncio.run(serve(p.parse_args().listen))


if __name__ == "__main__":
    main()
