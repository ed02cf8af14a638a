"""Pydantic models of everything that crosses the wire, shared by gateway, controllers and bees.

JSON field names are camelCase as the specification writes them; Python attributes are
snake_case. Dump with ``to_json`` so the aliases are used everywhere.
"""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict, deque
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any, Literal

from pydantic import Field, StrictBool, field_validator, model_validator

from controlplane.contract import keys
from controlplane.contract.base import Strict, Wire
from controlplane.contract.pool import PoolSpec

WIRE_VERSION = "1"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 time as the wire and Docker write it (``Z``, nanoseconds), UTC when it names
    no zone; None when it is absent, unreadable, or Docker's "never" (year 1)."""
    if not isinstance(value, str) or not value or value.startswith("0001-01-01"):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def new_id() -> str:
    return str(uuid.uuid4())


def _slug(value: str, what: str) -> str:
    problem = keys.slug_problem(value)
    if problem:
        raise ValueError(f"{what} {problem}")
    return value


# --- swarm plans and templates ------------------------------------------------------------


class WorkIO(Strict):
    """Queue suffixes a bee reads from and writes to on the swarm's hive exchange."""

    in_: str | None = Field(None, alias="in")
    out: str | None = None

    @field_validator("in_", "out")
    @classmethod
    def _queue_suffix(cls, value: str | None) -> str | None:
        return None if value is None else _slug(value, "queue suffix")


class BeeSpec(Strict):
    """One bee of a swarm plan. Deliberately has no fields for privileges, mounts or networks:
    what a caller may ask to run is limited to an image, its env and its config."""

    name: str
    role: str
    image: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")
    work: WorkIO = Field(default_factory=WorkIO)
    env: dict[str, str] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    depends_on: list[str] = Field(default_factory=list)
    enabled: bool = False
    # Config keys whose values are secret wherever they appear: shown as *** in every read and
    # event, like env, headers and keys named like a password or token.
    secrets: list[str] = Field(default_factory=list, max_length=64)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if value in keys.RESERVED_CONTAINER_PARTS:
            raise ValueError(f"bee name {value!r} is reserved (the swarm's "
                             f"{'controller' if value == keys.CONTROLLER_PART else 'system under test'} has it)")
        problem = keys.part_problem(value)
        if problem:
            raise ValueError(f"bee name {problem}")
        return value

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        if value == keys.CONTROLLER_ROLE:
            raise ValueError(f"role {value!r} is reserved for the swarm's controller")
        return _slug(value, "role")


class SutSpec(Strict):
    """A swarm's own system under test: one HTTP service the controller runs before the bees.

    Bees reach it through ``CP_SUT_URL``. Like ``BeeSpec`` it has no privilege, mount or
    network fields; with host networking (an operator's choice) ``port`` is a host port.
    """

    image: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")
    command: list[str] | None = None  # None: the project image's own SUT (python -m bees.sut)
    port: int = Field(8080, ge=1024, le=65535)
    health_path: str = Field("/_sut/healthz", pattern=r"^/[A-Za-z0-9._~/-]*$")
    env: dict[str, str] = Field(default_factory=dict)


SUT_NAME = keys.SUT_PART
MAX_BEES = 1000  # per plan; a plan is one message and one controller's work


class SwarmPlan(Strict):
    bees: list[BeeSpec] = Field(default_factory=list, max_length=MAX_BEES)
    sut: SutSpec | None = None
    pool: PoolSpec | None = None  # a pool: its controller also runs the pool policy

    @model_validator(mode="after")
    def _unique_and_acyclic(self) -> SwarmPlan:
        if not self.bees and self.pool is None:
            raise ValueError("a plan needs at least one bee, or a pool")
        # Linear in the plan's size: a large plan must not stall the event loop.
        names = Counter(b.name for b in self.bees)
        dupes = sorted(n for n, count in names.items() if count > 1)
        if dupes:
            raise ValueError(f"bee names must be unique, repeated: {', '.join(dupes)}")
        unknown = sorted({d for b in self.bees for d in b.depends_on if d not in names})
        if unknown:
            raise ValueError(f"dependsOn names unknown bees: {', '.join(unknown)}")
        self.start_order()  # raises on a cycle
        return self

    def work_suffixes(self) -> set[str]:
        """Suffixes of every work queue the plan's bees read or write."""
        return {s for b in self.bees for s in (b.work.in_, b.work.out) if s}

    def start_order(self) -> list[BeeSpec]:
        """Bees ordered so that every bee starts after the ones it depends on.

        A bee depends on what it names in ``dependsOn`` and on every bee that consumes the
        queue it writes to: consumers come up first so no work is published to nobody.
        """
        by_name = {b.name: b for b in self.bees}
        consumers: dict[str, list[str]] = defaultdict(list)
        for bee in self.bees:
            if bee.work.in_:
                consumers[bee.work.in_].append(bee.name)
        # A work queue is a node of its own that waits for all its consumers, and each producer
        # waits for the queue: edges stay linear in the plan's size however many share a queue.
        needs: dict[str, set[str]] = {}
        for bee in self.bees:
            needs[bee.name] = set(bee.depends_on)
            queue = bee.work.out
            if queue and queue in consumers:
                if bee.name in consumers[queue]:  # it reads what it writes: it waits for the others only
                    needs[bee.name].update(c for c in consumers[queue] if c != bee.name)
                else:
                    needs[bee.name].add(_QUEUE_NODE + queue)
        for queue, names in consumers.items():
            needs[_QUEUE_NODE + queue] = set(names)
        waiting = {node: len(wanted) for node, wanted in needs.items()}
        dependents: dict[str, list[str]] = defaultdict(list)
        for node, wanted in needs.items():
            for other in wanted:
                dependents[other].append(node)
        ready = deque(node for node in needs if not waiting[node])
        ordered: list[BeeSpec] = []
        while ready:
            node = ready.popleft()
            if node in by_name:
                ordered.append(by_name[node])
            for dependent in dependents[node]:
                waiting[dependent] -= 1
                if not waiting[dependent]:
                    ready.append(dependent)
        if len(ordered) < len(self.bees):
            stuck = sorted(set(by_name) - {b.name for b in ordered})
            raise ValueError("bees depend on each other in a cycle: " + ", ".join(stuck))
        return ordered


_QUEUE_NODE = "queue:"  # bee names are slugs, so this never names a bee


class Template(Strict):
    """A scenario file from ``scenarios/``: a named swarm plan."""

    id: str
    name: str = ""
    description: str = ""
    controller_image: str | None = Field(None, min_length=1, max_length=200,
                                         pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")
    sut: SutSpec | None = None
    bees: list[BeeSpec] = Field(default_factory=list)
    pool: PoolSpec | None = None

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return _slug(value, "template id")

    @model_validator(mode="after")
    def _valid_plan(self) -> Template:
        self.plan()  # the same checks as a plan sent by a caller
        return self

    def plan(self) -> SwarmPlan:
        return SwarmPlan(bees=self.bees, sut=self.sut, pool=self.pool)

    def workload_images(self) -> set[str]:
        """The images of its bees and its SUT; shipping a template is the operator vetting them."""
        images = {b.image for b in self.bees} | ({self.sut.image} if self.sut else set())
        return images | ({self.pool.image} if self.pool and self.pool.image else set())


# --- messages on ph.control -------------------------------------------------------------


class CommandTarget(StrEnum):
    ALL = "all"
    SWARM = "swarm"
    ROLE = "role"
    INSTANCE = "instance"


class Signal(Wire):
    signal: str
    correlation_id: str
    idempotency_key: str
    swarm_id: str | None = None
    role: str | None = None
    instance: str | None = None
    command_target: CommandTarget = CommandTarget.SWARM
    args: dict[str, Any] = Field(default_factory=dict)
    ts: datetime = Field(default_factory=utcnow)
    origin: str = "gateway"

    @property
    def scope(self) -> str:
        return keys.scope_of(self.swarm_id, self.role, self.instance)

    def routing_key(self) -> str:
        return keys.signal_key(self.signal, self.scope)


class Scope(Wire):
    swarm_id: str | None = None
    role: str | None = None
    instance: str | None = None

    def key(self) -> str:
        return keys.scope_of(self.swarm_id, self.role, self.instance)


class SwarmStatus(StrEnum):
    CREATING = "Creating"
    READY = "Ready"
    STARTING = "Starting"
    RUNNING = "Running"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    REMOVING = "Removing"
    REMOVED = "Removed"
    FAILED = "Failed"


class OutcomeState(Wire):
    status: str | None = None
    enabled: bool | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class Outcome(Wire):
    """``ev.ready.*`` / ``ev.error.*`` body: what became of one signal."""

    ts: datetime = Field(default_factory=utcnow)
    correlation_id: str
    idempotency_key: str
    signal: str
    scope: Scope
    result: Literal["success", "error"]
    state: OutcomeState = Field(default_factory=OutcomeState)
    details: dict[str, Any] = Field(default_factory=dict)
    phase: str | None = None
    code: str | None = None
    message: str | None = None
    retryable: bool | None = None

    def routing_key(self) -> str:
        build = keys.ready_key if self.result == "success" else keys.error_key
        return build(self.signal, self.scope.key())

    @classmethod
    def for_signal(cls, sig: Signal, **fields: Any) -> Outcome:
        scope = Scope(swarm_id=sig.swarm_id, role=sig.role, instance=sig.instance)
        return cls(correlation_id=sig.correlation_id, idempotency_key=sig.idempotency_key,
                   signal=sig.signal, scope=scope, **fields)


class BeeState(Wire):
    """One bee as a controller reports it."""

    name: str
    role: str
    instance: str
    image: str
    container_id: str | None = None
    state: str = "unknown"  # container state: created, running, exited, missing
    enabled: bool = False
    last_seen: datetime | None = None


class Status(Wire):
    """``ev.status-full`` / ``ev.status-delta`` body."""

    kind: Literal["status-full", "status-delta"]
    role: str
    instance: str
    swarm_id: str | None = None
    enabled: bool = False
    state: str = "unknown"
    totals: dict[str, float] = Field(default_factory=dict)
    queue_stats: dict[str, dict[str, float]] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    ts: datetime = Field(default_factory=utcnow)
    version: str = WIRE_VERSION

    def routing_key(self) -> str:
        return keys.status_key(self.kind, self.role, self.instance)


# --- REST: requests and the correlation envelope ------------------------------------------


class ActionRequest(Strict):
    idempotency_key: uuid.UUID
    notes: str | None = Field(None, max_length=2000)


class CreateSwarmRequest(ActionRequest):
    template_id: str

    @field_validator("template_id")
    @classmethod
    def _template(cls, value: str) -> str:
        return _slug(value, "templateId")


class TemplateRequest(ActionRequest):
    swarm_plan: SwarmPlan


class ComponentConfigRequest(ActionRequest):
    """``POST /api/components/{role}/{instance}/config``.

    ``commandTarget`` widens who receives the patch, resolved from the gateway's registry:
    ``instance`` (default) the addressed component, ``swarm`` every component of its swarm,
    ``role`` every registered component with its role, ``all`` every registered component.
    """

    patch: dict[str, Any] = Field(min_length=1)
    command_target: CommandTarget = CommandTarget.INSTANCE


class ControllersConfigRequest(ActionRequest):
    """``POST /api/controllers/config``: switch swarm-controllers' workloads on or off."""

    enabled: StrictBool  # a kill switch takes true or false, not "no" or 0
    targets: list[str] | None = Field(None, max_length=10_000)  # "swarm-controller.<instance>"

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: list[str] | None) -> list[str] | None:
        for target in value or ():
            role, dot, instance = target.partition(".")
            if role != keys.CONTROLLER_ROLE or not dot:
                raise ValueError(f"target {target!r} must be '{keys.CONTROLLER_ROLE}.<instance>'")
            _slug(instance, "instance")
        return None if value is None else list(dict.fromkeys(value))  # repeated targets count once


class Watch(Wire):
    success_topic: str | None = None
    error_topic: str | None = None
    info_topic: str | None = None


class TargetTopics(Wire):
    """One component of a fan-out and where its outcome will appear."""

    instance: str  # "<role>.<instance>"
    success_topic: str
    error_topic: str


class Envelope(Wire):
    """The answer to every action. A fan-out lists one entry per target under ``targets``."""

    correlation_id: str
    idempotency_key: str
    watch: Watch | None = None
    targets: list[TargetTopics] | None = None
    timeout_ms: int
