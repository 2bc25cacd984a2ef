"""`geryon cpu`: run a command on a cpu of the cluster (Inferno's cpu over
rstyx), and `geryon cpu serve`, the service itself.

    geryon cpu [-h HOST | --attr A=V ...] [-t | -T] [-n] [--mount NAME ...]
               [--dir DIR] [--env VAR=VALUE ...] [-- COMMAND ARGS...]
    geryon cpu serve --listen HOST:PORT [--tls-dir DIR] [--runas KEY=ACCOUNT ...] ...

Command lines and the local terminal only; the session's protocol is in
geryon.cpu.client, the service in geryon.cpu.server. Exit status: the remote
command's (128+N when signal N killed it); 255 when geryon itself could not
run it (no cpu, refused, unreachable), as ssh does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import queue
import signal
import sys
import termios
import threading
import tty

from geryon import endpoints, errors
from geryon.client import Client
from geryon.cpu import client as cpu_client
from geryon.model import escape

FAILED = 255
FORWARDED = {
    signal.SIGINT: "INT",
    signal.SIGTERM: "TERM",
    signal.SIGHUP: "HUP",
    signal.SIGQUIT: "QUIT",
}


class Failed(Exception):
    """One line for stderr; exit status 255."""


def _say(msg: str) -> None:
    print(f"geryon: cpu: {msg}", file=sys.stderr, flush=True)


# ---- the local side of a session ----------------------------------------------


class _Stdin:
    """Standard input read by a daemon thread (a read from a terminal cannot
    be cancelled, and must not keep the process alive), a few chunks ahead."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._room = threading.Semaphore(4)
        self._loop = loop
        threading.Thread(target=self._read, name="stdin", daemon=True).start()

    def _read(self) -> None:
        while True:
            self._room.acquire()
            try:
                data = os.read(0, cpu_client.STDIN_CHUNK)
            except OSError:
                data = b""
            try:
                self._loop.call_soon_threadsafe(self.queue.put_nowait, data)
            except RuntimeError:  # the loop has closed: the session is over
                return
            if not data:
                return

    async def get(self) -> bytes:
        data = await self.queue.get()
        self._room.release()
        return data


class _Output:
    """Writes output in a thread of its own (a slow stdout must not stall
    the loop), in order, acknowledging each piece once written. The first
    write that fails (a closed pipe, a terminal gone) is ``failed``'s result."""

    def __init__(self, session: cpu_client.Session, loop: asyncio.AbstractEventLoop) -> None:
        self.session = session
        self.loop = loop
        self.pending: queue.SimpleQueue[tuple[int, bytes] | None] = queue.SimpleQueue()
        self.failed: asyncio.Future[OSError] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self._acks: set[asyncio.Future[None]] = set()
        threading.Thread(target=self._write, name="output", daemon=True).start()

    def _tell(self, fn: object, *args: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            self.loop.call_soon_threadsafe(fn, *args)  # type: ignore[arg-type]

    def _write(self) -> None:
        failed = False
        while (item := self.pending.get()) is not None:
            fd, data = item
            if failed:
                continue
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError as exc:
                failed = True
                self._tell(_settle, self.failed, exc)
                continue
            self._tell(self._ack, len(data))
        self._tell(_settle, self.done, None)

    def _ack(self, n: int) -> None:
        t = asyncio.ensure_future(self.session.consumed(n))
        self._acks.add(t)
        t.add_done_callback(self._acks.discard)


def _settle(fut: asyncio.Future[object], value: object) -> None:
    if not fut.done():
        fut.set_result(value)


async def _pump_stdin(session: cpu_client.Session, stdin: _Stdin) -> None:
    while data := await stdin.get():
        await session.send_stdin(data)
    await session.close_stdin()


def _terminal_size() -> tuple[int, int]:
    """The local terminal's rows and columns; 24x80 when it has none (a
    terminal nobody sized says 0x0)."""
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            if size.lines > 0 and size.columns > 0:
                return size.lines, size.columns
    return 24, 80


async def _drive(session: cpu_client.Session, *, no_stdin: bool, raw: bool) -> int:
    """Run an opened session to its exit; its shell status."""
    loop = asyncio.get_running_loop()
    out = _Output(session, loop)
    tasks: set[asyncio.Future[None]] = set()

    def later(coro: object) -> None:
        t = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    async def pump() -> None:
        async for fd, data in session.output():
            out.pending.put((fd, data))

    for sig, name in FORWARDED.items():
        loop.add_signal_handler(sig, lambda name=name: later(session.signal(name)))
    if raw:
        loop.add_signal_handler(
            signal.SIGWINCH, lambda: later(session.resize(*_terminal_size()))
        )
    if no_stdin:
        later(session.close_stdin())
    else:
        later(_pump_stdin(session, _Stdin(loop)))
    pumping = asyncio.ensure_future(pump())
    try:
        await asyncio.wait({pumping, out.failed}, return_when=asyncio.FIRST_COMPLETED)
        if out.failed.done():
            # Nobody reads our output any more: end the session (its
            # processes are killed), as a pipe's writer gets SIGPIPE.
            pumping.cancel()
            session.cancel()
        else:
            pumping.result()  # the session's error, if it ended in one
    finally:
        out.pending.put(None)
        for sig in (*FORWARDED, signal.SIGWINCH):
            loop.remove_signal_handler(sig)
        for t in (*tasks, pumping):
            t.cancel()
        # What arrived is written out before anything is said or we exit.
        await out.done
    if out.failed.done():
        error = out.failed.result()
        if isinstance(error, BrokenPipeError):
            return 128 + signal.SIGPIPE
        raise Failed(f"cannot write output: {error.strerror or error}")
    assert session.exit is not None
    return session.exit.shell_status


def _pairs(items: list[str] | None, flag: str, want: str) -> dict[str, str]:
    """NAME=VALUE arguments of FLAG; ValueError names a bad one."""
    out: dict[str, str] = {}
    for item in items or ():
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValueError(f"{flag}: want {want}, got {item!r}")
        out[k] = v
    return out


async def cmd_cpu(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if command and command[0] == "serve" and args.command[0] != "--":
        return await cmd_serve(args, command[1:])
    try:
        attrs = _pairs(args.attr, "--attr", "A=V")
        env = _pairs(args.env, "--env", "VAR=VALUE")
    except ValueError as exc:
        _say(str(exc))
        return 2
    use_tty = args.tty if args.tty is not None else (not command and os.isatty(0))
    raw = use_tty and os.isatty(0)
    start = cpu_client.start_message(
        command, env=env, dir=args.dir or "", mounts=args.mount or (),
        term=os.environ.get("TERM", "dumb") if use_tty else None,
        size=_terminal_size() if use_tty else None,
    )  # fmt: skip
    try:
        session, cpu = await _open(args, start, attrs)
    except Failed as exc:
        _say(str(exc))
        return FAILED
    saved = termios.tcgetattr(0) if raw else None
    error = ""
    try:
        if raw:
            tty.setraw(0)
        return await _drive(session, no_stdin=args.no_stdin, raw=raw)
    except errors.GeryonError as exc:
        error = f"{cpu.name}: {exc}"
    except Failed as exc:
        error = str(exc)
    finally:
        if saved is not None:  # before any message: a raw terminal prints a staircase
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        session.cancel()
        if error:
            _say(error)
    return FAILED


async def _open(
    args: argparse.Namespace, start: object, attrs: dict[str, str]
) -> tuple[cpu_client.Session, cpu_client.Cpu]:
    """Find a cpu and open the session: the chosen one with -h, else the
    least loaded that answers (one that cannot be reached is passed over;
    one that refuses is not)."""
    async with Client(
        args.registry, tls_dir=args.tls_dir, user=args.user, retry_for=args.timeout
    ) as registry:
        try:
            cpus = cpu_client.rank(await cpu_client.find(registry, node=args.node, attrs=attrs))
        except (errors.Unavailable, errors.DeadlineExceeded) as exc:
            raise Failed(f"registry {args.registry} unreachable: {exc}") from None
        except errors.GeryonError as exc:
            raise Failed(f"registry: {exc}") from None
    if not cpus:
        where = f" on {args.node}" if args.node else ""
        match = "".join(f" {k}={v}" for k, v in attrs.items())
        raise Failed(f"no cpu{where} (svc=rstyx{match}) is registered and healthy")
    last = ""
    for cpu in cpus:
        try:
            ch = cpu_client.channel(cpu, tls_dir=args.tls_dir)
        except errors.GeryonError as exc:
            last = str(exc)  # an entry that is not an address: the next one
            continue
        session = cpu_client.Session(ch, start, user=args.user)  # type: ignore[arg-type]
        try:
            await session.open(within=min(args.timeout, cpu_client.CONNECT_TIMEOUT_S))
        except (errors.Unavailable, errors.DeadlineExceeded) as exc:
            last = f"{cpu.name} ({escape(cpu.node)}): unreachable: {exc}"
            await ch.close()
            continue
        except errors.GeryonError as exc:
            await ch.close()
            raise Failed(f"{cpu.name} ({escape(cpu.node)}): {exc}") from None
        return session, cpu
    raise Failed(last)


# ---- serve -----------------------------------------------------------------------


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="geryon cpu serve",
        description="Serve the cpu service (rstyx) until SIGTERM or SIGINT: each session "
        "runs one command as the local account the runas map gives its caller, in a "
        "process group and session of its own, killed whole when the session ends. "
        "In TLS with --tls-dir (callers are their certificates' identities; the "
        "certificate must be a node's or server's issued by geryon ca issue); plain "
        "text only on loopback, where every caller is the local admin and runs as "
        "@admin's account (--user only names it) and --allow-root is refused.",
    )
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="port 0: a free one")
    p.add_argument("--tls-dir", default=None, help="identity to serve with")
    p.add_argument("--node", default=None, help="this node's name (default: the hostname)")
    p.add_argument(
        "--runas",
        action="append",
        default=[],
        metavar="KEY=ACCOUNT",
        help="KEY is an identity's name or @ROLE; ACCOUNT a local account, or $user for "
        "the account named as the identity (repeatable). A caller named by none is refused",
    )
    p.add_argument("--allow-root", action="store_true", help="let the runas map name root")
    p.add_argument("--max-sessions", type=int, default=64, metavar="N", help="in all (64)")
    p.add_argument(
        "--max-sessions-per-identity", type=int, default=16, metavar="N", help="per caller (16)"
    )
    p.add_argument("--insecure", action="store_true", help="allow plain text off loopback")
    return p


async def cmd_serve(args: argparse.Namespace, argv: list[str]) -> int:
    from geryon.announce import default_host
    from geryon.cpu import runas as runas_mod
    from geryon.cpu import server
    from geryon.cpu.service import Limits

    opts = _serve_parser().parse_args(argv)
    try:
        host, port = endpoints.parse_listen(opts.listen)
    except ValueError as exc:
        _say(f"serve: --listen: {exc}")
        return 2
    if opts.max_sessions < 1 or opts.max_sessions_per_identity < 1:
        _say("serve: --max-sessions and --max-sessions-per-identity: want at least 1")
        return 2
    from geryon import tls

    tls_dir = tls.tls_dir_from(opts.tls_dir or args.tls_dir)
    if tls_dir is None and not endpoints.is_loopback(host) and not opts.insecure:
        _say(f"serve: refusing plain text on non-loopback {host}: give --tls-dir, or --insecure")
        return 2
    try:
        entries = runas_mod.parse_entries(opts.runas)
    except ValueError as exc:
        _say(f"serve: --runas: {exc}")
        return 2
    runas = runas_mod.RunAs(entries, allow_root=opts.allow_root)
    problems = runas.check()
    if problems:
        for line in problems:
            _say(f"serve: --runas {line}")
        return 2
    node = opts.node or default_host()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    def ready(bound: int) -> None:
        how = "in TLS" if tls_dir else "plain text"
        print(f"cpu: {node}: serving on {host}:{bound} ({how})", file=sys.stderr, flush=True)

    try:
        await server.serve(
            "0.0.0.0" if host == "*" else host, port, node=node, runas=runas,
            limits=Limits(opts.max_sessions, opts.max_sessions_per_identity),
            tls_dir=tls_dir, registry=args.registry, registry_timeout=args.timeout, ready=ready,
        )  # fmt: skip
    except errors.GeryonError as exc:
        _say(f"serve: {exc}")
        return 1
    except OSError as exc:
        _say(f"serve: {opts.listen}: {exc.strerror}")
        return 1
    return 0


# ---- the parser -----------------------------------------------------------------


def add_cpu_command(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "cpu",
        add_help=False,
        help="run a command on a cpu of the cluster (Inferno's cpu, rstyx); `cpu serve`",
        usage="geryon cpu [-h HOST | --attr A=V ...] [-t | -T] [-n] [--mount NAME ...] "
        "[--dir DIR] [--env VAR=VALUE ...] [-- COMMAND ARGS...]\n"
        "       geryon cpu serve --listen HOST:PORT [--tls-dir DIR] [--runas KEY=ACCOUNT ...] "
        "(geryon cpu serve --help)",
        description="Run COMMAND on a cpu service from the registry (svc=rstyx): on node "
        "HOST with -h, else the least loaded one matching every --attr (load per "
        "processor, then open sessions; ties at random). Without COMMAND: the account's "
        "login shell, on a pseudo-terminal when stdin is a terminal. Standard input, "
        "output and error are streamed; Ctrl-C, SIGTERM, SIGHUP, SIGQUIT and window "
        "changes are forwarded. --mount NAME makes disk NAME available to the command "
        "at /n/NAME (in the session's own namespace). Exit status: the command's, "
        "128+N when signal N killed it, 255 when it could not be run.",
    )
    c.add_argument("--help", action="help", help="show this help and exit")
    c.add_argument("-h", "--host", dest="node", metavar="HOST", help="the node to run on")
    c.add_argument(
        "--attr", "-a", action="append", metavar="A=V", help="pick among cpus with A=V (repeatable)"
    )
    c.add_argument(
        "-t", dest="tty", action="store_const", const=True, default=None,
        help="run on a pseudo-terminal even with a COMMAND",
    )  # fmt: skip
    c.add_argument("-T", dest="tty", action="store_const", const=False, help="never a terminal")
    c.add_argument("-n", dest="no_stdin", action="store_true", help="stdin from /dev/null")
    c.add_argument(
        "--mount", "-m", action="append", metavar="NAME", help="disk NAME at /n/NAME (repeatable)"
    )
    c.add_argument("--dir", metavar="DIR", help="working directory (default: the account's home)")
    c.add_argument(
        "--env", "-e", action="append", metavar="VAR=VALUE", help="set in its environment"
    )
    c.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND")
    c.set_defaults(run=cmd_cpu, own_signals=True)
