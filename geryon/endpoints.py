"""Servers reached at several addresses: a registry's fronts, etcd's members.

A list is written ``HOST:PORT[,HOST:PORT...]`` on command lines and in the
environment; each address is checked at once, so that a typo is an error
rather than a connection retried for ever.
"""

from __future__ import annotations

import ipaddress


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"bad address {text!r} (want HOST:PORT)")
    return host, int(port)


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT to listen on (HOST * for every address, IPv4 and IPv6); port
    0 picks a free one (a server's ready line says which)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad address {text!r} (want HOST:PORT or *:PORT)")
    return host.strip("[]"), int(port)


def split(text: str) -> list[str]:
    """The addresses of a comma-separated list, in order, blanks dropped."""
    return [part.strip() for part in text.split(",") if part.strip()]


def parse(text: str | list[str], *, unix: bool = False) -> list[str]:
    """Check a list of addresses, written ``HOST:PORT[,HOST:PORT...]`` or
    given as an array, one an element (node.toml); ``unix:PATH`` too, alone,
    when ``unix``. Raise ValueError naming the bad one."""
    if isinstance(text, str):
        parts = split(text)
        if not parts:
            raise ValueError(f"no address in {text!r} (want HOST:PORT[,HOST:PORT...])")
    else:
        if not text or not all(isinstance(t, str) for t in text):
            raise ValueError("want a non-empty array of HOST:PORT strings")
        for t in text:
            if not t.strip() or "," in t:
                raise ValueError(f"bad address {t!r} (want one HOST:PORT an element)")
        parts = [t.strip() for t in text]
    for part in parts:
        if unix and part.startswith("unix:"):
            if len(parts) > 1:
                raise ValueError(f"{text!r}: a unix: socket cannot be one of several endpoints")
            continue
        parse_hostport(part)
    if len(set(parts)) != len(parts):
        raise ValueError(f"{text!r} names an address twice")
    return parts


def registry_address(text: str | list[str]) -> str:
    """One registry's endpoints (its fronts), checked, as one comma-separated
    string: HOST:PORT[,HOST:PORT...] or unix:PATH, or an array of them."""
    return ",".join(parse(text, unix=True))


def is_loopback(host: str) -> bool:
    """Whether HOST names this machine's loopback, where plain text is allowed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
