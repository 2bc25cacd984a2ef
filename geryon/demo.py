"""`make demo` and `make demo-ha`: a small live cluster on this machine, narrated.

`make demo` makes a cluster CA in .demo/, starts geryon-registryd with TLS on
a loopback port (the embedded store), two node agents (host0, host1: two
chunks served as disks over 9P2000 in TLS, and a cpu listener each), and the
reconciler naming the disks from an ndb file; then it mounts d0.mbox on both
"nodes" (FUSE, under .demo/hostN/n/), writes a file on one and reads it on
the other, and shows ls, a live ndb edit, a master chunk's failover and
failback, an agent killed with kill -9, and a registry restart that loses
nothing.

`make demo-ha` (``--ha``) runs the registry as two fronts over a
three-member etcd cluster on loopback, with both agents and the reconciler
connected to both fronts, then kills a front and the etcd leader with
kill -9 while a loop resolves a disk name, and counts what it saw.

On a terminal the cluster stays up until Ctrl-C; without one (CI) it stops
by itself.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from geryon import localetcd, tls

ROOT = Path.cwd()
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """The demo's processes; every one is stopped on exit."""

    def __init__(self, home: Path, *, fronts: int = 1) -> None:
        self.home = home
        self.procs: dict[str, subprocess.Popen] = {}
        # One registry, or several fronts over etcd (self.etcd, when started).
        self.ports = [free_port() for _ in range(fronts)]
        self.port = self.ports[0]
        self.etcd: localetcd.Cluster | None = None
        self.address = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        self.env = {
            **os.environ,
            "GERYON_REGISTRY": self.address,
            "GERYON_TLS_DIR": str(home / "id" / "admin"),
        }

    def pki(self) -> None:
        ca = self.home / "ca"
        tls.init_ca(ca)
        tls.issue(ca, "registry", role="server", out=self.home / "id" / "registry")
        tls.issue(ca, "admin", role="admin", out=self.home / "id" / "admin")
        for host in ("host0", "host1"):
            tls.issue(ca, host, role="node", out=self.home / "id" / host)

    def start(self, name: str, argv: list[str], ready: str, env: dict | None = None) -> None:
        log = self.home / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env or self.env,
            )
        self.procs[name] = proc
        deadline = time.monotonic() + 20
        while ready not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"demo: {name} did not start:\n{log.read_text()}")
            time.sleep(0.05)

    def registry(self, front: int = 0) -> None:
        """Start the registry (or, over etcd, front number ``front``)."""
        name = f"registry{front}" if self.etcd else "registry"
        log = self.home / f"{name}.log"
        if log.exists():
            log.write_text("")
        if self.etcd is None:
            store = ["--data-dir", str(self.home / "registry")]
        else:
            store = ["--etcd", self.etcd.endpoints]
        self.start(
            name,
            [
                str(BIN / "geryon-registryd"),
                "--listen",
                f"127.0.0.1:{self.ports[front]}",
                *store,
                "--tls-dir",
                str(self.home / "id" / "registry"),
            ],
            "serving on",
            env={**self.env, "GERYON_TLS_DIR": ""},
        )

    def kill9(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        for root in getattr(self, "unmount", []):
            subprocess.run(
                [str(BIN / "geryon"), "umount", "--root", str(root), "d0.mbox"],
                env=self.env,
                capture_output=True,
            )
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()
        if self.etcd is not None:
            self.etcd.stop()

    def run(self, *args: str, show: bool = True, env: dict | None = None) -> str:
        if show:
            print(f"% geryon {' '.join(_shell_quote(a) for a in args)}", flush=True)
        r = subprocess.run(
            [str(BIN / "geryon"), *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
        )
        out = r.stdout + r.stderr
        if show and out:
            print(out, end="", flush=True)
        return out


def _shell_quote(word: str) -> str:
    return word if word and all(c.isalnum() or c in "!=._-/:*" for c in word) else f"'{word}'"


def say(text: str) -> None:
    print(f"\n## {text}", flush=True)


CLUSTER_NDB = """\
# /lib/ndb/cluster, as in the lab note: disk names and the chunks serving them
name=d0.mbox kfs
  master=host0!chunk0
  replica=d0.replica

name=d1.mbox kfs
  master=host0!chunk1
  replica=d1.replica

name=d0.replica kfs
  master=host1!chunk0 replica

name=d1.replica kfs
  master=host1!chunk1 replica
"""

SCRATCH = """
name=scratch kfs
  master=host1!chunk1
"""


def agent_config(c: Cluster, host: str) -> Path:
    chunks = c.home / "chunks" / host
    chunks.mkdir(parents=True, exist_ok=True)
    fronts = ", ".join(f'"127.0.0.1:{p}"' for p in c.ports)
    lines = [
        f"registry = [{fronts}]" if len(c.ports) > 1 else f'registry = "127.0.0.1:{c.port}"',
        f'host = "{host}"',
        'advertise = "127.0.0.1"',
        f'tls_dir = "{c.home / "id" / host}"',
        'lease_ttl = "10s"',
        'restart_delay = "3s"',
    ]
    for chunk in ("chunk0", "chunk1"):
        lines += [
            "",
            "[[chunk]]",
            f'id = "{chunk}"',
            f'path = "{chunks / chunk}"',
            'size = "64MiB"',
            f'users = "{c.home / "users"}"',
            'attrs = { kfs = "1" }',
            'health = { type = "tcp", interval = "1s" }',
        ]
    # Commands run as nobody when the demo runs as root: runas never needs root.
    account = "nobody" if os.geteuid() == 0 else getpass.getuser()
    lines += ["", "[[cpu]]", f'runas = {{ "@admin" = "{account}" }}']
    path = c.home / f"{host}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_agent(c: Cluster, host: str) -> None:
    c.start(
        f"agent-{host}",
        [str(BIN / "geryon-agent"), "--config", str(c.home / f"{host}.toml")],
        "services announced",
        env={**c.env, "GERYON_TLS_DIR": ""},
    )


def wait_for(c: Cluster, check: str, *args: str, timeout: float = 15) -> None:
    """Poll a CLI command until its output contains ``check``."""
    deadline = time.monotonic() + timeout
    while check not in c.run(*args, show=False) and time.monotonic() < deadline:
        time.sleep(0.2)


# The disks' /adm/users: each node's identity, each in the other's group, so
# either node may write on any disk; the admin identity is in adm.
USERS = """\
-1:adm:adm:admin
0:none::
10000:admin:admin:
10001:host0:host0:host1
10002:host1:host1:host0
"""


def as_node(c: Cluster, host: str) -> dict[str, str]:
    return {"GERYON_TLS_DIR": str(c.home / "id" / host)}


def mounts(c: Cluster) -> None:
    """rmnt d0.mbox on both nodes: one writes, the other reads it back."""
    say("rmnt d0.mbox on each node (geryon mount, FUSE): host0 writes a file, host1 reads it")
    roots = {h: c.home / h / "n" for h in ("host0", "host1")}
    mounted = []
    for host, root in roots.items():
        out = c.run("mount", "--root", str(root), "d0.mbox", env=as_node(c, host))
        if not (root / "d0.mbox").is_mount():
            print(f"(no FUSE here: {out.strip()}; the same through geryon disk instead)")
            break
        mounted.append(host)
    if len(mounted) == 2:
        c.unmount = list(roots.values())  # type: ignore[attr-defined]
        note = roots["host0"] / "d0.mbox" / "hello"
        print(f"% echo 'written on host0' > {note}")
        note.write_text(f"written on host0 at {time.strftime('%H:%M:%S')}\n")
        for cmd in (["ls", "-l", str(roots["host1"] / "d0.mbox")],
                    ["cat", str(roots["host1"] / "d0.mbox" / "hello")]):  # fmt: skip
            print("% " + " ".join(cmd), flush=True)
            print(subprocess.run(cmd, capture_output=True, text=True).stdout, end="", flush=True)
    else:
        note = c.home / "hello"
        note.write_text("written on host0\n")
        c.run("disk", "put", str(note), "d0.mbox:/hello", env=as_node(c, "host0"))
        c.run("disk", "cat", "d0.mbox:/hello", env=as_node(c, "host1"))
    c.run("disk", "ls", "-l", "d0.mbox")
    c.run("disk", "df", "d0.mbox", "d1.mbox")
    say("d0.mbox's replica (host1's chunk0) follows its master: status, then a read from it")
    wait_for(c, "lag 0 changes", "disk", "status", "d0.mbox")
    c.run("disk", "status", "d0.mbox")
    c.run("disk", "cat", "--replica", "d0.mbox:/hello")


def tour(c: Cluster) -> None:
    say("a registry with mutual TLS; every program has a certificate from the demo CA")
    c.run("ca", "show", str(c.home / "id" / "host0"))

    say("watch every change, in the background")
    watch_log = c.home / "watch.log"
    with open(watch_log, "w") as out:
        c.procs["watch"] = subprocess.Popen(
            [str(BIN / "geryon"), "watch"], stdout=out, stderr=subprocess.STDOUT, env=c.env
        )

    say(
        "two nodes, host0 and host1: each agent serves two chunks, as disks (9P2000 in TLS), "
        "and one cpu (rstyx)"
    )
    (c.home / "users").write_text(USERS)
    for host in ("host0", "host1"):
        agent_config(c, host)
        start_agent(c, host)
    print((c.home / "host0.toml").read_text(), end="")
    c.run("ls")
    c.run("ls", "--attr", "svc=rstyx")
    # The lab note's `ndb/regquery -n name $host id $chunk`:
    c.run("ls", "-n", "--attr", "name=host0", "--attr", "id=chunk0")

    say("disk names from an ndb file, kept in the registry by the reconciler")
    ndb = c.home / "cluster"
    ndb.write_text(CLUSTER_NDB)
    c.run("ndb", "query", "-f", str(ndb), "-a", "kfs", "", "name")
    c.start(
        "reconciler",
        [str(BIN / "geryon-reconciler"), "--ndb", str(ndb)],
        "reconciler: watching",
    )
    wait_for(c, "d1.replica", "ls", "-n", "--attr", "managed-by=reconciler")
    c.run("ls", "--attr", "managed-by=reconciler")
    c.run("resolve", "d0.mbox")
    mounts(c)

    say("cpus: run a command on the least loaded node, then on host1 with a disk mounted")
    c.run("cpu", "-n", "--", "sh", "-c", "echo hello from $GERYON_NODE as $USER; uname -sr")
    c.run("cpu", "-n", "-h", "host1", "--mount", "d0.mbox", "--", "cat", "/n/d0.mbox/hello")

    say("the ndb file is edited live: a new disk name appears, then goes")
    with open(ndb, "a") as f:
        f.write(SCRATCH)
    wait_for(c, "scratch", "ls", "-n", "--prefix", "scratch")
    c.run("ls", "--prefix", "scratch")
    ndb.write_text(CLUSTER_NDB)
    time.sleep(1.5)
    c.run("ls", "-n", "--attr", "managed-by=reconciler")

    say(
        "d0.mbox's master chunk dies (kill -9): the name fails over to its replica, "
        "and back once the agent has restarted the chunk"
    )
    master = json.loads(
        c.run("ls", "--json", "--attr", "name=host0", "--attr", "id=chunk0", show=False)
    )[0]
    os.kill(int(master["attrs"]["pid"]), signal.SIGKILL)
    wait_for(c, "serving replica", "get", "d0.mbox")
    c.run("get", "d0.mbox")
    wait_for(c, "serving master", "get", "d0.mbox")
    c.run("get", "d0.mbox")

    say("node host1's agent is killed with kill -9: its entries vanish at once")
    c.kill9("agent-host1")
    time.sleep(0.5)
    c.run("ls", "--attr", "svc=rstyx")
    c.run("ls", "-n", "--attr", "name=host1")
    c.run("get", "d0.replica")
    start_agent(c, "host1")

    say(
        "the registry is killed with kill -9 and restarted: every entry comes back, "
        "the agents' leases resume"
    )
    before = c.run("ls", show=False)
    c.kill9("registry")
    c.registry()
    wait_for(c, before, "ls")
    c.run("ls")

    c.procs["watch"].send_signal(signal.SIGINT)
    c.procs.pop("watch").wait(10)
    events = watch_log.read_text().splitlines(keepends=True)
    say(f"what the watcher saw: {len(events)} events (PUT/DELETE, revision, entry); the last ten")
    print("".join(events[-10:]), end="", flush=True)


class Resolver(threading.Thread):
    """`geryon resolve NAME` in a loop, as a user would, counting answers."""

    def __init__(self, c: Cluster, name: str) -> None:
        super().__init__(daemon=True)
        self.c, self.name = c, name
        self.ok = self.failed = 0
        self.slowest = 0.0
        self.answers: set[str] = set()
        self.errors: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            started = time.monotonic()
            r = subprocess.run(
                [str(BIN / "geryon"), "resolve", self.name],
                env=self.c.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            took = time.monotonic() - started
            self.slowest = max(self.slowest, took)
            if r.returncode == 0:
                self.ok += 1
                self.answers.add(r.stdout.strip())
            else:
                self.failed += 1
                self.errors.append(r.stderr.strip())
            time.sleep(0.2)

    def report(self) -> str:
        seen = ", ".join(sorted(self.answers))
        return (
            f"{self.name} resolved {self.ok} of {self.ok + self.failed} times "
            f"(slowest answer {self.slowest:.1f}s; addresses seen: {seen})"
        ) + "".join(f"\n  failed: {e}" for e in self.errors)


def tour_ha(c: Cluster) -> None:
    assert c.etcd is not None
    say("a three-member etcd cluster on loopback, and two registry fronts over it")
    leader = c.etcd.leader()
    print(f"etcd {localetcd.version()}: members {c.etcd.endpoints}; leader {leader.name}")
    print(f"registry fronts: GERYON_REGISTRY={c.address}")
    c.run("ls")

    say("two nodes, each agent connected to both fronts; the reconciler too")
    for host in ("host0", "host1"):
        agent_config(c, host)
        start_agent(c, host)
    print((c.home / "host0.toml").read_text().split("\n\n")[0])
    ndb = c.home / "cluster"
    ndb.write_text(CLUSTER_NDB)
    c.start(
        "reconciler",
        [str(BIN / "geryon-reconciler"), "--ndb", str(ndb)],
        "reconciler: watching",
    )
    wait_for(c, "d1.replica", "ls", "-n", "--attr", "managed-by=reconciler")
    c.run("ls", "--attr", "kfs")
    c.run("resolve", "d0.mbox")

    watch_log = c.home / "watch.log"
    with open(watch_log, "w") as out:
        c.procs["watch"] = subprocess.Popen(
            [str(BIN / "geryon"), "watch", "--snapshot", "--json"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=c.env,
        )
    resolver = Resolver(c, "d0.mbox")
    resolver.start()
    time.sleep(1)

    say("front 0 is killed with kill -9: agents, reconciler and clients move to front 1")
    c.kill9("registry0")
    time.sleep(3)
    c.run("ls", "-n", "--attr", "kfs")
    moved = [
        line
        for name in ("agent-host0", "agent-host1", "reconciler")
        for line in (c.home / f"{name}.log").read_text().splitlines()
        if "trying" in line
    ]
    print("\n".join(moved[-3:]))

    say("front 0 comes back; then the etcd leader is killed with kill -9")
    c.registry(0)
    leader = c.etcd.leader()
    leader.kill9()
    print(f"killed etcd {leader.name}; the others elect {c.etcd.leader().name}")
    time.sleep(3)
    c.run("ls", "-n", "--attr", "kfs")
    c.run("resolve", "d0.mbox")

    resolver.done.set()
    resolver.join(70)
    c.procs["watch"].send_signal(signal.SIGINT)
    c.procs.pop("watch").wait(10)
    say("what the loop and the watcher saw")
    print(resolver.report())
    print(watch_report(watch_log))


def watch_report(path: Path) -> str:
    """What `geryon watch --snapshot --json` saw happen to the entries: judged
    from its log, not assumed."""
    text = path.read_text().splitlines()
    lines = [json.loads(x) for x in text if x.startswith("{")]
    # Anything else is the watch's own complaint: its silence proves nothing.
    said = [x for x in text if x.strip() and not x.startswith("{")]
    last = {m["service"]["name"]: m["service"] for m in lines if m["type"] == "SNAPSHOT"}
    events = [m for m in lines if m["type"] in ("PUT", "DELETE")]
    deleted, remade, rewritten = set(), set(), set()
    for e in events:
        s = e["service"]
        before = last.get(s["name"])
        if e["type"] == "DELETE":
            deleted.add(s["name"])
        # Made at this revision, or under another lease: its owner lost it.
        elif s["create_revision"] == e["revision"] or (before and before["lease"] != s["lease"]):
            remade.add(s["name"])
        elif before and before["attrs"] == s["attrs"]:
            rewritten.add(s["name"])
        last[s["name"]] = s

    def names(found: set[str]) -> str:
        return ", ".join(sorted(found)) or "none"

    tail = "".join(f"\n{e['type']} {e['revision']} {e['service']['name']}" for e in events[-5:])
    return (
        f"watch events while all this happened: {len(events)}; entries deleted: "
        f"{names(deleted)}; made anew: {names(remade)}; rewritten unchanged: "
        f"{names(rewritten)}{tail}"
    ) + "".join(f"\n  the watch said: {x}" for x in said)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m geryon.demo", description=__doc__.split("\n")[0])
    p.add_argument("--ha", action="store_true", help="two fronts over a three-member etcd")
    args = p.parse_args(argv)
    home = ROOT / ".demo"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir()
    c = Cluster(home, fronts=2 if args.ha else 1)
    try:
        c.pki()
        if args.ha:
            c.etcd = localetcd.Cluster(home / "etcd").start()
            for front in range(len(c.ports)):
                c.registry(front)
            tour_ha(c)
        else:
            c.registry()
            tour(c)
        if sys.stdin.isatty() and os.environ.get("CI") != "true":
            say(
                f"the cluster stays up: GERYON_REGISTRY={c.env['GERYON_REGISTRY']} "
                f"GERYON_TLS_DIR={c.env['GERYON_TLS_DIR']}; Ctrl-C stops it"
            )
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
    print("\ndemo: stopped; logs in .demo/", flush=True)


if __name__ == "__main__":
    main()
