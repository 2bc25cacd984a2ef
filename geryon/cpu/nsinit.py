"""The exec wrapper of a session with --mount: disks at /n/NAME in the
session's own mount namespace, then the command.

    unshare --mount --propagation private -- python -I -S nsinit.py JSON -- COMMAND...

JSON is ``{"names": [NAME...], "mount": [ARGV...]}``, ARGV being ``geryon
mount --foreground`` without its mount point and name. In the private
namespace ``unshare`` made, this mounts a small tmpfs on /n (so the session
sees its own disks there and the node's /n is untouched), starts one mount
process per NAME at /n/NAME and waits until each answers, then execs
COMMAND (which drops to the session's account). The mount processes run as
root in process groups of their own (a Ctrl-C meant for the command does not
reach them), in the session, so the session's end kills them; the parent-death
signal ends them too when the command exits. When a mount fails, its one-line
reason goes to stderr and the wrapper exits 1 before anything runs.

Only the standard library, and nothing from geryon: it runs under
``python -I -S`` to start quickly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def fail(msg: str) -> None:
    sys.stderr.write(f"cpu: {msg}\n")
    sys.stderr.flush()
    os._exit(1)


def main() -> None:
    args = sys.argv[1:]
    if len(args) < 3 or args[1] != "--":
        sys.stderr.write("usage: nsinit.py JSON -- COMMAND...\n")
        os._exit(2)
    spec, command = json.loads(args[0]), args[2:]
    os.makedirs("/n", exist_ok=True)
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "mode=755,size=1m", "geryon-n", "/n"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if made.returncode != 0:
        fail(f"cannot mount a tmpfs on /n: {made.stderr.strip()}")
    waiting = []
    for name in spec["names"]:
        point = f"/n/{name}"
        os.mkdir(point)
        r, w = os.pipe()
        argv = ["setpriv", "--pdeathsig=TERM", "--", *spec["mount"]]
        argv += ["--ready-fd", str(w), "--at", point, "--", name]
        subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, pass_fds=(w,), process_group=0, cwd="/",
        )  # fmt: skip
        os.close(w)
        waiting.append((name, r))
    for name, r in waiting:
        answer = b""
        while b"\n" not in answer and (piece := os.read(r, 4096)):
            answer += piece
        os.close(r)
        line = answer.decode(errors="replace").strip()
        if line != "ok":
            fail(f"mount {name}: {line.removeprefix('error: ') or 'the mount process exited'}")
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        fail(f"cannot run {command[0]}: {exc.strerror}")


if __name__ == "__main__":
    main()
