"""`geryon register` and `geryon reglisten`: their command lines only; the
work is in geryon.announce.

As Inferno's grid/register and grid/reglisten, with ``-a ATTR VALUE`` taking
two words, and the command after ``--``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geryon.errors import InvalidArgument
from geryon.model import validate_attr_name

if TYPE_CHECKING:  # the work is imported when a command runs: the CLI starts faster
    from geryon.announce import AnnounceOptions


class _AttrAction(argparse.Action):
    """``-a ATTR VALUE``: collect into a dict, checking the attribute name."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        attr, value = values
        try:
            validate_attr_name(attr, "-a")
        except InvalidArgument as exc:
            parser.error(str(exc))
        attrs = dict(getattr(namespace, self.dest) or {})
        attrs[attr] = value
        setattr(namespace, self.dest, attrs)


def _listen_addr(text: str) -> Any:
    from geryon.agent_config import parse_listen_addr  # imported when used: a faster start

    try:
        return parse_listen_addr(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    """Seconds (``2.5``), or with a unit as in node.toml (``250ms``, ``2m``); at most a day."""
    from geryon.agent_config import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _conns(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"want at least 1 connection, got {text!r}")
    return n


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-a",
        dest="attrs",
        nargs=2,
        action=_AttrAction,
        metavar=("ATTR", "VALUE"),
        help="an attribute of the entry (repeatable); proto, auth and name "
        "default to styx, none and the node's name",
    )
    p.add_argument(
        "--host",
        default="",
        help="this node's name: the name and host attributes (default $GERYON_HOST "
        "or the hostname)",
    )
    p.add_argument(
        "--advertise",
        default=os.environ.get("GERYON_ADVERTISE", ""),
        metavar="ADDR",
        help="the host others dial, in the registered tcp!ADDR!PORT "
        "(default $GERYON_ADVERTISE or --host)",
    )
    p.add_argument(
        "--lease-ttl",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="lease time to live (default 10)",
    )
    p.add_argument(
        "--reconnect-max",
        type=_seconds,
        default=None,  # $GERYON_RECONNECT_MAX, read only when register or reglisten runs
        metavar="SECONDS",
        help="longest wait between attempts to reach the registry "
        "(default $GERYON_RECONNECT_MAX or 10)",
    )
    p.add_argument(
        "--stop-grace",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="SIGTERM to SIGKILL when stopping COMMAND (default 5)",
    )


def _options(args: argparse.Namespace) -> AnnounceOptions | None:
    """The options, or None once a bad environment variable was reported."""
    logging.basicConfig(format="%(message)s", level=logging.INFO, stream=sys.stderr)
    reconnect_max = args.reconnect_max
    if reconnect_max is None:
        try:
            from geryon.agent_config import parse_duration

            reconnect_max = parse_duration(os.environ.get("GERYON_RECONNECT_MAX") or "10")
        except ValueError as exc:
            print(f"geryon: GERYON_RECONNECT_MAX: {exc}", file=sys.stderr)
            return None
    from geryon.announce import AnnounceOptions

    return AnnounceOptions(
        registry=args.registry,
        tls_dir=Path(args.tls_dir) if args.tls_dir else None,
        user=args.user,
        host=args.host,
        advertise=args.advertise,
        attrs=args.attrs or {},
        lease_ttl=args.lease_ttl,
        reconnect_max=reconnect_max,
        ready_timeout=getattr(args, "ready_timeout", 30.0),
        stop_grace=args.stop_grace,
    )


async def cmd_register(args: argparse.Namespace) -> int:
    from geryon.announce import run_register

    opts = _options(args)
    return 2 if opts is None else await run_register(opts, args.command)


async def cmd_reglisten(args: argparse.Namespace) -> int:
    from geryon.announce import run_reglisten

    opts = _options(args)
    if opts is None:
        return 2
    return await run_reglisten(opts, args.addr, args.command, max_conns=args.max_conns)


def add_announce_commands(sub: Any) -> None:
    """Add register and reglisten to geryon's subcommands."""
    r = sub.add_parser(
        "register",
        help="run a service on a free port and announce it (grid/register)",
        description="Pick a free port, start COMMAND with {port} and {addr} "
        "replaced in its arguments (and GERYON_PORT, GERYON_ADDR in its "
        "environment), and once the port accepts connections register "
        "tcp!HOST!PORT under a lease, kept while the registry comes and goes. "
        "The entry goes when COMMAND exits; register exits with its status.",
    )
    _common(r)
    r.add_argument(
        "--ready-timeout",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long COMMAND may take to accept connections (default 30)",
    )
    r.add_argument("command", nargs="+", metavar="COMMAND", help="after --: the service")
    r.set_defaults(run=cmd_register)

    rl = sub.add_parser(
        "reglisten",
        help="listen on ADDR, announce it, run COMMAND per connection (grid/reglisten)",
        description="Listen on ADDR (tcp!*!0: any interface, a free port; or "
        "tcp!HOST!PORT), register the address really got, and run COMMAND for "
        "each connection with the connection as its stdin and stdout.",
    )
    _common(rl)
    rl.add_argument(
        "-u",
        "--max-conns",
        type=_conns,
        default=64,
        metavar="N",
        help="connections served at once; past it: 'server overloaded' (default 64)",
    )
    rl.add_argument("addr", type=_listen_addr, metavar="ADDR")
    rl.add_argument("command", nargs="+", metavar="COMMAND", help="after --: the server")
    rl.set_defaults(run=cmd_reglisten)
