"""Geryon on its etcd store: geryon-registryd fronts (``--etcd``) over a
three-member etcd cluster on loopback (``geryon.localetcd``), both started by
the run.

Every reset starts a fresh, empty cluster (new ports, new data dirs) and one
front; the failover workloads add a second front (``add_front``). A front is
the same geryon-registryd, with the same flags, as the Geryon side's, with
``--etcd ENDPOINTS --etcd-prefix /bench/`` in place of ``--data-dir``.
Connections, keepalive streams and watches are the Geryon side's: the wire is
the same.

etcd's members run with the cluster's defaults, as the plain etcd side does:
each fsyncs its WAL on every commit. The cluster is stopped while a workload
that does not use it runs (``idle``), so it takes no CPU from the others.

The members are forked from the event loop's thread and adopted by
bench/procs.py, so ``kill_all`` ends them, and setpriv's death signal ends
them with the benchmark.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench import procs
from bench.core import GERYON_ETCD
from bench.geryon_side import GeryonSide
from geryon import localetcd

PREFIX = "/bench/"
MEMBERS = 3


class GeryonEtcdSide(GeryonSide):
    name = GERYON_ETCD
    label = "Geryon (etcd store)"
    profile_stem = "registryd-etcd"

    def __init__(
        self,
        tmp: Path,
        *,
        members: int = MEMBERS,
        profile_dir: Path | None = None,
        extra_args: list[str] = (),
    ) -> None:
        super().__init__(
            tmp, profile_dir=profile_dir, extra_args=extra_args, log_name="geryon-etcd.log"
        )
        self.members = members
        self.cluster: localetcd.Cluster | None = None
        self.clusters = 0  # how many were started: each has its own directory
        self.others: list[tuple[str, procs.Proc]] = []  # fronts beyond the first

    def store_args(self) -> list[str]:
        if self.cluster is None:
            raise RuntimeError("bench: no etcd cluster for the etcd store")
        return ["--etcd", self.cluster.endpoints, "--etcd-prefix", PREFIX]

    @property
    def fronts(self) -> list[tuple[str, procs.Proc]]:
        """(address, process) of every front, the first one first."""
        first = [(self.address, self.proc)] if self.proc is not None else []
        return first + self.others

    async def start(self) -> None:
        if self.cluster is None:
            await self._start_cluster()
        # A port picked now: the one the last front had may have gone to a
        # member of the new cluster. (``respawn`` keeps the front's port.)
        self.port = procs.free_port()
        await super().start()

    async def reset(self) -> None:
        self.stop()
        await self.start()

    async def add_front(self) -> tuple[str, procs.Proc]:
        """Another front over the same cluster and prefix, serving."""
        address = f"127.0.0.1:{procs.free_port()}"
        proc = self._new_proc(address)
        self.others.append((address, proc))
        await proc.start()
        return address, proc

    async def _start_cluster(self) -> None:
        self.clusters += 1
        cluster = localetcd.Cluster(self.tmp / f"etcd-cluster-{self.clusters}", size=self.members)
        self.cluster = cluster
        for m in cluster.members:  # forked here, on the loop's thread (see procs.adopt)
            m.start(cluster.etcd, cluster.initial)
            procs.adopt(m.proc)
        await asyncio.to_thread(cluster.wait_ready)

    @staticmethod
    def kill_member(member: localetcd.Member) -> None:
        """kill -9 one member and reap it (bounded, unlike Member.kill9)."""
        proc = member.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        procs.forget(proc)

    def idle(self) -> None:
        self.stop()

    def stop(self) -> None:
        for _, proc in self.others:
            self._end(proc)
        self.others.clear()
        super().stop()
        self.proc = None
        if self.cluster is not None:
            for m in self.cluster.members:
                self.kill_member(m)
                procs.wipe(m.data_dir)  # the logs stay, for a failed run's report
            self.cluster = None
