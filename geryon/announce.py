"""Announcing services and keeping them announced: what `geryon register`,
`geryon reglisten` and geryon-agent share.

Inferno's grid/register registers once and never notices the registry going
away: its entries just vanish. Here an ``Announcer`` holds the *desired*
entries and makes the registry match them under one lease, level-triggered:

- registry unreachable (at start, or later): services keep running; the
  announcer retries with jittered exponential backoff, so a hundred nodes
  coming back at once do not stampede the registry;
- registry restarted: the lease's keepalive reconnects and the registry kept
  the lease and its entries, so nothing is re-sent and watchers see nothing;
- lease lost (expired, revoked, a registry that forgot it): a new lease is
  granted and every entry registered again (Register is an upsert);
- a change made while the registry was away (a service exited, restarted on
  another port, changed health) is applied when it is back;
- registry refusing us for good (a terminal error other than
  RESOURCE_EXHAUSTED: a reader's identity, a name someone else holds): no
  outage, and never logged as one. With ``fail_fast`` (geryon register,
  reglisten: one entry, one command) the announcer stops and sets
  ``refused``. Otherwise (the agent) the services keep running; a refused
  entry waits for its attributes to change, and a refused lease is asked
  for again at the longest backoff, for an operator may fix the registry's
  side meanwhile.

Each transition is logged once, not once per retry.

A served command runs through ``ChildService`` (start it with a free port,
wait until the port accepts connections, announce ``tcp!ADVERTISE!PORT``,
unannounce the moment it exits) or ``Listener`` (listen ourselves, announce
the address we got, run the command per connection with the connection as
stdin and stdout, as inetd and Inferno's reglisten). Attributes follow
Inferno's grid/register (``proto``, ``auth``, ``name`` = the node's name)
plus ``host``, ``pid`` and ``started`` (Unix seconds), which users filter on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

from geryon import errors, procs
from geryon.agent_config import ListenAddr
from geryon.client import Backoff, Client, Lease
from geryon.model import MAX_BATCH, Registration

log = logging.getLogger("geryon.announce")

# How long one registry call (with the client's own quick retries) may take
# before we count the registry as away and back off ourselves.
CALL_TIMEOUT = 2.0
# Concurrent Register/Update calls while (re-)announcing many entries.
SYNC_CONCURRENCY = 16
# What refuses one entry for good (until its desired attributes change).
REFUSED = (
    errors.InvalidArgument,
    errors.AlreadyExists,
    errors.PermissionDenied,
    errors.FailedPrecondition,
)
# How often an up lease's keepalive state is looked at, for the transition
# log: client.Lease has an event for its stream coming up, none for it breaking.
OVERLOADED = b"server overloaded\n"
PLACEHOLDER = re.compile(r"\{(path|port|addr|id|host)\}")


class _LeaseGone(Exception):
    """The registry no longer knows our lease: grant a new one at once."""


def _refusal(exc: errors.GeryonError) -> bool:
    """The registry said no and will say it again: retrying soon cannot help.
    Over a quota is a reason to slow down, not a refusal."""
    return isinstance(exc, errors.Terminal) and not isinstance(exc, errors.ResourceExhausted)


async def _first(*events: asyncio.Event, limit: float | None = None) -> None:
    """Until one of ``events`` is set, or ``limit`` seconds pass."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


class Announcer:
    """Keeps ``desired`` (name -> attrs) registered under one lease.

    ``put``, ``set_attrs`` and ``remove`` only change the desired state and
    wake the loop; they never block and never fail, whatever the registry
    is doing. ``synced`` is set whenever the registry matches. With
    ``fail_fast``, a refusal (see ``_refusal``) is logged, stops the
    announcer and sets ``refused``.
    """

    def __init__(
        self,
        client: Client,
        *,
        who: str,
        ttl: float = 10.0,
        reconnect_initial: float = 0.1,
        reconnect_max: float = 10.0,
        fail_fast: bool = False,
    ) -> None:
        self.client = client
        self.who = who
        self.fail_fast = fail_fast
        self.ttl_ms = max(500, int(ttl * 1000))
        self.backoff = Backoff(reconnect_initial, reconnect_max)
        self.desired: dict[str, dict[str, str]] = {}
        # What the registry holds under self.lease, as far as we know.
        self.actual: dict[str, dict[str, str]] = {}
        # Entries the registry refused for good (bad attribute, a name held by
        # someone else): not retried until their desired attrs change.
        self.rejected: dict[str, dict[str, str]] = {}
        self.lease: Lease | None = None
        self.synced = asyncio.Event()
        self.refused = asyncio.Event()
        self.state = "new"  # new | up | down | refused
        self._down_lease = 0  # the lease we held when the registry went away
        self._breaks_seen = 0  # lease.breaks when we last looked
        self._refused_why = ""  # the refusal last logged
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ---- the desired state ----------------------------------------------------

    def put(self, name: str, attrs: Mapping[str, str]) -> None:
        self.desired[name] = dict(attrs)
        self._changed()

    def set_attrs(self, name: str, attrs: Mapping[str, str]) -> None:
        if name in self.desired:
            self.desired[name] = {**self.desired[name], **attrs}
            self._changed()

    def remove(self, name: str) -> None:
        if self.desired.pop(name, None) is not None:
            self._changed()

    def _changed(self) -> None:
        self.synced.clear()
        self._wake.set()

    # ---- running --------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name=f"announce {self.who}")

    async def close(self, *, revoke: bool, grace: float = CALL_TIMEOUT) -> None:
        """Stop; with ``revoke``, end the lease so every entry goes in one revision."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.desired.clear()
        if self.lease is None:
            return
        lease, self.lease = self.lease, None
        try:
            async with asyncio.timeout(grace):
                await lease.close(revoke=revoke)
        except TimeoutError:
            # Our keepalive stream is gone with the task: a registry that comes
            # back ends the lease when its TTL passes.
            log.warning(
                "%s: registry %s unreachable; lease %d not revoked",
                self.who,
                self.client.target,
                lease.id,
            )

    async def run(self) -> None:
        while True:
            try:
                if self.lease is None or self.lease.lost.is_set():
                    await self._new_lease()
                await self._sync()
            except _LeaseGone:
                continue
            except errors.GeryonError as exc:
                if not _refusal(exc):
                    self._went_down(str(exc))
                    await asyncio.sleep(self.backoff.next())
                    continue
                if self.fail_fast:
                    log.error("%s: registry %s refused: %s", self.who, self.client.target, exc)
                    self.refused.set()
                    return
                self._was_refused(str(exc))
                await asyncio.sleep(self.backoff.maximum)
                continue
            except Exception as exc:  # a bug, or grpc surprising us: never stop announcing
                log.exception("%s: announcing failed", self.who)
                self._went_down(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(self.backoff.next())
                continue
            self.backoff.reset()
            await self._wait()

    async def _new_lease(self) -> None:
        old, self.lease = self.lease, None
        if old is not None:
            await old.close(revoke=False)
        lease = self.client.lease(self.ttl_ms)
        try:
            await lease.start()
        except BaseException:
            await lease.close(revoke=False)
            raise
        self.lease = lease
        self._breaks_seen = lease.breaks
        self.actual.clear()
        self.rejected.clear()
        if old is not None and self.state == "up":
            log.warning(
                "%s: lease %d lost; registering %d services under lease %d",
                self.who,
                old.id,
                len(self.desired),
                lease.id,
            )

    async def _sync(self) -> None:
        assert self.lease is not None
        lease = self.lease
        while names := self._pending():
            limit = asyncio.Semaphore(SYNC_CONCURRENCY)
            # Names new to the registry go in batches, one revision each;
            # changes and removals one call each.
            new = [n for n in names if n in self.desired and n not in self.actual]
            rest = [n for n in names if n in self.actual or n not in self.desired]
            batches = [new[i : i + MAX_BATCH] for i in range(0, len(new), MAX_BATCH)]
            results = await asyncio.gather(
                *(self._register(batch, lease, limit) for batch in batches),
                *(self._apply(name, lease, limit) for name in rest),
                return_exceptions=True,
            )
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        if lease.connected.is_set():
            self._came_up()
        self.synced.set()

    def _pending(self) -> list[str]:
        out = []
        for name in self.desired.keys() | self.actual.keys():
            want = self.desired.get(name)
            if want == self.actual.get(name):
                continue
            if want is not None and self.rejected.get(name) == want:
                continue
            out.append(name)
        return sorted(out)

    async def _register(self, names: list[str], lease: Lease, limit: asyncio.Semaphore) -> None:
        """Register ``names`` in one RegisterBatch. The batch is all or
        nothing: when it is refused, register them one by one, so each
        refusal is its own and the others still get in."""
        # Read now, not when the batch was planned: desired may have changed.
        wants = {n: want for n in names if (want := self.desired.get(n)) is not None}
        if not wants:
            return
        async with limit:
            try:
                await self.client.register_batch(
                    Registration(name, want, lease=lease.id) for name, want in wants.items()
                )
            except errors.NotFound:  # the only thing a register may not find
                lease.lost.set()
                raise _LeaseGone from None
            except REFUSED:
                refused = True
            else:
                refused = False
        if refused:
            await asyncio.gather(*(self._apply(name, lease, limit) for name in wants))
            return
        for name, want in wants.items():
            self.actual[name] = want
            self.rejected.pop(name, None)

    async def _apply(self, name: str, lease: Lease, limit: asyncio.Semaphore) -> None:
        async with limit:
            want = self.desired.get(name)
            have = self.actual.get(name)
            try:
                if want is None:
                    with contextlib.suppress(errors.NotFound):
                        await self.client.unregister(name)
                    self.actual.pop(name, None)
                    return
                if have is not None:
                    set_attrs = {k: v for k, v in want.items() if have.get(k) != v}
                    remove = [k for k in have if k not in want]
                    try:
                        await self.client.update(name, set_attrs, remove_attrs=remove)
                    except errors.NotFound:
                        have = None  # someone removed it: register it again
                if have is None:
                    try:
                        await self.client.register(name, want, lease=lease.id)
                    except errors.NotFound:
                        lease.lost.set()
                        raise _LeaseGone from None
                self.actual[name] = want
                self.rejected.pop(name, None)
            except REFUSED as exc:
                if self.fail_fast:
                    raise  # our only entries: run() ends us
                log.error("%s: cannot register %s: %s", self.who, name, exc)
                if want is not None:
                    self.rejected[name] = want
                else:
                    self.actual.pop(name, None)

    async def _wait(self) -> None:
        """Until the desired state changes or the lease is lost; meanwhile,
        log the keepalive stream breaking and coming back."""
        assert self.lease is not None
        lease = self.lease
        self._wake.clear()
        while not (self._wake.is_set() or lease.lost.is_set()):
            lease.changed.clear()
            if lease.breaks != self._breaks_seen and self.state == "up":
                self._went_down("keepalive stream broken")
            self._breaks_seen = lease.breaks
            if lease.connected.is_set():
                self._came_up()
            elif self.state == "up":
                self._went_down("keepalive stream broken")
            await _first(self._wake, lease.lost, lease.changed)

    def _went_down(self, why: str) -> None:
        if self.state == "down":
            return
        log.warning(
            "%s: registry %s unreachable (%s); services keep running, retrying",
            self.who,
            self.client.target,
            why,
        )
        self._down_lease = self.lease.id if self.lease is not None else 0
        self.state = "down"

    def _was_refused(self, why: str) -> None:
        if self.state == "refused" and why == self._refused_why:
            return
        log.error(
            "%s: registry %s refused: %s; services keep running, retrying every %gs",
            self.who,
            self.client.target,
            why,
            self.backoff.maximum,
        )
        self._refused_why = why
        self.state = "refused"

    def _came_up(self) -> None:
        if self.state == "up" or self.lease is None:
            return
        n = len(self.actual)
        if self.state in ("new", "refused"):
            log.info("%s: registry %s: lease %d", self.who, self.client.target, self.lease.id)
        elif self.lease.id == self._down_lease:
            log.info(
                "%s: registry %s back; lease %d resumed, %d services kept",
                self.who,
                self.client.target,
                self.lease.id,
                n,
            )
        else:
            log.info(
                "%s: registry %s back; %d services registered under new lease %d",
                self.who,
                self.client.target,
                n,
                self.lease.id,
            )
        self.state = "up"


# ---- serving a port ----------------------------------------------------------


@dataclass
class Node:
    """What every announced service of one process shares."""

    announcer: Announcer
    keeper: procs.Keeper
    _: KW_ONLY
    host: str  # the node's name: the name and host attributes
    advertise: str  # what others dial: tcp!ADVERTISE!PORT
    who: str  # the log prefix
    stop_grace: float = 5.0

    @property
    def probe_host(self) -> str:
        """Where we dial our own services: the advertised address if it is
        an IP address, else loopback (a name may not resolve, or slowly)."""
        try:
            ipaddress.ip_address(self.advertise)
        except ValueError:
            return "127.0.0.1"
        return self.advertise

    def dial_name(self, port: int) -> str:
        return f"tcp!{self.advertise}!{port}"

    def attrs(self, extra: Mapping[str, str], *, pid: int, started: float) -> dict[str, str]:
        """Inferno's register defaults, which ``extra`` may override, then
        what only the announcer knows."""
        return {
            "proto": "styx",
            "auth": "none",
            "name": self.host,
            **extra,
            "host": self.host,
            "pid": str(pid),
            "started": str(int(started)),
        }


def pick_port() -> int:
    """A port free right now on every interface (the command binds it next)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def substitute(argv: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """Replace {port} {addr} {path} {id} {host} in each argument; other braces
    (a shell's) are left alone."""
    return [PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), a) for a in argv]


async def wait_ready(proc: asyncio.subprocess.Process, host: str, port: int, limit: float) -> bool:
    """Until the port accepts connections: False if the process exits first
    or ``limit`` seconds pass."""
    deadline = time.monotonic() + limit
    delay = 0.01
    while proc.returncode is None and time.monotonic() < deadline:
        if (await procs.check_tcp(host, port, 1.0))[0]:
            return True
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)
    return False


class _Announced:
    """What ChildService and Listener share: one entry, announced as ``name``
    while serving, its attributes and health kept up to date."""

    node: Node
    attrs: Mapping[str, str]
    name: str  # "" while not announced
    health: str
    started: float

    def _pid(self) -> int:
        """The process the entry names."""
        raise NotImplementedError

    def entry(self) -> dict[str, str]:
        attrs = self.node.attrs(self.attrs, pid=self._pid(), started=self.started)
        return {**attrs, "health": self.health}

    def set_health(self, health: str) -> None:
        self.health = health
        if self.name:
            self.node.announcer.set_attrs(self.name, {"health": health})

    def set_attrs(self, attrs: Mapping[str, str]) -> None:
        """New configured attributes for the entry, applied at once."""
        self.attrs = dict(attrs)
        if self.name:
            self.node.announcer.put(self.name, self.entry())


@dataclass
class ChildService(_Announced):
    """One run of a command that serves a TCP port.

    ``run`` picks the port (unless given), starts the command with {port}
    and {addr} (the dial name it will have) substituted and GERYON_PORT and
    GERYON_ADDR set, announces it once the port accepts connections, and
    returns the command's exit code once it exits, the entry removed at that
    moment. Cancelled, it stops the command's process group first.
    """

    node: Node
    argv: Sequence[str]
    _: KW_ONLY
    attrs: Mapping[str, str] = field(default_factory=dict)
    port: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    values: Mapping[str, str] = field(default_factory=dict)
    ready_timeout: float = 30.0
    name: str = ""
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    health: str = "passing"

    def _pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def run(self, on_ready: Callable[[], Awaitable[None]] | None = None) -> int | None:
        node = self.node
        port = self.port or pick_port()
        addr = node.dial_name(port)
        values = {"host": node.host, **self.values, "port": str(port), "addr": addr}
        env = {**os.environ, **self.env, "GERYON_PORT": str(port), "GERYON_ADDR": addr}
        self.proc = proc = await procs.spawn(
            substitute(self.argv, values), keeper=node.keeper, env=env
        )
        self.started = time.time()
        watcher: asyncio.Task[None] | None = None
        try:
            if await wait_ready(proc, node.probe_host, port, self.ready_timeout):
                self.name = addr
                node.announcer.put(addr, self.entry())
                if on_ready is not None:
                    watcher = asyncio.create_task(on_ready(), name=f"health {addr}")
            elif proc.returncode is None:
                log.error(
                    "%s: %s not accepting connections on port %d after %gs; stopping it",
                    node.who,
                    self.argv[0],
                    port,
                    self.ready_timeout,
                )
                await procs.stop(proc, node.keeper, grace=node.stop_grace)
            await proc.wait()
        finally:
            if self.name:
                node.announcer.remove(self.name)
                self.name = ""
            if watcher is not None:
                watcher.cancel()
            if proc.returncode is None:
                await procs.stop(proc, node.keeper, grace=node.stop_grace)
            else:
                procs.reap_group(proc, node.keeper)
        return proc.returncode


class Listener(_Announced):
    """Listen on an Inferno address ourselves; run a command per connection.

    Each connection gets its own process (its own process group), with the
    connection as stdin and stdout and GERYON_ADDR and GERYON_REMOTE set.
    Past ``max_conns`` live connections a new one is told ``server
    overloaded`` and closed, as Inferno's register does.
    """

    def __init__(
        self,
        node: Node,
        addr: ListenAddr,
        argv: Sequence[str],
        *,
        attrs: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        max_conns: int = 64,
    ) -> None:
        self.node = node
        self.addr = addr
        self.argv = list(argv)
        self.attrs = dict(attrs or {})
        self.env = dict(env or {})
        self.max_conns = max_conns
        self.sock: socket.socket | None = None
        self.name = ""
        self.health = "passing"
        self.started = 0.0
        self.conns: set[asyncio.subprocess.Process] = set()

    def bind(self) -> str:
        """Listen; return the name we will be announced as."""
        # The host's own address family: tcp!::1!0 listens on IPv6.
        family, _, _, _, where = socket.getaddrinfo(
            self.addr.bind_host, self.addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(where)
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        port = sock.getsockname()[1]
        host = self.node.advertise if self.addr.host == "*" else self.addr.host
        self.name = f"tcp!{host}!{port}"
        self.started = time.time()
        return self.name

    def _pid(self) -> int:
        return os.getpid()  # the process listening: ours

    async def serve(self) -> None:
        """Announce, then accept until cancelled; then unannounce, stop
        listening and stop every connection's process."""
        if self.sock is None:
            self.bind()
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        self.node.announcer.put(self.name, self.entry())
        reapers: set[asyncio.Task[None]] = set()
        try:
            while True:
                conn, remote = await loop.sock_accept(self.sock)
                with conn:
                    if len(self.conns) >= self.max_conns:
                        log.warning(
                            "%s: %s: %d connections, the limit; refusing %s!%s",
                            self.node.who,
                            self.name,
                            len(self.conns),
                            *remote[:2],
                        )
                        with contextlib.suppress(OSError):
                            conn.send(OVERLOADED)
                        continue
                    # The child shares this socket's file status flags.
                    conn.setblocking(True)
                    try:
                        proc = await self._spawn(conn, remote)
                    except OSError as exc:
                        log.error(
                            "%s: %s: cannot run %s: %s", self.node.who, self.name, self.argv[0], exc
                        )
                        continue
                self.conns.add(proc)
                t = asyncio.create_task(self._reap(proc), name=f"conn {proc.pid}")
                reapers.add(t)
                t.add_done_callback(reapers.discard)
        finally:
            self.node.announcer.remove(self.name)
            self.sock.close()
            self.sock = None
            await asyncio.gather(
                *(procs.stop(p, self.node.keeper, grace=self.node.stop_grace) for p in self.conns),
                return_exceptions=True,
            )
            for t in reapers:
                t.cancel()

    async def _spawn(
        self, conn: socket.socket, remote: tuple[str, int]
    ) -> asyncio.subprocess.Process:
        values = {"host": self.node.host, "addr": self.name, "port": self.name.split("!")[-1]}
        env = {
            **os.environ,
            **self.env,
            "GERYON_ADDR": self.name,
            "GERYON_REMOTE": f"tcp!{remote[0]}!{remote[1]}",
        }
        return await procs.spawn(
            substitute(self.argv, values),
            keeper=self.node.keeper,
            env=env,
            stdin=conn.fileno(),
            stdout=conn.fileno(),
        )

    async def _reap(self, proc: asyncio.subprocess.Process) -> None:
        try:
            await proc.wait()
        finally:
            self.conns.discard(proc)
            if proc.returncode is not None:
                procs.reap_group(proc, self.node.keeper)


# ---- geryon register and geryon reglisten -----------------------------------


@dataclass
class AnnounceOptions:
    """What `geryon register` and `geryon reglisten` are told on the command line."""

    registry: str
    tls_dir: Path | None = None
    user: str | None = None
    host: str = ""
    advertise: str = ""
    attrs: Mapping[str, str] = field(default_factory=dict)
    lease_ttl: float = 10.0
    reconnect_max: float = 10.0
    ready_timeout: float = 30.0
    stop_grace: float = 5.0


def default_host() -> str:
    return os.environ.get("GERYON_HOST") or socket.gethostname().split(".")[0] or "localhost"


@contextlib.asynccontextmanager
async def _node(opts: AnnounceOptions, who: str):  # type: ignore[no-untyped-def]
    client = Client(
        opts.registry,
        tls_dir=opts.tls_dir,
        user=opts.user,
        retry_for=CALL_TIMEOUT,
        own_connection=True,
    )
    # One command's entry: a refusal ends the command, as any other error would.
    announcer = Announcer(
        client, who=who, ttl=opts.lease_ttl, reconnect_max=opts.reconnect_max, fail_fast=True
    )
    keeper = procs.Keeper()
    keeper.ensure()
    host = opts.host or default_host()
    node = Node(
        announcer,
        keeper,
        host=host,
        advertise=opts.advertise or host,
        who=who,
        stop_grace=opts.stop_grace,
    )
    announcer.start()
    try:
        yield node
    finally:
        await announcer.close(revoke=True)
        keeper.close()
        await client.close()


def _on_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def _until(task: asyncio.Task[object], *stops: asyncio.Event) -> None:
    """Wait for ``task`` to end or one of ``stops``; then cancel the task."""
    stoppers = [asyncio.ensure_future(s.wait()) for s in stops]
    try:
        await asyncio.wait([task, *stoppers], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for s in stoppers:
            s.cancel()
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def run_register(opts: AnnounceOptions, argv: Sequence[str]) -> int:
    """`geryon register`: serve, announce, return COMMAND's exit status
    (128+N if a signal N ended it), or 1 if the registry refused us."""
    stop = asyncio.Event()
    _on_stop_signals(stop)
    async with _node(opts, "register") as node:
        child = ChildService(node, argv, attrs=opts.attrs, ready_timeout=opts.ready_timeout)
        task = asyncio.create_task(child.run(), name="register child")
        await _until(task, stop, node.announcer.refused)
        if child.proc is None or node.announcer.refused.is_set():
            return 1
        status = procs.exit_status(child.proc.returncode)
        if not stop.is_set():
            log.info("register: %s %s", argv[0], procs.describe(child.proc.returncode))
        return status


async def run_reglisten(
    opts: AnnounceOptions, addr: ListenAddr, argv: Sequence[str], *, max_conns: int
) -> int:
    """`geryon reglisten`: listen, announce, serve until SIGTERM/SIGINT;
    1 if the registry refused us."""
    stop = asyncio.Event()
    _on_stop_signals(stop)
    async with _node(opts, "reglisten") as node:
        listener = Listener(node, addr, argv, attrs=opts.attrs, max_conns=max_conns)
        try:
            name = listener.bind()
        except OSError as exc:
            log.error("reglisten: cannot listen on %s: %s", addr, exc.strerror)
            return 1
        log.info("reglisten: listening on %s as %s", addr, name)
        task = asyncio.create_task(listener.serve(), name="reglisten")
        await _until(task, stop, node.announcer.refused)
        return 1 if node.announcer.refused.is_set() else 0
