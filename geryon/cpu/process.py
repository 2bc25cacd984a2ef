"""One session's command: started as its account in a session of its own,
its output read as the caller can take it, and the whole of it killed at the end.

The command runs through small util-linux and coreutils programs, which cost
well under a millisecond where a Python exec wrapper costs ten:

    [setsid --ctty] setpriv --pdeathsig=KILL [--reuid --regid --init-groups] --
        env -i --chdir=DIR VAR=VALUE... ARGV

- Its own session and process group (pgid = sid = its pid): by subprocess's
  setsid for pipes, or by ``setsid --ctty``, which also makes the terminal
  its controlling terminal, with a pseudo-terminal. A signal for the session
  goes to the terminal's foreground process group (a shell's current job),
  else to the command's group, and only to processes the account could
  signal itself.
- ``setpriv`` drops to the account (with its supplementary groups) and arms
  PR_SET_PDEATHSIG last (a change of credentials clears it): if the cpu
  server dies, the kernel kills the command, and the server's keeper kills its
  process group.
- Until ``env`` every program runs as root, found by absolute path, with a
  fixed environment; ``env``, already the account, sets the session's
  environment and enters its directory, so nothing the caller sends reaches
  root and no directory is entered with root's rights.
- At the end (the command exited and its output is drained, the caller went
  away, or the server stops), ``end`` sends SIGKILL to the process group, to
  every process of the session (job-control groups of an interactive shell
  included) and to every process of the account still carrying the session's
  GERYON_SESSION (a daemon that made a session of its own), until none is
  left.

No grpc here: the servicer pumps a Process's output into its stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import re
import shutil
import signal
import struct
import sys
import termios
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

from geryon import procs
from geryon.cpu.runas import Account

# One read of output: large enough that a stream of bulk output costs few
# messages, small enough to stay well inside gRPC's 4 MiB message limit.
CHUNK = 1 << 20
# The command's stdout and stderr pipes: the most unprivileged users may ask for.
PIPE_SIZE = 1 << 20
# Once the command has exited, output still arriving (from a background job
# holding its stdout) is forwarded until this long passes without any.
LINGER_S = 0.1
STDOUT, STDERR = 1, 2
# Signals a caller may send, by name.
SIGNALS = frozenset(
    {"INT", "TERM", "HUP", "QUIT", "KILL", "USR1", "USR2", "WINCH", "CONT", "STOP", "TSTP"}
)
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True, slots=True)
class Window:
    rows: int = 24
    cols: int = 80
    width_px: int = 0
    height_px: int = 0

    def packed(self) -> bytes:
        return struct.pack("HHHH", self.rows, self.cols, self.width_px, self.height_px)


@dataclass(frozen=True, slots=True)
class Spec:
    """What to run, checked by the servicer."""

    argv: tuple[str, ...]  # empty: the account's login shell
    account: Account
    _: KW_ONLY
    env: Mapping[str, str] = field(default_factory=dict)
    dir: str = ""  # "": the account's home, else /
    term: str | None = None  # set: on a pseudo-terminal of this type
    window: Window = Window()
    # The mount wrapper's argv (geryon.cpu.nsinit), run before setpriv; () for none.
    wrapper: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ExitStatus:
    code: int = 0
    signal: str = ""  # e.g. "KILL", when a signal ended it

    def __str__(self) -> str:
        return f"killed by SIG{self.signal}" if self.signal else f"exit status {self.code}"


class Unavailable(Exception):
    """A program this service needs is missing (util-linux, coreutils)."""


# What runs as root before the drop gets this environment and nothing of the
# caller's: a PATH, LD_PRELOAD or PYTHONPATH of theirs must not reach a
# program running as root. Their environment is set by env(1), as the account.
ROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def helpers() -> dict[str, str]:
    """Absolute paths of setsid, setpriv, unshare and env, looked up once in
    the system's PATH (never the caller's)."""
    found = {}
    for name in ("setsid", "setpriv", "unshare", "env"):
        path = shutil.which(name, path=ROOT_ENV["PATH"])
        if path is None:
            raise Unavailable(f"{name} is missing (util-linux, coreutils)")
        found[name] = path
    return found


def environment(spec: Spec, extra: Mapping[str, str]) -> dict[str, str]:
    """A clean login environment for the account, then the caller's additions,
    then what the service says about itself (EXTRA) last."""
    acct = spec.account
    env = {
        "HOME": acct.home,
        "USER": acct.name,
        "LOGNAME": acct.name,
        "SHELL": acct.shell,
        "PATH": ROOT_PATH if acct.uid == 0 else DEFAULT_PATH,
    }
    if "LANG" in os.environ:
        env["LANG"] = os.environ["LANG"]
    if spec.term is not None:
        env["TERM"] = spec.term or "dumb"
    return {**env, **spec.env, **extra}


def command_line(
    spec: Spec, env: Mapping[str, str], tools: Mapping[str, str], *, home: str
) -> list[str]:
    """The chain that starts SPEC. Everything before env(1) runs as root
    with ROOT_ENV; env(1) runs as the account: it clears the environment,
    sets the session's, enters the working directory (so an account cannot
    start inside a directory it could not reach) and execs argv, looked up
    in the session's PATH (127 and a line on stderr when it is not there)."""
    acct = spec.account
    argv = list(spec.argv)
    if not argv:
        # A login shell on a terminal, as login(1) starts it; a plain one
        # reading commands from stdin otherwise.
        argv = [acct.shell, "-l"] if spec.term is not None else [acct.shell]
    chain = [tools["setpriv"]]
    if os.geteuid() != acct.uid or os.getegid() != acct.gid:
        chain += [f"--reuid={acct.uid}", f"--regid={acct.gid}", "--init-groups"]
    chain += ["--pdeathsig=KILL", "--", tools["env"], "-i", f"--chdir={spec.dir or home}"]
    # Assignments end at the first word without "=": check_env and
    # check_argv keep names and argv[0] from being mistaken for either.
    chain += [f"{k}={v}" for k, v in env.items()]
    chain += argv
    if spec.term is not None:
        chain = [tools["setsid"], "--ctty", "--", *spec.wrapper, *chain]
    else:
        chain = [*spec.wrapper, *chain]
    return chain


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


class Process:
    """A started command. Read its output with ``output()``; feed it with
    ``write``/``close_stdin``; ``wait`` for its status; ``kill`` at the end."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        *,
        stdin: int,
        outputs: dict[int, int],
        pty: bool,
        keeper: procs.Keeper,
    ) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._stdin = stdin  # our end: the pipe's write end, or the terminal's master
        self._outputs = outputs  # our fd -> STDOUT or STDERR
        self._pty = pty
        self._keeper = keeper
        self._stdin_open = True
        self._ended = False
        self._closed = False
        self.tag = b""  # GERYON_SESSION=ID in its environment
        self.uid = -1
        self._exited = asyncio.ensure_future(proc.wait())

    @classmethod
    async def start(
        cls,
        spec: Spec,
        *,
        keeper: procs.Keeper,
        extra_env: Mapping[str, str],
        tools: Mapping[str, str],
    ) -> Process:
        """Start SPEC (TOOLS: ``helpers()``). OSError when no pipe or
        terminal can be had (out of descriptors) or a helper cannot run."""
        env = environment(spec, extra_env)
        acct = spec.account
        # An account without a home (nobody's is /nonexistent) starts in /.
        # A stat that NFS may hold up: off the loop.
        home = acct.home if await asyncio.to_thread(os.path.isdir, acct.home) else "/"
        command = command_line(spec, env, tools, home=home)
        ours: list[int] = []
        theirs: list[int] = []
        try:
            if spec.term is not None:
                master, slave = os.openpty()
                ours.append(master)
                theirs.append(slave)
                fcntl.ioctl(slave, termios.TIOCSWINSZ, spec.window.packed())
                if acct.uid != os.geteuid():
                    # As login does: the terminal belongs to whoever uses it.
                    os.fchown(slave, acct.uid, -1)
                    os.fchmod(slave, 0o620)
                stdin_r = stdout_w = stderr_w = slave
                stdin_w, outputs = master, {master: STDOUT}
            else:
                pipes = []
                for _ in range(3):
                    r, w = os.pipe()
                    pipes.append((r, w))
                    ours.append(w if len(pipes) == 1 else r)
                    theirs.append(r if len(pipes) == 1 else w)
                (stdin_r, stdin_w), (out_r, stdout_w), (err_r, stderr_w) = pipes
                outputs = {out_r: STDOUT, err_r: STDERR}
                for fd in (out_r, err_r):
                    # Bigger pipes, fewer and larger messages (a pipe holds 64 KiB).
                    with contextlib.suppress(OSError):
                        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
                if acct.uid != os.geteuid():
                    # Theirs to reopen too (/dev/stdout, /dev/stderr), as a
                    # terminal is: a pipe belongs to whoever made it.
                    for fd in theirs:
                        os.fchown(fd, acct.uid, acct.gid)
            keeper.ensure()
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=stdin_r,
                stdout=stdout_w,
                stderr=stderr_w,
                cwd="/",  # env(1) enters the session's directory, as the account
                env=ROOT_ENV,
                close_fds=True,
                # setsid(1) makes the session itself with a terminal: it
                # must not be a process-group leader already, or it forks.
                start_new_session=spec.term is None,
            )
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        keeper.watch(proc.pid)
        for fd in ours:
            os.set_blocking(fd, False)
        self = cls(proc, stdin=stdin_w, outputs=outputs, pty=spec.term is not None, keeper=keeper)
        if "GERYON_SESSION" in env:
            self.tag = f"GERYON_SESSION={env['GERYON_SESSION']}".encode()
        self.uid = acct.uid
        return self

    # ---- output ---------------------------------------------------------

    async def output(self) -> AsyncIterator[tuple[int, bytes]]:
        """(STDOUT or STDERR, bytes) as the command writes them, read only
        as fast as this is iterated (so a slow caller slows the command, and
        nothing piles up here). Ends at end of file on every output, or once
        the command has exited and LINGER_S passed without more output."""
        fds = dict(self._outputs)
        loop = asyncio.get_running_loop()
        while fds:
            got = False
            for fd, which in list(fds.items()):
                try:
                    data = os.read(fd, CHUNK)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno != errno.EIO:  # EIO: a terminal nobody holds any more
                        raise
                    data = b""
                if not data:
                    del fds[fd]
                    continue
                got = True
                yield which, data
            if got or not fds:
                continue
            ready = loop.create_future()
            for fd in fds:
                loop.add_reader(fd, _wake, ready)
            try:
                if self._exited.done():
                    # Only what is already on its way: a background job that
                    # keeps the pipe open must not keep the session alive.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(LINGER_S):
                            await ready
                    if not ready.done():
                        return
                else:
                    await asyncio.wait({ready, self._exited}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for fd in fds:
                    loop.remove_reader(fd)

    # ---- input ----------------------------------------------------------

    async def write(self, data: bytes) -> None:
        """Hand DATA to the command's input, waiting while its pipe is full.
        Once the command no longer reads it (closed, exited), input is
        dropped: the caller is told it was consumed all the same."""
        view = memoryview(data)
        loop = asyncio.get_running_loop()
        while view and self._stdin_open:
            try:
                n = os.write(self._stdin, view)
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_writer(self._stdin, _wake, ready)
                try:
                    await asyncio.wait({ready, self._exited}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    loop.remove_writer(self._stdin)
                if self._exited.done() and not ready.done():
                    self._stdin_open = False
                continue
            except OSError:  # EPIPE; EIO from a terminal nobody holds
                self._stdin_open = False
                return
            view = view[n:]

    async def close_stdin(self) -> None:
        """The caller's input ended: end of file for a pipe; the terminal's
        end-of-file character (^D) for a terminal, which is what a user types."""
        if not self._stdin_open:
            return
        if self._pty:
            eof = termios.tcgetattr(self._stdin)[6][termios.VEOF]
            await self.write(eof if isinstance(eof, bytes) else bytes([eof]))
            return
        self._stdin_open = False
        os.close(self._stdin)
        self._stdin = -1

    # ---- control --------------------------------------------------------

    def signal(self, name: str) -> None:
        """Send SIGNAME to the terminal's foreground job, else the command's
        group, as the account could itself: not to a group whose leader it
        does not own (a setuid program started by someone else)."""
        if self._exited.done():
            return  # its pid may be someone else's group by now
        sig = signal.Signals[f"SIG{name}"]
        group = self.pid
        if self._pty:
            with contextlib.suppress(OSError):
                group = os.tcgetpgrp(self._stdin)
        for pid in group_members(group):
            if may_signal(pid, self.uid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)

    def resize(self, window: Window) -> None:
        if self._pty:  # the kernel tells the foreground job (SIGWINCH)
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._stdin, termios.TIOCSWINSZ, window.packed())

    async def wait(self) -> ExitStatus:
        rc = await self._exited
        if rc < 0:
            return ExitStatus(signal=signal.Signals(-rc).name.removeprefix("SIG"))
        return ExitStatus(code=rc)

    async def end(self) -> None:
        """Kill every process of the session; our ends stay open for the
        pumps to find end of file on. Idempotent."""
        if self._ended:
            return
        self._ended = True
        try:
            # A scan of /proc, repeated: off the loop, which serves the other sessions.
            await asyncio.to_thread(kill_session, self.pid, tag=self.tag, uid=self.uid)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        finally:
            self._keeper.forget(self.pid)

    async def kill(self) -> None:
        """End the session and close our ends. Idempotent."""
        try:
            await self.end()
            with contextlib.suppress(Exception):
                await self._exited
        finally:
            if not self._closed:
                self._closed = True
                # A terminal's master is both our stdin and our output: once.
                for fd in {self._stdin, *self._outputs}:
                    if fd >= 0:
                        with contextlib.suppress(OSError):
                            os.close(fd)


def group_members(pgid: int) -> list[int]:
    """The live processes of process group PGID (from /proc)."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_bytes()
                fields = stat[stat.rindex(b")") + 2 :].split()
                if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                    pids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return pids


def may_signal(pid: int, uid: int) -> bool:
    """Whether account UID could signal PID itself (its real or saved user
    id is UID: the kernel's rule for an unprivileged sender). Root signals
    for the account, so it must not reach further than the account could."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("Uid:"):
            real, _effective, saved = (int(x) for x in line.split()[1:4])
            return uid in (real, saved)
    return False


def session_members(sid: int, *, tag: bytes = b"", uid: int = -1) -> list[int]:
    """Every live process in session SID, and (with TAG) every process of
    account UID whose environment holds TAG: one that left the session
    (setsid, a daemon) still carries the session's GERYON_SESSION."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_bytes()
            # pid (comm) state ppid pgrp session ...: comm may hold spaces
            # and parentheses, so count fields from the last ')'.
            fields = stat[stat.rindex(b")") + 2 :].split()
            if fields[0] in (b"Z", b"X"):
                continue  # dead already: its parent (or init) reaps it
            if int(fields[3]) == sid:
                pids.append(int(entry.name))
            elif tag and entry.stat().st_uid == uid:
                if tag in Path(entry.path, "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return pids


def kill_session(sid: int, *, tag: bytes = b"", uid: int = -1, rounds: int = 20) -> None:
    """SIGKILL the process group SID and every process of the session (see
    session_members), again until none is left (a process forking as it
    dies adds another)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, signal.SIGKILL)
    me = os.getpid()
    for _ in range(rounds):
        members = [p for p in session_members(sid, tag=tag, uid=uid) if p != me]
        if not members:
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.001)  # let the killed die before looking again
    print(f"cpu: session {sid}: processes left after {rounds} rounds of SIGKILL", file=sys.stderr)


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_env(env: Mapping[str, str]) -> str | None:
    """Why ENV cannot be an environment, or None."""
    for k, v in env.items():
        if not ENV_NAME.fullmatch(k) or "\0" in v:
            return f"bad environment variable {k!r} (want [A-Za-z_][A-Za-z0-9_]*, no NUL)"
    return None


def check_argv(argv: Sequence[str]) -> str | None:
    if argv and (not argv[0] or "=" in argv[0]):
        return f"argv[0] {argv[0]!r}: empty, or holding '='"
    if any("\0" in a for a in argv):
        return "an argument holds a NUL byte"
    return None
