"""A disk's users and groups: Inferno's /adm/users.

One line per user, each also a group of the same name:

    id:name:leader:members

``id`` is a number, ``leader`` (may be empty) the user who may change the
group's files' modes and groups, ``members`` a comma-separated list. A user
is a member of its own group. ``none`` always exists and is nobody's member;
it gets only a file's "other" permissions. Blank lines and lines starting
with # are ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

NONE = "none"
ADM = "adm"
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


class UsersError(ValueError):
    """A users file that does not parse: says which line and why."""


@dataclass(frozen=True, slots=True)
class Group:
    id: int
    name: str
    leader: str
    members: frozenset[str]


@dataclass(frozen=True)
class Users:
    groups: dict[str, Group] = field(default_factory=dict)

    def exists(self, user: str) -> bool:
        return user == NONE or user in self.groups

    def member(self, user: str, group: str) -> bool:
        if user == NONE:
            return False
        g = self.groups.get(group)
        return user == group or (g is not None and user in g.members)

    def leader(self, user: str, group: str) -> bool:
        """Plan 9: a group's leader, or any member when it names none."""
        g = self.groups.get(group)
        if g is None:
            return user == group
        return user == g.leader if g.leader else self.member(user, group)

    def text(self) -> str:
        lines = [
            f"{g.id}:{g.name}:{g.leader}:{','.join(sorted(g.members))}"
            for g in sorted(self.groups.values(), key=lambda g: (g.id, g.name))
        ]
        return "\n".join(lines) + "\n"


def parse(text: str) -> Users:
    groups: dict[str, Group] = {}
    ids: dict[int, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) != 4:
            raise UsersError(f"line {n}: want id:name:leader:members, got {line!r}")
        sid, name, leader, members = parts
        try:
            uid = int(sid)
        except ValueError:
            raise UsersError(f"line {n}: id {sid!r} is not a number") from None
        for who in [name, leader, *members.split(",")]:
            if who and not _NAME.fullmatch(who):
                raise UsersError(f"line {n}: bad user name {who!r}")
        if not name:
            raise UsersError(f"line {n}: empty name")
        if name in groups:
            raise UsersError(f"line {n}: {name} given twice")
        if uid in ids:
            raise UsersError(f"line {n}: id {uid} already used by {ids[uid]}")
        ids[uid] = name
        groups[name] = Group(uid, name, leader, frozenset(m for m in members.split(",") if m))
    for g in groups.values():
        for who in [g.leader, *g.members]:
            if who and who not in groups and who != NONE:
                raise UsersError(f"group {g.name} names unknown user {who}")
    return Users(groups)


def default(owner: str) -> str:
    """The users file `geryon disk format` writes when given none."""
    lines = [f"-1:{ADM}:{ADM}:{owner if owner not in (ADM, NONE) else ''}", f"0:{NONE}::"]
    if owner not in (ADM, NONE):
        lines.append(f"10000:{owner}:{owner}:")
    return "\n".join(lines) + "\n"
