"""Persistence of the control plane: idempotency records, operations and the swarms read model.

``open_store(url)`` connects (SQLite or PostgreSQL) and migrates to head; everything else
is a method of the returned ``Store``.
"""

from controlplane.store.models import (
    FINAL_STATUSES,
    OPEN_STATUSES,
    REPLACEABLE_SWARM_STATUSES,
    BeginResult,
    Busy,
    NewAction,
    OperationRow,
    OperationStatus,
    Replayed,
    Started,
    SwarmExists,
    SwarmRow,
)
from controlplane.store.repo import Store, open_store

__all__ = [
    "FINAL_STATUSES",
    "OPEN_STATUSES",
    "REPLACEABLE_SWARM_STATUSES",
    "BeginResult",
    "Busy",
    "NewAction",
    "OperationRow",
    "OperationStatus",
    "Replayed",
    "Started",
    "SwarmExists",
    "SwarmRow",
    "Store",
    "open_store",
]
