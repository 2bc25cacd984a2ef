"""What every workload is made of: sizes, rows, the workload record, the
server-side adapter interface, and bounded waiting.

A workload is a function of the run's ``Sizes`` returning a ``Workload``: the
rows it reports, an optional ``prepare`` run once per side, and ``measure``,
one round on one side returning a value per row. ``run.py`` holds the list
of workloads and alternates the sides round by round; a new workload (agents
re-announcing after a registry restart, reconciler convergence) is a module
with such a function, added to that list.

Workloads talk to a server through a ``Side`` (Geryon, Geryon on its etcd
store, or etcd) and its ``Conn`` connections, so each is written once and
every server is driven by the same code over raw grpc.aio stubs.

Geryon on its etcd store (GERYON_ETCD) has no column of its own: a workload
run on it as well as on Geryon gets a twin of each row, labelled "(etcd
store)", whose Geryon column is the etcd-store figure and whose etcd column
repeats plain etcd's, so that the ratio still reads Geryon over etcd
(``Workload.table_rows`` and ``Workload.cells``).
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")
C = TypeVar("C")

GERYON, ETCD, ECHO = "geryon", "etcd", "echo"
# geryon-registryd fronts with --etcd over a 3-member etcd cluster: its
# figures go in the Geryon column of the "(etcd store)" rows.
GERYON_ETCD = "geryon-etcd"
ETCD_STORE = " (etcd store)"  # appended to the label of a twin row
# A workload run on both of Geryon's stores and on etcd.
REGISTRIES = (GERYON, ETCD, GERYON_ETCD)


@dataclass(frozen=True)
class Sizes:
    """How big each workload is; ``quick_sizes()`` is the smoke-test run."""

    rounds: int = 3
    services: int = 10_000  # register (16 clients), find, restart
    services_1: int = 1_000  # register with 1 client: 10,000 would take minutes
    leases: int = 100  # leases the services live under
    concurrency: int = 16
    rstyx: int = 10  # services with svc=rstyx among ``services``
    find_seconds: float = 1.5  # each find round runs this long
    watchers: tuple[int, ...] = (10, 100, 1_000)  # fan-out: a row per count
    watcher_procs: int = 4  # fan-out: client processes the watchers are spread over
    updates: int = 1_000
    churn: int = 1_000  # leases granted, renewed once and revoked (16 clients)
    churn_1: int = 1_000  # the same with 1 client
    echo_calls: int = 2_000  # per round and concurrency
    batch_agents: int = 100  # register in batches: agents, each on its own connection
    batch_size: int = 100  # services per agent, in one call
    agents: int = 20  # re-announce: node agents, in-process in agent_helpers processes
    agent_services: int = 50  # services per agent
    agent_helpers: int = 2
    conv_disks: int = 100  # convergence latency: disk names in the ndb file
    conv_changes: int = 200  # chunk registrations and deaths, one at a time
    resync_disks: int = 1_000  # full resync
    quick: bool = False

    @classmethod
    def quick_sizes(cls) -> Sizes:
        return cls(
            rounds=1,
            services=400,
            services_1=100,
            leases=4,
            concurrency=4,
            find_seconds=0.2,
            watchers=(2, 5),
            watcher_procs=2,
            updates=50,
            churn=40,
            churn_1=20,
            batch_agents=4,
            batch_size=10,
            echo_calls=200,
            agents=2,
            agent_services=5,
            conv_disks=10,
            conv_changes=20,
            resync_disks=50,
            quick=True,
        )


@dataclass(frozen=True)
class Row:
    """One line of the table.

    ``key`` is stable across commits (compare results by it); ``label`` is
    what is printed. ``echo`` names the echo row a Geryon throughput is shown
    as a fraction of, and ``rpcs`` how many round trips one counted operation
    takes (a churned lease is three: grant, keepalive, revoke).
    """

    key: str
    label: str
    unit: str
    better: Literal["higher", "lower"] = "higher"
    echo: str | None = None
    rpcs: int = 1


@dataclass
class Workload:
    name: str
    rows: tuple[Row, ...]
    # One round on one side: {row key: value}.
    measure: Callable[[Bench, Side], Awaitable[dict[str, float]]]
    # Once per side before the rounds (the servers are fresh then).
    prepare: Callable[[Bench, Side], Awaitable[None]] | None = None
    sides: tuple[str, ...] = (GERYON, ETCD)
    # Start every round (not only the first) on an empty server.
    reset_each_round: bool = False
    # A bound on one round (or on prepare), in seconds.
    timeout: float = 120.0

    @property
    def twinned(self) -> bool:
        """Run on both of Geryon's stores: each row has an etcd-store twin."""
        return GERYON in self.sides and GERYON_ETCD in self.sides

    @property
    def table_rows(self) -> tuple[Row, ...]:
        """The rows printed: ``rows``, then their etcd-store twins."""
        return self.rows + tuple(twin(r) for r in self.rows) if self.twinned else self.rows

    def cells(self, side: str, key: str) -> list[tuple[str, str]]:
        """Where a value measured on ``side`` for row ``key`` goes in the
        table: [(row key, column)]. Geryon on etcd fills the Geryon column (of
        the twin row when there is one); plain etcd's value is shown in both
        the row and its twin."""
        if side == GERYON_ETCD:
            return [(twin_key(key) if self.twinned else key, GERYON)]
        if side == ETCD and self.twinned:
            return [(key, ETCD), (twin_key(key), ETCD)]
        return [(key, side)]


def twin_key(key: str) -> str:
    return f"{key}.etcd-store"


def twin(row: Row) -> Row:
    """A row's etcd-store twin."""
    return dataclasses.replace(row, key=twin_key(row.key), label=row.label + ETCD_STORE)


@dataclass
class Bench:
    """What a workload may use: the sizes, a scratch dir, the servers."""

    sizes: Sizes
    tmp: Path
    sides: dict[str, Side]
    # Per-workload scratch state, cleared after each workload.
    state: dict[str, Any] = field(default_factory=dict)
    # Run (and cleared) after each workload: close what it kept open.
    cleanups: list[Callable[[], Awaitable[object]]] = field(default_factory=list)
    # Facts learned while running (etcd's minimum TTL, ...), printed under
    # the table and kept in the JSON.
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


# ---- the server adapters ----------------------------------------------------


class Side(abc.ABC):
    """One server under test: its process and how to talk to it."""

    name: str
    label: str

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def reset(self) -> None:
        """Kill the server, wipe its data, start an empty one."""

    @abc.abstractmethod
    def kill9(self) -> None: ...

    @abc.abstractmethod
    def respawn(self) -> None:
        """Start the server again on its old port and data, without waiting
        (the restart workload times how long it takes to serve)."""

    @abc.abstractmethod
    def stop(self) -> None: ...

    def idle(self) -> None:  # noqa: B027 (a hook: most sides have nothing to stop)
        """The next workload does not use this side: stop whatever would take
        CPU from the others meanwhile (its next ``reset`` starts it again)."""

    @abc.abstractmethod
    def connect(self) -> Any:
        """A new client on its own TCP connection (a Conn, for a registry)."""

    @abc.abstractmethod
    def holder_argv(self, name: str) -> list[str]:
        """A process that registers ``name`` under a lease it keeps alive,
        prints "holding" and waits to be killed."""


class KeepAlive(abc.ABC):
    """One open keepalive stream."""

    @abc.abstractmethod
    async def renew(self, lease: int) -> float:
        """Renew ``lease``; return its TTL in seconds (0: gone)."""

    @abc.abstractmethod
    def close(self) -> None: ...


class Conn(abc.ABC):
    """One client connection to a Side; calls are bounded by ``timeout``."""

    timeout = 10.0

    @abc.abstractmethod
    async def put(self, name: str, attrs: Mapping[str, str], lease: int = 0) -> None:
        """Register ``name`` under ``lease``, or persistent when it is 0."""

    @abc.abstractmethod
    async def put_batch(self, items: Sequence[tuple[str, Mapping[str, str], int]]) -> None:
        """Register every (name, attrs, lease) in one call: Geryon's
        RegisterBatch, etcd's Txn of puts."""

    @abc.abstractmethod
    async def find(self, attr: str, value: str) -> list[str]:
        """Names of services with ``attr`` = ``value``, sorted."""

    @abc.abstractmethod
    async def get(self, name: str, *, timeout: float) -> bool:
        """Read one service; True when it exists."""

    @abc.abstractmethod
    async def grant(self, ttl_s: float) -> tuple[int, float]:
        """A new lease: (id, TTL in seconds as the server granted it)."""

    @abc.abstractmethod
    async def revoke(self, lease: int) -> None: ...

    @abc.abstractmethod
    async def keepalive(self) -> KeepAlive: ...

    @abc.abstractmethod
    def watch(self, prefix: str) -> Watch: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class Watch(abc.ABC):
    """A watch on every service whose name starts with a prefix."""

    @abc.abstractmethod
    async def started(self) -> None:
        """Wait until the server has confirmed the watch."""

    @abc.abstractmethod
    def batches(self) -> AsyncIterator[list[tuple[str, str]]]:
        """Each message's events as ("put" | "delete", name)."""

    @abc.abstractmethod
    def close(self) -> None: ...


# ---- small helpers ----------------------------------------------------------


async def bounded(aw: Awaitable[T], timeout: float, what: str) -> T:
    """Await with a timeout whose error names what was awaited."""
    try:
        return await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        raise TimeoutError(f"bench: {what}: no result in {timeout:g}s") from None


async def connections(side: Side, n: int) -> list[Conn]:
    """n clients, each on its own TCP connection, connected (one read each)
    before anything is timed."""
    conns = [side.connect() for _ in range(n)]
    await asyncio.gather(*(c.get("warm-up", timeout=10.0) for c in conns))
    return conns


async def close_all(conns: list[Any]) -> None:
    await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


async def spread(
    conns: Sequence[C], items: Sequence[T], fn: Callable[[C, T], Awaitable[None]]
) -> float:
    """Run ``fn`` over ``items``, each client taking every n-th item in turn
    (one request in flight per client); return the seconds taken."""
    n = len(conns)

    async def worker(i: int) -> None:
        for item in items[i::n]:
            await fn(conns[i], item)

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(n)))
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values)


def service(i: int, n: int, rstyx: int, prefix: str = "") -> tuple[str, dict[str, str]]:
    """The i-th of n benchmark services: a name and 4 attributes, exactly
    ``rstyx`` of the n with svc=rstyx."""
    step = max(1, n // rstyx)
    svc = "rstyx" if i % step == 0 and i // step < rstyx else ("styx", "http", "kfs")[i % 3]
    host = f"h{i // 100:03d}"
    port = str(6700 + i % 100)
    attrs = {"svc": svc, "host": host, "port": port, "proto": "tcp"}
    return f"{prefix}tcp!{host}!{port}!{i}", attrs
