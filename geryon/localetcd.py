"""A real etcd cluster on this machine's loopback, for `make demo-ha`, the
tests and the benchmark: N members of the installed ``etcd`` binary (Debian's
``etcd-server``), each with its own data dir and log, ports picked free.

Members are started through ``setpriv --pdeathsig KILL`` where util-linux has
it, so none outlives the process that started it, even one killed with -9.
Readiness is a linearizable read answered by each member (so the cluster has
a leader); ``leader`` asks the members which of them leads. With ``tls_dir``
(ca.crt, cert.pem, key.pem: a server identity from `geryon ca issue`, naming
127.0.0.1) clients must present a certificate from that CA, as in production.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import grpc

from geryon import tls
from geryon.etcdpb import rpc_pb2 as epb
from geryon.etcdpb import rpc_pb2_grpc as egrpc

READY_TIMEOUT = 30.0
# setpriv execs the command in the same process, which keeps the death signal.
_SETPRIV = shutil.which("setpriv")
DIE_WITH_PARENT = [_SETPRIV, "--pdeathsig", "KILL", "--"] if _SETPRIV else []


def binary() -> str | None:
    """The etcd server binary, or None when it is not installed."""
    return shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)


def version() -> str:
    etcd = binary()
    if etcd is None:
        return "not installed"
    out = subprocess.run(
        [etcd, "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    return out.splitlines()[0].replace("etcd Version:", "").strip() if out else "unknown"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Member:
    """One etcd member: its ports, data dir, log and process."""

    def __init__(self, name: str, root: Path, tls_dir: Path | None = None) -> None:
        self.name = name
        self.tls_dir = tls_dir
        self.client_port = _free_port()
        self.peer_port = _free_port()
        self.data_dir = root / name
        self.log_path = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, etcd: str, initial_cluster: str) -> None:
        client = f"{'https' if self.tls_dir else 'http'}://{self.address}"
        argv = [
            *DIE_WITH_PARENT,
            etcd,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={initial_cluster}",
            "--initial-cluster-state=new",  # ignored once the data dir exists
            "--initial-cluster-token=geryon-local",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        if self.tls_dir is not None:
            argv += [
                f"--cert-file={self.tls_dir / 'cert.pem'}",
                f"--key-file={self.tls_dir / 'key.pem'}",
                f"--trusted-ca-file={self.tls_dir / 'ca.crt'}",
                "--client-cert-auth",
            ]
        # ETCD_* variables would override the flags.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def channel(self) -> grpc.Channel:
        if self.tls_dir is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, tls.channel_credentials(self.tls_dir))

    def status(self, timeout: float = 2.0) -> epb.StatusResponse:
        with self.channel() as ch:
            return egrpc.MaintenanceStub(ch).Status(epb.StatusRequest(), timeout=timeout)

    def answers(self, timeout: float = 1.0) -> bool:
        """A linearizable read through this member succeeds (it has a leader)."""
        try:
            with self.channel() as ch:
                egrpc.KVStub(ch).Range(epb.RangeRequest(key=b"ready-probe"), timeout=timeout)
            return True
        except grpc.RpcError:
            return False

    def tail(self, n: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


class Cluster:
    """``size`` members on loopback, under ``root``."""

    def __init__(self, root: Path, size: int = 3, *, tls_dir: Path | None = None) -> None:
        etcd = binary()
        if etcd is None:
            raise FileNotFoundError(
                "etcd is not installed (Debian's etcd-server: make etcd-deps installs it)"
            )
        self.etcd = etcd
        self.root = root
        self.members = [Member(f"etcd{i}", root, tls_dir) for i in range(size)]
        self.initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> str:
        """The client addresses, as ``--etcd`` takes them."""
        return ",".join(m.address for m in self.members)

    def start(self) -> Cluster:
        for m in self.members:
            m.start(self.etcd, self.initial)
        self.wait_ready()
        return self

    def restart(self, member: Member) -> None:
        member.kill9()
        member.start(self.etcd, self.initial)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until every running member answers a linearizable read."""
        deadline = time.monotonic() + timeout
        for m in self.members:
            while m.running and not m.answers():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"etcd {m.name} not ready in {timeout}s:\n{m.tail()}")
                time.sleep(0.05)
            if m.proc is not None and not m.running:
                raise RuntimeError(f"etcd {m.name} exited {m.proc.returncode}:\n{m.tail()}")

    def leader(self, timeout: float = READY_TIMEOUT) -> Member:
        """The member that leads now (waiting for an election if need be)."""
        deadline = time.monotonic() + timeout
        while True:
            for m in self.members:
                if not m.running:
                    continue
                with contextlib.suppress(grpc.RpcError):
                    st = m.status()
                    if st.leader and st.leader == st.header.member_id:
                        return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd: no leader in {timeout}s")
            time.sleep(0.05)

    def stop(self) -> None:
        for m in self.members:
            m.kill9()
