"""Routing keys, queue and exchange names: the only module that builds or parses them.

Grammar (see the swarm orchestrator specification):
  sig.<signal>.<scope>            a command
  ev.ready.<signal>.<scope>       its success outcome
  ev.error.<signal>.<scope>       its failure outcome
  ev.status-full.<role>.<instance> / ev.status-delta.<role>.<instance>
where <scope> is <swarmId> for swarm-level signals and <role>.<instance> for components.
Every id that becomes a key segment or a container name must pass ``check_slug`` first.
The streams registry's keys take a stream id (a UUID) as their scope: ``sig.stream-request.<id>``
and ``ev.ready.<registry event>.<id>`` (``stream_request_key``, ``registry_event_key``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CONTROL_EXCHANGE = "ph.control"
DEAD_LETTER_EXCHANGE = "ph.control.dlx"
DEAD_LETTER_QUEUE = "ph.control.dead-letter"
DEAD_LETTER_POLICY = "cp-dead-letter"  # the topology's policy bounding it
HOST_CONTROLLER_QUEUE = "ph.control.host-controller"
# Replies the host controller waits for (controller handshakes), apart from its commands.
HOST_CONTROLLER_REPLIES_QUEUE = "ph.control.host-controller.replies"
# Requests the host controller answers to the requester (services' logs), apart from its commands.
HOST_CONTROLLER_REQUESTS_QUEUE = "ph.control.host-controller.requests"

CONTROLLER_ROLE = "swarm-controller"
# Container name parts of a swarm's own containers; no bee may be named after them.
CONTROLLER_PART = "ctl"
SUT_PART = "sut"
RESERVED_CONTAINER_PARTS = (CONTROLLER_PART, SUT_PART)
SWARM_SIGNALS = ("swarm-create", "swarm-start", "swarm-stop", "swarm-remove", "swarm-template")
COMPONENT_SIGNALS = ("config-update", "status-request")
# A pool's own signals (its swarm scope), and the events its streams make: ``stream-events``
# (gateways' batches of starts and ends, and the pool's own ends) and ``stream-stats`` (one
# collection round), both ``ev.ready.<event>.<pool>``.
POOL_SIGNALS = ("pool-provision", "pool-remove", "pool-gc", "pool-scale", "pool-inspect")
STREAM_EVENTS = "stream-events"
STREAM_STATS = "stream-stats"

# The streams registry (the Streams API surface): a negotiation is ``sig.stream-request.<streamId>``,
# answered by the stream's publisher under the request's reply-to key; everything the registry
# sees happen is an event ``ev.ready.<event>.<scope>``, the scope a stream id (a type's name
# for stream-type-created, the announcing gateway for stream-heartbeats).
STREAM_REQUEST = "stream-request"
STREAM_ADVERTISED = "stream-advertised"
STREAM_WITHDRAWN = "stream-withdrawn"
STREAM_EXPIRED = "stream-expired"
SESSIONS_STARTED = "stream-sessions-started"
SESSION_STOPPED = "stream-session-stopped"
STREAM_TYPE_CREATED = "stream-type-created"
STREAM_HEARTBEATS = "stream-heartbeats"
REGISTRY_EVENTS = (STREAM_ADVERTISED, STREAM_WITHDRAWN, STREAM_EXPIRED, SESSIONS_STARTED, SESSION_STOPPED,
                   STREAM_TYPE_CREATED, STREAM_HEARTBEATS)
# The services dashboard: lifecycle signals to a container's owner (``sig.<signal>.<swarmId>``
# for a swarm's container, ``sig.<signal>.host-controller.<owner>`` for the rest), the host
# controller's reports of what its engine runs (``ev.ready.service-report.<owner>``: facts,
# not outcomes), the gateway's ask for a full report, and its logs request (request-reply).
HOST_CONTROLLER_ROLE = "host-controller"
SERVICE_ACTIONS = ("service-start", "service-stop", "service-restart", "service-update")
SERVICE_REPORT = "service-report"
SERVICE_REPORT_REQUEST = "service-report-request"
SERVICE_LOGS = "service-logs"
# Events that are facts some process saw happen, not the outcome of a signal.
FACT_EVENTS = REGISTRY_EVENTS + (SERVICE_REPORT,)
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_TYPE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,99}$")

SLUG_MAX = 32
_SLUG = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")


class InvalidKey(ValueError):
    """A routing key or id that does not follow the grammar."""


def slug_problem(value: str) -> str | None:
    """Why ``value`` is not a valid id segment, or None when it is."""
    if not value:
        return "must not be empty"
    if len(value) > SLUG_MAX:
        return f"must be at most {SLUG_MAX} characters"
    if not _SLUG.match(value):
        return "must use only lowercase letters, digits and '-', starting and ending with a letter or digit"
    return None


def check_slug(value: str, what: str = "id") -> str:
    problem = slug_problem(value)
    if problem:
        raise InvalidKey(f"{what} {value!r} {problem}")
    return value


# --- building ---------------------------------------------------------------------------


# Joins a swarm id and a bee name into the bee's instance id. Neither may contain it, so an
# instance id reads one way only: swarm "a"'s bee "b-gen" and swarm "a-b"'s bee "gen" differ,
# and a swarm-controller's broker permissions for "<swarm>--*" cover its own bees only.
INSTANCE_SEPARATOR = "--"


def part_problem(value: str) -> str | None:
    """Why ``value`` cannot be a swarm id or a bee name, or None."""
    problem = slug_problem(value)
    if problem is None and INSTANCE_SEPARATOR in value:
        problem = f"must not contain {INSTANCE_SEPARATOR!r}, which joins a swarm and its bee in an instance id"
    return problem


def swarm_scope(swarm_id: str) -> str:
    problem = part_problem(swarm_id)
    if problem:
        raise InvalidKey(f"swarmId {swarm_id!r} {problem}")
    return swarm_id


def component_scope(role: str, instance: str) -> str:
    return f"{check_slug(role, 'role')}.{check_slug(instance, 'instance')}"


def scope_of(swarm_id: str | None, role: str | None = None, instance: str | None = None) -> str:
    """The scope segment(s) of a key: ``<role>.<instance>`` for a component, else ``<swarmId>``."""
    if role and instance:
        return component_scope(role, instance)
    return swarm_scope(swarm_id or "")


def split_scope(scope: str) -> tuple[str | None, str | None]:
    """``(role, instance)`` of a component scope; ``(None, None)`` for a swarm scope."""
    role, dot, instance = scope.partition(".")
    return (role, instance) if dot else (None, None)


def signal_key(signal: str, scope: str) -> str:
    return f"sig.{signal}.{scope}"


def ready_key(signal: str, scope: str) -> str:
    return f"ev.ready.{signal}.{scope}"


def error_key(signal: str, scope: str) -> str:
    return f"ev.error.{signal}.{scope}"


def status_key(kind: str, role: str, instance: str) -> str:
    if kind not in ("status-full", "status-delta"):
        raise InvalidKey(f"unknown status kind {kind!r}")
    return f"ev.{kind}.{component_scope(role, instance)}"


def stream_request_key(stream_id: str) -> str:
    """``sig.stream-request.<streamId>``: a stream id is a lowercase UUID, never a slug."""
    return f"sig.{STREAM_REQUEST}.{_stream_id(stream_id)}"


def registry_event_key(event: str, scope: str) -> str:
    """``ev.ready.<event>.<scope>`` of a streams-registry event."""
    if event not in REGISTRY_EVENTS:
        raise InvalidKey(f"unknown streams-registry event {event!r}")
    if event in (STREAM_HEARTBEATS, SESSIONS_STARTED):  # a gateway's gathered events
        scope = check_slug(scope, "gateway")
    elif event == STREAM_TYPE_CREATED:
        if not _TYPE_NAME.match(scope):
            raise InvalidKey(f"stream type name {scope!r} is not a valid key segment")
    else:
        scope = _stream_id(scope)
    return ready_key(event, scope)


def _stream_id(stream_id: str) -> str:
    if not _UUID.match(stream_id):
        raise InvalidKey(f"stream id {stream_id!r} must be a lowercase UUID")
    return stream_id


def host_controller_scope(owner: str) -> str:
    return component_scope(HOST_CONTROLLER_ROLE, owner)


def service_report_key(owner: str) -> str:
    """``ev.ready.service-report.<owner>``: what one host controller's engine runs."""
    return ready_key(SERVICE_REPORT, check_slug(owner, "owner"))


def controller_handshake_key(instance: str, ok: bool = True) -> str:
    """``ev.ready.swarm-controller.<instance>``: the instance alone is the scope here."""
    scope = check_slug(instance, "instance")
    return ready_key(CONTROLLER_ROLE, scope) if ok else error_key(CONTROLLER_ROLE, scope)


def component_event_patterns(role: str, instance: str) -> tuple[str, str]:
    """Binding patterns for every event a component emits: its status reports
    (``ev.<kind>.<role>.<instance>``) and its outcomes (``ev.<result>.<signal>.<role>.<instance>``)."""
    scope = component_scope(role, instance)
    return f"ev.*.{scope}", f"ev.*.*.{scope}"


def hive_exchange(swarm_id: str) -> str:
    """The swarm's own topic exchange for work traffic between bees."""
    return f"ph.{swarm_scope(swarm_id)}.hive"


def hive_queue(swarm_id: str, suffix: str) -> str:
    return f"ph.{swarm_scope(swarm_id)}.{check_slug(suffix, 'queue suffix')}"


def component_queue(role: str, instance: str) -> str:
    """Control queue of one controller or bee: where its signals arrive."""
    return f"ph.control.{component_scope(role, instance)}"


def replies_queue(role: str, instance: str) -> str:
    """Where a component receives the replies its handlers wait for, apart from its signals."""
    return f"{component_queue(role, instance)}.replies"


def state_queue(role: str, instance: str) -> str:
    """A component's last-value queue: its latest state, read back when it restarts."""
    return f"ph.control.state.{component_scope(role, instance)}"


def state_key(role: str, instance: str) -> str:
    """Routing key of a component's state snapshot on ph.control, bound to its state queue only."""
    return f"state.{component_scope(role, instance)}"


def controller_instance(swarm_id: str) -> str:
    """A swarm's controller instance id; deterministic so a retried create finds it."""
    return swarm_scope(swarm_id)


def bee_instance(swarm_id: str, bee_name: str) -> str:
    """Bee instance ids embed the swarm id so they are unique across swarms."""
    problem = part_problem(bee_name)
    if problem:
        raise InvalidKey(f"bee name {bee_name!r} {problem}")
    return check_slug(f"{swarm_scope(swarm_id)}{INSTANCE_SEPARATOR}{bee_name}", "bee instance")


def container_name(owner: str, swarm_id: str, part: str) -> str:
    """Names carry the owner: control planes sharing an engine may run swarms of the same id."""
    return f"cp-{check_slug(owner, 'owner')}-{swarm_scope(swarm_id)}-{check_slug(part, 'container part')}"


# --- parsing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedKey:
    kind: str  # "sig", "ready", "error", "status-full", "status-delta"
    signal: str | None
    swarm_id: str | None
    role: str | None
    instance: str | None

    @property
    def scope(self) -> str:
        if self.role:
            return f"{self.role}.{self.instance}"
        return self.swarm_id or ""


def parse_key(key: str) -> ParsedKey:
    parts = key.split(".")
    if parts[0] == "sig" and len(parts) >= 3:
        kind, signal, rest = "sig", parts[1], parts[2:]
    elif parts[0] == "ev" and len(parts) >= 4 and parts[1] in ("ready", "error"):
        kind, signal, rest = parts[1], parts[2], parts[3:]
    elif parts[0] == "ev" and len(parts) == 4 and parts[1] in ("status-full", "status-delta"):
        return ParsedKey(parts[1], None, None, parts[2], parts[3])
    else:
        raise InvalidKey(f"not a control routing key: {key!r}")
    if len(rest) == 1:
        return ParsedKey(kind, signal, rest[0], None, None)
    if len(rest) == 2:
        return ParsedKey(kind, signal, None, rest[0], rest[1])
    raise InvalidKey(f"scope of {key!r} has too many segments")
