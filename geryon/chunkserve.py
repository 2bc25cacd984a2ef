"""geryon.chunkserve: serve one chunk file over TCP (the demo's and the tests'
stand-in for a kfs chunk server).

    python -m geryon.chunkserve PATH PORT [--host ADDR]

Protocol, one request line at a time, an answer for each:

    size                ->  "SIZE\\n"                the file's size in bytes
    read OFFSET COUNT   ->  "ok N\\n" + N bytes       N < COUNT only at the end
    anything else       ->  "error: ...\\n"

It exits 0 on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

MAX_READ = 1 << 20


def read(path: str, offset: int, count: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(count)


async def handle(path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            words = line.decode(errors="replace").split()
            if words == ["size"]:
                writer.write(b"%d\n" % os.stat(path).st_size)
            elif len(words) == 3 and words[0] == "read" and all(w.isdigit() for w in words[1:]):
                offset, count = int(words[1]), min(int(words[2]), MAX_READ)
                data = await asyncio.to_thread(read, path, offset, count)
                writer.write(b"ok %d\n" % len(data) + data)
            else:
                writer.write(b"error: want size or read OFFSET COUNT\n")
            await writer.drain()
    except (OSError, ConnectionError) as exc:
        with contextlib.suppress(Exception):
            writer.write(f"error: {exc}\n".encode())
    finally:
        writer.close()


async def serve(path: str, host: str, port: int) -> None:
    server = await asyncio.start_server(lambda r, w: handle(path, r, w), host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="chunkserve", description="Serve a chunk file over TCP.")
    p.add_argument("path")
    p.add_argument("port", type=int)
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default all)")
    args = p.parse_args(argv)
    if not os.path.exists(args.path):
        sys.exit(f"chunkserve: {args.path}: no such file")
    asyncio.run(serve(args.path, args.host, args.port))


if __name__ == "__main__":
    main()
