"""`geryon disk ...`: make, serve and use disks (the seed's kfs, without FUSE).

    geryon disk format CHUNK [--size 64MiB] [--owner NAME] [--users FILE] [--force]
    geryon disk serve CHUNK --listen ADDR [--tls-dir DIR] [--read-only] [--create SIZE]
    geryon disk users CHUNK|NAME [--set FILE]
    geryon disk check CHUNK
    geryon disk ls [-l] NAME[:/PATH]      geryon disk stat NAME:/PATH
    geryon disk cat NAME:/PATH...         geryon disk get NAME:/PATH [LOCAL]
    geryon disk put LOCAL NAME:/PATH      geryon disk rm NAME:/PATH...
    geryon disk mkdir NAME:/PATH...       geryon disk df NAME...

A NAME is a disk name the registry resolves (as `geryon resolve` does), or a
chunk server's address itself (tcp!HOST!PORT or HOST:PORT). Command lines
only; the work is in geryon.disk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import getpass
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from geryon import endpoints, errors
from geryon.client import Client
from geryon.disk import client as styx_client
from geryon.disk import fs, styx
from geryon.disk import users as users_mod
from geryon.model import escape
from geryon.resolve import Unresolved, disk_entry


class Failed(Exception):
    """One line for stderr, exit status 1."""


def _size(text: str) -> int:
    try:
        from geryon.agent_config import parse_size  # node.toml's sizes, read lazily

        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"bad mode {text!r} (want octal permission bits)")
    return mode


def _listen(text: str) -> tuple[str, int]:
    try:
        return endpoints.parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def split_target(text: str) -> tuple[str, str]:
    """NAME:/PATH -> (NAME, /PATH); a bare NAME (or HOST:PORT) is its root."""
    if ":/" in text:
        name, _, path = text.partition(":/")
        return name, "/" + path
    if _is_addr(text):
        return text, "/"
    name, _, path = text.partition(":")
    return name, "/" + path


def _is_addr(name: str) -> bool:
    if "!" in name:
        return True
    host, sep, port = name.rpartition(":")
    return bool(sep and host and port.isdigit())


def _tls_dir(args: argparse.Namespace) -> Path | None:
    from geryon import tls  # cryptography: only for commands that may use TLS

    return tls.tls_dir_from(args.tls_dir)


def _registry(args: argparse.Namespace) -> Client:
    return Client(args.registry, tls_dir=args.tls_dir, user=args.user, retry_for=args.timeout)


async def _resolve(c: Client, name: str, *, replica: bool = False) -> str:
    """The chunk address (tcp!HOST!PORT) NAME stands for: itself when it is
    one; with REPLICA, its live replica's."""
    if _is_addr(name):
        return name if "!" in name else "tcp!{}!{}".format(*name.rsplit(":", 1))
    try:
        s = await disk_entry(c, name)
    except Unresolved as exc:
        raise Failed(str(exc)) from None
    if not replica:
        return s.attrs["addr"]
    addr = styx_client.replica_addr(s.attrs)
    if addr is None:
        raise Failed(f"{name} has no live replica")
    return addr


@asynccontextmanager
async def _remote(args: argparse.Namespace, name: str) -> AsyncIterator[styx_client.Remote]:
    if _is_addr(name):
        addr = name  # no registry needed to dial an address
    else:
        async with _registry(args) as c:
            addr = await _resolve(c, name, replica=getattr(args, "replica", False))
    try:
        styx_client.parse_addr(addr)
    except ValueError as exc:
        raise Failed(str(exc)) from None
    try:
        r = await styx_client.connect(
            addr,
            uname=args.uname or getpass.getuser(),
            tls_dir=_tls_dir(args),
            limit=args.timeout,
        )
    except styx_client.Gone as exc:
        raise Failed(f"disk {name}: {exc}") from None
    except styx_client.StyxError as exc:
        raise Failed(f"disk {name}: attach: {exc}") from None
    try:
        yield r
    finally:
        await r.conn.close()


def _fail(target: str, exc: BaseException) -> Failed:
    return Failed(f"{target}: {exc}")


# ---- local commands --------------------------------------------------------


async def cmd_format(args: argparse.Namespace) -> int:
    chunk = Path(args.chunk)
    size = args.size
    if size is None:
        have = chunk.stat().st_size if chunk.exists() else 0
        if not have:
            raise Failed(f"{chunk}: no size: give --size (e.g. --size 64MiB)")
        size = have
    text = None
    if args.users:
        try:
            text = Path(args.users).read_text()
        except OSError as exc:
            raise Failed(f"{args.users}: {exc.strerror}") from None
    owner = args.owner or getpass.getuser()
    try:
        await asyncio.to_thread(
            fs.format, chunk, size, owner=owner, users_text=text, force=args.force
        )
    except users_mod.UsersError as exc:
        raise Failed(f"{args.users or 'users'}: {exc}") from None
    except (ValueError, FileExistsError, fs.NotADisk) as exc:
        raise Failed(str(exc)) from None
    except OSError as exc:
        raise Failed(f"{chunk}: {exc.strerror}") from None
    print(f"{chunk}: empty disk of {size} bytes, owner {owner}")
    return 0


def _local_disk(chunk: str, *, lock: bool) -> fs.Disk:
    """CHUNK's disk opened here. Unless LOCK (a change: the disk must not be
    served) a served disk is read beside its server; one that is not is
    opened read-write, so that closing it folds SQLite's log back in."""
    try:
        try:
            return fs.Disk(Path(chunk))
        except fs.NotADisk as exc:
            if lock or "in use" not in str(exc):
                raise
            return fs.Disk(Path(chunk), lock=False, read_only=True)
    except fs.NotADisk as exc:
        raise Failed(str(exc)) from None


async def cmd_users(args: argparse.Namespace) -> int:
    if Path(args.target).exists():
        if args.set is None:
            d = _local_disk(args.target, lock=False)
            try:
                sys.stdout.write(d.users_text())
            finally:
                d.close()
            return 0
        # Offline, as the chunk file's own Unix owner: the server holds the
        # chunk's lock while it runs, so a served disk is changed over 9P.
        d = _local_disk(args.target, lock=True)
        try:
            text = Path(args.set).read_text()
            if not users_mod.parse(text).exists(d.owner):
                raise Failed(f"{args.set}: does not name the disk's owner {d.owner}")
            e = d.walk1(d.walk1(d.entry(fs.ROOT), "adm", fs.Caller(d.owner)), "users",
                        fs.Caller(d.owner))  # fmt: skip
            d.opened(e, styx.OWRITE | styx.OTRUNC, fs.Caller(d.owner))
            d.write(e, 0, text.encode(), fs.Caller(d.owner))
            d.sync()
        except users_mod.UsersError as exc:
            raise Failed(f"{args.set}: {exc}") from None
        except OSError as exc:
            raise Failed(f"{args.set}: {exc.strerror}") from None
        except fs.FSError as exc:
            raise Failed(f"{args.target}: {exc}") from None
        finally:
            d.close()
        return 0
    name, _ = split_target(args.target)
    async with _remote(args, name) as r:
        try:
            if args.set is None:
                sys.stdout.write((await r.read_file("/adm/users")).decode(errors="replace"))
            else:
                text = Path(args.set).read_text()
                users_mod.parse(text)
                await r.write_file("/adm/users", text.encode())
        except users_mod.UsersError as exc:
            raise Failed(f"{args.set}: {exc}") from None
        except OSError as exc:
            raise Failed(f"{args.set}: {exc.strerror}") from None
        except styx_client.StyxError as exc:
            raise Failed(f"{name}:/adm/users: {exc}") from None
    return 0


async def cmd_check(args: argparse.Namespace) -> int:
    d = _local_disk(args.chunk, lock=False)
    try:
        problems = await asyncio.to_thread(d.check)
        u = d.usage()
    finally:
        d.close()
    for p in problems:
        print(f"{args.chunk}: {p}")
    if problems:
        return 1
    print(f"{args.chunk}: ok, {u.files} files, {u.used} of {u.capacity} bytes used")
    return 0


async def cmd_serve(args: argparse.Namespace) -> int:
    from geryon.disk import role, server  # the server's side: only to serve

    chunk = Path(args.chunk)
    host, port = args.listen
    tls_dir = _tls_dir(args)
    if tls_dir is None and not endpoints.is_loopback(host) and not args.insecure:
        raise Failed(
            f"refusing plain 9P on non-loopback {host}: "
            "give --tls-dir, or --insecure if you mean it"
        )
    if args.create is not None and not fs.is_disk(chunk):
        try:
            owner = args.owner or getpass.getuser()
            text = Path(args.users).read_text() if args.users else None
            # Without force: a file of zeros is formatted, one holding data refused.
            await asyncio.to_thread(fs.format, chunk, args.create, owner=owner, users_text=text)
        except (ValueError, OSError, fs.NotADisk) as exc:
            raise Failed(f"{chunk}: cannot format: {exc}") from None
        # UsersError is a ValueError: named above with the line at fault.
        print(f"disk: formatted {chunk}, {args.create} bytes", file=sys.stderr, flush=True)

    def ready(bound: int) -> None:
        how = "9P2000 in TLS" if tls_dir else "9P2000"
        mode = ", read-only" if args.read_only else ", synchronous" if args.sync else ""
        print(f"disk: serving {chunk} on {host}:{bound} ({how}{mode})", file=sys.stderr, flush=True)

    # The role and replication log say what happens to the disk: info and up.
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    beside = None
    if args.chunk_name:
        ssl_ctx = styx_client.client_ssl(tls_dir) if tls_dir else None

        async def beside(cs: server.ChunkServer) -> None:
            async with _registry(args) as c:
                await role.Role(cs, c, args.chunk_name, ssl_ctx=ssl_ctx).run()

    try:
        await server.serve(
            chunk, host, port, tls_dir=tls_dir, read_only=args.read_only, sync=args.sync,
            ready=ready, beside=beside,
        )  # fmt: skip
    except (fs.NotADisk, server.RoleLost) as exc:
        raise Failed(str(exc)) from None
    except errors.GeryonError as exc:
        raise Failed(str(exc)) from None
    except OSError as exc:
        raise Failed(f"{args.listen[0]}:{args.listen[1]}: {exc.strerror}") from None
    return 0


# ---- file commands over 9P --------------------------------------------------


def _ls_line(st: styx.Stat) -> str:
    when = dt.datetime.fromtimestamp(st.mtime).strftime("%b %e %H:%M")
    return (
        f"{styx.mode_string(st.mode)} {st.uid:<8} {st.gid:<8} {st.length:>10} {when} {st.name}"
    )


async def cmd_ls(args: argparse.Namespace) -> int:
    name, path = split_target(args.target)
    async with _remote(args, name) as r:
        try:
            st = await r.stat(path)
            stats = await r.listdir(path) if st.mode & styx.DMDIR else [st]
        except styx_client.StyxError as exc:
            raise _fail(args.target, exc) from None
    for s in sorted(stats, key=lambda s: s.name):
        print(_ls_line(s) if args.long else s.name + ("/" if s.mode & styx.DMDIR else ""))
    return 0


async def cmd_stat(args: argparse.Namespace) -> int:
    name, path = split_target(args.target)
    async with _remote(args, name) as r:
        try:
            st = await r.stat(path)
        except styx_client.StyxError as exc:
            raise _fail(args.target, exc) from None
    q = st.qid
    print(_ls_line(st))
    print(f"qid path {q.path} vers {q.vers} type {q.type:#x}  muid {st.muid}  atime {st.atime}")
    return 0


async def cmd_cat(args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    for target in args.targets:
        name, path = split_target(target)
        async with _remote(args, name) as r:
            try:
                async for piece in r.chunks(path):
                    out.write(piece)
            except styx_client.StyxError as exc:
                raise _fail(target, exc) from None
    out.flush()
    return 0


async def cmd_get(args: argparse.Namespace) -> int:
    name, path = split_target(args.target)
    local = Path(args.local or Path(path).name or "out")
    tmp = local.with_name(f".{local.name}.part")
    async with _remote(args, name) as r:
        try:
            with open(tmp, "wb") as f:
                async for piece in r.chunks(path):
                    f.write(piece)
            os.replace(tmp, local)
        except styx_client.StyxError as exc:
            tmp.unlink(missing_ok=True)
            raise _fail(args.target, exc) from None
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise Failed(f"{local}: {exc.strerror}") from None
    return 0


async def cmd_put(args: argparse.Namespace) -> int:
    name, path = split_target(args.target)
    try:
        data = sys.stdin.buffer.read() if args.local == "-" else Path(args.local).read_bytes()
    except OSError as exc:
        raise Failed(f"{args.local}: {exc.strerror}") from None
    async with _remote(args, name) as r:
        try:
            if path.endswith("/") or (await _is_dir(r, path)):
                path = path.rstrip("/") + "/" + Path(args.local).name
            await r.write_file(path, data)
        except styx_client.StyxError as exc:
            raise _fail(f"{name}:{path}", exc) from None
    return 0


async def _is_dir(r: styx_client.Remote, path: str) -> bool:
    try:
        return bool((await r.stat(path)).mode & styx.DMDIR)
    except styx_client.StyxError:
        return False


async def cmd_rm(args: argparse.Namespace) -> int:
    failed = 0
    for target in args.targets:
        name, path = split_target(target)
        async with _remote(args, name) as r:
            try:
                await r.remove(path)
            except styx_client.StyxError as exc:
                print(f"geryon: disk rm: {target}: {exc}", file=sys.stderr)
                failed += 1
    return 1 if failed else 0


async def cmd_mkdir(args: argparse.Namespace) -> int:
    for target in args.targets:
        name, path = split_target(target)
        async with _remote(args, name) as r:
            try:
                await r.mkdir(path, args.mode)
            except styx_client.StyxError as exc:
                raise _fail(target, exc) from None
    return 0


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


async def cmd_df(args: argparse.Namespace) -> int:
    print(f"{'disk':<16} {'size':>10} {'used':>10} {'avail':>10} {'use%':>5}  chunk")
    bad = 0
    async with _registry(args) as c:
        for name in args.names:
            try:
                addr = await _resolve(c, name)
            except Failed as exc:
                print(f"geryon: disk df: {exc}", file=sys.stderr)
                bad += 1
                continue
            try:  # size and used: the chunk's own entry keeps them current
                attrs = dict((await c.get(addr)).attrs)
            except errors.NotFound:
                attrs = {}
            size, used = int(attrs.get("size", "0") or 0), int(attrs.get("used", "0") or 0)
            pct = f"{100 * used // size}%" if size else "-"
            print(
                f"{name:<16} {_human(size):>10} {_human(used):>10} "
                f"{_human(max(size - used, 0)):>10} {pct:>5}  {escape(addr)}"
            )
    return 1 if bad else 0


# ---- replication -------------------------------------------------------------


async def _chunk(c: Client, chunk: str) -> str | None:
    """The live address of chunk HOST!ID (as its agent registers it), or None."""
    host, _, cid = chunk.partition("!")
    found, _ = await c.find({"host": host, "id": cid})
    from geryon.reconciler import live_chunks  # the reconciler's own rule

    live = live_chunks(found).get((host, cid))
    return live.name if live is not None else None


async def _replication(c: Client, args: argparse.Namespace, name: str):
    """NAME's entry and, for its primary and standby chunks, (chunk, addr, status)."""
    try:
        s = await c.get(name)
    except errors.NotFound:
        raise Failed(f"no disk named {name}") from None
    if not s.attrs.get("primary"):
        raise Failed(f"{name} is not a disk the reconciler keeps (no primary in its entry)")
    out = []
    for key in ("primary", "standby") if s.attrs.get("standby") else ("primary",):
        chunk = s.attrs.get(key, "")
        addr = await _chunk(c, chunk) if chunk else None
        st: dict[str, object] | str = "down"
        if addr is not None:
            try:
                st = await styx_client.replication_status(
                    addr, tls_dir=_tls_dir(args), limit=args.timeout
                )
            except (styx_client.Gone, styx_client.StyxError, ValueError) as exc:
                st = f"unreachable: {exc}"
        out.append((key, chunk, addr, st))
    return s, out


async def cmd_status(args: argparse.Namespace) -> int:
    rows: list[dict[str, object]] = []
    async with _registry(args) as c:
        for name in args.names:
            s, chunks = await _replication(c, args, name)
            head: dict[str, object] = {
                "disk": name,
                "epoch": int(s.attrs.get("epoch", "1")),
                "serving": s.attrs.get("serving", ""),
                "addr": s.attrs.get("addr", ""),
            }
            prim = chunks[0][3] if isinstance(chunks[0][3], dict) else {}
            head["sync"] = prim.get("sync", None)
            head["in_sync"] = prim.get("in_sync", None)
            head["chunks"] = []
            for key, chunk, addr, st in chunks:
                row: dict[str, object] = {"role": key, "chunk": chunk, "addr": addr}
                if isinstance(st, dict):
                    row["seq"] = st.get("seq")
                    row["epoch"] = st.get("epoch")
                    row["writable"] = not st.get("frozen")
                    if key == "primary":
                        row["acked"] = st.get("acked")
                    fol = st.get("following")
                    if isinstance(fol, dict):
                        row.update(
                            lag=fol.get("lag"),
                            lag_s=fol.get("lag_s"),
                            following=fol.get("primary_addr"),
                            error=fol.get("error"),
                        )
                    elif key == "standby":
                        row["following"] = None
                else:
                    row["state"] = st
                head["chunks"].append(row)  # type: ignore[union-attr]
            rows.append(head)
    if args.json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
        return 0
    for h in rows:
        mode = "synchronous" if h["sync"] else "asynchronous"
        if h["sync"]:
            mode += ", in sync" if h["in_sync"] else ", OUT OF SYNC (writes are asynchronous)"
        # Entries' values and chunks' answers, escaped: each row stays one line.
        serving, addr = escape(str(h["serving"])), escape(str(h["addr"]))
        print(f"{h['disk']}: epoch {h['epoch']}, {mode}, serving {serving} {addr}")
        for r in h["chunks"]:  # type: ignore[attr-defined]
            chunk, addr = escape(str(r["chunk"])), escape(str(r["addr"] or "-"))
            where = f"  {r['role']:<8} {chunk:<20} {addr:<24}"
            if "state" in r:
                print(f"{where} {escape(str(r['state']))}")
                continue
            what = f"seq {r['seq']} epoch {r['epoch']}"
            what += " writable" if r["writable"] else " read-only"
            if r["role"] == "primary":
                what += f", acked {r['acked']}"
            if r.get("following"):
                what += f", lag {r['lag']} changes {r['lag_s']}s"
                if r.get("error"):
                    what += f" ({escape(str(r['error']))})"
            elif r["role"] == "standby":
                what += ", not following (no live primary)"
            print(f"{where} {what}")
    return 0


async def cmd_promote(args: argparse.Namespace) -> int:
    async with _registry(args) as c:
        s, chunks = await _replication(c, args, args.name)
        if len(chunks) < 2:
            raise Failed(f"{args.name} has no replica (its ndb entry names none)")
        (_, primary, p_addr, _), (_, standby, s_addr, st) = chunks
        shown_p, shown_s = escape(primary), escape(standby)  # for messages: one line each
        epoch = int(s.attrs.get("epoch", "1"))
        if s_addr is None:
            raise Failed(f"{args.name}: its replica {shown_s} is not running")
        if p_addr is not None and not args.force:
            raise Failed(
                f"{args.name}: its primary {shown_p} is live at {p_addr}; stop it first, "
                "or --force to switch now (its unreplicated changes go to /recovered)"
            )
        fol = st.get("following") if isinstance(st, dict) else None
        if not args.force:
            if not isinstance(fol, dict):
                raise Failed(
                    f"{args.name}: {shown_s} has not followed {shown_p} since it started, "
                    "so it may lack changes (--force to promote anyway)"
                )
            if not fol.get("safe"):
                raise Failed(
                    f"{args.name}: {shown_s} applied seq {st['seq']}, but {shown_p} had "  # type: ignore[index]
                    f"acknowledged seq {fol.get('primary_acked')}: promoting loses those "
                    "changes (--force to accept)"
                )
        try:
            await c.update(
                args.name,
                {"primary": standby, "standby": primary, "epoch": str(epoch + 1)},
                expected_mod_revision=s.mod_revision,
            )
        except errors.FailedPrecondition:
            raise Failed(f"{args.name} changed while promoting; look again") from None
        # Until the new primary takes its role, writes would still be refused.
        if sys.stderr.isatty():
            print(f"geryon: disk promote: epoch {epoch + 1} written; waiting (up to "
                  f"{args.timeout:g}s) for {shown_s} to take writes", file=sys.stderr)  # fmt: skip
        deadline = asyncio.get_running_loop().time() + args.timeout
        while asyncio.get_running_loop().time() < deadline:
            with contextlib.suppress(styx_client.Gone, styx_client.StyxError, ValueError):
                now = await styx_client.replication_status(
                    s_addr, tls_dir=_tls_dir(args), limit=args.timeout
                )
                if now.get("role") == "primary" and not now.get("frozen"):
                    break
            await asyncio.sleep(0.2)
        else:
            raise Failed(
                f"{args.name}: promoted {shown_s} to epoch {epoch + 1}, but it is not "
                f"writable yet after {args.timeout:g}s"
            )
    print(f"{args.name}: {shown_s} is the primary at epoch {epoch + 1}")
    return 0


async def run(args: argparse.Namespace) -> int:
    try:
        return await args.disk_run(args)
    except Failed as exc:
        print(f"geryon: disk {args.disk_command}: {exc}", file=sys.stderr)
        return 1


def add_disk_commands(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "disk",
        help="make, serve and use disks (9P2000 file systems in chunk files)",
        description="A disk is a file system inside one chunk file (Inferno's kfs), served "
        "over 9P2000. NAME is a disk name from the registry (as `geryon resolve` takes) or "
        "a chunk server's tcp!HOST!PORT; NAME:/PATH names a file on it.",
    )
    ds = d.add_subparsers(dest="disk_command", metavar="DISK_COMMAND")
    ds.required = True

    def cmd(name: str, fn: object, help: str, **kw: object) -> argparse.ArgumentParser:
        p = ds.add_parser(name, help=help, **kw)  # type: ignore[arg-type]
        p.set_defaults(run=run, disk_run=fn)
        return p

    def replica(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--replica",
            action="store_true",
            help="read NAME's live replica instead of its primary",
        )

    def uname(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--uname",
            default=None,
            help="9P user name to attach as over plain 9P (default: your login name); "
            "over TLS the certificate's identity is used",
        )

    f = cmd("format", cmd_format, "make CHUNK an empty disk (kfs -r)")
    f.add_argument("chunk", metavar="CHUNK")
    f.add_argument("--size", type=_size, help="capacity, e.g. 64MiB (default: CHUNK's size)")
    f.add_argument("--owner", help="owner of the root and of /adm/users (default: you)")
    f.add_argument("--users", metavar="FILE", help="users file to copy in (id:name:leader:members)")
    f.add_argument("--force", action="store_true", help="wipe a chunk that holds data")

    s = cmd(
        "serve",
        cmd_serve,
        "serve CHUNK's disk over 9P2000",
        description="Serve CHUNK's disk over 9P2000 until SIGTERM or SIGINT; in TLS with "
        "--tls-dir (callers are their certificates' identities), plain 9P only on loopback "
        "or with --insecure (callers are their attach names).",
    )
    s.add_argument("chunk", metavar="CHUNK")
    s.add_argument("--listen", type=_listen, required=True, metavar="HOST:PORT")
    s.add_argument("--tls-dir", default=argparse.SUPPRESS, help="identity to serve with")
    s.add_argument("--read-only", action="store_true", help="refuse every change")
    s.add_argument("--insecure", action="store_true", help="allow plain 9P off loopback")
    s.add_argument(
        "--create",
        type=_size,
        metavar="SIZE",
        help="format CHUNK first, SIZE bytes, when it holds no disk yet (missing or zeros)",
    )
    s.add_argument("--owner", help="with --create: the new disk's owner (default: you)")
    s.add_argument("--users", metavar="FILE", help="with --create: the new disk's users file")
    s.add_argument(
        "--chunk",
        dest="chunk_name",
        metavar="HOST!CHUNK",
        help="this chunk as the ndb names it: take the role (primary, replica, neither) "
        "the disk's registry entry gives it; writes are refused until the registry answers",
    )
    s.add_argument(
        "--sync",
        action="store_true",
        help="as a primary, acknowledge a durable write only once a replica has it "
        "(asynchronous again while none keeps up)",
    )

    u = cmd("users", cmd_users, "show or replace a disk's /adm/users")
    u.add_argument("target", metavar="CHUNK|NAME")
    u.add_argument("--set", metavar="FILE", help="replace it (the disk's owner or adm only)")
    uname(u)

    c = cmd("check", cmd_check, "check CHUNK's disk for damage (fsck)")
    c.add_argument("chunk", metavar="CHUNK")

    ls = cmd("ls", cmd_ls, "list a directory")
    ls.add_argument("target", metavar="NAME[:/PATH]")
    ls.add_argument("-l", dest="long", action="store_true", help="long listing")
    uname(ls)
    replica(ls)
    st = cmd("stat", cmd_stat, "show a file's directory entry")
    st.add_argument("target", metavar="NAME:/PATH")
    uname(st)
    replica(st)
    ca = cmd("cat", cmd_cat, "print files")
    ca.add_argument("targets", nargs="+", metavar="NAME:/PATH")
    uname(ca)
    replica(ca)
    g = cmd("get", cmd_get, "copy a file from a disk")
    g.add_argument("target", metavar="NAME:/PATH")
    g.add_argument("local", nargs="?", metavar="LOCAL")
    uname(g)
    replica(g)
    p = cmd("put", cmd_put, "copy a file onto a disk (LOCAL - reads stdin)")
    p.add_argument("local", metavar="LOCAL")
    p.add_argument("target", metavar="NAME:/PATH")
    uname(p)
    r = cmd("rm", cmd_rm, "remove files or empty directories")
    r.add_argument("targets", nargs="+", metavar="NAME:/PATH")
    uname(r)
    m = cmd("mkdir", cmd_mkdir, "make directories")
    m.add_argument("targets", nargs="+", metavar="NAME:/PATH")
    m.add_argument(
        "--mode", type=_mode, default=0o775, help="permission bits, octal (default 775)"
    )
    uname(m)
    sta = cmd(
        "status",
        cmd_status,
        "a replicated disk's primary and replica: positions, lag, sync",
        description="For each NAME: its epoch, whether writes wait for the replica "
        "(synchronous mode, and whether it is in sync now), and for the primary and the "
        "replica chunk their position (seq), whether they take writes, and the replica's "
        "lag behind the primary in changes and seconds, asked of the chunk servers.",
    )
    sta.add_argument("names", nargs="+", metavar="NAME")
    sta.add_argument("--json", action="store_true", help="print JSON")
    pr = cmd(
        "promote",
        cmd_promote,
        "make a replicated disk's replica its primary (a new epoch)",
        description="Make NAME's replica the primary at the next epoch, so that it takes "
        "writes; the old primary, when it returns, refuses writes and follows the new one "
        "(its changes the new primary never had are kept in /recovered). Refused while the "
        "primary is live, or when the replica lacks changes the primary acknowledged, "
        "unless --force.",
    )
    pr.add_argument("name", metavar="NAME")
    pr.add_argument("--force", action="store_true", help="promote even so")
    df = cmd("df", cmd_df, "size and use of disks (from their chunks' registry entries)")
    df.add_argument("names", nargs="+", metavar="NAME")
