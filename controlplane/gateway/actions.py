"""Idempotent actions: from a validated request to a published signal and an envelope.

Every surface goes through ``submit``. The order matters:
1. a known idempotency key is answered from its record (same body: the same envelope;
   another body: 422) before anything else is checked, and again from the store before
   any precondition failure is answered, so a retry (even one sent to another gateway)
   never sees a conflict caused by its own first attempt;
2. the surface's precondition (the swarm exists, its state allows the action), and the
   resource the action holds; a conflict with an operation still open waits (on its close
   event, bounded) for that operation to close, because a caller reacting to an outcome
   event may arrive before this gateway has consumed it;
3. the record, the operation and its signals are committed in the writer's next batch,
   where concurrent duplicates and a second holder of one resource are refused;
4. only then are the signals published and the caller answered: the answer waits for the
   commit, not for the broker's confirm, since a signal not confirmed is published again
   by the outbox (``dispatch``). A broker that is down is refused before anything is
   committed (503).

Replays, preconditions and conflicts are answered from memory (``Ledger``, ``Swarms``,
``Registry``); the only database work on the way is the commit the 202 depends on.

A fan-out (bulk controller toggles, a config patch widened by ``commandTarget``) is one
action with one correlation id and one signal per target; the operation closes when every
target has answered.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from controlplane.contract import keys
from controlplane.contract.models import (
    ActionRequest, CommandTarget, Envelope, Signal, SwarmStatus, TargetTopics, Watch, new_id, utcnow,
)
from controlplane.contract.redact import redact
from controlplane.gateway import metrics
from controlplane.gateway.context import GatewayContext, context_of
from controlplane.gateway.dispatch import start_dispatch
from controlplane.gateway.ledger import Record, Tracked, wait_closed
from controlplane.gateway.middleware import ApiError, read_json
from controlplane.logs import get_logger
from controlplane.store import Busy, NewAction, OperationRow, Replayed, Started, SwarmExists, SwarmRow, TargetRow
from controlplane.store.models import OperationStatus, swarm_resource
from controlplane.store.writer import detach

log = get_logger("gateway.actions")

# timeoutMs of each signal, as the specifications give them: every surface registers the
# signals it sends when it is mounted (``surface.mount``).
SIGNAL_TIMEOUTS_MS: dict[str, int] = {}
# The longest a caller may ask a request to wait for its outcome (``Prefer: wait``, ``?wait=``).
MAX_WAIT_S = 300.0
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?(\d+(?:\.\d+)?)\"?", re.IGNORECASE)


def register_signals(timeouts_ms: dict[str, int]) -> None:
    """A surface's own signals and their timeouts; a name registered twice differently is a bug."""
    for signal, timeout in timeouts_ms.items():
        if SIGNAL_TIMEOUTS_MS.get(signal, timeout) != timeout:
            raise ValueError(f"signal {signal!r} is already registered with another timeout")
        SIGNAL_TIMEOUTS_MS[signal] = timeout


@dataclass(frozen=True)
class Target:
    """One component a fan-out signals."""

    role: str
    instance: str
    swarm_id: str | None = None

    @property
    def scope(self) -> str:
        return keys.component_scope(self.role, self.instance)


@dataclass(frozen=True)
class Action:
    """What a surface asks ``submit`` to do."""

    signal: str
    request: ActionRequest
    swarm_id: str | None = None
    role: str | None = None
    instance: str | None = None
    args: dict[str, Any] | None = None
    lifecycle: bool = False
    create_swarm: SwarmRow | None = None
    info_only: bool = False  # the answer is a status event, not ev.ready / ev.error
    fan_out: tuple[Target, ...] | None = None  # None: one signal to the action's own scope
    command_target: CommandTarget | None = None
    key_scope: str | None = None  # where keys and operations are filed when there is no single target
    # What the operation holds while open; a lifecycle action holds its swarm.
    holds: str | None = None

    @property
    def scope(self) -> str:
        return self.key_scope or keys.scope_of(self.swarm_id, self.role, self.instance)

    @property
    def key(self) -> str:
        return str(self.request.idempotency_key)

    @property
    def resource(self) -> str | None:
        if self.holds is not None:
            return self.holds
        return swarm_resource(self.swarm_id) if self.lifecycle and self.swarm_id else None

    def watch(self) -> Watch | None:
        if self.info_only:
            return Watch(info_topic=keys.status_key("status-full", self.role or "", self.instance or ""))
        if self.key_scope is not None:
            return None
        return Watch(success_topic=keys.ready_key(self.signal, self.scope),
                     error_topic=keys.error_key(self.signal, self.scope))

    def target_topics(self) -> list[TargetTopics] | None:
        if self.fan_out is None:
            return None
        return [TargetTopics(instance=t.scope, success_topic=keys.ready_key(self.signal, t.scope),
                             error_topic=keys.error_key(self.signal, t.scope)) for t in self.fan_out]

    def signals(self, correlation_id: str, key: str, timeout_ms: int) -> list[Signal]:
        args = {**(self.args or {}), "timeoutMs": timeout_ms,
                **({"notes": self.request.notes} if self.request.notes else {})}
        command_target = self.command_target or (CommandTarget.INSTANCE if self.instance else CommandTarget.SWARM)
        targets = self.fan_out if self.fan_out is not None else (
            Target(self.role, self.instance, self.swarm_id) if self.role and self.instance else None,)
        return [Signal(signal=self.signal, correlation_id=correlation_id, idempotency_key=key,
                       swarm_id=t.swarm_id if t else self.swarm_id, role=t.role if t else None,
                       instance=t.instance if t else None, command_target=command_target, args=args)
                for t in targets]


def request_hash(signal: str, scope: str, request: ActionRequest) -> str:
    canonical = json.dumps({"signal": signal, "scope": scope,
                            "body": request.model_dump(mode="json", by_alias=True)}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def timeout_ms(ctx: GatewayContext, signal: str) -> int:
    if signal not in SIGNAL_TIMEOUTS_MS:
        raise LookupError(f"signal {signal!r} has no timeout; a surface registers its signals with register_signals")
    return ctx.settings.operation_timeouts_ms.get(signal, SIGNAL_TIMEOUTS_MS[signal])


async def read_action(request: web.Request) -> dict[str, Any]:
    """The JSON body of an action, its ``idempotencyKey`` taken from the ``Idempotency-Key``
    header when the body has none (surfaces whose documents carry no key in their bodies)."""
    body = await read_json(request)
    header = request.headers.get("Idempotency-Key")
    if header is not None:
        header = header.strip().strip('"')
        if "idempotencyKey" not in body:
            body["idempotencyKey"] = header
        elif str(body["idempotencyKey"]) != header:
            raise ApiError(400, "idempotency-key-mismatch", "the Idempotency-Key header and the body's "
                           "idempotencyKey differ; send one of them",
                           [{"field": "idempotencyKey", "reason": "differs from the Idempotency-Key header"}])
    return body


def prefer_wait(request: web.Request) -> float | None:
    """Seconds the caller is willing to wait for the outcome (RFC 7240 ``Prefer: wait=``)."""
    found = _PREFER_WAIT.search(request.headers.get("Prefer", ""))
    return min(float(found.group(1)), MAX_WAIT_S) if found else None


async def replay_if_known(request: web.Request, signal: str, scope: str, body: ActionRequest,
                          consult_store: bool = False) -> web.Response | None:
    """Answer a retry before a handler runs preconditions of its own (a lookup, a 404).

    Memory first; ``consult_store`` also asks the store, for a handler about to refuse the
    request (the key may have been used first through another gateway)."""
    ctx = context_of(request)
    digest = request_hash(signal, scope, body)
    known = ctx.ledger.find(signal, scope, str(body.idempotency_key), digest)
    if known is None and consult_store:
        known = await ctx.store.find_action(signal, scope, str(body.idempotency_key), digest)
    if known is None:
        return None
    begun = _replay(ctx, known, signal)
    return await _answer(request, begun.tracked, begun.envelope, 202, {"Idempotent-Replayed": "true"})


async def refuse_unless_known(request: web.Request, signal: str, scope: str, body: ActionRequest,
                              error: ApiError) -> web.Response:
    """A handler's precondition failed: answer a retry from its key, else raise ``error``."""
    replayed = await replay_if_known(request, signal, scope, body, consult_store=True)
    if replayed is None:
        raise error
    return replayed


@dataclass(frozen=True)
class Begun:
    """An action under way: its operation as the gateway tracks it (None when it is only in the
    store, replayed from another gateway's record) and the envelope its caller is answered."""

    tracked: Tracked | None
    envelope: dict[str, Any]
    replayed: bool = False


async def submit(request: web.Request, action: Action,
                 precondition: Callable[[], Awaitable[None]] | None = None) -> web.Response:
    """``begin`` answered over HTTP: the envelope (202), or the closed operation when the
    caller asked to wait (``Prefer: wait``) and it closed in time."""
    begun = await begin(context_of(request), action, precondition)
    headers = {"Idempotent-Replayed": "true"} if begun.replayed else None
    return await _answer(request, begun.tracked, begun.envelope, 202, headers)


async def begin(ctx: GatewayContext, action: Action,
                precondition: Callable[[], Awaitable[None]] | None = None) -> Begun:
    digest = request_hash(action.signal, action.scope, action.request)
    known = ctx.ledger.find(action.signal, action.scope, action.key, digest)
    if known is not None:
        return _replay(ctx, known, action.signal)
    try:
        _check_limits(ctx, action)
        if precondition is not None:
            await precondition()
    except ApiError as exc:
        # The key may be known to the store only: sent first to another gateway.
        known = await ctx.store.find_action(action.signal, action.scope, action.key, digest)
        if known is not None:
            return _replay(ctx, known, action.signal)
        if exc.status != 409 or precondition is None or not await _settled(ctx, action):
            raise
        _check_limits(ctx, action)
        await precondition()
    holder = ctx.ledger.holder(action.resource)
    if holder is not None and not await _settled(ctx, action):
        return await _replay_or_busy(ctx, action, digest, holder.op)
    if not ctx.bus.ready:
        raise _broker_down()

    correlation_id = new_id()
    envelope = Envelope(correlation_id=correlation_id, idempotency_key=action.key, watch=action.watch(),
                        targets=action.target_topics(), timeout_ms=timeout_ms(ctx, action.signal))
    signals = action.signals(correlation_id, action.key, envelope.timeout_ms)
    new = NewAction(action=action.signal, target=action.scope, idempotency_key=action.key, request_hash=digest,
                    correlation_id=correlation_id, envelope=envelope.to_dict(), signal=action.signal,
                    swarm_id=action.swarm_id, lifecycle=action.lifecycle, timeout_ms=envelope.timeout_ms,
                    created_at=utcnow(), retention_s=ctx.settings.idempotency_retention_s,
                    targets=tuple(t.scope for t in action.fan_out or ()), resource=action.resource,
                    signals=[s.to_dict() for s in signals])
    result = await ctx.store.begin_action(new, create_swarm=action.create_swarm)
    if isinstance(result, Busy) and await _settled(ctx, action):
        if precondition is not None:
            await precondition()
        result = await ctx.store.begin_action(new, create_swarm=action.create_swarm)
    if isinstance(result, Replayed):
        return _replay(ctx, result, action.signal)
    if isinstance(result, Busy):
        return await _replay_or_busy(ctx, action, digest, result.active)
    if isinstance(result, SwarmExists):
        raise ApiError(409, "swarm-exists", f"swarm {action.swarm_id!r} already exists (status {result.swarm.status})",
                       currentState=result.swarm.status)
    assert isinstance(result, Started)

    tracked = ctx.ledger.add(result.operation, Record(new.envelope, correlation_id, digest, new.expires_at),
                             new.targets)
    tracked.signals = signals
    if action.create_swarm is not None:
        ctx.swarms.put(action.create_swarm)
    if not signals:  # an empty fan-out: nothing to wait for
        ctx.ledger.finish(tracked, OperationStatus.SUCCEEDED, {"targets": {}})
        detach(ctx.store.set_operation_status(correlation_id, OperationStatus.SUCCEEDED, {"targets": {}}),
               "close empty fan-out")
    else:
        start_dispatch(ctx, tracked)  # from here on a signal not confirmed is the outbox's to send
    return Begun(tracked, new.envelope)


async def begin_and_wait(ctx: GatewayContext, action: Action) -> tuple[Tracked, bool]:
    """``begin``, then wait (the signal's timeout, and a second) for the operation to close: for
    surfaces whose documents answer an action with its result. The operation, and whether it
    closed in time. A key first used through another gateway is a 409 naming its operation."""
    begun = await begin(ctx, action)
    if begun.tracked is None:
        raise ApiError(409, "idempotency-key-used", "this Idempotency-Key was used through another gateway; "
                       f"read its operation at /api/operations/{begun.envelope['correlationId']}")
    return begun.tracked, await wait_closed(begun.tracked, timeout_ms(ctx, action.signal) / 1000 + 1)


def _replay(ctx: GatewayContext, known: Replayed, signal: str) -> Begun:
    if not known.same_request:
        raise ApiError(422, "idempotency-key-reused",
                       "idempotencyKey was already used for this action with a different request body; "
                       "use a new key for a new request", [{"field": "idempotencyKey", "reason": "reused with another body"}])
    metrics.IDEMPOTENT_REPLAYS.labels(signal).inc()
    tracked = ctx.ledger.get(known.correlation_id)
    if tracked is not None and tracked.op.is_open and not tracked.published:
        start_dispatch(ctx, tracked)  # what the outbox would do on its next sweep
    return Begun(tracked, known.envelope, replayed=True)


async def _answer(request: web.Request, tracked: Tracked | None, envelope: dict[str, Any], status: int,
                  headers: dict[str, str] | None = None) -> web.Response:
    """The envelope, or — when the caller asked to wait and the operation closed in time —
    the closed operation with 200."""
    wait_s = prefer_wait(request)
    if wait_s is not None and tracked is not None and await wait_closed(tracked, wait_s):
        return web.json_response(tracked_view(tracked), status=200,
                                 headers={**(headers or {}), "Preference-Applied": f"wait={wait_s:g}"})
    return web.json_response(envelope, status=status, headers=headers)


def _check_limits(ctx: GatewayContext, action: Action) -> None:
    """The operator's bounds on how much one request may start."""
    limit = ctx.settings.max_fanout_targets
    if action.fan_out is not None and len(action.fan_out) > limit:
        raise ApiError(422, "too-many-targets", f"this request addresses {len(action.fan_out)} components; at most "
                       f"{limit} may be addressed at once (CP_MAX_FANOUT_TARGETS): narrow it with targets or "
                       "commandTarget", [{"field": "targets", "reason": f"more than {limit}"}])
    # Counted only near the bound: a create must not walk every swarm.
    if action.create_swarm is not None and ctx.swarms.size() >= ctx.settings.max_swarms:
        active = sum(1 for s in ctx.swarms.all() if s.status not in (SwarmStatus.REMOVED, SwarmStatus.FAILED)
                     and s.id != action.create_swarm.id)
        if active >= ctx.settings.max_swarms:
            raise ApiError(409, "swarm-limit", f"{active} swarms exist, the most this control plane runs "
                           "(CP_MAX_SWARMS); remove one first", limit=ctx.settings.max_swarms)


def _broker_down() -> ApiError:
    return ApiError(503, "broker-unavailable", "the message broker is not reachable; nothing was recorded; "
                    "retry with the same idempotencyKey")


async def _replay_or_busy(ctx: GatewayContext, action: Action, digest: str, active: OperationRow) -> Begun:
    """A 409 for ``active``, unless the store knows this request's key by now: a duplicate
    begun through another gateway a moment ago is answered as a replay, never as busy."""
    known = await ctx.store.find_action(action.signal, action.scope, action.key, digest)
    if known is None:
        raise _busy(action, active)
    return _replay(ctx, known, action.signal)


def _busy(action: Action, active: OperationRow) -> ApiError:
    what = f"swarm {action.swarm_id!r}" if action.swarm_id and action.lifecycle else repr(action.resource)
    return ApiError(409, "operation-in-progress",
                    f"{what} has an operation in progress ({active.signal}, correlationId {active.correlation_id}); "
                    "retry when it has finished", activeOperation=operation_view(active))


async def _settled(ctx: GatewayContext, action: Action) -> bool:
    """Wait (bounded, on its close event) until the holder of ``action``'s resource is done.

    True means a re-check is worth it: what the caller collided with may have just closed.
    """
    holder = ctx.ledger.holder(action.resource)
    if holder is None:
        return action.resource is not None
    return await wait_closed(holder, ctx.settings.conflict_settle_ms / 1000)


def tracked_view(tracked: Tracked) -> dict[str, Any]:
    return operation_view(tracked.op, sorted(tracked.targets.values(), key=lambda t: t.target))


def operation_view(op: OperationRow, targets: list[TargetRow] | None = None) -> dict[str, Any]:
    """An operation as ``GET /api/operations/{correlationId}`` shows it; a fan-out adds its targets."""
    view = {
        "correlationId": op.correlation_id,
        "idempotencyKey": op.idempotency_key,
        "signal": op.signal,
        "target": op.target,
        "swarmId": op.swarm_id,
        "status": op.status,
        "watch": op.envelope.get("watch"),
        "timeoutMs": op.timeout_ms,
        "deadline": op.deadline.isoformat(),
        "createdAt": op.created_at.isoformat(),
        "updatedAt": op.updated_at.isoformat(),
        "outcome": redact(op.outcome),
    }
    if targets:
        view["targets"] = [{"target": t.target, "status": t.status, "outcome": redact(t.outcome),
                            "updatedAt": t.updated_at.isoformat()} for t in targets]
    return view
