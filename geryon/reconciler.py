"""geryon-reconciler: keep the registry's disk names true to an ndb file.

The seed's ``refresh`` copied disk names from ``/lib/ndb/cluster`` into the
registry whenever someone remembered to run it. This is that process done as
a level-triggered controller:

- Desired state (``read_disks`` + ``desired_entries``): for every ndb entry
  with ``kfs`` and a ``name``, ``master=HOST!CHUNK`` names the chunk that
  serves it, found among the live chunk services (``host=HOST id=CHUNK``,
  ``health`` not ``critical``; absent health counts as passing). Each disk
  name gets one persistent entry::

      d0.mbox host h0 chunk chunk0 addr tcp!h0!6701 automount 1 persist 1
              replica d0.replica status up serving master managed-by reconciler

  When the master is not live but the replica disk's chunk is, the entry
  points there (``serving replica``; ``host`` and ``chunk`` say whose chunk
  ``addr`` is). With neither live it stays, ``status down`` without ``addr``.
  ``--failback auto`` points back at the master as soon as it is live again;
  ``never`` stays on a live replica the entry already serves -- except for a
  replicated disk, which serves its primary whenever it is live (the replica
  takes no writes until promoted).
- A disk that is no disk's replica names its writable chunk and an epoch
  (``primary``, ``epoch``; with a replica also ``standby`` and, beside a live
  primary, ``replica-addr``). Promotion (``geryon disk promote``, or
  ``--promote auto`` here when the replica's server says nothing the primary
  acknowledged is missing) swaps primary and standby at the next epoch; the
  entry keeps them from pass to pass, and epochs never go back (the chunks'
  own ``epoch`` attributes count).
- The difference (``plan``): create (fenced: only if still absent), update
  or delete (fenced by ``mod_revision``) managed entries; an unmanaged entry
  holding a disk name is reported, never touched. Managed entries are owned
  whole: attributes not desired are removed.
- Triggers are hints (``run``): a Watch on chunk entries (``id=*``), a Watch
  on managed entries, the ndb files' signatures polled every half second, and
  a periodic resync. Any of them sets one flag; the loop clears it and runs a
  whole pass from fresh reads, so a burst of triggers coalesces into one pass
  and missed events, restarts and resyncs all take the same path.

Invariants: the desired state is a function of the ndb files, the live chunks
and the entries' ``primary`` and ``epoch`` (and, for ``--failback never``,
which chunk each entry serves now), so two
reconcilers with the same flags compute the same writes; a write that lost a
race fails its fence and the pass re-runs from fresh reads. A malformed ndb
edit keeps the last good disks (the error is logged once, with file and line).
The reconciler talks to the registry through ``geryon.client`` only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from geryon import errors
from geryon.client import DEFAULT_REGISTRY, Backoff, Client
from geryon.disk.client import Gone, StyxError, replication_status
from geryon.endpoints import registry_address
from geryon.model import Revision, Service, validate_name
from geryon.ndb import Database, NdbError

__all__ = [
    "Action",
    "Disk",
    "PassResult",
    "Reconciler",
    "desired_entries",
    "live_chunks",
    "main",
    "plan",
    "read_disks",
    "run",
    "run_at",
]

log = logging.getLogger("geryon.reconciler")

# The attribute marking entries this reconciler owns.
MANAGED_ATTR = "managed-by"
MANAGED_VALUE = "reconciler"
MANAGED_FILTER = {MANAGED_ATTR: MANAGED_VALUE}
# Chunk entries, as node agents register them: id=CHUNK host=HOST health=...
CHUNK_FILTER = {"id": "*"}

Failback = Literal["auto", "never"]
FAILBACKS = ("auto", "never")
Promote = Literal["auto", "never"]
PROMOTES = ("auto", "never")
PROMOTE_CHECK_S = 3.0
DEFAULT_RESYNC_S = 30.0
NDB_POLL_S = 0.5
# Triggers arriving this close together share one pass.
DEBOUNCE_S = 0.02
# Writes (and Gets) in flight at once in a pass: the registry commits
# concurrent writes in one batch.
CONCURRENCY = 64
# A write failing so lost a race: the entry changed, vanished or appeared
# since the pass read it. The pass runs again from fresh reads.
# Past this many disk names without a managed entry (a first pass), one
# unfiltered Find is cheaper than a Get each.
MAX_GETS = 32
LOST_RACE = (errors.FailedPrecondition, errors.NotFound, errors.AlreadyExists)


# ---- desired state (pure) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Disk:
    """One disk name from the ndb file."""

    name: str
    host: str  # master's host; "" when master is missing or malformed
    chunk: str  # master's chunk id
    replica: str = ""  # another disk name, "" for none
    where: str = ""  # FILE:LINE of its entry, for messages


def read_disks(db: Database) -> tuple[dict[str, Disk], list[str]]:
    """Every disk name in ``db`` and the problems found, ``FILE:LINE: what``.

    As the seed's ``refresh``: every ``name`` of every entry with ``kfs``,
    with the ``master`` and ``replica`` bound to that name (attrdb line
    binding). A name already taken by an earlier entry is ignored; a missing
    or malformed ``master`` keeps the name (its entry will be ``down``).
    """
    disks: dict[str, Disk] = {}
    problems: list[str] = []
    for entry in db.find("kfs"):
        where = f"{entry.file}:{entry.lineno}"
        for name in dict.fromkeys(entry.values("name")):  # once each, in order
            try:
                validate_name(name, "name")
            except errors.InvalidArgument as exc:
                problems.append(f"{where}: disk {exc}; ignored")
                continue
            if name in disks:
                problems.append(
                    f"{where}: disk name {name} already defined at {disks[name].where}; ignored"
                )
                continue
            masters = entry.lookup("name", name, "master")
            host, sep, chunk = (masters[0] if masters else "").partition("!")
            if not sep or not host or not chunk or "!" in chunk:
                problems.append(
                    f"{where}: disk {name}: want master=HOST!CHUNK, "
                    f"got {masters[0] if masters else 'none'!r}"
                )
                host = chunk = ""
            replicas = entry.lookup("name", name, "replica")
            disks[name] = Disk(name, host, chunk, replicas[0] if replicas else "", where)
    for d in disks.values():
        if d.replica and d.replica not in disks:
            problems.append(f"{d.where}: disk {d.name}: replica {d.replica} is not a disk name")
    owners: dict[tuple[str, str], str] = {}
    for d in disks.values():
        if d.host and owners.setdefault((d.host, d.chunk), d.name) != d.name:
            problems.append(
                f"{d.where}: disk {d.name}: chunk {d.host}!{d.chunk} is also disk "
                f"{owners[d.host, d.chunk]}'s (one chunk holds one disk)"
            )
    return disks, problems


def is_managed(s: Service) -> bool:
    return s.attrs.get(MANAGED_ATTR) == MANAGED_VALUE


def live_chunks(services: Iterable[Service]) -> dict[tuple[str, str], Service]:
    """The live chunk for each (host, id): not ``critical``; the newest
    registration when several claim one chunk (a chunk that moved to a new
    port while its old entry's lease runs out), then the greatest name."""
    best: dict[tuple[str, str], Service] = {}
    for s in services:
        host, cid = s.attrs.get("host"), s.attrs.get("id")
        if not host or not cid or s.attrs.get("health") == "critical" or is_managed(s):
            continue
        cur = best.get((host, cid))
        if cur is None or (s.create_revision, s.name) > (cur.create_revision, cur.name):
            best[host, cid] = s
    return best


def desired_entries(
    disks: Mapping[str, Disk],
    chunks: Iterable[Service],
    *,
    failback: Failback = "auto",
    actual: Mapping[str, Service] | None = None,
    promote: Iterable[str] = (),
) -> dict[str, dict[str, str]]:
    """The attributes each disk name's entry should have now.

    ``actual`` (the entries as they are) carries a replicated disk's
    ``primary`` and ``epoch`` from pass to pass (``geryon disk promote``
    writes them), and matters for ``failback never``: an entry already
    serving a live replica keeps serving it. ``promote`` names disks whose
    live standby becomes the primary at the next epoch (``--promote auto``).
    """
    live = live_chunks(chunks)
    actual = actual or {}
    promote = set(promote)
    replicas = {d.replica for d in disks.values() if d.replica}
    out: dict[str, dict[str, str]] = {}
    for name in sorted(disks):
        d = disks[name]
        rd = disks.get(d.replica) if d.replica else None
        now = actual.get(name)
        ours = now if now is not None and is_managed(now) else None
        attrs = {MANAGED_ATTR: MANAGED_VALUE, "automount": "1", "persist": "1"}
        if d.replica:
            attrs["replica"] = d.replica
        # The chunks, primary first: the ndb's master until a promotion.
        first = (d.host, d.chunk)
        second = (rd.host, rd.chunk) if rd is not None and rd.host else None
        # Every disk that is not some disk's replica names the chunk that
        # takes its writes, at an epoch (geryon.disk.role fences by them).
        fenced = bool(d.host) and name not in replicas
        if fenced:
            have = ours.attrs.get("primary", "") if ours is not None else ""
            epoch = _epoch_of(ours, live.get(first), live.get(second) if second else None)
            if second is not None:
                pair = {_bang(first): first, _bang(second): second}
                if have in pair:
                    if have != _bang(first):
                        first, second = second, first
                elif _epoch_of(live.get(second)) > _epoch_of(live.get(first)):
                    # No entry to go by (a new or lost one): the chunk that
                    # has seen the later epoch holds the later history.
                    first, second = second, first
                if name in promote and live.get(second) is not None and live.get(first) is None:
                    first, second = second, first
                    epoch += 1
            if have and have != _bang(first) and not (second and have == _bang(second)):
                epoch += 1  # the ndb moved the disk: a new epoch
            attrs.update(primary=_bang(first), epoch=str(epoch))
            if second is not None:
                attrs["standby"] = _bang(second)
        master = live.get(first) if first[0] else None
        replica = live.get(second) if second is not None else None
        sticky = (
            failback == "never"
            and not fenced  # a replicated disk serves where its writes go
            and replica is not None
            and ours is not None
            and ours.attrs.get("status") == "up"
            and ours.attrs.get("serving") == "replica"
        )
        if master is not None and not sticky:
            attrs.update(host=first[0], chunk=first[1], addr=master.name, serving="master")
            attrs["status"] = "up"
            if fenced and replica is not None:
                attrs["replica-addr"] = replica.name
        elif replica is not None and second is not None:
            attrs.update(host=second[0], chunk=second[1], addr=replica.name, serving="replica")
            attrs["status"] = "up"
        else:
            if first[0]:
                attrs.update(host=first[0], chunk=first[1])
            attrs["status"] = "down"
        out[name] = attrs
    return out


def _bang(chunk: tuple[str, str]) -> str:
    return f"{chunk[0]}!{chunk[1]}"


def _epoch_of(*entries: Service | None) -> int:
    """The highest epoch the entry or its chunks (as their agents report) know."""
    best = 1
    for s in entries:
        with contextlib.suppress(ValueError, AttributeError):
            best = max(best, int(s.attrs.get("epoch", "1")))  # type: ignore[union-attr]
    return best


# ---- the difference (pure) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Action:
    """One change to make, or (``clash``) one to refuse and report.

    ``create``: register ``attrs`` persistently. ``update``: set ``attrs`` and
    remove ``remove`` if the entry's mod_revision is still ``expected``.
    ``delete``: unregister if still ``expected``. ``clash``: ``owner``'s
    unmanaged entry holds a disk name.
    """

    kind: Literal["create", "update", "delete", "clash"]
    name: str
    attrs: Mapping[str, str] = field(default_factory=dict)
    remove: tuple[str, ...] = ()
    expected: Revision = 0
    owner: str = ""

    def __str__(self) -> str:
        pairs = " ".join(f"{k}={v}" for k, v in sorted(self.attrs.items()))
        if self.kind == "create":
            return f"create {self.name}: {pairs}"
        if self.kind == "update":
            gone = f" (removed {' '.join(self.remove)})" if self.remove else ""
            return f"update {self.name}: {pairs or '-'}{gone}"
        if self.kind == "delete":
            return f"delete {self.name}: no longer in the ndb file"
        return f"{self.name} is an entry of {self.owner or 'someone'} not managed here; left alone"


def plan(desired: Mapping[str, Mapping[str, str]], actual: Mapping[str, Service]) -> list[Action]:
    """The actions that turn ``actual`` into ``desired``, in name order.

    ``actual`` holds the managed entries and any unmanaged entry at a desired
    name; unmanaged entries are never written, only reported as clashes.
    """
    actions: list[Action] = []
    for name in sorted(desired.keys() | actual.keys()):
        want, have = desired.get(name), actual.get(name)
        if have is not None and not is_managed(have):
            if want is not None:
                actions.append(Action("clash", name, owner=have.owner))
            continue
        if want is None:
            assert have is not None
            actions.append(Action("delete", name, expected=have.mod_revision))
        elif have is None:
            actions.append(Action("create", name, dict(want)))
        else:
            changed = {k: v for k, v in want.items() if have.attrs.get(k) != v}
            extra = tuple(sorted(k for k in have.attrs if k not in want))
            if changed or extra:
                actions.append(Action("update", name, changed, extra, have.mod_revision))
    return actions


# ---- the controller -------------------------------------------------------


@dataclass(slots=True)
class PassResult:
    """What one pass did: ``conflict`` means a fenced write lost a race (or
    the entry vanished) and the pass should run again from fresh reads."""

    disks: int = 0
    changes: int = 0
    clashes: int = 0
    failed: int = 0
    conflict: bool = False


class Reconciler:
    """The state between passes: the last good disks and what was reported.

    ``reconcile()`` is one level-triggered pass; ``run()`` drives it.
    """

    def __init__(
        self,
        client: Client,
        ndb_path: str | os.PathLike[str],
        *,
        failback: Failback,
        promote: Promote = "never",
        tls_dir: str | os.PathLike[str] | None = None,
    ):
        if failback not in FAILBACKS:
            raise ValueError(f"failback: want one of {FAILBACKS}, got {failback!r}")
        if promote not in PROMOTES:
            raise ValueError(f"promote: want one of {PROMOTES}, got {promote!r}")
        self.client = client
        self.path = os.fspath(ndb_path)
        self.failback = failback
        self.promote = promote
        self.tls_dir = Path(tls_dir) if tls_dir else None
        # The last good read; None until the first one.
        self.disks: dict[str, Disk] | None = None
        # What to stat for changes: the last good database, or a stand-in
        # watching the top file alone.
        self._db = Database([], [(self.path, None)])
        # The files' signature when a read failed: unchanged files are not
        # re-read (or re-reported) until they change. (A file first listed by
        # the failed read is not in it: the periodic resync re-reads anyway.)
        self._bad_sig: tuple | None = None
        self._ndb_error = ""
        self._reported: set[str] = set()

    # ndb ---------------------------------------------------------------------

    def ndb_changed(self) -> bool:
        if self.disks is None and self._bad_sig is None:
            return True
        if self._bad_sig is not None:
            return self._db.signature() != self._bad_sig
        return self._db.changed()

    def load(self, *, force: bool = False) -> bool:
        """Re-read the ndb files if they changed (or ``force``); False while
        no good read has been made yet."""
        if force or self.ndb_changed():
            before = self._db.signature()
            try:
                db = Database.open(self.path)
            except NdbError as exc:
                if str(exc) != self._ndb_error:
                    how = "keeping the last good state" if self.disks is not None else "waiting"
                    log.error("reconciler: %s; %s", exc, how)
                self._ndb_error = str(exc)
                self._bad_sig = before
            else:
                if self._ndb_error:
                    log.info("reconciler: %s reads cleanly again", self.path)
                self._db, self._bad_sig, self._ndb_error = db, None, ""
                self.disks, problems = read_disks(db)
                self._report("ndb", problems)
        return self.disks is not None

    # one pass ----------------------------------------------------------------

    async def reconcile(self, *, force_read: bool = False) -> PassResult:
        """Read the ndb files (if changed) and the registry, write the difference."""
        if not self.load(force=force_read):
            return PassResult()
        assert self.disks is not None
        disks = self.disks
        # The entries are read before the chunks, never after: a fenced write
        # then succeeds only over an entry written from an older view of the
        # chunks than its own, so two reconcilers never write a disk back to
        # an older state (no flapping), whatever the interleaving.
        managed, _ = await self.client.find(MANAGED_FILTER)
        actual = {s.name: s for s in managed}
        # A disk name with no managed entry may still be taken by someone.
        missing = [n for n in disks if n not in actual]
        if len(missing) > MAX_GETS:  # one read of everything beats many Gets
            everything, _ = await self.client.find()
            actual.update((s.name, s) for s in everything if s.name in disks and s.name in missing)
        else:
            for name, s in zip(missing, await _bounded(map(self._get, missing)), strict=True):
                if s is not None:
                    actual[name] = s
        chunks, _ = await self.client.find(CHUNK_FILTER)
        desired = desired_entries(disks, chunks, failback=self.failback, actual=actual)
        if self.promote == "auto":
            # A replica serving in its primary's place: promoted when it has
            # everything the primary acknowledged (as it last heard).
            waiting = [
                n for n, a in desired.items() if a.get("primary") and a.get("serving") == "replica"
            ]
            verdicts = await asyncio.gather(*(self._safe(n, desired[n]["addr"]) for n in waiting))
            safe = [n for n, ok in zip(waiting, verdicts, strict=True) if ok]
            if safe:
                desired = desired_entries(
                    disks, chunks, failback=self.failback, actual=actual, promote=safe
                )
                for n in safe:
                    if desired[n].get("primary") != actual[n].attrs.get("primary"):
                        addr = desired[n]["addr"]
                        log.warning("reconciler: %s: promoting its replica at %s", n, addr)
        actions = plan(desired, actual)
        result = PassResult(disks=len(desired))
        clashes = [str(a) for a in actions if a.kind == "clash"]
        result.clashes = len(clashes)
        self._report("clash", clashes)
        writes = [a for a in actions if a.kind != "clash"]
        problems: list[str] = []
        for a, outcome in zip(writes, await _bounded(map(self._apply, writes)), strict=True):
            if outcome is None:
                result.changes += 1
                log.info("reconciler: %s", a)
            elif isinstance(outcome, LOST_RACE):
                log.debug("reconciler: %s: %s; will re-read", a.name, outcome)
                result.conflict = True
            else:
                result.failed += 1
                problems.append(f"{a.kind} {a.name}: {outcome}")
        self._report("write", problems)
        return result

    async def _safe(self, name: str, addr: str) -> bool:
        try:
            st = await replication_status(addr, tls_dir=self.tls_dir, limit=PROMOTE_CHECK_S)
        except (Gone, StyxError, ValueError) as exc:
            self._report(f"promote {name}", [f"{name}: cannot ask {addr} whether promotion is "
                                             f"safe: {exc}"])  # fmt: skip
            return False
        following = st.get("following")
        ok = isinstance(following, dict) and bool(following.get("safe"))
        if not ok:
            self._report(f"promote {name}", [
                f"{name}: not promoting {addr}: it may lack changes its primary acknowledged "
                f"(geryon disk promote --force {name} to take that loss)"])  # fmt: skip
        return ok

    async def _get(self, name: str) -> Service | None:
        try:
            return await self.client.get(name)
        except errors.NotFound:
            return None

    async def _apply(self, a: Action) -> errors.GeryonError | None:
        """Make one write; a terminal error is returned, a transient one raised."""
        try:
            if a.kind == "create":
                await self.client.register(a.name, a.attrs, persist=True, create_only=True)
            elif a.kind == "update":
                await self.client.update(
                    a.name, a.attrs, remove_attrs=a.remove, expected_mod_revision=a.expected
                )
            elif a.kind == "delete":
                await self.client.unregister(a.name, expected_mod_revision=a.expected)
        except errors.GeryonError as exc:
            if exc.transient:
                raise
            return exc
        return None

    def _report(self, kind: str, messages: list[str]) -> None:
        """Log each problem once while it lasts (again if it comes back)."""
        now = {f"{kind}\0{m}" for m in messages}
        for key in sorted(now - self._reported):
            log.warning("reconciler: %s", key.split("\0", 1)[1])
        self._reported = {k for k in self._reported if not k.startswith(kind + "\0")} | now


async def _bounded(aws: Iterable[Awaitable[object]], limit: int = CONCURRENCY) -> list:
    sem = asyncio.Semaphore(limit)

    async def one(aw: Awaitable[object]) -> object:
        async with sem:
            return await aw

    return list(await asyncio.gather(*(one(aw) for aw in aws)))


async def run(
    client: Client,
    ndb_path: str | os.PathLike[str],
    *,
    failback: Failback = "auto",
    promote: Promote = "never",
    tls_dir: str | os.PathLike[str] | None = None,
    resync: float = DEFAULT_RESYNC_S,
    ready: Callable[[int], object] | None = None,
    poll: float = NDB_POLL_S,
    debounce: float = DEBOUNCE_S,
) -> None:
    """Reconcile until cancelled.

    ``ready(n)`` is called once, after the first complete pass, with the
    number of disk names (default: print the ready line on stderr).
    """
    rec = Reconciler(client, ndb_path, failback=failback, promote=promote, tls_dir=tls_dir)
    kick = asyncio.Event()
    kick.set()  # the first pass

    async def watch(attrs: dict[str, str]) -> None:
        # Events are hints: any change (or a fresh snapshot) means "look again".
        while True:
            try:
                async for m in client.watch(attrs, snapshot=True):
                    if m.kind != "progress":
                        kick.set()
            except errors.GeryonError as exc:
                log.warning("reconciler: watch %s: %s; retrying", attrs, exc)
            await asyncio.sleep(1.0)

    async def poll_ndb() -> None:
        while True:
            await asyncio.sleep(poll)
            if rec.ndb_changed():
                kick.set()

    tasks = [
        asyncio.create_task(watch(CHUNK_FILTER), name="reconciler-watch-chunks"),
        asyncio.create_task(watch(MANAGED_FILTER), name="reconciler-watch-managed"),
        asyncio.create_task(poll_ndb(), name="reconciler-poll-ndb"),
    ]
    loop = asyncio.get_running_loop()
    next_resync = loop.time() + resync
    backoff = Backoff(0.1, 5.0)
    unready = True
    failure = ""
    idle_since = float("-inf")  # when the last pass ended
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_resync - loop.time())):
                    await kick.wait()
            # After a quiet spell the first trigger is served at once; triggers
            # that come while we are busy are gathered for a moment first.
            if loop.time() - idle_since < debounce:
                await asyncio.sleep(debounce)
            kick.clear()  # a trigger from here on means another pass
            full = loop.time() >= next_resync
            if full:
                next_resync = loop.time() + resync
            try:
                result = await rec.reconcile(force_read=full)
                idle_since = loop.time()
            except errors.GeryonError as exc:
                if str(exc) != failure:
                    log.warning("reconciler: registry %s: %s; retrying", client.target, exc)
                failure = str(exc)
                await asyncio.sleep(backoff.next())
                kick.set()
                continue
            except Exception:
                log.exception("reconciler: internal error; retrying")
                await asyncio.sleep(backoff.next())
                kick.set()
                continue
            if failure:
                log.info("reconciler: registry %s answers again", client.target)
            backoff.reset()
            failure = ""
            if result.conflict:
                # Lost a race (another reconciler, an operator): read again.
                await asyncio.sleep(random.random() * debounce)
                kick.set()
            if unready and rec.disks is not None:
                unready = False
                if ready is None:
                    print(
                        f"reconciler: watching {result.disks} disk names from {rec.path}",
                        file=sys.stderr,
                        flush=True,
                    )
                else:
                    ready(result.disks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_at(
    target: str,
    ndb_path: str | os.PathLike[str],
    *,
    failback: Failback = "auto",
    promote: Promote = "never",
    resync: float = DEFAULT_RESYNC_S,
    tls_dir: str | os.PathLike[str] | None = "",
    user: str | None = None,
) -> None:
    """``run`` with a client of its own for ``target`` (closed on the way out).

    ``tls_dir=""`` is plain text (geryon-registryd's private unix socket).
    """
    client = Client(target, tls_dir=tls_dir, user=user or MANAGED_VALUE, retry_for=10.0)
    try:
        await run(
            client, ndb_path, failback=failback, promote=promote, tls_dir=tls_dir or None,
            resync=resync,
        )  # fmt: skip
    finally:
        await client.close()


# ---- geryon-reconciler ----------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="geryon-reconciler",
        description="Keep a persistent registry entry for every disk name in an ndb "
        "file, pointing at its live master chunk (or replica).",
    )
    p.add_argument(
        "--registry",
        type=registry_address,
        default=os.environ.get("GERYON_REGISTRY", DEFAULT_REGISTRY),
        metavar="HOST:PORT[,...]",
        help="the registry, or its fronts tried in turn "
        f"(default $GERYON_REGISTRY or {DEFAULT_REGISTRY})",
    )
    p.add_argument(
        "--tls-dir",
        default=os.environ.get("GERYON_TLS_DIR") or None,
        help="an admin identity: ca.crt, cert.pem, key.pem (default $GERYON_TLS_DIR; "
        "none: plain text)",
    )
    p.add_argument("--ndb", required=True, metavar="FILE", help="the ndb file naming the disks")
    p.add_argument(
        "--failback",
        default="auto",
        choices=FAILBACKS,
        help="point a disk back at its master when it returns (auto, the default) "
        "or stay on the replica while it lives (never; not for a replicated disk, "
        "whose replica takes writes only once promoted)",
    )
    p.add_argument(
        "--promote",
        default="never",
        choices=PROMOTES,
        help="when a replicated disk's primary is gone, promote its replica at once if it "
        "holds every change the primary acknowledged (auto), or leave it read-only until "
        "`geryon disk promote` (never, the default)",
    )
    p.add_argument(
        "--resync",
        type=float,
        default=DEFAULT_RESYNC_S,
        metavar="SECONDS",
        help=f"full resync period (default {DEFAULT_RESYNC_S:g})",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    if args.resync <= 0:
        p.error("--resync: want a positive number of seconds")
    return args


async def _serve(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(
        run_at(
            args.registry,
            args.ndb,
            failback=args.failback,
            promote=args.promote,
            resync=args.resync,
            tls_dir=args.tls_dir or "",
            user=os.environ.get("GERYON_USER"),
        ),
        name="reconciler",
    )
    stopped = asyncio.create_task(stop.wait(), name="reconciler-stop")
    await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task  # re-raises what ended it early
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(message)s", stream=sys.stderr
    )
    try:
        # Refuse to start on a file that does not read: there is no last good
        # state to keep yet. (Later bad edits are logged and waited out.)
        Database.open(args.ndb)
        sys.exit(asyncio.run(_serve(args)))
    except (NdbError, errors.GeryonError) as exc:
        print(f"geryon-reconciler: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
