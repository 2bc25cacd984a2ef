"""The registry's plain data: services, leases, events, filters.

No grpc and no I/O here: the store, the watch hub, the servicer and the client
all speak these types, and the rules for what a valid name or attribute is live
in one place.
"""

from __future__ import annotations

import enum
import re
import sys
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from geryon.errors import InvalidArgument

Revision = int
LeaseID = int

# registry(4) gives these names meaning in its file tree; keep them free so a
# 9P front end could serve the same registry.
RESERVED_NAMES = frozenset({"new", "find", "index", "event"})
MAX_NAME_BYTES = 255
MAX_VALUE_BYTES = 1024
MAX_ATTRS = 64
ATTR_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
WILDCARD = "*"

# Characters that change how the text around them shows on a terminal, or
# break it into lines: controls (C0, DEL, C1), format characters (the bidi
# overrides and isolates, zero-width spaces and joiners, U+FEFF), the line
# and paragraph separators, and lone surrogates (no UTF-8 form, so
# unprintable). Names may not hold them; text output escapes them.
HIDDEN = {
    "Cc": "a control character",
    "Cf": "a format character",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
    "Cs": "a surrogate",
}
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}

# Lease TTL bounds, in milliseconds. The floor keeps a keepalive every
# ttl/3 from becoming a busy loop; the ceiling keeps dead leases from
# lingering for more than a day.
MIN_TTL_MS = 500
MAX_TTL_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class Service:
    """One registry entry. ``lease`` is 0 for a persistent entry."""

    name: str
    attrs: Mapping[str, str]
    lease: LeaseID = 0
    owner: str = ""
    create_revision: Revision = 0
    mod_revision: Revision = 0
    # Its form in a Watch snapshot, encoded once by convert.snapshot_response
    # (an entry is immutable, and a snapshot of 100,000 would build each
    # again): opaque bytes here, no part of what the entry is.
    wire: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def persistent(self) -> bool:
        return self.lease == 0


@dataclass(slots=True)
class Lease:
    """A lease: ``deadline`` is a time.monotonic() value, never persisted."""

    id: LeaseID
    ttl_ms: int
    owner: str
    deadline: float = 0.0
    services: set[str] = field(default_factory=set)
    # The token of the KeepAlive stream that renewed it last: when that
    # stream's client goes away, the lease ends at once.
    holder: str | None = None


class EventType(enum.Enum):
    PUT = 1
    DELETE = 2


@dataclass(frozen=True, slots=True)
class Event:
    """One change. For DELETE, ``service`` is the entry's last state."""

    type: EventType
    service: Service
    prev: Service | None
    revision: Revision


@dataclass(frozen=True, slots=True)
class Filter:
    """Find's and Watch's selection: every attr must match, and the prefix."""

    attrs: Mapping[str, str] = field(default_factory=dict)
    prefix: str = ""

    def matches(self, service: Service | None) -> bool:
        if service is None or not service.name.startswith(self.prefix):
            return False
        for attr, want in self.attrs.items():
            have = service.attrs.get(attr)
            if have is None or (want != WILDCARD and have != want):
                return False
        return True


def _utf8(text: str, field_name: str, what: str) -> bytes:
    # A lone surrogate (from surrogateescape, say) has no UTF-8 form: that is
    # bad input, not an internal error.
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise InvalidArgument(f"{field_name}: {what} is not valid UTF-8") from None


def validate_name(name: str, field_name: str = "name", *, new: bool = True) -> str:
    """Check a service name; return it or raise InvalidArgument naming the field.

    ``new=False`` for a name that only looks an entry up (get, update, remove,
    loading the store): one stored before format and separator characters
    were refused must stay reachable, to be removed."""
    if not name:
        raise InvalidArgument(f"{field_name}: empty service name")
    if len(_utf8(name, field_name, "service name")) > MAX_NAME_BYTES:
        raise InvalidArgument(f"{field_name}: service name longer than {MAX_NAME_BYTES} bytes")
    if name in RESERVED_NAMES:
        raise InvalidArgument(f"{field_name}: {name!r} is a reserved name")
    if " " in name or "/" in name:
        raise InvalidArgument(f"{field_name}: service name {name!r} holds a space or '/'")
    if name.isprintable():  # nothing HIDDEN (the common case, fast)
        return name
    for ch in name:
        category = unicodedata.category(ch)
        # Controls were always refused; the others only in new names.
        if (kind := HIDDEN.get(category)) and (new or category == "Cc"):
            # repr escapes every HIDDEN character, so the message is one line.
            raise InvalidArgument(
                f"{field_name}: service name {name!r} holds U+{ord(ch):04X}, {kind}"
            )
    return name


def escape(text: str) -> str:
    """``text`` for a terminal: each backslash and HIDDEN character written as
    Python writes it in a string literal (``\\\\``, ``\\n``, ``\\x1b``, ``\\u202e``).

    The result is one line that shows what is stored: nothing in it moves the
    cursor or reorders what follows, and it reads back as exactly ``text``.
    """
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch in _ESCAPES:
            ch = _ESCAPES[ch]
        elif unicodedata.category(ch) in HIDDEN:
            n = ord(ch)
            ch = f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"
        out.append(ch)
    return "".join(out)


def validate_attr_name(attr: str, field_name: str = "attrs") -> str:
    if not ATTR_NAME.fullmatch(attr):
        raise InvalidArgument(
            f"{field_name}: bad attribute name {attr!r} (want [A-Za-z0-9._-]{{1,64}})"
        )
    return attr


def validate_attrs(attrs: Mapping[str, str], field_name: str = "attrs") -> dict[str, str]:
    """Check a set of attributes; return a plain dict copy."""
    if len(attrs) > MAX_ATTRS:
        raise InvalidArgument(f"{field_name}: more than {MAX_ATTRS} attributes")
    for attr, value in attrs.items():
        validate_attr_name(attr, field_name)
        if len(_utf8(value, field_name, f"value of {attr!r}")) > MAX_VALUE_BYTES:
            raise InvalidArgument(
                f"{field_name}: value of {attr!r} longer than {MAX_VALUE_BYTES} bytes"
            )
    # Interned: each request brings its own copies of the same few names and
    # values, and an entry keeps them as long as it lives.
    return {sys.intern(k): sys.intern(v) for k, v in attrs.items()}


def validate_filter(attrs: Mapping[str, str], prefix: str = "") -> Filter:
    for attr in attrs:
        validate_attr_name(attr, "attrs")
    return Filter(dict(attrs), prefix)


def validate_ttl(ttl_ms: int) -> int:
    if not MIN_TTL_MS <= ttl_ms <= MAX_TTL_MS:
        raise InvalidArgument(f"ttl_ms: {ttl_ms} outside {MIN_TTL_MS}..{MAX_TTL_MS} milliseconds")
    return ttl_ms


ROLES = ("server", "admin", "node", "reader")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: the name and role an authenticated connection proved."""

    name: str
    role: str = "admin"
    serial: str = ""  # the certificate's, hex; empty over plain text
    # Over plain text, the connection's peer address. A name there is the
    # caller's own say-so, so limits count per name and connection: every
    # local process is "admin", and one must not use up another's share.
    connection: str = ""
    # When its certificate expires (POSIX time; 0: never, plain text).
    expires: float = 0.0

    @classmethod
    def plain_text(cls, metadata: Iterable[tuple[str, Any]] | None, peer: str) -> Caller:
        """A caller over plain text: the local admin, named by its
        ``geryon-user`` metadata when given (so owners still mean something
        in development), its limits its connection's."""
        name = "admin"
        for key, value in metadata or ():
            if key == "geryon-user" and value:
                name = str(value)
        return cls(name, "admin", connection=peer)

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def expires_in(self, now: float) -> float | None:
        """Seconds until its certificate expires (None: no certificate). A
        stream that outlives it is ended."""
        return max(0.0, self.expires - now) if self.expires else None

    @property
    def limited_as(self) -> str:
        """Whom per-identity limits (quotas, watches, sessions) count against."""
        return f"{self.name} on {self.connection}" if self.connection else self.name
