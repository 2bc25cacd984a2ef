"""The registry's plain data: services, leases, events, filters.

No grpc and no I/O here: the store, the watch hub, the servicer and the client
all speak these types, and the rules for what a valid name or attribute is live
in one place.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

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


def validate_name(name: str, field_name: str = "name") -> str:
    """Check a service name; return it or raise InvalidArgument naming the field."""
    if not name:
        raise InvalidArgument(f"{field_name}: empty service name")
    if len(_utf8(name, field_name, "service name")) > MAX_NAME_BYTES:
        raise InvalidArgument(f"{field_name}: service name longer than {MAX_NAME_BYTES} bytes")
    if name in RESERVED_NAMES:
        raise InvalidArgument(f"{field_name}: {name!r} is a reserved name")
    for ch in name:
        if ch == " " or ch == "/" or ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0:
            raise InvalidArgument(
                f"{field_name}: service name {name!r} holds a space, '/' or control character"
            )
    return name


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
    return dict(attrs)


def validate_filter(attrs: Mapping[str, str], prefix: str = "") -> Filter:
    for attr in attrs:
        validate_attr_name(attr, "attrs")
    return Filter(dict(attrs), prefix)


def validate_ttl(ttl_ms: int) -> int:
    if not MIN_TTL_MS <= ttl_ms <= MAX_TTL_MS:
        raise InvalidArgument(
            f"ttl_ms: {ttl_ms} outside {MIN_TTL_MS}..{MAX_TTL_MS} milliseconds"
        )
    return ttl_ms


ROLES = ("server", "admin", "node", "reader")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: the name and role an authenticated connection proved."""

    name: str
    role: str = "admin"
    serial: str = ""  # the certificate's, hex; empty over plain text

    @property
    def admin(self) -> bool:
        return self.role == "admin"
