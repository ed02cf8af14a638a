"""Follows every operation to its outcome and keeps the gateway's read models current.

Outcome events close operations (by correlation id, signal and target) and move the swarm
read model; every status event goes to the registry, and a ``status-full`` sent in answer to
a status request closes that request's operation. A sweeper times out operations whose
deadline passed and publishes ``ev.error.<signal>.<scope>`` with ``code: "timeout"`` on the
very topic the caller was told to watch (for a fan-out: on each silent target's topic).
Closing is a compare-and-set in the store, so with several gateways exactly one publishes
each timeout.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from controlplane.bus import Bus, Consumer
from controlplane.contract import keys
from controlplane.contract.models import Outcome, OutcomeState, Scope, Status, SwarmStatus, utcnow
from controlplane.gateway import metrics
from controlplane.gateway.events import EventHub
from controlplane.gateway.registry import Registry
from controlplane.logs import get_logger
from controlplane.store import OperationRow, Store

log = get_logger("gateway.tracker")

SWEEP_INTERVAL_S = 0.5
PURGE_INTERVAL_S = 600


class Tracker:
    def __init__(self, store: Store, bus: Bus, retention_s: int, gateway_name: str) -> None:
        self.store, self.bus, self.retention_s = store, bus, retention_s
        self.gateway_name = gateway_name
        self.events = EventHub()
        self.registry = Registry(store)
        self._consumer: Consumer | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> Tracker:
        self.registry.start()
        decl = self.bus.topology.templates.gateway_queue.render(instance=self.gateway_name)
        self._consumer = await self.bus.consume(decl, self._on_event, prefetch=64)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="operation-sweeper")
        return self

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.cancel()
        await self.registry.stop()

    # --- events ----------------------------------------------------------------------------

    async def _on_event(self, routing_key: str, body: dict[str, Any], message: Any) -> None:
        self.events.publish(routing_key, body)
        parsed = keys.parse_key(routing_key)
        if parsed.kind in ("status-full", "status-delta"):
            status = Status.model_validate(body)
            self.registry.observe(status)
            if status.kind == "status-full" and message.correlation_id:
                await self._on_status_answer(status, message.correlation_id)
        elif parsed.kind in ("ready", "error") and parsed.signal != keys.CONTROLLER_ROLE:
            await self._on_outcome(Outcome.model_validate(body))

    async def _on_status_answer(self, status: Status, correlation_id: str) -> None:
        """A status request is answered by the component's ``status-full``, not by ``ev.ready``."""
        scope = keys.component_scope(status.role, status.instance)
        recorded = await self.store.record_outcome(correlation_id, "status-request", scope, "succeeded",
                                                   status.to_dict())
        if recorded.closed is not None:
            self._finished(recorded.closed)

    async def _on_outcome(self, outcome: Outcome) -> None:
        # The read model moves first, so once an operation reads as closed its swarm shows the
        # result; it follows what really happened, even when the outcome came after a timeout.
        if outcome.signal.startswith("swarm-") and outcome.scope.swarm_id:
            await self._project_swarm(outcome)
        status = "succeeded" if outcome.result == "success" else "failed"
        recorded = await self.store.record_outcome(outcome.correlation_id, outcome.signal, outcome.scope.key(),
                                                   status, outcome.to_dict())
        if recorded.closed is not None:
            self._finished(recorded.closed)

    def _finished(self, op: OperationRow) -> None:
        metrics.OPERATIONS_FINISHED.labels(op.signal, op.status).inc()
        metrics.OPERATION_SECONDS.labels(op.signal).observe((utcnow() - op.created_at).total_seconds())

    async def _project_swarm(self, outcome: Outcome) -> None:
        swarm_id = outcome.scope.swarm_id or ""
        if outcome.signal == "swarm-remove" and outcome.result == "success":
            await self.store.delete_swarm(swarm_id)
            return
        fields: dict[str, Any] = {}
        if outcome.state.status:
            fields["status"] = outcome.state.status
        if outcome.result == "success":
            fields["last_error"] = None
            if outcome.signal == "swarm-create":
                fields["controller_instance"] = outcome.state.details.get("controller", keys.controller_instance(swarm_id))
                if isinstance(outcome.details.get("bees"), list):
                    fields["bees"] = outcome.details["bees"]
        else:
            fields["last_error"] = {"signal": outcome.signal, "code": outcome.code, "message": outcome.message,
                                    "correlationId": outcome.correlation_id, "ts": outcome.ts.isoformat()}
        await self.store.update_swarm(swarm_id, **fields)

    # --- timeouts ----------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        last_purge = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self.sweep()
                if loop.time() - last_purge > PURGE_INTERVAL_S:
                    now = utcnow()
                    await self.store.purge_expired(now, finished_before=now - timedelta(seconds=self.retention_s))
                    last_purge = loop.time()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("operation sweep failed")
            await asyncio.sleep(SWEEP_INTERVAL_S)

    async def sweep(self) -> None:
        for op in await self.store.due_operations(utcnow()):
            targets = await self.store.operation_targets(op.correlation_id)
            if targets:
                for target in targets:
                    if target.status in ("accepted", "dispatched"):
                        await self._time_out(op, target.target)
                continue
            outcome = await self._time_out(op, op.target)
            if outcome is not None and op.signal == "swarm-create" and op.swarm_id:
                await self.store.update_swarm(op.swarm_id, status=SwarmStatus.FAILED, last_error={
                    "signal": op.signal, "code": "timeout", "message": outcome.message,
                    "correlationId": op.correlation_id})

    async def _time_out(self, op: OperationRow, target: str) -> Outcome | None:
        """Close ``target`` of ``op`` as timed out and say so on its error topic; None when an
        outcome or another gateway got there first."""
        outcome = timeout_outcome(op, target)
        recorded = await self.store.record_outcome(op.correlation_id, op.signal, target, "timed_out", outcome.to_dict())
        if not recorded.moved:
            return None
        await self.bus.publish(outcome.routing_key(), outcome)
        log.warning("operation timed out", signal=op.signal, target=target, correlation_id=op.correlation_id)
        if recorded.closed is not None:
            self._finished(recorded.closed)
        return outcome


def timeout_outcome(op: OperationRow, target: str | None = None) -> Outcome:
    target = target or op.target
    role, instance = keys.split_scope(target)
    scope = Scope(swarm_id=op.swarm_id, role=role, instance=instance)
    return Outcome(correlation_id=op.correlation_id, idempotency_key=op.idempotency_key, signal=op.signal,
                   scope=scope, result="error", state=OutcomeState(), phase="gateway", code="timeout",
                   message=f"no outcome for {op.signal} on {target} within {op.timeout_ms} ms", retryable=True)
