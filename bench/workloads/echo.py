"""The Python limit: unary calls per second to a bare grpc.aio echo server
(bench/echo.py), 1 client and N concurrent, each on its own connection."""

from __future__ import annotations

from bench.core import ECHO, Bench, Row, Side, Sizes, Workload, close_all, spread

PAYLOAD = b"x" * 100  # about the size of a Register request


def workload(sizes: Sizes) -> Workload:
    n = sizes.concurrency
    rows = (
        Row("echo.1", "grpc.aio echo server (the Python limit), 1 client", "calls/s"),
        Row("echo.n", f"grpc.aio echo server (the Python limit), {n} clients", "calls/s"),
    )

    async def measure(bench: Bench, side: Side) -> dict[str, float]:
        out = {}
        for key, clients in (("echo.1", 1), ("echo.n", n)):
            conns = [side.connect() for _ in range(clients)]
            try:
                for c in conns:
                    await c.echo(PAYLOAD)  # connect before timing

                async def call(c, _: int) -> None:
                    await c.echo(PAYLOAD)

                calls = sizes.echo_calls
                out[key] = calls / await spread(conns, list(range(calls)), call)
            finally:
                await close_all(conns)
        return out

    return Workload("echo", rows, measure, sides=(ECHO,))
