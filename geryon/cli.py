"""geryon: the command line. Argument parsing and printing only.

What a user of Inferno's ndb/regquery, grid/register, grid/reglisten and rmnt
reaches for, against Geryon's registry. Every error prints one line on stderr
and exits non-zero; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from geryon import errors
from geryon.cli_announce import add_announce_commands
from geryon.cli_cpu import add_cpu_command
from geryon.cli_disk import add_disk_commands
from geryon.cli_mount import add_mount_commands
from geryon.client import DEFAULT_REGISTRY, Client, WatchMessage
from geryon.endpoints import registry_address
from geryon.model import ROLES, Event, Service, escape, validate_attr_name
from geryon.resolve import add_resolve_command

Handler = Callable[[argparse.Namespace], Awaitable[int]]


class UsageError(Exception):
    """A bad command line: printed as `geryon: ...` with exit status 2."""


def parse_attr(text: str, *, wildcard: bool) -> tuple[str, str]:
    """``attr=value`` (or bare ``attr`` meaning any value, where allowed)."""
    attr, sep, value = text.partition("=")
    if not sep:
        if not wildcard:
            raise UsageError(f"want attr=value, got {text!r}")
        value = "*"
    try:
        validate_attr_name(attr, "attr")
    except errors.InvalidArgument as exc:
        raise UsageError(str(exc)) from None
    return attr, value


def parse_attrs(items: Sequence[str] | None, *, wildcard: bool = False) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        attr, value = parse_attr(item, wildcard=wildcard)
        if attr in out:
            raise UsageError(f"attribute {attr!r} given twice")
        out[attr] = value
    return out


def _registry(text: str) -> str:
    try:
        return registry_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def word(text: str) -> str:
    """One word of registry(4)'s text, quoted as Inferno's %q does: in single
    quotes (doubled inside) when empty or holding a quote or a character at or
    below space; here also any other white space, so one word never reads as
    two. Backslashes and hidden characters are escaped (model.escape): an
    entry stays on one line, and a NUL shows instead of ending the word."""
    if text and not any(c <= " " or c == "'" or c.isspace() for c in text):
        return escape(text)
    return "'" + escape(text).replace("'", "''") + "'"


def text_line(s: Service) -> str:
    """registry(4)'s text format: the name, then attr value pairs, each a word()."""
    words = [word(s.name)]
    for attr in sorted(s.attrs):
        words += [word(attr), word(s.attrs[attr])]
    return " ".join(words)


def service_json(s: Service) -> dict[str, Any]:
    return {
        "name": s.name,
        "attrs": dict(sorted(s.attrs.items())),
        "lease": s.lease,
        "owner": s.owner,
        "create_revision": s.create_revision,
        "mod_revision": s.mod_revision,
    }


def event_line(e: Event) -> str:
    return f"{e.type.name} {e.revision} {text_line(e.service)}"


def event_json(e: Event) -> dict[str, Any]:
    return {
        "type": e.type.name,
        "revision": e.revision,
        "service": service_json(e.service),
        "prev": service_json(e.prev) if e.prev else None,
    }


def client_for(args: argparse.Namespace) -> Client:
    return Client(args.registry, tls_dir=args.tls_dir, user=args.user, retry_for=args.timeout)


# ---- commands --------------------------------------------------------------


async def cmd_ls(args: argparse.Namespace) -> int:
    async with client_for(args) as c:
        services, _ = await c.find(parse_attrs(args.attr, wildcard=True), prefix=args.prefix)
    if args.json:
        print(json.dumps([service_json(s) for s in services], indent=1))
    else:
        for s in services:
            print(escape(s.name) if args.n else text_line(s))
    return 0


async def cmd_get(args: argparse.Namespace) -> int:
    async with client_for(args) as c:
        s = await c.get(args.name)
    print(json.dumps(service_json(s), indent=1) if args.json else text_line(s))
    return 0


async def cmd_set(args: argparse.Namespace) -> int:
    if args.rev < 0:
        raise UsageError(f"--rev: want a revision, got {args.rev}")
    attrs = parse_attrs(args.attrs)
    remove = [parse_attr(a + "=", wildcard=False)[0] for a in args.rm_attr or ()]
    async with client_for(args) as c:
        try:
            await c.get(args.name)
        except errors.NotFound:
            if args.rev:
                raise
            if not args.persist:
                raise UsageError(
                    f"{args.name} does not exist; give --persist to create it "
                    "(services that live with a process come from geryon register)"
                ) from None
            s = await c.register(args.name, attrs, persist=True)
        else:
            s = await c.update(
                args.name, attrs, remove_attrs=remove, expected_mod_revision=args.rev
            )
    print(text_line(s))
    return 0


async def cmd_rm(args: argparse.Namespace) -> int:
    async with client_for(args) as c:
        for name in args.names:
            await c.unregister(name, expected_mod_revision=args.rev)
    return 0


async def cmd_watch(args: argparse.Namespace) -> int:
    if args.snapshot and args.rev:
        raise UsageError("--snapshot and --rev: give one (a snapshot starts from now)")
    if args.rev < 0:
        raise UsageError(f"--rev: want a revision, got {args.rev}")
    async with client_for(args) as c:
        watch = c.watch(
            parse_attrs(args.attr, wildcard=True),
            prefix=args.prefix,
            snapshot=args.snapshot,
            start_revision=args.rev,
        )
        messages = aiter(watch)
        # The watch itself rides out a registry restart; but a registry that
        # never answers at all is an error the user should hear about.
        try:
            async with asyncio.timeout(args.timeout):
                first = await anext(messages)
        except TimeoutError:
            raise errors.Unavailable(f"no answer in {args.timeout:g}s") from None
        print_watch(first, as_json=args.json)
        async for message in messages:
            print_watch(message, as_json=args.json)
    return 0


def print_watch(m: WatchMessage, *, as_json: bool) -> None:
    if m.kind == "events":
        for e in m.events:
            print(json.dumps(event_json(e)) if as_json else event_line(e), flush=True)
    elif m.kind == "snapshot":
        for s in m.services:
            if as_json:
                print(json.dumps({"type": "SNAPSHOT", "service": service_json(s)}))
            else:
                print(f"SNAPSHOT {s.mod_revision} {text_line(s)}")
        print(
            json.dumps({"type": "SYNCED", "revision": m.revision})
            if as_json
            else f"SYNCED {m.revision}",
            flush=True,
        )


async def cmd_leases(args: argparse.Namespace) -> int:
    async with client_for(args) as c:
        leases = await c.leases()
    if args.json:
        print(json.dumps([dataclasses.asdict(lease) for lease in leases], indent=1))
    else:
        for lease in leases:
            print(
                f"{lease.id} ttl {lease.ttl_ms}ms remaining {lease.remaining_ms}ms "
                f"owner {word(lease.owner)} services {lease.services}"
            )
    return 0


async def cmd_ca(args: argparse.Namespace) -> int:
    from geryon import tls

    if args.ca_command == "init":
        tls.init_ca(Path(args.cadir), days=args.days)
        print(f"geryon: cluster CA in {args.cadir}: keep ca.key secret")
    elif args.ca_command == "issue":
        out = tls.issue(
            Path(args.cadir),
            args.name,
            role=args.role,
            out=Path(args.out),
            days=args.days,
            sans=args.san or (),
        )
        print(tls.show(out))
    else:
        print(tls.show(Path(args.dir)))
    return 0


async def cmd_ndb(args: argparse.Namespace) -> int:
    from geryon import ndb

    return ndb.query_main(args.args, sys.stdout, sys.stderr)


# ---- the parser ------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="geryon",
        description="Query and change Geryon's registry (Inferno's ndb/regquery and friends).",
    )
    p.add_argument(
        "--registry",
        type=_registry,
        default=os.environ.get("GERYON_REGISTRY", DEFAULT_REGISTRY),
        metavar="HOST:PORT[,...]",
        help="the registry, or its fronts tried in turn "
        f"(default $GERYON_REGISTRY or {DEFAULT_REGISTRY})",
    )
    p.add_argument(
        "--tls-dir",
        default=os.environ.get("GERYON_TLS_DIR") or None,
        help="identity to connect with: ca.crt, cert.pem, key.pem "
        "(default $GERYON_TLS_DIR; none: plain text)",
    )
    p.add_argument(
        "--user", default=None, help="owner name to act as over plain text (default $GERYON_USER)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to retry an unreachable registry (default 10)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    ls = sub.add_parser(
        "ls",
        help="list services matching attributes (ndb/regquery)",
        description="List services having every attribute given; "
        "A=* or a bare A matches any value. One line per service: "
        "the name, then attribute value pairs.",
    )
    ls.add_argument("--attr", "-a", action="append", metavar="A=V", help="filter (repeatable)")
    ls.add_argument("--prefix", default="", help="only names starting with this")
    ls.add_argument("-n", action="store_true", help="print names only")
    ls.add_argument("--json", action="store_true", help="print a JSON array")
    ls.set_defaults(run=cmd_ls)

    get = sub.add_parser("get", help="show one service")
    get.add_argument("name")
    get.add_argument("--json", action="store_true")
    get.set_defaults(run=cmd_get)

    st = sub.add_parser(
        "set",
        help="create (with --persist) or update a service",
        description="Set attributes on a service: merges into an existing "
        "one, or creates a persistent one with --persist.",
    )
    st.add_argument("name")
    st.add_argument("attrs", nargs="*", metavar="A=V")
    st.add_argument(
        "--persist",
        action="store_true",
        help="create the service if missing; it lives until removed",
    )
    st.add_argument("--rm-attr", action="append", metavar="A", help="remove an attribute")
    st.add_argument(
        "--rev", type=int, default=0, help="only if the service's mod_revision is still this"
    )
    st.set_defaults(run=cmd_set)

    rm = sub.add_parser("rm", help="remove services")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.add_argument(
        "--rev", type=int, default=0, help="only if the service's mod_revision is still this"
    )
    rm.set_defaults(run=cmd_rm)

    w = sub.add_parser(
        "watch",
        help="print changes as they happen, until interrupted",
        description="One line per event: PUT or DELETE, the revision, "
        "then the service as ls prints it. Runs until SIGINT or SIGTERM "
        "(exit status 130 or 143).",
    )
    w.add_argument("--attr", "-a", action="append", metavar="A=V", help="filter (repeatable)")
    w.add_argument("--prefix", default="", help="only names starting with this")
    w.add_argument(
        "--snapshot",
        action="store_true",
        help="first print the matching services (SNAPSHOT lines, then SYNCED)",
    )
    w.add_argument("--rev", type=int, default=0, help="start from this revision")
    w.add_argument("--json", action="store_true", help="JSON lines")
    w.set_defaults(run=cmd_watch)

    le = sub.add_parser("leases", help="list live leases (yours; an admin sees every one)")
    le.add_argument("--json", action="store_true")
    le.set_defaults(run=cmd_leases)

    ca = sub.add_parser(
        "ca",
        help="make a cluster CA and issue identities",
        description="Identities for mutual TLS: a cluster CA (Inferno's "
        "createsignerkey) and certificates naming geryon://ROLE/NAME "
        "(getauthinfo). Keys are written mode 0600 and never printed.",
    )
    casub = ca.add_subparsers(dest="ca_command", metavar="CA_COMMAND")
    casub.required = True
    init = casub.add_parser("init", help="make a cluster CA in CADIR")
    init.add_argument("cadir")
    init.add_argument("--days", type=int, default=3650)
    iss = casub.add_parser("issue", help="issue an identity: ca.crt, cert.pem, key.pem in --out")
    iss.add_argument("cadir")
    iss.add_argument("name")
    iss.add_argument("--role", required=True, choices=ROLES)
    iss.add_argument("--out", required=True, metavar="DIR")
    iss.add_argument("--days", type=int, default=365)
    iss.add_argument(
        "--san",
        action="append",
        metavar="HOST",
        help="extra DNS name or IP for a server certificate (repeatable)",
    )
    show = casub.add_parser("show", help="who a certificate says it is, and when it expires")
    show.add_argument("dir", metavar="DIR_OR_CERT")
    ca.set_defaults(run=cmd_ca)

    nd = sub.add_parser("ndb", help="query an ndb file as Inferno's ndb/query does")
    ndsub = nd.add_subparsers(dest="ndb_command", metavar="NDB_COMMAND")
    ndsub.required = True
    q = ndsub.add_parser(
        "query",
        help="ndb/query [-a] [-f FILE] ATTR [VALUE [RATTR]]",
        prefix_chars="\0",
        add_help=False,
    )
    q.add_argument("args", nargs=argparse.REMAINDER)
    nd.set_defaults(run=cmd_ndb)
    add_announce_commands(sub)
    add_resolve_command(sub)
    add_mount_commands(sub)
    add_disk_commands(sub)
    add_cpu_command(sub)
    return p


async def run_interruptible(args: argparse.Namespace) -> int:
    """Run the command; SIGINT or SIGTERM cancels it and exits 128+N.

    asyncio.run's own SIGINT handler is not enough: a signal the kernel hands
    to one of grpc's threads does not wake a loop parked on a quiet watch. A
    wakeup fd does, whichever thread takes the signal."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    caught: list[int] = []
    wake_r, wake_w = socket.socketpair()
    for end in (wake_r, wake_w):
        end.setblocking(False)

    # Cancelling the root task, not setting a flag: every command is a plain
    # await chain with nothing to finish first. A second signal is the
    # default one again, so it ends a command that is stuck outside the loop.
    def on_signal(sig: int, _frame: object) -> None:
        caught.append(sig)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        loop.call_soon_threadsafe(task.cancel)

    loop.add_reader(wake_r.fileno(), wake_r.recv, 512)
    old_fd = signal.set_wakeup_fd(wake_w.fileno())
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        return await args.run(args)
    except asyncio.CancelledError:
        if caught:
            return 128 + caught[0]
        raise
    finally:
        signal.set_wakeup_fd(old_fd)
        loop.remove_reader(wake_r.fileno())
        wake_r.close()
        wake_w.close()


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # A command that handles its own signals (geryon cpu forwards them).
        run = args.run(args) if getattr(args, "own_signals", False) else run_interruptible(args)
        code = asyncio.run(run)
    except UsageError as exc:
        print(f"geryon: {exc}", file=sys.stderr)
        code = 2
    except errors.Unavailable as exc:
        print(f"geryon: registry {args.registry} unreachable: {exc}", file=sys.stderr)
        code = 1
    except errors.DeadlineExceeded:
        print(
            f"geryon: registry {args.registry} did not answer in {args.timeout}s", file=sys.stderr
        )
        code = 1
    except errors.GeryonError as exc:
        print(f"geryon: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
