"""The workloads ``make bench`` runs, in order.

Each entry is a function of the run's ``Sizes`` returning a ``Workload``
(bench/core.py). To add one (agents re-announcing after a registry restart,
reconciler convergence), write a module beside these with such a function and
append it here; a Geryon-only workload says ``sides=(GERYON,)``, and one run
on Geryon's etcd store as well adds GERYON_ETCD (its rows get "(etcd store)"
twins).
"""

from __future__ import annotations

from collections.abc import Callable

from bench.core import Sizes, Workload
from bench.workloads import (
    churn,
    convergence,
    death,
    echo,
    failover,
    fanout,
    find,
    reannounce,
    register,
    restart,
)

WORKLOADS: list[Callable[[Sizes], Workload]] = [
    echo.workload,
    register.workload,
    find.workload,
    fanout.workload,
    churn.workload,
    death.workload,
    restart.workload,
    reannounce.workload,
    convergence.workload,
    convergence.resync_workload,
    failover.front_workload,
    failover.leader_workload,
]
