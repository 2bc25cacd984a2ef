"""``geryon resolve NAME``: the address a disk name resolves to now.

The seed's ``rmnt`` read a disk name's entry and mounted its ``addr``; this
prints that ``addr`` (for ``mount -c $addr /n/NAME`` or a script), and exits 1
with one line on stderr when the name is unknown or its disk is down, so a
script never mounts a stale address. Kept apart from cli.py, which only calls
``add_resolve_command``.
"""

from __future__ import annotations

import argparse
import sys

from geryon import errors
from geryon.client import Client
from geryon.model import Service, escape


class Unresolved(errors.GeryonError):
    """A disk name that has no usable address now: unknown, down or addr-less."""


async def disk_entry(client: Client, name: str) -> Service:
    """NAME's entry, checked usable: Unresolved (one line) when it is not."""
    try:
        s = await client.get(name)
    except errors.NotFound:
        raise Unresolved(f"no disk named {name}") from None
    addr = s.attrs.get("addr", "")
    if s.attrs.get("status") == "down" or not addr:
        where = escape(s.attrs.get("host", "?") + "!" + s.attrs.get("chunk", "?"))
        what = "is down" if s.attrs.get("status") == "down" else "has no addr"
        raise Unresolved(f"{name} {what} (chunk {where})")
    return s


async def cmd_resolve(args: argparse.Namespace) -> int:
    async with Client(
        args.registry, tls_dir=args.tls_dir, user=args.user, retry_for=args.timeout
    ) as c:
        try:
            s = await disk_entry(c, args.name)
        except Unresolved as exc:
            print(f"geryon: resolve: {exc}", file=sys.stderr)
            return 1
    print(escape(s.attrs["addr"]))  # an addr holding a line break prints as one line
    return 0


def add_resolve_command(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "resolve",
        help="print the address a disk name resolves to now",
        description="Print the addr of NAME's entry (what rmnt mounts). Exit 1 "
        "when NAME is unknown or its disk is down.",
    )
    r.add_argument("name", metavar="NAME")
    r.set_defaults(run=cmd_resolve)
