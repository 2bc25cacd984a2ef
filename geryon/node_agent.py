"""geryon-agent: run one node's services from one TOML file and keep them
announced while the registry comes and goes.

    geryon-agent --config node.toml [--check]

Every chunk server, listener and cpu service of the node runs under the
agent and is announced under one lease (geryon.announce). The agent

- supervises: a service whose process exits is unregistered at once and
  restarted with jittered exponential backoff, as its restart policy says
  (always, on-failure, never); a crash loop is logged with each exit status
  and never takes the agent down;
- checks health and keeps ``health=passing|critical`` on each entry;
- serves a chunk with no command as a disk (``geryon disk serve``: a 9P2000
  file system inside the chunk file, formatted when the file is new) and
  keeps its entry's ``size`` (the disk's capacity) and ``used`` current,
  checked every USAGE_INTERVAL seconds; for a chunk with a command, creates
  the file, sparse, at its size when it is missing, and never truncates one
  that exists;
- runs a [[cpu]] as ``geryon cpu serve`` and keeps its entry's ncpu, load
  and sessions current, read from the server every USAGE_INTERVAL seconds;
- leaves nothing behind: SIGTERM or SIGINT revokes the lease (every entry
  goes in one revision), stops each service's process group (SIGTERM, then
  SIGKILL after stop_grace) and exits 0; after a kill -9 the registry ends
  the lease with our keepalive stream and the keeper (geryon/keeper.py)
  kills every service process group;
- on SIGHUP re-reads the file and applies only the difference: services
  added, removed or changed are started, stopped or restarted, a change of
  attributes alone is applied in place, everything else is left running; a
  file with errors is reported and the running config kept.

Once its services are registered it prints ``agent HOST: N services
announced`` on stderr (again after each reload), which tests and the demo
wait for.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import getpass
import logging
import os
import signal
import sys
import time
from pathlib import Path

from geryon import agent_config, endpoints, errors, procs, tls
from geryon.agent_config import AgentConfig, ChunkSpec, ConfigError, CpuSpec, ListenerSpec
from geryon.announce import (
    CALL_TIMEOUT,
    Announcer,
    ChildService,
    Listener,
    Node,
    substitute,
)
from geryon.client import Backoff, Client
from geryon.cpu import client as cpu_client
from geryon.disk import fs as disk_fs
from geryon.health import Checker

log = logging.getLogger("geryon.agent")

# A service that ran this long before exiting starts its restart backoff over.
STABLE_S = 10.0
# How often a disk's size and used are read and, when changed, announced.
USAGE_INTERVAL = 3.0
# Settings a reload cannot change under running services.
FIXED_AT_START = ("registry", "tls_dir", "lease_ttl", "host", "advertise", "reconnect_max_delay")


def with_tls_dir(config: AgentConfig, flag: str | None) -> AgentConfig:
    """The identity to reach the registry with: ``--tls-dir``, else the
    file's tls_dir, else $GERYON_TLS_DIR. Applied to every config read, at
    start and at each reload, so a reload compares like with like."""
    tls_dir = flag or config.tls_dir or os.environ.get("GERYON_TLS_DIR") or None
    return dataclasses.replace(config, tls_dir=Path(tls_dir) if tls_dir else None)


def ensure_chunk_file(path: Path, size: int) -> bool:
    """Create ``path`` sparse at ``size`` bytes if it is missing; return
    whether it was created. An existing file is never truncated or grown."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return True


class Unit:
    """One configured service and the task that runs it."""

    def __init__(self, agent: Agent, spec: ChunkSpec | ListenerSpec) -> None:
        self.agent = agent
        self.spec = spec
        self.node = agent.node
        self.who = f"{agent.who}: {spec.key}"
        # Set once the first start is over, announced or failed: the ready
        # line waits for every unit's.
        self.settled = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._guarded(), name=self.spec.key)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def _guarded(self) -> None:
        try:
            await self.run()
        except Exception:
            log.exception("%s: failed", self.who)  # a bug: say so, keep the agent up
        finally:
            self.settled.set()

    async def run(self) -> None:
        raise NotImplementedError

    def update(self, spec: ChunkSpec | ListenerSpec | CpuSpec) -> None:
        self.spec = spec

    async def restart_after(
        self, returncode: int | None, why: str, began: float, backoff: Backoff
    ) -> bool:
        """A run that began at BEGAN ended: False when the restart policy
        says stop; else wait out the backoff (afresh after a stable run), True."""
        self.settled.set()
        policy = self.spec.restart.policy  # type: ignore[union-attr]
        if policy == "never" or (policy == "on-failure" and returncode == 0):
            log.warning("%s: %s; not restarting (restart = %s)", self.who, why, policy)
            return False
        if time.monotonic() - began >= STABLE_S:
            backoff.reset()
        delay = backoff.next()
        log.warning("%s: %s; restarting in %.2fs", self.who, why, delay)
        await asyncio.sleep(delay)
        return True


class CannotStart(Exception):
    """A service's process cannot be started this time: why, for the log."""


class ChildUnit(Unit):
    """A service that is one child process (a ChildService): restarted as its
    policy says, health-checked, its entry's own figures kept by ``track``."""

    spec: ChunkSpec | CpuSpec

    def __init__(self, agent: Agent, spec: ChunkSpec | CpuSpec) -> None:
        super().__init__(agent, spec)
        self.child: ChildService | None = None
        self.figures: dict[str, str] = {}  # what track() read last

    def attrs(self) -> dict[str, str]:
        return {**self.spec.announced_attrs, **self.figures}

    def update(self, spec: ChunkSpec | ListenerSpec | CpuSpec) -> None:
        """Only the attributes changed: apply them to the running entry."""
        assert isinstance(spec, ChunkSpec | CpuSpec)
        self.spec = spec
        if self.child is not None:
            self.child.set_attrs(self.attrs())

    def command(self) -> tuple[str, ...] | None:
        """The argv to run; None (logged) when it can never run as configured;
        CannotStart when not this time."""
        raise NotImplementedError

    def values(self) -> dict[str, str]:
        """Placeholders for the command and the health check, beside {port}."""
        return {}

    def env(self) -> dict[str, str]:
        """The configured environment (also the health command's)."""
        return {}

    def child_env(self) -> dict[str, str]:
        return self.env()

    async def track(self, child: ChildService, port: int) -> None:
        """Keep the entry's own figures current (``keep``); none by default."""

    def keep(self, child: ChildService, figures: dict[str, str]) -> None:
        if figures != self.figures:
            self.figures = figures
            child.set_attrs(self.attrs())

    async def run(self) -> None:
        backoff = Backoff(self.spec.restart.delay, self.spec.restart.max_delay)
        while True:
            spec = self.spec  # update() may have changed its attributes
            began = time.monotonic()
            returncode: int | None = None
            try:
                command = self.command()
            except CannotStart as exc:
                why = str(exc)
            else:
                if not command:
                    return
                self.child = ChildService(
                    self.node, command, attrs=self.attrs(), port=spec.port,
                    env=self.child_env(), values=self.values(), ready_timeout=spec.ready_timeout,
                )  # fmt: skip
                returncode = await self.child.run(on_ready=self._ready)
                why = procs.describe(returncode)
            if not await self.restart_after(returncode, why, began, backoff):
                return

    async def _ready(self) -> None:
        self.settled.set()
        child = self.child
        assert child is not None and child.name
        port = int(child.name.rsplit("!", 1)[1])
        health = self.spec.health
        checker = Checker(
            health,
            host=self.node.probe_host,
            port=port,
            keeper=self.node.keeper,
            command=substitute(
                health.command,
                {**self.values(), "host": self.node.host, "port": str(port), "addr": child.name},
            ),
            env=self.env(),
        )

        def report(state: str, why: str) -> None:
            log.warning("%s: %s health %s (%s)", self.who, child.name, state, why)
            child.set_health(state)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(checker.run(report))
            tg.create_task(self.track(child, port))


class ChunkUnit(ChildUnit):
    spec: ChunkSpec

    def __init__(self, agent: Agent, spec: ChunkSpec) -> None:
        super().__init__(agent, spec)
        self._warned = False  # of a size that differs, once

    def values(self) -> dict[str, str]:
        return {"path": str(self.spec.path), "id": self.spec.id}

    def env(self) -> dict[str, str]:
        return dict(self.spec.env)

    def child_env(self) -> dict[str, str]:
        spec = self.spec
        return {**spec.env, "GERYON_CHUNK_ID": spec.id, "GERYON_CHUNK_PATH": str(spec.path)}

    def command(self) -> tuple[str, ...] | None:
        spec = self.spec
        if spec.is_disk:
            return self.disk_command()
        try:
            if ensure_chunk_file(spec.path, spec.size):
                log.info("%s: created %s, %d bytes", self.who, spec.path, spec.size)
            elif (have := spec.path.stat().st_size) != spec.size and not self._warned:
                self._warned = True  # left as it is: a chunk's data is never cut
                log.warning("%s: %s holds %d bytes, not %d", self.who, spec.path, have, spec.size)
        except OSError as exc:
            raise CannotStart(f"cannot create {spec.path}: {exc.strerror}") from None
        return spec.command

    def disk_command(self) -> tuple[str, ...] | None:
        """`geryon disk serve` for this chunk; None (logged) when it cannot be
        served safely: plain 9P is for loopback only, as the registry's text."""
        tls_dir = self.agent.config.tls_dir
        # Others dial the advertised address: plain 9P only when that is loopback.
        advertise = self.node.advertise
        if tls_dir is None and not endpoints.is_loopback(advertise):
            log.error(
                "%s: a disk dialled at %s needs TLS: set tls_dir (or --tls-dir)",
                self.who,
                advertise,
            )
            return None
        config = self.agent.config
        argv = [sys.executable, "-m", "geryon.cli", "--registry", config.registry]
        argv += ["disk", "serve", "{path}", "--chunk", f"{config.host}!{self.spec.id}"]
        argv += ["--listen", f"{'*' if tls_dir else advertise}:{{port}}"]
        if self.spec.sync:
            argv += ["--sync"]
        argv += ["--create", str(self.spec.size), "--owner", self.disk_owner()]
        if self.spec.users is not None:
            argv += ["--users", str(self.spec.users)]
        if tls_dir is not None:
            argv += ["--tls-dir", str(tls_dir)]
        return tuple(argv)

    def disk_owner(self) -> str:
        """A new disk's owner: as configured, else whom 9P callers from this
        node will be: its TLS identity, or (plain 9P) the local user."""
        if self.spec.owner:
            return self.spec.owner
        if self.agent.config.tls_dir is not None:
            try:
                return tls.identity_of_dir(self.agent.config.tls_dir).name
            except errors.GeryonError:
                pass  # the agent has already said what is wrong with it
        return getpass.getuser()

    async def track(self, child: ChildService, port: int) -> None:
        """Keep the entry's size and used true to the disk (read beside the
        server: SQLite's WAL readers do not block it)."""
        while self.spec.is_disk:
            try:
                u = await asyncio.to_thread(disk_fs.usage, self.spec.path)
            except Exception as exc:  # a disk mid-format or damaged: say so, keep going
                log.debug("%s: cannot read usage: %s", self.who, exc)
            else:
                # The position (seq) and epoch: where a replica stands, at a glance.
                self.keep(child, {"size": str(u.capacity), "used": str(u.used),
                                  "applied": str(u.seq), "epoch": str(u.epoch)})  # fmt: skip
            await asyncio.sleep(USAGE_INTERVAL)


class CpuUnit(ChildUnit):
    """A [[cpu]]: `geryon cpu serve` announced as svc=rstyx, its ncpu, load
    and sessions read from the server every USAGE_INTERVAL seconds."""

    spec: CpuSpec

    def command(self) -> tuple[str, ...] | None:
        config = self.agent.config
        tls_dir = config.tls_dir
        if tls_dir is None and not endpoints.is_loopback(self.node.advertise):
            log.error("%s: a cpu dialled at %s needs TLS: set tls_dir (or --tls-dir)",
                      self.who, self.node.advertise)  # fmt: skip
            return None
        if tls_dir is None and self.spec.allow_root:
            log.error("%s: allow_root needs TLS: over plain text every local process "
                      "would be the admin", self.who)  # fmt: skip
            return None
        argv = [sys.executable, "-m", "geryon.cli", "--registry", config.registry]
        if tls_dir is not None:
            argv += ["--tls-dir", str(tls_dir)]
        argv += ["cpu", "serve", "--listen", f"{'*' if tls_dir else self.node.advertise}:{{port}}"]
        argv += ["--node", config.host, "--max-sessions", str(self.spec.max_sessions)]
        argv += ["--max-sessions-per-identity", str(self.spec.max_sessions_per_identity)]
        for key, account in sorted(self.spec.runas.items()):
            argv += [f"--runas={key}={account}"]
        if self.spec.allow_root:
            argv += ["--allow-root"]
        return tuple(argv)

    async def track(self, child: ChildService, port: int) -> None:
        """Keep the entry's ncpu, load and sessions true to the server."""
        tls_dir = self.agent.config.tls_dir
        owner = tls.identity_of_dir(tls_dir).name if tls_dir else ""
        me = cpu_client.Cpu(f"tcp!{self.node.probe_host}!{port}", self.node.host, owner, 1, 0, 0)
        while True:
            try:
                st = await cpu_client.status(me, tls_dir=tls_dir)
            except errors.GeryonError as exc:
                log.debug("%s: cannot read the cpu's status: %s", self.who, exc)
            else:
                self.keep(child, {"ncpu": str(st.ncpu), "load": f"{st.load:.2f}",
                                  "sessions": str(st.sessions)})  # fmt: skip
            await asyncio.sleep(USAGE_INTERVAL)


class ListenerUnit(Unit):
    spec: ListenerSpec

    async def run(self) -> None:
        spec = self.spec
        backoff = Backoff(1.0, 30.0)
        failing = False
        while True:
            listener = Listener(
                self.node,
                spec.addr,
                spec.command,
                attrs=spec.attrs,
                env=spec.env,
                max_conns=spec.max_conns,
            )
            try:
                name = listener.bind()
            except OSError as exc:
                if not failing:
                    log.error("%s: cannot listen: %s; retrying", self.who, exc.strerror)
                failing = True
                self.settled.set()
                await asyncio.sleep(backoff.next())
                continue
            if failing:
                log.info("%s: listening again", self.who)
            failing = False
            backoff.reset()
            checker = Checker(
                spec.health,
                host=self.node.probe_host,
                port=int(name.rsplit("!", 1)[1]),
                keeper=self.node.keeper,
                command=substitute(
                    spec.health.command,
                    {"host": self.node.host, "addr": name, "port": name.rsplit("!", 1)[1]},
                ),
                env=spec.env,
            )

            def report(state: str, why: str, listener: Listener = listener) -> None:
                log.warning("%s: %s health %s (%s)", self.who, listener.name, state, why)
                listener.set_health(state)

            health = asyncio.create_task(checker.run(report), name=f"health {name}")
            serving = asyncio.create_task(listener.serve(), name=f"serve {name}")
            await asyncio.sleep(0)  # serve() has announced the entry
            self.settled.set()
            try:
                await serving
            except OSError as exc:
                log.error("%s: accept failed: %s; listening again", self.who, exc)
                await asyncio.sleep(backoff.next())
            finally:
                health.cancel()
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await serving


class Agent:
    """One node's services, announced under one lease.

    ``start`` returns once every service was started; ``ready`` is set once
    they are announced (the ready line). ``reload`` applies a new config's
    difference; ``stop`` revokes the lease and stops every service.
    """

    def __init__(self, config: AgentConfig, *, keeper: procs.Keeper | None = None) -> None:
        self.config = config
        self.who = f"agent {config.host}"
        self.client = Client(
            config.registry, tls_dir=config.tls_dir, retry_for=CALL_TIMEOUT, own_connection=True
        )
        self.announcer = Announcer(
            self.client,
            who=self.who,
            ttl=config.lease_ttl,
            reconnect_max=config.reconnect_max_delay,
        )
        self.keeper = keeper or procs.Keeper()
        self._own_keeper = keeper is None
        self.node = Node(
            self.announcer,
            self.keeper,
            host=config.host,
            advertise=config.advertise,
            who=self.who,
            stop_grace=config.stop_grace,
        )
        self.units: dict[str, Unit] = {}
        self.ready = asyncio.Event()
        self._reporter: asyncio.Task[None] | None = None

    def _unit(self, spec: ChunkSpec | ListenerSpec | CpuSpec) -> Unit:
        kind = {ChunkSpec: ChunkUnit, ListenerSpec: ListenerUnit, CpuSpec: CpuUnit}[type(spec)]
        unit = kind(self, spec)  # type: ignore[arg-type]
        self.units[spec.key] = unit
        unit.start()
        return unit

    async def start(self) -> None:
        self.keeper.ensure()
        self.announcer.start()
        for spec in self.config.services.values():
            self._unit(spec)
        self._report_ready()

    def _report_ready(self) -> None:
        if self._reporter is not None:
            self._reporter.cancel()
        self.ready.clear()
        self._reporter = asyncio.create_task(self._ready_line(), name="ready line")

    async def _ready_line(self) -> None:
        for unit in list(self.units.values()):
            await unit.settled.wait()
        await self.announcer.synced.wait()
        log.info("%s: %d services announced", self.who, len(self.announcer.actual))
        self.ready.set()

    async def reload(self, new: AgentConfig) -> None:
        """Apply what changed between the running config and ``new``."""
        old = self.config
        fixed = [k for k in FIXED_AT_START if getattr(old, k) != getattr(new, k)]
        if fixed:
            log.warning(
                "%s: reload: %s changed; restart the agent to apply", self.who, ", ".join(fixed)
            )
            new = dataclasses.replace(new, **{k: getattr(old, k) for k in fixed})
        self.node.stop_grace = new.stop_grace
        before, after = old.services, new.services
        removed = [k for k in before if k not in after]
        added = [k for k in after if k not in before]
        changed = [k for k in after if k in before and after[k] != before[k]]
        restart = []
        for k in changed:
            a, b = before[k], after[k]
            if isinstance(a, ChunkSpec | CpuSpec) and dataclasses.replace(a, attrs=b.attrs) == b:
                self.units[k].update(b)
            else:
                restart.append(k)
        await asyncio.gather(*(self.units.pop(k).stop() for k in (*removed, *restart)))
        for k in (*restart, *added):
            self._unit(after[k])
        self.config = new
        log.info(
            "%s: reload: %d added, %d removed, %d restarted, %d changed in place",
            self.who,
            len(added),
            len(removed),
            len(restart),
            len(changed) - len(restart),
        )
        self._report_ready()

    async def stop(self) -> None:
        if self._reporter is not None:
            self._reporter.cancel()
        # The lease first: every entry vanishes in one revision, before any
        # service stops answering, instead of one deletion per service.
        await self.announcer.close(revoke=True)
        await asyncio.gather(*(u.stop() for u in self.units.values()))
        self.units.clear()
        if self._own_keeper:
            self.keeper.close()
        await self.client.close()
        log.info("%s: stopped", self.who)


async def run_agent(
    config: AgentConfig,
    *,
    stop: asyncio.Event | None = None,
    handle_signals: bool = False,
    keeper: procs.Keeper | None = None,
    tls_dir: str | None = None,
) -> int:
    """Run an agent until ``stop`` is set (or SIGTERM/SIGINT when
    ``handle_signals``, which also makes SIGHUP reload ``config.path``).
    ``tls_dir`` (--tls-dir) overrides every config's, the reloaded ones too."""
    stop = stop or asyncio.Event()
    hup = asyncio.Event()
    if handle_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, hup.set)
    agent = Agent(config, keeper=keeper)
    await agent.start()
    try:
        while not stop.is_set():
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(hup.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if hup.is_set() and not stop.is_set():
                hup.clear()
                try:
                    new = with_tls_dir(agent_config.load(agent.config.path), tls_dir)
                except ConfigError as exc:
                    for line in exc.problems:
                        log.error("%s: reload: %s", agent.who, line)
                    log.error("%s: reload: keeping the running config", agent.who)
                    continue
                await agent.reload(new)
    finally:
        await agent.stop()
    return 0


# ---- --check -----------------------------------------------------------------


def _seconds(s: float) -> str:
    return f"{s * 1000:g}ms" if s < 1 else f"{s:g}s"


def _health_text(h: agent_config.HealthSpec) -> str:
    if h.type == "none":
        return "none (always passing)"
    what = {"tcp": "tcp connect", "grpc": f"grpc health {h.service!r}"}.get(
        h.type, "command " + " ".join(h.command)
    )
    return (
        f"{what} every {_seconds(h.interval)}, timeout {_seconds(h.timeout)}; critical after "
        f"{h.failure_threshold} failures, passing after {h.success_threshold} successes"
    )


def describe(config: AgentConfig) -> str:
    """What the agent would run, for --check."""
    lines = [
        f"agent {config.host}: registry {config.registry} "
        f"({'tls ' + str(config.tls_dir) if config.tls_dir else 'plain text'}), "
        f"advertise {config.advertise}, lease ttl {_seconds(config.lease_ttl)}, "
        f"{len(config.chunks)} chunks, {len(config.listeners)} listeners, {len(config.cpus)} cpus"
    ]
    for c in config.chunks:
        if c.is_disk:
            state = (
                "a disk" if disk_fs.is_disk(c.path)
                else "missing: will be formatted" if not c.path.exists()
                else "not a disk: will be formatted if it holds only zeros"
            )  # fmt: skip
            how = "9P2000" + (" in TLS" if config.tls_dir else "") + (", sync" if c.sync else "")
            run = f"geryon disk serve {c.path} ({how})"
        else:
            state = "exists" if c.path.exists() else "missing: will be created sparse"
            run = " ".join(c.command)
        lines += [
            f"chunk {c.id}: {c.path} ({state}), {c.size} bytes",
            f"  run: {run}",
            f"  port: {c.port or 'a free one at each start'}",
            "  attrs: " + " ".join(f"{k}={v}" for k, v in sorted(c.announced_attrs.items())),
            f"  health: {_health_text(c.health)}",
            f"  restart: {c.restart.policy}, backoff {_seconds(c.restart.delay)} to "
            f"{_seconds(c.restart.max_delay)}",
        ]
    for cpu in config.cpus:
        lines += [
            f"cpu {cpu.index}: geryon cpu serve "
            f"({'gRPC in TLS' if config.tls_dir else 'plain text'})",
            f"  port: {cpu.port or 'a free one at each start'}",
            "  runas: " + " ".join(f"{k}={v}" for k, v in sorted(cpu.runas.items()))
            + (" (root allowed)" if cpu.allow_root else ""),
            f"  at most {cpu.max_sessions} sessions, {cpu.max_sessions_per_identity} per identity",
            "  attrs: " + " ".join(f"{k}={v}" for k, v in sorted(cpu.announced_attrs.items())),
            f"  health: {_health_text(cpu.health)}",
        ]
    for li in config.listeners:
        lines += [
            f"listener {li.addr}:",
            f"  run per connection: {' '.join(li.command)}",
            f"  at most {li.max_conns} connections",
            "  attrs: " + (" ".join(f"{k}={v}" for k, v in sorted(li.attrs.items())) or "-"),
            f"  health: {_health_text(li.health)}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="geryon-agent",
        description="Run a node's chunk servers and listeners from one TOML file, "
        "announced in Geryon's registry under one lease.",
    )
    p.add_argument("--config", "-c", required=True, type=Path, metavar="FILE")
    p.add_argument(
        "--check", action="store_true", help="check the config, print what would run, exit"
    )
    p.add_argument(
        "--tls-dir",
        default=None,
        help="identity to reach the registry with (default: tls_dir in the config, "
        "else $GERYON_TLS_DIR; none: plain text)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    logging.basicConfig(
        format="%(message)s", level=args.log_level.upper(), stream=sys.stderr, force=True
    )
    try:
        config = agent_config.load(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    in_file = config.tls_dir is not None
    config = with_tls_dir(config, args.tls_dir)
    if config.tls_dir is not None:
        # Read the identity now: a missing or broken file is a config error,
        # reported before any service starts, not a traceback from the client.
        try:
            tls.channel_credentials(config.tls_dir)
        except errors.GeryonError as exc:
            where = (
                "geryon-agent: --tls-dir"
                if args.tls_dir
                else f"{args.config}: tls_dir"
                if in_file
                else "geryon-agent: GERYON_TLS_DIR"
            )
            print(f"{where}: {str(exc).removeprefix('tls: ')}", file=sys.stderr)
            sys.exit(2)
    if args.check:
        print(describe(config))
        sys.exit(0)
    try:
        code = asyncio.run(run_agent(config, handle_signals=True, tls_dir=args.tls_dir))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
