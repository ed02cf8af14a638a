"""Persistence of the control plane: idempotency records, operations, the swarms read model and the
component registry.

``open_store(url)`` connects (SQLite or PostgreSQL) and migrates to head; everything else
is a method of the returned ``Store``.
"""

from controlplane.store.models import (
    FINAL_STATUSES,
    OPEN_STATUSES,
    REPLACEABLE_SWARM_STATUSES,
    BeginResult,
    Busy,
    ComponentRow,
    ControllerView,
    NewAction,
    OperationRow,
    OperationStatus,
    Recorded,
    RegistryBatch,
    Replayed,
    Started,
    StatusReport,
    SwarmExists,
    SwarmRow,
    TargetRow,
)
from controlplane.store.repo import Store, open_store

__all__ = [
    "FINAL_STATUSES",
    "OPEN_STATUSES",
    "REPLACEABLE_SWARM_STATUSES",
    "BeginResult",
    "Busy",
    "ComponentRow",
    "ControllerView",
    "NewAction",
    "OperationRow",
    "OperationStatus",
    "Recorded",
    "RegistryBatch",
    "Replayed",
    "Started",
    "StatusReport",
    "SwarmExists",
    "SwarmRow",
    "TargetRow",
    "Store",
    "open_store",
]
