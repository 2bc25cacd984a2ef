"""The keeper: kills a parent's process groups when the parent dies.

A process that runs services (geryon-agent, geryon register, reglisten) starts
one keeper as its child and holds the only write end of the keeper's stdin.
Each service runs in its own process group. The kernel closes that pipe however
the parent ends, kill -9 included, and the keeper then kills every group it
was told about: grandchildren too (a shell's background jobs, a pipeline),
which the parent-death signal on the direct child alone would leave behind.
This is what a service manager's cgroup gives; a process that leaves its
group (setsid, setpgid) escapes, as it would escape any process-group kill.

Protocol on the keeper's stdin, one decimal process-group id a line:

    +PGID   kill this group if the parent dies (written by the child itself,
            before it execs its command, so no window is left open)
    -PGID   forget it (written by the parent once the group is gone)

On end of file: SIGKILL every group still listed, then exit 0. The keeper
ignores SIGINT, SIGTERM and SIGHUP: a Ctrl-C or a signal sent to the parent's
process group must not take it away before the parent is gone.

The same file is the exec wrapper every service command starts through
(``keeper.py --exec PARENT FD -- ARGV...``): it arms PR_SET_PDEATHSIG, checks
the parent is still PARENT, writes ``+PID`` to FD (the keeper's stdin), closes
it and execs ARGV. Doing this after exec rather than in a preexec_fn lets the
parent spawn with vfork: a plain fork() of a process running grpc runs grpc's
fork handlers, which can start threads in the child before it execs.

Only the standard library, and nothing from geryon: the wrapper runs under
``python -I -S`` to start in a few tens of milliseconds.
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def keep() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin.buffer:
        word = line.strip()
        try:
            op, pgid = word[:1], int(word[1:])
        except ValueError:
            continue
        if pgid <= 1:
            continue  # never killpg(0) (ourselves) or init's group
        if op == b"+":
            groups.add(pgid)
        elif op == b"-":
            groups.discard(pgid)
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass  # already gone


def wrap(parent: int, fd: int, argv: list[str]) -> None:
    import ctypes

    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(127)  # the parent died before the death signal was armed
    try:
        os.write(fd, b"+%d\n" % os.getpid())
    except OSError:
        pass  # no keeper: the death signal still covers the direct child
    os.close(fd)
    # Python ignores these; an exec'd command expects the defaults.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        sys.stderr.write(f"geryon: cannot run {argv[0]}: {exc.strerror}\n")
        os._exit(127)


def main() -> None:
    args = sys.argv[1:]
    if not args:
        keep()
        return
    if len(args) < 5 or args[0] != "--exec" or args[3] != "--":
        sys.stderr.write("usage: keeper.py [--exec PARENT FD -- COMMAND ...]\n")
        os._exit(2)
    wrap(int(args[1]), int(args[2]), args[4:])


if __name__ == "__main__":
    main()
