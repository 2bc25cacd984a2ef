"""The registry's state and where it is kept.

``state`` is what every backend keeps in memory (services, their attribute
index, leases, the history window) and the rules a write must pass; ``base``
is the interface the servicer, watch hub and lease keeper use; ``sqlite``
(the default, embedded) and ``etcd`` (a cluster shared by several registry
fronts) are the backends. Import a backend from its own module: only the one
in use is loaded.
"""

from geryon.store.base import Store, Written
from geryon.store.state import Limits, State

__all__ = ["Limits", "State", "Store", "Written"]
