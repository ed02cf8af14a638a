"""Plain values the store takes and returns, so callers never see SQLAlchemy rows.

Every timestamp is a timezone-aware UTC ``datetime``; JSON columns come back as
``dict``/``list``. The begin results form a small closed union (``BeginResult``) that
callers match on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from typing import Any


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class OperationStatus(StrEnum):
    """Life of an operation: accepted → dispatched → one final status (or straight to final)."""

    ACCEPTED = "accepted"
    DISPATCHED = "dispatched"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"


OPEN_STATUSES: tuple[str, ...] = (OperationStatus.ACCEPTED, OperationStatus.DISPATCHED)
FINAL_STATUSES: tuple[str, ...] = (
    OperationStatus.SUCCEEDED,
    OperationStatus.FAILED,
    OperationStatus.TIMED_OUT,
)

# A swarm row in one of these states may be replaced by a new swarm with the same id.
REPLACEABLE_SWARM_STATUSES: tuple[str, ...] = ("Removed", "Failed")


def swarm_resource(swarm_id: str) -> str:
    """The resource a swarm's lifecycle operations hold."""
    return f"swarm:{swarm_id}"


def _require_aware(name: str, value: datetime | None) -> None:
    if value is not None and value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")


@dataclass(frozen=True, kw_only=True)
class NewAction:
    """One accepted request: becomes an idempotency row plus an operation row."""

    action: str
    target: str
    idempotency_key: str
    request_hash: str
    correlation_id: str
    envelope: dict[str, Any]
    signal: str
    swarm_id: str | None
    lifecycle: bool
    timeout_ms: int
    created_at: datetime
    retention_s: int
    # A fan-out: one signal per target under this correlation id, each closed by its own outcome.
    targets: tuple[str, ...] = ()
    # What the operation holds while open; a lifecycle action holds its swarm unless told otherwise.
    resource: str | None = None
    # The signal bodies to publish, kept so an outbox can send them after a crash.
    signals: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        _require_aware("created_at", self.created_at)
        if self.lifecycle and self.resource is None:
            if not self.swarm_id:
                # The one-open-operation rule is keyed on the resource; without it nothing holds.
                raise ValueError("a lifecycle action needs a swarm_id or a resource")
            object.__setattr__(self, "resource", swarm_resource(self.swarm_id))
        if self.timeout_ms <= 0 or self.retention_s <= 0:
            raise ValueError("timeout_ms and retention_s must be positive")

    @property
    def deadline(self) -> datetime:
        return self.created_at + timedelta(milliseconds=self.timeout_ms)

    @property
    def expires_at(self) -> datetime:
        return self.created_at + timedelta(seconds=self.retention_s)


@dataclass(frozen=True, kw_only=True)
class OperationRow:
    """One row of ``operations``: what was asked, and where it stands."""

    correlation_id: str
    idempotency_key: str
    action: str
    target: str
    signal: str
    swarm_id: str | None
    lifecycle: bool
    status: str
    envelope: dict[str, Any]
    timeout_ms: int
    deadline: datetime
    created_at: datetime
    updated_at: datetime
    outcome: dict[str, Any] | None = None
    creates_swarm: bool = False  # its begin inserted the swarm row
    signals: list[dict[str, Any]] | None = None
    resource: str | None = None

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES


@dataclass(frozen=True, kw_only=True)
class SwarmRow:
    """One row of ``swarms``, the gateway's read model of a swarm."""

    id: str
    template_id: str
    status: str
    controller_instance: str | None = None
    health: str = "unknown"
    enabled: bool = True
    bees: list[Any] = field(default_factory=list)
    last_heartbeat: datetime | None = None
    last_error: dict[str, Any] | None = None
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)

    def __post_init__(self) -> None:
        for name in ("last_heartbeat", "created_at", "updated_at"):
            _require_aware(name, getattr(self, name))


@dataclass(frozen=True)
class Recorded:
    """What ``record_outcome`` did: closed a target or operation (``moved``), and the
    operation if this closed it as a whole."""

    moved: bool
    closed: OperationRow | None = None


@dataclass(frozen=True, kw_only=True)
class TargetRow:
    """One target of a fan-out operation."""

    target: str
    status: str
    outcome: dict[str, Any] | None
    updated_at: datetime


@dataclass(frozen=True, kw_only=True)
class ComponentRow:
    """One row of ``components``, the gateway's registry entry for a controller or bee."""

    role: str
    instance: str
    swarm_id: str | None
    enabled: bool
    state: str
    container_state: str | None
    totals: dict[str, Any]
    queue_stats: dict[str, Any]
    data: dict[str, Any]
    version: str | None
    first_seen: datetime
    last_seen: datetime | None


@dataclass(frozen=True, kw_only=True)
class StatusReport:
    """A status a component sent, as the registry saves it (``seen_at``: when it arrived)."""

    role: str
    instance: str
    swarm_id: str
    enabled: bool
    state: str
    totals: dict[str, Any]
    queue_stats: dict[str, Any]
    data: dict[str, Any]
    version: str | None
    seen_at: datetime


@dataclass(frozen=True, kw_only=True)
class ControllerView:
    """What a swarm-controller's status says about its swarm and its bees' containers."""

    role: str
    instance: str
    swarm_id: str
    seen_at: datetime
    enabled: bool
    bees: list[dict[str, Any]]  # BeeState dicts: role, instance, state (container), enabled...
    settled: bool  # False while the controller is still applying its plan: its bee list may be partial


@dataclass
class RegistryBatch:
    """Everything the registry saves in one transaction."""

    reports: dict[tuple[str, str], StatusReport] = field(default_factory=dict)
    controllers: dict[str, ControllerView] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.reports or self.controllers)


@dataclass(frozen=True)
class Started:
    """The action was recorded; the caller now publishes its signal."""

    operation: OperationRow


@dataclass(frozen=True)
class Replayed:
    """The (action, target, key) was seen before; answer with the stored envelope."""

    envelope: dict[str, Any]
    correlation_id: str
    same_request: bool


@dataclass(frozen=True)
class Busy:
    """Another lifecycle operation on the same swarm is still open."""

    active: OperationRow


@dataclass(frozen=True)
class SwarmExists:
    """A swarm with that id exists and is neither Removed nor Failed."""

    swarm: SwarmRow


BeginResult = Started | Replayed | Busy | SwarmExists
