"""`geryon mount` and `geryon umount`: disk names as FUSE file systems.

    geryon mount [--root DIR] [--wait SECONDS] [--uname NAME] [--log FILE] NAME...
    geryon mount --at DIR NAME
    geryon mount --foreground [--at DIR | --root DIR] NAME
    geryon umount [--root DIR] [--lazy] DIR|NAME...

Inferno's rmnt mounted each disk name at /n/NAME; so does this, through
FUSE, with a mount that follows the name's entry (geryon.disk.mount). Each
mount is one background process in its own session, so it outlives the
command; the command waits on a pipe until the mount answers (or the process
says why it cannot) and exits 0 only then. Command lines only; the work is in
geryon.disk.mount, imported when a command runs (it loads pyfuse3).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from geryon.resolve import disk_entry

DEFAULT_ROOT = "/n"
# How long the command waits, beyond the registry's --timeout, for a mount
# process to answer (a dial and an attach are at most 10 s each).
READY_SLACK = 30.0


class Failed(Exception):
    """One line for stderr, exit status 1."""


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want seconds, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"want a positive number of seconds, got {text}")
    return v


def _say(command: str, msg: str) -> None:
    print(f"geryon: {command}: {msg}", file=sys.stderr)


# ---- mount -----------------------------------------------------------------


async def cmd_mount(args: argparse.Namespace) -> int:
    names: list[str] = args.names
    if args.at and len(names) != 1:
        _say("mount", "--at takes exactly one NAME")
        return 2
    if args.foreground and len(names) != 1:
        _say("mount", "--foreground takes exactly one NAME (one mount per process)")
        return 2
    bad = [n for n in names if not n or "/" in n or n in (".", "..")]
    if bad:
        _say("mount", f"{bad[0]!r} is not a disk name")
        return 2
    from geryon.disk import mount as mount_mod

    why = mount_mod.fuse_unavailable()
    if why is not None:
        _report(args, f"FUSE is not available here ({why})")
        return 1
    if args.foreground:
        return await _foreground(args, names[0])
    results = await asyncio.gather(*(_background(args, n) for n in names))
    failed = [msg for msg in results if msg is not None]
    for msg in failed:
        _say("mount", msg)
    return 1 if failed else 0


def _mountpoint(args: argparse.Namespace, name: str) -> Path:
    return Path(args.at) if args.at else Path(args.root) / name


def _report(args: argparse.Namespace, msg: str) -> None:
    """MSG on stderr, and to whoever waits on the readiness pipe."""
    _say("mount", msg)
    if args.ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(args.ready_fd, f"error: {msg}\n".encode())
            os.close(args.ready_fd)
        args.ready_fd = None


async def _foreground(args: argparse.Namespace, name: str) -> int:
    from geryon.disk import mount as mount_mod

    handler: logging.Handler = (
        logging.FileHandler(args.log) if args.log else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    root_log = logging.getLogger()
    root_log.addHandler(handler)
    root_log.setLevel(logging.INFO)
    logging.getLogger("pyfuse3").setLevel(logging.WARNING)
    mount_mod.log.info("mount: pid %d: %s at %s", os.getpid(), name, _mountpoint(args, name))

    def ready() -> None:
        if args.ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(args.ready_fd, b"ok\n")
                os.close(args.ready_fd)
            args.ready_fd = None

    from geryon import tls

    opts = mount_mod.Options(
        name=name,
        mountpoint=_mountpoint(args, name),
        registry=args.registry,
        resolve=disk_entry,
        tls_dir=tls.tls_dir_from(args.tls_dir),
        user=args.user,
        timeout=args.timeout,
        uname=args.uname or getpass.getuser(),
        wait=args.wait,
        replica=args.replica,
        allow_other=args.allow_other,
    )
    try:
        await mount_mod.mount(opts, ready=ready)
    except mount_mod.MountError as exc:
        _report(args, str(exc))
        return 1
    except Exception as exc:
        # Unexpected: the traceback goes to the log; the one line to the user.
        mount_mod.log.exception("mount %s failed", name)
        _report(args, f"{name}: {type(exc).__name__}: {exc}")
        return 1
    return 0


def _child_argv(args: argparse.Namespace, name: str, point: Path, ready_fd: int) -> list[str]:
    argv = [sys.executable, "-m", "geryon.cli", "--registry", args.registry]
    argv += ["--timeout", str(args.timeout)]
    if args.tls_dir:
        argv += ["--tls-dir", str(Path(args.tls_dir).expanduser().resolve())]
    if args.user:
        argv += ["--user", args.user]
    argv += ["mount", "--foreground", "--ready-fd", str(ready_fd), "--at", str(point)]
    argv += ["--wait", str(args.wait), "--uname", args.uname or getpass.getuser()]
    argv += ["--replica"] if args.replica else []
    argv += ["--allow-other"] if args.allow_other else []
    argv += ["--", name]
    return argv


async def _background(args: argparse.Namespace, name: str) -> str | None:
    """Start NAME's mount process and wait until it answers: None, or why not."""
    from geryon.disk.mount import resolved_path

    point = Path(resolved_path(_mountpoint(args, name)))
    try:
        proc, r = _spawn(args, name, point)
    except OSError as exc:
        return f"{name}: cannot start the mount process: {exc.strerror}"
    try:
        async with asyncio.timeout(args.timeout + args.wait + READY_SLACK):
            line = await asyncio.to_thread(_read_all, r)
    except TimeoutError:
        proc.kill()  # our own child, by pid; its read end closes with it
        await asyncio.to_thread(proc.wait)
        _unmount_quietly(point)
        return f"{name}: the mount process did not answer; killed it"
    finally:
        with contextlib.suppress(OSError):
            os.close(r)
    if line.startswith("ok"):
        return None
    if line.startswith("error: "):
        await asyncio.to_thread(proc.wait)
        return line[len("error: ") :].strip()
    code = await asyncio.to_thread(proc.wait)
    where = f" (see {args.log})" if args.log else " (--log FILE says why)"
    return f"{name}: the mount process exited with status {code}{where}"


def _spawn(args: argparse.Namespace, name: str, point: Path) -> tuple[subprocess.Popen, int]:
    """The mount process, and the read end of its readiness pipe."""
    log = open(args.log, "ab") if args.log else open(os.devnull, "wb")
    r, w = os.pipe()
    try:
        # Its own session: no terminal's hangup or ^C reaches it, and it
        # outlives this command. Its cwd is / so it pins no directory.
        proc = subprocess.Popen(
            _child_argv(args, name, point, w),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(w,),
            start_new_session=True,
            cwd="/",
        )
    except OSError:
        os.close(r)
        raise
    finally:
        os.close(w)
        log.close()
    return proc, r


def _read_all(fd: int) -> str:
    """The pipe's contents until its writer closes it (the first line is enough)."""
    out = b""
    while b"\n" not in out and (piece := os.read(fd, 4096)):
        out += piece
    return out.decode(errors="replace")


def _unmount_quietly(point: Path) -> None:
    with contextlib.suppress(OSError):
        subprocess.run(
            [shutil.which("fusermount3") or "fusermount3", "-u", "-z", str(point)],
            capture_output=True,
            check=False,
        )


# ---- umount ----------------------------------------------------------------


async def cmd_umount(args: argparse.Namespace) -> int:
    from geryon.disk.mount import mounts, resolved_path

    failed = 0
    for target in args.targets:
        table = mounts()  # afresh: the one before may have been this one
        # A NAME means ROOT/NAME; anything with a slash (or not mounted under
        # ROOT, but mounted where it names from here) is a directory.
        if "/" in target or target in (".", ".."):
            candidates = [resolved_path(target)]
        else:
            candidates = [resolved_path(Path(args.root) / target), resolved_path(target)]
        point = next((c for c in candidates if c in table), None)
        if point is None:
            _say("umount", f"{candidates[0]}: not mounted")
            failed += 1
            continue
        if table[point] != "fuse.geryon":
            _say("umount", f"{point}: not a geryon mount ({table[point]})")
            failed += 1
            continue
        tool = shutil.which("fusermount3")
        argv = [tool, "-u"] if tool else ["umount"]
        if args.lazy:
            argv.append("-z" if tool else "-l")
        try:
            r = await asyncio.to_thread(
                subprocess.run, [*argv, point], capture_output=True, text=True, check=False
            )
        except OSError as exc:
            _say("umount", f"{point}: {argv[0]}: {exc.strerror}")
            failed += 1
            continue
        if r.returncode != 0:
            msg = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
            tool, sep, rest = msg.partition(": ")
            if sep and os.path.basename(tool) in ("fusermount3", "umount"):
                msg = rest  # it names itself by its path: we are `geryon: umount:`
            _say("umount", msg)
            failed += 1
    return 1 if failed else 0


# ---- the parser ------------------------------------------------------------


def add_mount_commands(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser(
        "mount",
        help="mount disks by name through FUSE (rmnt), following their entries",
        description="Mount each disk NAME at ROOT/NAME (default /n/NAME, made when "
        "missing), or one at --at DIR, after resolving NAME as `geryon resolve` does. "
        "The mount follows NAME's registry entry: when its addr changes or the "
        "connection is lost, it reconnects by itself; meanwhile file operations wait "
        "--wait seconds, then fail with EIO. Returns once every mount is live (each is "
        "a background process; `geryon umount` or fusermount3 -u ends it). Exit 1 "
        "when a NAME is unknown or down, its disk does not answer, or FUSE is missing.",
    )
    m.add_argument("names", nargs="+", metavar="NAME")
    m.add_argument(
        "--root",
        default=DEFAULT_ROOT,
        metavar="DIR",
        help=f"mount each NAME at DIR/NAME (default {DEFAULT_ROOT})",
    )
    m.add_argument("--at", metavar="DIR", help="mount the one NAME at DIR")
    m.add_argument(
        "--replica",
        action="store_true",
        help="read NAME's live replica instead of its primary, read-only (its "
        "entry's replica-addr, or addr while the replica serves in the primary's place)",
    )
    m.add_argument(
        "--uname",
        default=None,
        help="9P user name to attach as over plain 9P (default: your login name); "
        "over TLS the certificate's identity is used",
    )
    m.add_argument(
        "--wait",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="how long a file operation waits for an unreachable disk before it "
        "fails with EIO (default 10)",
    )
    m.add_argument(
        "--foreground",
        "-f",
        action="store_true",
        help="stay attached (one NAME): log to stderr, unmount on SIGINT or SIGTERM",
    )
    m.add_argument(
        "--log",
        metavar="FILE",
        help="append the mount process's log to FILE (default: none; with --foreground, stderr)",
    )
    m.add_argument(
        "--allow-other",
        action="store_true",
        help="let other local users use the mount, as the mount's 9P identity (root, "
        "or user_allow_other in /etc/fuse.conf)",
    )
    m.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    m.set_defaults(run=cmd_mount)

    u = sub.add_parser(
        "umount",
        help="unmount disks mounted by geryon mount",
        description="Unmount each DIR, or NAME's mount at ROOT/NAME (default "
        f"{DEFAULT_ROOT}/NAME); its mount process then exits. Exit 1 when one is not "
        "mounted or is busy (--lazy detaches it anyway).",
    )
    u.add_argument("targets", nargs="+", metavar="DIR|NAME")
    u.add_argument(
        "--root",
        default=DEFAULT_ROOT,
        metavar="DIR",
        help=f"where NAMEs are mounted (default {DEFAULT_ROOT})",
    )
    u.add_argument(
        "--lazy",
        "-z",
        action="store_true",
        help="detach even when busy; it goes when the last user lets go",
    )
    u.set_defaults(run=cmd_umount)
