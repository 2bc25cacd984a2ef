"""geryon-registryd: the registry daemon.

Wires the store (SQLite in a data dir, or an etcd cluster shared with other
fronts), the lease keeper, the watch hub and the servicer into a grpc.aio
server with health checking and reflection, and shuts them down in stages on
SIGTERM/SIGINT: stop accepting, end streams with UNAVAILABLE (leases left
alone), flush the store, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from geryon import endpoints, leases, wire
from geryon.convert import pb, pb_grpc
from geryon.errors import GeryonError, Unauthenticated
from geryon.model import Caller, validate_attrs, validate_name
from geryon.quota import Quota
from geryon.registry_service import RegistryService, local_admin_on_unix, plaintext_caller
from geryon.store import Limits, Store
from geryon.watch import DEFAULT_BACKLOG, Hub

if TYPE_CHECKING:
    from geryon import tls

log = logging.getLogger("geryon.registryd")

GRACE_S = 2.0
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Registry"].full_name
# A static entry's owner: only an admin may change it.
STATIC_OWNER = "registryd"


def default_data_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "geryon" / "registry"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="geryon-registryd",
        description="Serve Geryon's registry: services found by attribute, "
        "leases, and a watch stream of every change.",
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:6675",
        metavar="HOST:PORT",
        help="address to serve on (default 127.0.0.1:6675; port 0 picks one)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"where the embedded store lives (default {default_data_dir()})",
    )
    p.add_argument(
        "--etcd",
        metavar="HOST:PORT[,HOST:PORT...]",
        help="keep the registry in this etcd v3 cluster instead of --data-dir; "
        "any number of registries may serve the same cluster and prefix",
    )
    # The etcd flags default to None so that, without --etcd, giving one is
    # an error rather than ignored; the defaults are filled in below.
    p.add_argument(
        "--etcd-prefix",
        metavar="/PATH/",
        help="the keys this registry owns in etcd (default /geryon/)",
    )
    p.add_argument(
        "--etcd-tls-dir",
        type=Path,
        metavar="DIR",
        help="client identity for etcd: ca.crt, cert.pem, key.pem (default: plain text)",
    )
    p.add_argument(
        "--etcd-timeout",
        type=float,
        metavar="SECONDS",
        help="give up on etcd after this long and answer UNAVAILABLE (default 5); "
        "starting gives up after twice as long (at least 10 s) with no progress",
    )
    p.add_argument(
        "--etcd-compact-interval",
        type=float,
        metavar="SECONDS",
        help="how often to compact etcd's history to the --history bounds "
        "(one registry does it at a time; 0: never; default 60)",
    )
    p.add_argument(
        "-f",
        dest="static",
        type=Path,
        metavar="FILE",
        help="load static persistent services from an ndb file: every entry "
        "with service=NAME, its other pairs as attributes (as registry(4))",
    )
    p.add_argument(
        "--tls-dir",
        type=Path,
        default=os.environ.get("GERYON_TLS_DIR") or None,
        help="server identity: ca.crt, cert.pem, key.pem (or GERYON_TLS_DIR)",
    )
    p.add_argument(
        "--insecure", action="store_true", help="allow plain text on a non-loopback address"
    )
    p.add_argument(
        "--deny",
        type=Path,
        metavar="FILE",
        help="certificate names or serials to refuse, one a line (re-read on SIGHUP)",
    )
    p.add_argument(
        "--write-rate",
        type=float,
        default=1000,
        metavar="PER_S",
        help="writes per second per identity (bursts of twice that); a write over it "
        "waits up to 1 s, then RESOURCE_EXHAUSTED (0: unlimited; default 1000). Over "
        "plain text this and --max-watches count per name and connection",
    )
    p.add_argument(
        "--keepalive-rate",
        type=float,
        default=100,
        metavar="PER_S",
        help="keepalives per second on one KeepAlive stream (default 100)",
    )
    p.add_argument(
        "--max-watches",
        type=int,
        default=1000,
        metavar="N",
        help="open Watch streams per identity (per name and connection over plain "
        "text; default 1000)",
    )
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here")
    p.add_argument(
        "--history",
        type=int,
        default=100_000,
        metavar="EVENTS",
        help="events of history kept for resuming watchers (default 100000)",
    )
    p.add_argument(
        "--history-age",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="drop history older than this (default 3600)",
    )
    p.add_argument(
        "--history-bytes",
        type=int,
        default=64 << 20,
        metavar="BYTES",
        help="drop the oldest history past this size, counted as its events are "
        "stored (default 67108864: 64 MiB)",
    )
    p.add_argument(
        "--watch-backlog",
        type=int,
        default=DEFAULT_BACKLOG,
        metavar="EVENTS",
        help=f"events queued for one watcher before it is cut off (default {DEFAULT_BACKLOG})",
    )
    p.add_argument(
        "--progress-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="progress notices to idle watchers (default 10)",
    )
    p.add_argument("--ndb", type=Path, metavar="FILE", help="also run geryon-reconciler on FILE")
    p.add_argument("--failback", default="auto", choices=["auto", "never"], help="its --failback")
    p.add_argument(
        "--promote",
        default="never",
        choices=["auto", "never"],
        help="its --promote (asking chunk servers over plain 9P: for disks on loopback; "
        "run geryon-reconciler with an admin --tls-dir for disks in TLS)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    for flag, default in [
        ("--etcd-prefix", "/geryon/"),
        ("--etcd-tls-dir", None),
        ("--etcd-timeout", 5.0),
        ("--etcd-compact-interval", 60.0),
    ]:
        dest = flag[2:].replace("-", "_")
        if getattr(args, dest) is None:
            setattr(args, dest, default)
        elif args.etcd is None:
            p.error(f"{flag}: needs --etcd")
    for flag, value, least in [
        ("--etcd-timeout", args.etcd_timeout, 0.5),
        ("--etcd-compact-interval", args.etcd_compact_interval, 0),
        ("--history", args.history, 1),
        ("--history-age", args.history_age, 1),
        ("--history-bytes", args.history_bytes, 1),
        ("--watch-backlog", args.watch_backlog, 1),
        ("--max-watches", args.max_watches, 1),
        ("--progress-interval", args.progress_interval, 0.1),
        ("--write-rate", args.write_rate, 0),
        ("--keepalive-rate", args.keepalive_rate, 0),
    ]:
        if not least <= value < float("inf"):
            p.error(f"{flag}: want at least {least}, got {value}")
    if args.deny and not args.tls_dir:
        p.error("--deny: needs --tls-dir (over plain text nobody has a certificate to deny)")
    if args.etcd is not None:
        if args.data_dir is not None:
            p.error("--etcd: the registry lives in etcd; --data-dir is for the embedded store")
        try:
            args.etcd = endpoints.parse(args.etcd)
        except ValueError as exc:
            p.error(f"--etcd: {exc}")
        if not args.etcd_prefix.startswith("/") or not args.etcd_prefix.endswith("/"):
            p.error(f"--etcd-prefix: want /PATH/, got {args.etcd_prefix!r}")
    return args


def split_hostport(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise SystemExit(f"geryon-registryd: {flag}: want HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


async def load_static(store: Store, path: Path) -> int:
    """registry(4)'s -f: entries with service=NAME become persistent services.

    The whole file is checked before anything is written, and static entries
    an earlier start loaded but the file no longer names are removed.
    """
    from geryon import ndb

    caller = Caller(STATIC_OWNER, "admin")
    wanted: dict[str, tuple[dict[str, str], str]] = {}
    try:
        db = ndb.Database.open(path)
    except ndb.NdbError as exc:
        raise GeryonError(f"-f {exc}") from None
    for entry in db.find("service"):
        where = f"-f {entry.file}:{entry.lineno}"
        name = entry.get("service") or ""
        attrs = {p.attr: p.value for p in entry.pairs if p.attr != "service"}
        try:
            validate_name(name, "service")
            validate_attrs(attrs)
        except GeryonError as exc:
            raise GeryonError(f"{where}: {exc}") from None
        wanted[name] = (attrs, where)
    writes = []
    for name, (attrs, _) in wanted.items():
        existing = store.services.get(name)
        if existing is not None and existing.owner != STATIC_OWNER:
            log.warning("registryd: -f: %s is registered by %s; left alone", name, existing.owner)
            continue
        writes.append(store.register(name, attrs, lease=0, persist=True, caller=caller))
    for s in list(store.services.values()):
        if s.owner == STATIC_OWNER and s.name not in wanted:
            writes.append(store.unregister(s.name, expected_mod_revision=0, caller=caller))
    await asyncio.gather(*writes)
    return len(wanted)


async def open_store(args: argparse.Namespace) -> Store:
    limits = Limits(
        history_events=args.history,
        history_age_s=args.history_age,
        history_bytes=args.history_bytes,
    )
    if args.etcd:
        from geryon.store.etcd import EtcdStore

        return await EtcdStore.open(
            args.etcd,
            prefix=args.etcd_prefix,
            tls_dir=args.etcd_tls_dir,
            limits=limits,
            give_up_after=args.etcd_timeout,
            compact_interval=args.etcd_compact_interval,
            start_timeout=max(10.0, 2 * args.etcd_timeout),
        )
    from geryon.store.sqlite import SQLiteStore

    # Not waiting for the state to load: Get and Find are answered from the database
    # meanwhile, so a restart serves reads as soon as the port is open.
    return await SQLiteStore.open(args.data_dir or default_data_dir(), limits=limits, wait=False)


async def serve(args: argparse.Namespace) -> int:
    host, port = split_hostport(args.listen, "--listen")
    if args.tls_dir is None and not endpoints.is_loopback(host) and not args.insecure:
        print(
            f"geryon-registryd: refusing plain text on non-loopback {args.listen}: "
            "give --tls-dir, or --insecure if you mean it",
            file=sys.stderr,
        )
        return 2
    # Loading builds an object or more per entry: the cyclic GC would walk
    # all of them again and again as they pile up (a third of a 100,000-entry
    # load), and after it at every full collection (a pause of its own at a
    # million). None of them is garbage, so none is looked at: frozen.
    gc.disable()
    try:
        store = await open_store(args)
    except BaseException:
        gc.enable()
        raise
    hub = Hub(backlog=args.watch_backlog)
    store.on_commit.append(hub.publish)
    deny = credentials = None
    if args.tls_dir or args.deny:  # cryptography costs start-up time: import only if used
        from geryon import tls

        deny = tls.DenyList(args.deny) if args.deny else None
        credentials = tls.server_credentials(Path(args.tls_dir)) if args.tls_dir else None
    servicer = RegistryService(
        store,
        hub,
        authenticate=authenticator(deny) if credentials else plaintext_caller,
        progress_interval=args.progress_interval,
        max_watches_per_caller=args.max_watches,
        writes=Quota(args.write_rate),
        keepalive_rate=args.keepalive_rate,
    )
    store.on_lost.append(servicer.store_lost)
    servicer.serving.clear()  # until the state is in memory: Get and Find only

    interceptors = []
    if args.metrics:
        from geryon.metrics import Metrics

        metrics = Metrics(store, hub)
        mhost, mport = split_hostport(args.metrics, "--metrics")
        metrics.serve(mhost, mport)
        interceptors.append(metrics.interceptor())
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            # A request holds at most one entry (64 attributes of 1 KiB).
            ("grpc.max_receive_message_length", 256 * 1024),
            # Find dead peers whose kernel never said goodbye (power loss,
            # partitions); a clean exit or kill -9 closes the socket at once.
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # A second registry on a port in use must fail, not share it.
            ("grpc.so_reuseport", 0),
        ],
    )
    wire.guard(server, "registryd")  # malformed requests: INVALID_ARGUMENT, no traceback
    pb_grpc.add_RegistryServicer_to_server(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if credentials is not None:
            bound = server.add_secure_port(address, credentials)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:  # grpc says only "Failed to bind"
        raise GeryonError(
            f"--listen {args.listen}: cannot listen there (in use, or not this machine's)"
        ) from None
    private: tempfile.TemporaryDirectory[str] | None = None
    if args.ndb:
        # --ndb: the reconciler runs in here as a plain client of a private unix
        # socket in a 0700 directory (the data dir; with etcd, a temporary
        # one); callers on it are the local admin "reconciler".
        if args.etcd:
            private = tempfile.TemporaryDirectory(prefix="geryon-registryd-")
            sock_dir = Path(private.name)
        else:
            sock_dir = args.data_dir or default_data_dir()
        sock_dir.chmod(0o700)
        sock = sock_dir / "reconciler.sock"
        try:
            server.add_insecure_port(f"unix:{sock}")
        except RuntimeError:
            raise GeryonError(f"--ndb: cannot listen on {sock} (a path over 107 bytes?)") from None
        servicer.authenticate = local_admin_on_unix(servicer.authenticate, "reconciler")
    for name in (SERVICE_NAME, ""):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    try:
        await store.ready()
    except BaseException:
        await server.stop(0)
        raise
    finally:
        gc.enable()
    gc.freeze()
    if args.static:
        n = await load_static(store, args.static)
        log.info("registryd: loaded %d static services from %s", n, args.static)
    servicer.serving.set()
    scrub = asyncio.create_task(store.scrub(), name="store-scrub")
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    health_tasks: set[asyncio.Task[None]] = set()

    def follow_health(cause: str | None) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if cause is None
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in (SERVICE_NAME, ""):
            task = asyncio.create_task(health.set(name, status))
            health_tasks.add(task)
            task.add_done_callback(health_tasks.discard)

    store.on_health.append(follow_health)
    keepers = (
        [asyncio.create_task(leases.keep(store), name="lease-keeper")]
        if store.expires_leases
        else []
    )
    reconciler = None
    if args.ndb:
        from geryon.reconciler import run_at

        target = f"unix:{sock}"
        reconciler = asyncio.create_task(
            run_at(target, args.ndb, failback=args.failback, promote=args.promote),
            name="reconciler",
        )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: reload(servicer, deny, tls_on=bool(credentials)))
    print(
        f"registryd: serving on {host}:{bound} revision {store.revision} {store.describe()}",
        file=sys.stderr,
        flush=True,
    )

    await stop.wait()
    log.info("registryd: shutting down")
    if reconciler is not None:  # first: it is a client of this server
        reconciler.cancel()
        await asyncio.gather(reconciler, return_exceptions=True)
    await health.enter_graceful_shutdown()
    servicer.shutdown()
    await server.stop(GRACE_S)
    for keeper in (*keepers, scrub):
        keeper.cancel()
    await asyncio.gather(*keepers, scrub, return_exceptions=True)
    await store.close()
    if private is not None:
        private.cleanup()
    log.info("registryd: stopped at revision %d", store.durable_revision)
    return 0


def authenticator(deny: tls.DenyList | None) -> Callable[[object], Caller]:
    """Callers over mutual TLS: the verified certificate's geryon:// identity."""
    from geryon import tls

    def authenticate(context: object) -> Caller:
        ident = tls.identity_from_context(context)
        caller = Caller(ident.name, ident.role, ident.serial, expires=ident.expires)
        if deny is not None and deny.denied(caller):
            raise Unauthenticated(f"certificate of {ident.name} (serial {ident.serial}) is denied")
        return caller

    return authenticate


def reload(servicer: RegistryService, deny: tls.DenyList | None, *, tls_on: bool) -> None:
    """SIGHUP: re-read credentials and the deny list; cut off the newly denied."""
    from geryon import tls

    try:
        if tls_on:
            tls.reload_server_credentials()
        if deny is not None:
            deny.reload()
            n = servicer.cut_off(deny.denied)
            log.info("registryd: SIGHUP: deny list has %d entries; %d streams closed", len(deny), n)
    except GeryonError as exc:  # keep serving with what we had
        log.error("registryd: SIGHUP: %s", exc)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(message)s", stream=sys.stderr
    )
    try:
        # uvloop: a tenth less CPU per request than asyncio's own loop, measured
        # under grpc.aio (bench/README.md).
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            sys.exit(runner.run(serve(args)))
    except GeryonError as exc:
        print(f"geryon-registryd: {exc}", file=sys.stderr)
        sys.exit(1)
    except OSError as exc:
        print(f"geryon-registryd: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
