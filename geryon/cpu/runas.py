"""Which local account a caller's commands run as: Inferno's ``runas $user``.

A map from callers to accounts, kept in node.toml's ``[cpu.runas]`` or given
as ``--runas KEY=ACCOUNT``:

    glenda = "glenda"      # the identity named glenda (any role but reader)
    "@node" = "geryon"     # any identity of role node
    "@admin" = "$user"     # the local account named as the identity

An identity's own name wins over its role. Nobody runs as root (uid 0)
unless the map was built with ``allow_root``; a reader never runs anything;
a caller the map does not name is refused. Accounts are looked up when a
session starts, so an account added later works and one removed is refused.
"""

from __future__ import annotations

import os
import pwd
import re
from collections.abc import Mapping
from dataclasses import dataclass

from geryon.errors import PermissionDenied
from geryon.model import ROLES, Caller

SAME_NAME = "$user"
NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Roles that never run commands: a reader may only look.
NEVER = frozenset({"reader"})


@dataclass(frozen=True, slots=True)
class Account:
    """A local account, as a session needs it."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str


def account(name: str) -> Account:
    """The local account NAME; KeyError when there is none."""
    pw = pwd.getpwnam(name)
    return Account(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, pw.pw_shell or "/bin/sh")


class RunAs:
    """The checked map. ``check`` (at start) says what can never work;
    ``resolve`` (per session) gives the account or PermissionDenied."""

    def __init__(self, entries: Mapping[str, str], *, allow_root: bool = False) -> None:
        self.entries = dict(entries)
        self.allow_root = allow_root

    def check(self) -> list[str]:
        """Problems with the map, one line each: a bad key, an account that
        does not exist, root without allow_root, or an account this process
        cannot switch to."""
        problems = []
        me = os.geteuid()
        for key, value in self.entries.items():
            role = key[1:] if key.startswith("@") else None
            if role is None and not NAME.fullmatch(key):
                problems.append(f"{key!r}: not an identity's name ([A-Za-z0-9._-], 1 to 64) "
                                "or @ROLE")  # fmt: skip
                continue
            if role is not None and role not in ROLES:
                problems.append(f"{key}: no such role (want @{', @'.join(ROLES)})")
            elif role in NEVER:
                problems.append(f"{key}: a {role} never runs commands")
            if not key or not value:
                problems.append(f"{key!r} = {value!r}: empty")
                continue
            if value == SAME_NAME:
                continue
            try:
                acct = account(value)
            except KeyError:
                problems.append(f"{key}: no local account {value!r}")
                continue
            if acct.uid == 0 and not self.allow_root:
                problems.append(f"{key}: runs as root; only with allow_root")
            elif me != 0 and acct.uid != me:
                problems.append(
                    f"{key}: cannot run as {value}: this server is not root "
                    f"(it runs as {pwd.getpwuid(me).pw_name})"
                )
        return problems

    def resolve(self, caller: Caller) -> Account:
        if caller.role in NEVER:
            raise PermissionDenied(f"cpu: {caller.role} {caller.name} may not run commands")
        value = self.entries.get(caller.name) or self.entries.get(f"@{caller.role}")
        if value is None:
            raise PermissionDenied(
                f"cpu: {caller.role} {caller.name} has no account here "
                f"(the runas map names neither {caller.name} nor @{caller.role})"
            )
        name = caller.name if value == SAME_NAME else value
        try:
            acct = account(name)
        except KeyError:
            raise PermissionDenied(f"cpu: no local account {name!r} for {caller.name}") from None
        if acct.uid == 0 and not self.allow_root:
            raise PermissionDenied(f"cpu: {caller.name} would run as root, which is not allowed")
        me = os.geteuid()
        if me != 0 and acct.uid != me:
            raise PermissionDenied(f"cpu: cannot run as {name}: this server is not root")
        return acct


def parse_entries(items: list[str]) -> dict[str, str]:
    """``KEY=ACCOUNT`` strings (--runas); ValueError names the bad one."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"bad runas {item!r} (want NAME=ACCOUNT or @ROLE=ACCOUNT)")
        out[key] = value
    return out
