"""Idempotent actions: from a validated request to a published signal and an envelope.

Every surface goes through ``submit``. The order matters:
1. a known idempotency key is answered from its record (same body: the same envelope;
   another body: 422) before anything else is checked, and again before any 409, so a retry
   or a concurrent duplicate never sees a conflict caused by its own first attempt;
2. the surface's precondition (the swarm exists, its state allows the action);
   a conflict with an operation still open waits briefly for that operation to close, because
   a caller reacting to an outcome event may arrive before the gateway has projected it;
3. the record and the operation are stored in one transaction, which is where concurrent
   duplicates and a second lifecycle operation on the same swarm are refused;
4. only then is the signal published, and a failed publish removes the record again so
   the caller's retry starts afresh.

A fan-out (bulk controller toggles, a config patch widened by ``commandTarget``) is one
action with one correlation id and one signal per target; the operation closes when every
target has answered.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from controlplane.bus import Bus
from controlplane.config import Settings
from controlplane.contract import keys
from controlplane.contract.models import (
    ActionRequest, CommandTarget, Envelope, Outcome, Signal, TargetTopics, Watch, new_id, utcnow,
)
from controlplane.gateway import metrics
from controlplane.gateway.middleware import ApiError
from controlplane.logs import get_logger
from controlplane.store import (
    Busy, NewAction, OperationRow, Replayed, Started, Store, SwarmExists, SwarmRow, TargetRow,
)

log = get_logger("gateway.actions")

SETTLE_POLL_S = 0.05

# timeoutMs of each signal, as the specification gives them.
SPEC_TIMEOUTS_MS = {
    "swarm-create": 120_000,
    "swarm-start": 180_000,
    "swarm-stop": 90_000,
    "swarm-remove": 180_000,
    "swarm-template": 180_000,
    "config-update": 60_000,
    "status-request": 10_000,
}


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

    @property
    def scope(self) -> str:
        return self.key_scope or keys.scope_of(self.swarm_id, self.role, self.instance)

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


def request_hash(action: Action) -> str:
    canonical = json.dumps({"signal": action.signal, "scope": action.scope,
                            "body": action.request.model_dump(mode="json", by_alias=True)}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def timeout_ms(settings: Settings, signal: str) -> int:
    return settings.operation_timeouts_ms.get(signal, SPEC_TIMEOUTS_MS[signal])


def _replay(result: Replayed, action: Action) -> web.Response:
    if not result.same_request:
        raise ApiError(422, "idempotency-key-reused",
                       "idempotencyKey was already used for this action with a different request body; "
                       "use a new key for a new request", [{"field": "idempotencyKey", "reason": "reused with another body"}])
    metrics.IDEMPOTENT_REPLAYS.labels(action.signal).inc()
    return web.json_response(result.envelope, status=202, headers={"Idempotent-Replayed": "true"})


async def submit(store: Store, bus: Bus, settings: Settings, action: Action,
                 precondition: Callable[[], Awaitable[None]] | None = None) -> web.Response:
    key = str(action.request.idempotency_key)
    digest = request_hash(action)
    known = await store.find_action(action.signal, action.scope, key, digest)
    if known is not None:
        return _replay(known, action)
    if precondition is not None:
        try:
            await precondition()
        except ApiError as exc:
            if exc.status != 409:
                raise
            # A concurrent duplicate may have won between the lookup and the precondition.
            known = await store.find_action(action.signal, action.scope, key, digest)
            if known is not None:
                return _replay(known, action)
            if not await _settled(store, settings, action.swarm_id):
                raise
            await precondition()

    correlation_id = new_id()
    envelope = Envelope(correlation_id=correlation_id, idempotency_key=key, watch=action.watch(),
                        targets=action.target_topics(), timeout_ms=timeout_ms(settings, action.signal))
    new = NewAction(action=action.signal, target=action.scope, idempotency_key=key, request_hash=digest,
                    correlation_id=correlation_id, envelope=envelope.to_dict(), signal=action.signal,
                    swarm_id=action.swarm_id, lifecycle=action.lifecycle, timeout_ms=envelope.timeout_ms,
                    created_at=utcnow(), retention_s=settings.idempotency_retention_s,
                    targets=tuple(t.scope for t in action.fan_out or ()))
    result = await store.begin_action(new, create_swarm=action.create_swarm)
    if isinstance(result, Busy) and await _settled(store, settings, action.swarm_id):
        if precondition is not None:
            await precondition()
        result = await store.begin_action(new, create_swarm=action.create_swarm)
    if isinstance(result, Replayed):
        return _replay(result, action)
    if isinstance(result, Busy):
        raise ApiError(409, "operation-in-progress",
                       f"swarm {action.swarm_id!r} has an operation in progress ({result.active.signal}, "
                       f"correlationId {result.active.correlation_id}); retry when it has finished",
                       activeOperation=operation_view(result.active))
    if isinstance(result, SwarmExists):
        raise ApiError(409, "swarm-exists", f"swarm {action.swarm_id!r} already exists (status {result.swarm.status})",
                       currentState=result.swarm.status)
    assert isinstance(result, Started)

    signals = action.signals(correlation_id, key, envelope.timeout_ms)
    results = await asyncio.gather(*(bus.publish(s.routing_key(), s) for s in signals), return_exceptions=True)
    failed = [(s, r) for s, r in zip(signals, results) if isinstance(r, BaseException)]
    if signals and len(failed) == len(signals):
        await store.forget_action(correlation_id)
        log.error("signal publish failed", signal=action.signal, error=str(failed[0][1]), correlation_id=correlation_id)
        raise ApiError(503, "broker-unavailable", "the message broker did not accept the signal; retry with the "
                       "same idempotencyKey") from None
    await store.set_operation_status(correlation_id, "dispatched")
    for sig, exc in failed:  # part of a fan-out went out: the rest is answered as failed, not retried
        outcome = Outcome.for_signal(sig, result="error", phase="gateway", code="broker-unavailable",
                                     message=f"the broker did not accept the signal: {exc}", retryable=True)
        await store.record_outcome(correlation_id, sig.signal, sig.scope, "failed", outcome.to_dict())
    if action.fan_out == ():
        await store.set_operation_status(correlation_id, "succeeded", {"targets": {}})
    metrics.SIGNALS_PUBLISHED.labels(action.signal).inc(len(signals) - len(failed))
    log.info("signal published", signal=action.signal, scope=action.scope, correlation_id=correlation_id,
             idempotency_key=key, targets=len(signals))
    return web.json_response(envelope.to_dict(), status=202)


async def _settled(store: Store, settings: Settings, swarm_id: str | None) -> bool:
    """Wait (bounded) until ``swarm_id`` has no open lifecycle operation.

    True means a re-check is worth it: what the caller collided with may have just closed
    (its outcome projected between the first check and now).
    """
    if not swarm_id:
        return False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.conflict_settle_ms / 1000
    while await store.open_lifecycle_operation(swarm_id) is not None:
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(SETTLE_POLL_S)
    return True


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
        "outcome": op.outcome,
    }
    if targets:
        view["targets"] = [{"target": t.target, "status": t.status, "outcome": t.outcome,
                            "updatedAt": t.updated_at.isoformat()} for t in targets]
    return view
