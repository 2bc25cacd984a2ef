"""geryon-agent's configuration: one TOML file per node, checked whole before
anything starts.

Every mistake is reported as ``FILE: KEY: what is wrong``, all of them at once,
so a node's operator fixes the file in one pass. The parsed config is plain
frozen data: the agent compares two of them to apply a SIGHUP's difference.

    registry = "reghost:6675"   # HOST:PORT, or a list of a registry's fronts
                                # (default $GERYON_REGISTRY)
    host = "host0"              # this node's name (default: the hostname)
    advertise = "10.0.0.5"      # what others dial (default: host)
    tls_dir = "/etc/geryon"     # identity for the registry (default: plain text)
    lease_ttl = "10s"           # the one lease every entry lives under
    reconnect_max_delay = "10s" # backoff cap while the registry is away
    stop_grace = "5s"           # SIGTERM to SIGKILL when stopping a service
    restart = "always"          # defaults for every service below:
    restart_delay = "1s"        #   always | on-failure | never, and the
    restart_max_delay = "30s"   #   jittered exponential backoff between
    ready_timeout = "30s"       #   restarts; how long a port may take to open

    [[chunk]]                   # id, path, size: required
    id = "chunk0"
    path = "/chunks/chunk0"
    size = "64MiB"              # without a command: a disk of this capacity,
                                #   formatted when new and served over 9P2000
                                #   (geryon disk serve); with one, the file is
                                #   made this size and the command serves it
    command = ["my-server", "{path}", "{port}"]
    owner = "glenda"            # a new disk's owner (default: the agent's TLS
                                #   identity, else the user running the agent)
    users = "users"             # a new disk's /adm/users (id:name:leader:members)
    sync = false                # a disk: as a replicated disk's primary, acknowledge
                                #   a durable write only once the replica has it
    port = 0                    # 0: a free port at each start
    attrs = { kfs = "1" }
    env = { NAME = "value" }
    health = { type = "tcp", interval = "5s", timeout = "2s",
               success_threshold = 1, failure_threshold = 3 }

    [[cpu]]                     # a cpu service (geryon cpu serve), svc=rstyx
    port = 0                    # 0: a free port at each start
    runas = { "@admin" = "ops", glenda = "$user" }  # caller -> local account
    allow_root = false          # may the runas map name root?
    max_sessions = 64           # at once, in all
    max_sessions_per_identity = 16
    attrs = { arch = "amd64" }  # svc, ncpu, load, sessions are the agent's

    [[listener]]                # addr, command: required
    addr = "tcp!*!0"
    command = ["..."]           # one per connection, on its stdin and stdout
    max_conns = 64
    attrs = { svc = "rstyx" }

Health types: "tcp" (connect to the port; a chunk's default), "command"
(``command`` exits 0), "grpc" (the gRPC health protocol, ``service`` naming
the service to ask about), "none" (a listener's default).
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

from geryon.endpoints import registry_address
from geryon.errors import InvalidArgument
from geryon.model import validate_attr_name


class ConfigError(Exception):
    """Everything wrong with a config file, one ``FILE: KEY: what`` a line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


RESTART_POLICIES = ("always", "on-failure", "never")
HEALTH_TYPES = ("tcp", "command", "grpc", "none")
# Attributes the agent sets itself; a config may not override them.
CHUNK_OWN_ATTRS = frozenset(
    {"id", "host", "size", "used", "path", "name", "pid", "started", "health", "applied",
     "epoch"}
)
LISTENER_OWN_ATTRS = frozenset({"host", "name", "pid", "started", "health"})
CPU_OWN_ATTRS = LISTENER_OWN_ATTRS | {"svc", "ncpu", "load", "sessions"}
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")

SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# The longest duration anything takes: a day, the registry's longest lease.
MAX_DURATION_S = 86400.0


# ---- values ----------------------------------------------------------------


def parse_size(value: object) -> int:
    """Bytes from ``65536``, ``"64MiB"``, ``"1G"`` (binary) or ``"1GB"`` (decimal)."""
    if isinstance(value, bool):
        raise ValueError(f"bad size {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).lower() not in SIZE_UNITS:
            raise ValueError(
                f"bad size {value!r} (want bytes, or a number with KiB, MiB, GiB, TiB, "
                "K, M, G, T, KB, MB, GB or TB)"
            )
        n = int(m.group(1)) * SIZE_UNITS[m.group(2).lower()]
    else:
        raise ValueError(f"bad size {value!r}")
    if n <= 0:
        raise ValueError(f"bad size {value!r}: must be positive")
    return n


def parse_duration(value: object) -> float:
    """Seconds from ``"250ms"``, ``"1.5s"``, ``"2m"``, ``"1h"`` or a number of
    seconds: positive, finite and at most MAX_DURATION_S."""
    if isinstance(value, bool):
        raise ValueError(f"bad duration {value!r}")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an integer too big for a float: too long anyway
            seconds = math.inf
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*", value)
        if not m:
            raise ValueError(f"bad duration {value!r} (want e.g. 250ms, 1.5s, 2m, 1h)")
        seconds = float(m.group(1)) * DURATION_UNITS[m.group(2) or "s"]
    else:
        raise ValueError(f"bad duration {value!r}")
    if math.isnan(seconds):
        raise ValueError(f"bad duration {value!r}: not a number")
    if seconds <= 0:
        raise ValueError(f"bad duration {value!r}: must be positive")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"bad duration {value!r}: at most {MAX_DURATION_S:g}s (a day)")
    return seconds


@dataclass(frozen=True, slots=True)
class ListenAddr:
    """An Inferno listen address: ``tcp!*!0`` (any interface, any port) or
    ``tcp!HOST!PORT``."""

    host: str  # "*" for any interface
    port: int

    def __str__(self) -> str:
        return f"tcp!{self.host}!{self.port}"

    @property
    def bind_host(self) -> str:
        return "0.0.0.0" if self.host == "*" else self.host


def parse_listen_addr(text: str) -> ListenAddr:
    parts = text.split("!")
    if len(parts) != 3 or parts[0] != "tcp" or not parts[1]:
        raise ValueError(f"bad address {text!r} (want tcp!*!PORT or tcp!HOST!PORT)")
    if not parts[2].isdigit() or not 0 <= int(parts[2]) <= 65535:
        raise ValueError(f"bad address {text!r}: port {parts[2]!r} is not 0..65535")
    return ListenAddr(parts[1], int(parts[2]))


# ---- the parsed config -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class HealthSpec:
    type: str = "tcp"
    command: tuple[str, ...] = ()
    service: str = ""
    interval: float = 5.0
    timeout: float = 2.0
    success_threshold: int = 1
    failure_threshold: int = 3


@dataclass(frozen=True, slots=True)
class RestartSpec:
    policy: str = "always"
    delay: float = 1.0
    max_delay: float = 30.0


@dataclass(frozen=True, slots=True)
class ChunkSpec:
    id: str
    path: Path
    _: KW_ONLY
    size: int
    command: tuple[str, ...]
    attrs: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    port: int = 0
    health: HealthSpec = HealthSpec()
    restart: RestartSpec = RestartSpec()
    ready_timeout: float = 30.0
    owner: str = ""  # a new disk's owner ("": the agent's identity)
    users: Path | None = None  # a new disk's /adm/users ("": one naming the owner)
    sync: bool = False  # a disk: writes wait for its replica (geryon disk serve --sync)

    @property
    def key(self) -> str:
        return f"chunk {self.id}"

    @property
    def is_disk(self) -> bool:
        """No command: the agent serves the chunk as a disk (geryon disk serve)."""
        return not self.command

    @property
    def announced_attrs(self) -> dict[str, str]:
        """The configured attributes and what the agent adds from the spec."""
        own = {"id": self.id, "size": str(self.size), "path": str(self.path)}
        if self.is_disk:
            own["proto"] = "9p"
        return {**self.attrs, **own}


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    addr: ListenAddr
    command: tuple[str, ...]
    _: KW_ONLY
    attrs: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    max_conns: int = 64
    health: HealthSpec = HealthSpec(type="none")
    # Which listener on this addr, in file order: tcp!*!0 may be listened on
    # many times, and each must keep a key of its own for a reload's diff.
    index: int = 0

    @property
    def key(self) -> str:
        return f"listener {self.addr}#{self.index}"


@dataclass(frozen=True, slots=True)
class CpuSpec:
    index: int  # which [[cpu]], in file order
    _: KW_ONLY
    runas: Mapping[str, str] = field(default_factory=dict)
    allow_root: bool = False
    max_sessions: int = 64
    max_sessions_per_identity: int = 16
    port: int = 0
    attrs: Mapping[str, str] = field(default_factory=dict)
    health: HealthSpec = HealthSpec()
    restart: RestartSpec = RestartSpec()
    ready_timeout: float = 30.0

    @property
    def key(self) -> str:
        return f"cpu[{self.index}]"

    @property
    def announced_attrs(self) -> dict[str, str]:
        return {**self.attrs, "svc": "rstyx", "proto": "grpc"}


@dataclass(frozen=True, slots=True)
class AgentConfig:
    path: Path
    registry: str
    _: KW_ONLY
    host: str
    advertise: str
    tls_dir: Path | None = None
    lease_ttl: float = 10.0
    reconnect_max_delay: float = 10.0
    stop_grace: float = 5.0
    chunks: tuple[ChunkSpec, ...] = ()
    listeners: tuple[ListenerSpec, ...] = ()
    cpus: tuple[CpuSpec, ...] = ()

    @property
    def services(self) -> dict[str, ChunkSpec | ListenerSpec | CpuSpec]:
        return {s.key: s for s in (*self.chunks, *self.listeners, *self.cpus)}


# ---- reading ---------------------------------------------------------------


class _Table:
    """One TOML table being read: remembers which keys were used and every
    problem found, each under its full key."""

    def __init__(self, data: Mapping[str, Any], where: str, problems: list[str], file: str):
        self.data, self.where, self.problems, self.file = data, where, problems, file
        self.used: set[str] = set()

    def key(self, k: str) -> str:
        return f"{self.where}.{k}" if self.where else k

    def tables(self, k: str) -> Iterator[tuple[int, _Table]]:
        """The tables of the array of tables ``[[k]]``, each read on its own."""
        for i, raw in enumerate(self.get(k, list, []) or []):
            where = f"{self.key(k)}[{i}]"
            if not isinstance(raw, dict):
                self.problem(f"{k}[{i}]", f"want a table ([[{k}]])")
                continue
            yield i, _Table(raw, where, self.problems, self.file)

    def problem(self, k: str, what: str) -> None:
        self.problems.append(f"{self.file}: {self.key(k)}: {what}")

    def get(
        self,
        k: str,
        kinds: type | tuple[type, ...],
        default: Any = None,
        *,
        required: bool = False,
        parse: Callable[[Any], Any] | None = None,
    ) -> Any:
        self.used.add(k)
        if k not in self.data:
            if required:
                self.problem(k, "missing")
            return default
        v = self.data[k]
        if isinstance(v, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
            self.problem(k, f"want {_kind_name(kinds)}, got {v!r}")
            return default
        if not isinstance(v, kinds):
            self.problem(k, f"want {_kind_name(kinds)}, got {_toml_type(v)} {v!r}")
            return default
        if parse is not None:
            try:
                return parse(v)
            except ValueError as exc:
                self.problem(k, str(exc))
                return default
        return v

    def table(self, k: str) -> _Table | None:
        v = self.get(k, dict)
        return _Table(v, self.key(k), self.problems, self.file) if v is not None else None

    def finish(self, known: set[str]) -> None:
        for k in self.data:
            if k not in known:
                self.problem(k, f"unknown key (known: {', '.join(sorted(known))})")


def _kind_name(kinds: type | tuple[type, ...]) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        list: "an array",
        dict: "a table",
        bool: "true or false",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _toml_type(v: object) -> str:
    return {
        str: "string",
        int: "integer",
        float: "float",
        list: "array",
        dict: "table",
        bool: "boolean",
    }.get(type(v), type(v).__name__)


def _command(t: _Table, k: str, required: bool = True) -> tuple[str, ...]:
    v = t.get(k, list, required=required)
    if v is None:
        return ()
    if not v or not all(isinstance(a, str) for a in v) or not v[0]:
        t.problem(k, "want a non-empty array of strings (the program, then its arguments)")
        return ()
    return tuple(v)


def _strings(t: _Table, k: str, *, attrs: bool, own: frozenset[str] = frozenset()) -> dict:
    v = t.get(k, dict, {})
    out: dict[str, str] = {}
    for name, value in (v or {}).items():
        where = f"{k}.{name}"
        if attrs:
            try:
                validate_attr_name(name, "attr")
            except InvalidArgument as exc:
                t.problem(where, str(exc).removeprefix("attr: "))
                continue
            if name in own:
                t.problem(where, "set by the agent itself; choose another name")
                continue
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            t.problem(where, f"want a string, got {_toml_type(value)} {value!r}")
            continue
        out[name] = str(value)
    return out


def _health(t: _Table, default_type: str) -> HealthSpec:
    h = t.table("health")
    if h is None:
        return HealthSpec(type=default_type)
    kind = h.get("type", str, default_type)
    if kind not in HEALTH_TYPES:
        h.problem("type", f"unknown health check {kind!r} (want {', '.join(HEALTH_TYPES)})")
        kind = default_type
    command = _command(h, "command", required=kind == "command")
    if command and kind != "command":
        h.problem("command", f'only for type = "command", not {kind!r}')
    spec = HealthSpec(
        type=kind,
        command=command,
        service=h.get("service", str, ""),
        interval=h.get("interval", (str, int, float), 5.0, parse=parse_duration),
        timeout=h.get("timeout", (str, int, float), 2.0, parse=parse_duration),
        success_threshold=h.get("success_threshold", int, 1, parse=_positive),
        failure_threshold=h.get("failure_threshold", int, 3, parse=_positive),
    )
    h.finish(HEALTH_KEYS)
    return spec


def _claim(t: _Table, k: str, port: int | None, ports: dict[int, str]) -> None:
    """Key K asks for PORT (0: any free one): one fixed port per service."""
    if port:
        if port in ports:
            t.problem(k, f"port {port} is also {ports[port]}")
        ports.setdefault(port, t.key(k))


def _positive(n: int) -> int:
    if n < 1:
        raise ValueError(f"want at least 1, got {n}")
    return n


def _restart(t: _Table, default: RestartSpec) -> RestartSpec:
    policy = t.get("restart", str, default.policy)
    if policy not in RESTART_POLICIES:
        t.problem("restart", f"unknown policy {policy!r} (want {', '.join(RESTART_POLICIES)})")
        policy = default.policy
    return RestartSpec(
        policy,
        t.get("restart_delay", (str, int, float), default.delay, parse=parse_duration),
        t.get("restart_max_delay", (str, int, float), default.max_delay, parse=parse_duration),
    )


def _name(v: str) -> str:
    if not NAME_RE.fullmatch(v):
        raise ValueError(f"bad name {v!r} (want [A-Za-z0-9._-], 1 to 64 characters)")
    return v


def _advertise(v: str) -> str:
    if not v or any(c in v for c in "! /\t\n"):
        raise ValueError(f"bad address {v!r} (a host name or IP address)")
    return v


def _port(n: int) -> int:
    if not 0 <= n <= 65535:
        raise ValueError(f"bad port {n} (want 0..65535; 0 picks a free one)")
    return n


def parse(data: Mapping[str, Any], path: Path) -> AgentConfig:
    """Check a parsed TOML document; raise ConfigError listing every problem."""
    # Imported here: the CLI reads sizes and durations with this module and
    # should not pay for what only a config needs.
    from geryon.cpu.runas import RunAs
    from geryon.disk import users as users_mod
    from geryon.disk.fs import MIN_CAPACITY

    problems: list[str] = []
    file = str(path)
    top = _Table(data, "", problems, file)
    registry = top.get(
        "registry",
        (str, list),
        os.environ.get("GERYON_REGISTRY", "127.0.0.1:6675"),
        parse=registry_address,
    )
    host = top.get("host", str, None, parse=_name) or _name_or(socket.gethostname())
    advertise = top.get("advertise", str, None, parse=_advertise) or host
    tls_dir = top.get("tls_dir", str, None, parse=_directory)
    lease_ttl = top.get("lease_ttl", (str, int, float), 10.0, parse=parse_duration)
    if lease_ttl is not None and lease_ttl < 0.5:
        top.problem("lease_ttl", "at least 500ms")
    reconnect_max_delay = top.get(
        "reconnect_max_delay", (str, int, float), 10.0, parse=parse_duration
    )
    stop_grace = top.get("stop_grace", (str, int, float), 5.0, parse=parse_duration)
    restart = _restart(top, RestartSpec())
    ready_timeout = top.get("ready_timeout", (str, int, float), 30.0, parse=parse_duration)

    chunks: list[ChunkSpec] = []
    ids: dict[str, str] = {}
    paths: dict[Path, str] = {}
    ports: dict[int, str] = {}
    for _, t in top.tables("chunk"):
        cid = t.get("id", str, None, required=True, parse=_name)
        cpath = t.get("path", str, None, required=True)
        size = t.get("size", (str, int), None, required=True, parse=parse_size)
        command = _command(t, "command", required=False)
        owner = t.get("owner", str, "", parse=_name)
        users = t.get("users", str, None)
        sync = t.get("sync", bool, False)
        port = t.get("port", int, 0, parse=_port)
        spec_restart = _restart(t, restart)
        chunk_ready = t.get("ready_timeout", (str, int, float), ready_timeout, parse=parse_duration)
        health = _health(t, "tcp")
        attrs = _strings(t, "attrs", attrs=True, own=CHUNK_OWN_ATTRS)
        env = _strings(t, "env", attrs=False)
        t.finish(CHUNK_KEYS)
        if cid is not None:
            if cid in ids:
                t.problem("id", f"duplicate chunk id {cid!r} (also {ids[cid]}.id)")
            ids.setdefault(cid, t.where)
        if cpath is not None:
            if not cpath:
                t.problem("path", "empty")
                cpath = None
            else:
                # Relative to the config file; absolute in the path attribute.
                p = Path(os.path.abspath(path.parent / cpath))
                if p in paths:
                    t.problem("path", f"{cpath!r} is also {paths[p]}.path")
                paths.setdefault(p, t.where)
                cpath = p
        _claim(t, "port", port, ports)
        if users is not None:
            users = Path(os.path.abspath(path.parent / users))
            if not users.is_file():
                t.problem("users", f"{users}: no such file")
            else:
                try:
                    table = users_mod.parse(users.read_text())
                except (OSError, UnicodeDecodeError, users_mod.UsersError) as exc:
                    t.problem("users", f"{users}: {exc}")
                else:
                    if owner and not table.exists(owner):
                        t.problem("users", f"{users} does not name the owner {owner}")
        if not command and "command" not in t.data and size is not None and size < MIN_CAPACITY:
            t.problem("size", f"a disk needs at least {MIN_CAPACITY} bytes (256KiB)")
        if command and (owner or users or sync):
            key = "owner" if owner else "users" if users else "sync"
            t.problem(key, "only for a disk (a chunk without command)")
        if None not in (cid, cpath, size) and ("command" not in t.data or command):
            chunks.append(
                ChunkSpec(
                    cid,
                    cpath,
                    size=size,
                    command=command,
                    attrs=attrs,
                    env=env,
                    port=port,
                    health=health,
                    restart=spec_restart,
                    ready_timeout=chunk_ready,
                    owner=owner or "",
                    users=users,
                    sync=bool(sync),
                )
            )

    listeners: list[ListenerSpec] = []
    per_addr: dict[ListenAddr, int] = {}
    for _, t in top.tables("listener"):
        addr = t.get("addr", str, None, required=True, parse=parse_listen_addr)
        command = _command(t, "command")
        max_conns = t.get("max_conns", int, 64, parse=_positive)
        health = _health(t, "none")
        if health.type == "tcp":
            t.problem("health.type", "a tcp check would run the command; use command or none")
        attrs = _strings(t, "attrs", attrs=True, own=LISTENER_OWN_ATTRS)
        env = _strings(t, "env", attrs=False)
        t.finish(LISTENER_KEYS)
        if addr is not None:
            _claim(t, "addr", addr.port, ports)
        if addr is not None and command:
            n = per_addr[addr] = per_addr.get(addr, -1) + 1
            listeners.append(
                ListenerSpec(
                    addr, command, attrs=attrs, env=env, max_conns=max_conns, health=health, index=n
                )
            )

    cpus: list[CpuSpec] = []
    for i, t in top.tables("cpu"):
        port = t.get("port", int, 0, parse=_port)
        runas = _strings(t, "runas", attrs=False)
        allow_root = t.get("allow_root", bool, False)
        max_sessions = t.get("max_sessions", int, 64, parse=_positive)
        per_identity = t.get("max_sessions_per_identity", int, 16, parse=_positive)
        attrs = _strings(t, "attrs", attrs=True, own=CPU_OWN_ATTRS)
        health = _health(t, "tcp")
        spec_restart = _restart(t, restart)
        cpu_ready = t.get("ready_timeout", (str, int, float), ready_timeout, parse=parse_duration)
        t.finish(CPU_KEYS)
        if not runas:
            t.problem("runas", "missing: without it nobody may run anything")
        for line in RunAs(runas, allow_root=bool(allow_root)).check():
            key, _, what = line.partition(": ")
            t.problem(f"runas.{key}", what)
        _claim(t, "port", port, ports)
        cpus.append(
            CpuSpec(
                i, runas=runas, allow_root=bool(allow_root), max_sessions=max_sessions,
                max_sessions_per_identity=per_identity, port=port, attrs=attrs,
                health=health, restart=spec_restart, ready_timeout=cpu_ready,
            )
        )  # fmt: skip

    top.finish(TOP_KEYS)
    if problems:
        raise ConfigError(problems)
    return AgentConfig(
        path=path,
        registry=registry,
        host=host,
        advertise=advertise,
        tls_dir=Path(tls_dir) if tls_dir else None,
        lease_ttl=lease_ttl,
        reconnect_max_delay=reconnect_max_delay,
        stop_grace=stop_grace,
        chunks=tuple(chunks),
        listeners=tuple(listeners),
        cpus=tuple(cpus),
    )


def _name_or(hostname: str) -> str:
    """The machine's name, made a valid node name."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", hostname.split(".")[0])[:64]
    return name or "localhost"


def _directory(v: str) -> str:
    if not os.path.isdir(v):
        raise ValueError(f"{v!r} is not a directory")
    return v


TOP_KEYS = {
    "registry",
    "host",
    "advertise",
    "tls_dir",
    "lease_ttl",
    "reconnect_max_delay",
    "stop_grace",
    "restart",
    "restart_delay",
    "restart_max_delay",
    "ready_timeout",
    "chunk",
    "listener",
    "cpu",
}
CPU_KEYS = {
    "port",
    "runas",
    "allow_root",
    "max_sessions",
    "max_sessions_per_identity",
    "attrs",
    "health",
    "restart",
    "restart_delay",
    "restart_max_delay",
    "ready_timeout",
}
CHUNK_KEYS = {
    "id",
    "path",
    "size",
    "command",
    "port",
    "attrs",
    "env",
    "health",
    "restart",
    "restart_delay",
    "restart_max_delay",
    "ready_timeout",
    "owner",
    "users",
    "sync",
}
HEALTH_KEYS = {
    "type",
    "command",
    "service",
    "interval",
    "timeout",
    "success_threshold",
    "failure_threshold",
}
LISTENER_KEYS = {"addr", "command", "max_conns", "attrs", "env", "health"}


def load(path: Path | str) -> AgentConfig:
    """Read and check a config file; raise ConfigError on any problem."""
    import tomllib  # compiles its regexes at import: only when a file is read

    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: bad TOML: {exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None
    return parse(data, path)
