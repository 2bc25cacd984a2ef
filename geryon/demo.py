"""`make demo`: a small live cluster on this machine, narrated.

It makes a cluster CA in .demo/, starts geryon-registryd with TLS on a
loopback port, and tours the CLI: register, ls, watch, a lease that ends when
its holder dies, a registry restart that loses nothing. On a terminal it then
keeps the cluster up until Ctrl-C; without one (CI) it stops by itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from geryon import tls

ROOT = Path.cwd()
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """The demo's processes; every one is stopped on exit."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = free_port()
        self.env = {
            **os.environ,
            "GERYON_REGISTRY": f"127.0.0.1:{self.port}",
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

    def registry(self) -> None:
        log = self.home / "registry.log"
        if log.exists():
            log.write_text("")
        self.start(
            "registry",
            [
                str(BIN / "geryon-registryd"),
                "--listen",
                f"127.0.0.1:{self.port}",
                "--data-dir",
                str(self.home / "registry"),
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
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()

    def run(self, *args: str, show: bool = True) -> str:
        if show:
            print(f"% geryon {' '.join(_shell_quote(a) for a in args)}", flush=True)
        r = subprocess.run(
            [str(BIN / "geryon"), *args], env=self.env, capture_output=True, text=True, timeout=60
        )
        out = r.stdout + r.stderr
        if show and out:
            print(out, end="", flush=True)
        return out


def _shell_quote(word: str) -> str:
    return word if word and all(c.isalnum() or c in "!=._-/:*" for c in word) else f"'{word}'"


def say(text: str) -> None:
    print(f"\n## {text}", flush=True)


def tour(c: Cluster) -> None:
    say("a registry with mutual TLS; every caller has a certificate from the demo CA")
    c.run("ca", "show", str(c.home / "id" / "admin"))

    say("watch every change, as a background process")
    watch_log = c.home / "watch.log"
    with open(watch_log, "w") as out:
        c.procs["watch"] = subprocess.Popen(
            [str(BIN / "geryon"), "watch"], stdout=out, stderr=subprocess.STDOUT, env=c.env
        )
    time.sleep(1)

    say("persistent entries, as /lib/ndb/cluster's disk names would be")
    c.run("set", "d0.mbox", "addr=tcp!host0!6701", "automount=1", "persist=1", "--persist")
    c.run("set", "d0.replica", "addr=tcp!host1!6701", "automount=1", "persist=1", "--persist")
    c.run("set", "tcp!host0!6666", "svc=rstyx", "name=host0", "--persist")
    c.run("set", "tcp!host1!6666", "svc=rstyx", "name=host1", "--persist")
    c.run("ls")
    c.run("ls", "--attr", "svc=rstyx")
    c.run("ls", "-n", "--attr", "automount=*")

    say("a service that lives as long as its process: killed with kill -9, it is gone at once")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER],
        env={**c.env, "GERYON_TLS_DIR": str(c.home / "id" / "host0")},
        stdout=subprocess.PIPE,
        text=True,
    )
    holder.stdout.readline()
    c.run("ls", "--attr", "svc=kfs")
    c.run("leases")
    holder.kill()
    holder.wait()
    time.sleep(0.5)
    c.run("ls", "--attr", "svc=kfs")

    say("the registry is killed with kill -9 and restarted: nothing is lost")
    c.kill9("registry")
    c.registry()
    c.run("ls")

    c.procs["watch"].send_signal(signal.SIGINT)
    c.procs.pop("watch").wait(10)
    say("what the watcher saw (PUT/DELETE, revision, entry), across the restart")
    print(watch_log.read_text(), end="", flush=True)


HOLDER = """
import asyncio, os
from geryon.client import Client
async def main():
    c = Client()
    lease = c.lease(60_000)
    await lease.start()
    await c.register("tcp!host0!6701", {"svc": "kfs", "id": "chunk0"}, lease=lease.id)
    print("ready", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def main() -> None:
    home = ROOT / ".demo"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir()
    c = Cluster(home)
    try:
        c.pki()
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
