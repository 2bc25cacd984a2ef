"""`geryon cpu serve`: the cpu service's server, and what it needs around the
servicer: credentials, a keeper for the sessions' process groups, mounting
disks for sessions, and shutdown.

The server takes SIGTERM or SIGINT as the end: it stops taking sessions,
kills every session's processes (their callers see the stream end), and
exits. Its keeper kills the sessions' process groups if it dies otherwise,
kill -9 included. gRPC keepalive pings find a caller whose machine vanished
(no FIN, no RST) within about 20 s; its session then ends like any other.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from geryon import procs, tls, wire
from geryon.client import Client
from geryon.convert import cpu_pb_grpc
from geryon.cpu import nsinit, process
from geryon.cpu.runas import RunAs
from geryon.cpu.service import CpuService, Limits, plaintext_caller
from geryon.errors import FailedPrecondition, InvalidArgument, NotFound
from geryon.model import Caller

log = logging.getLogger("geryon.cpu")

# Ping an idle connection every 10 s; one unanswered for 10 s is dead.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
]
STOP_GRACE_S = 2.0


def tls_authenticator() -> Callable[[grpc.aio.ServicerContext], Caller]:
    def authenticate(context: grpc.aio.ServicerContext) -> Caller:
        ident = tls.identity_from_context(context)
        return Caller(ident.name, ident.role, ident.serial, expires=ident.expires)

    return authenticate


def check_tls(tls_dir: Path) -> None:
    """The certificate must carry its identity's name as a DNS name: clients
    dial a cpu by the name of the identity that registered it."""
    ident = tls.identity_of_dir(tls_dir)
    if tls.dial_name(ident.name) not in [n.lower() for n in tls.dns_names_of_dir(tls_dir)]:
        raise InvalidArgument(
            f"cpu: {tls_dir}: the certificate of {ident.role} {ident.name} has no DNS name "
            f"{tls.dial_name(ident.name)} (issued before cpus existed): issue it again "
            "(geryon ca issue)"
        )


class Mounts:
    """Makes a session's --mount wrapper (geryon.cpu.nsinit): checks this
    server can mount and that each name is a registered entry."""

    def __init__(
        self, client: Client, *, registry: str, tls_dir: Path | None, timeout: float, unshare: str
    ) -> None:
        self.client = client
        self.unshare = unshare
        self.registry = registry
        self.tls_dir = tls_dir
        self.timeout = timeout
        self._why_not: str | None = None
        self._checked = False

    def _unavailable(self) -> str | None:
        if not self._checked:
            self._checked = True
            if os.geteuid() != 0:
                self._why_not = "it is not root (a session's mounts need a namespace of its own)"
            else:
                from geryon.disk.mount import fuse_unavailable  # loads pyfuse3: only now

                self._why_not = fuse_unavailable()
        return self._why_not

    async def __call__(self, names: Sequence[str], caller: Caller) -> tuple[str, ...]:
        why = self._unavailable()
        if why is not None:
            raise FailedPrecondition(f"cpu: this cpu cannot mount disks: {why}")
        for name in names:
            bad = not name or name in (".", "..") or name.startswith("-")
            if bad or any(c in name for c in "/\0"):
                raise InvalidArgument(f"cpu: mount: {name!r} is not a disk name")
            try:
                await self.client.get(name)
            except NotFound:
                raise NotFound(f"cpu: mount: no disk named {name!r}") from None
        if len(set(names)) != len(names):
            raise InvalidArgument("cpu: mount: a name given twice")
        mount = [sys.executable, "-m", "geryon.cli", "--registry", self.registry]
        mount += ["--timeout", str(self.timeout)]
        if self.tls_dir is not None:
            mount += ["--tls-dir", str(self.tls_dir)]
        # Over plain 9P the caller attaches as itself; over TLS the node's
        # certificate is who the disk sees.
        mount += ["mount", "--foreground", "--allow-other", "--uname", caller.name]
        spec = json.dumps({"names": list(names), "mount": mount})
        python = [sys.executable, "-I", "-S", nsinit.__file__]
        return (self.unshare, "--mount", "--propagation", "private", "--", *python, spec, "--")


async def serve(
    host: str,
    port: int,
    *,
    node: str,
    runas: RunAs,
    limits: Limits,
    tls_dir: Path | None,
    registry: str | None,
    registry_timeout: float = 10.0,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT. OSError when the address cannot be
    bound; InvalidArgument (one line) for a setup that cannot serve."""
    if tls_dir is not None:
        check_tls(tls_dir)
    elif runas.allow_root:
        # Over plain text every local process is the admin: never root.
        raise InvalidArgument("cpu: allow_root needs TLS (--tls-dir): over plain text "
                              "every local process would be the admin")  # fmt: skip
    try:
        tools = process.helpers()
    except process.Unavailable as exc:
        raise InvalidArgument(f"cpu: {exc}") from None
    keeper = procs.Keeper()
    keeper.ensure()
    client = (
        Client(registry, tls_dir=tls_dir or "", retry_for=registry_timeout) if registry else None
    )
    mounter = None
    if client is not None and registry:
        mounter = Mounts(
            client, registry=registry, tls_dir=tls_dir, timeout=registry_timeout,
            unshare=tools["unshare"],
        )  # fmt: skip
    servicer = CpuService(
        node=node,
        runas=runas,
        limits=limits,
        keeper=keeper,
        authenticate=tls_authenticator() if tls_dir else plaintext_caller,
        mounter=mounter,
        plain_text=tls_dir is None,
    )
    server = grpc.aio.server(options=SERVER_OPTIONS)
    wire.guard(server, "cpu")  # malformed requests: INVALID_ARGUMENT, no traceback
    cpu_pb_grpc.add_CpuServiceServicer_to_server(servicer, server)
    address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    if tls_dir is not None:
        bound = server.add_secure_port(address, tls.server_credentials(tls_dir))
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise OSError(98, f"cannot listen on {address}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, tls.reload_server_credentials)
    if ready is not None:
        ready(bound)
    try:
        await stop.wait()
        log.info("cpu: stopping: %d sessions to end", len(servicer.sessions))
    finally:
        await servicer.stop()
        await server.stop(STOP_GRACE_S)
        if client is not None:
            await client.close()
        keeper.close()
