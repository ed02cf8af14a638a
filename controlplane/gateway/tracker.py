"""Follows every operation to its outcome and keeps the gateway's read models current.

Outcome events close operations (by correlation id) and move the swarm read model; status
events from swarm-controllers refresh bees and heartbeats. A sweeper times out operations
whose deadline passed and publishes ``ev.error.<signal>.<scope>`` with ``code: "timeout"``
on the very topic the caller was told to watch. Closing an operation is a compare-and-set in
the store, so with several gateways exactly one publishes the timeout.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from controlplane.bus import Bus, Consumer
from controlplane.contract import keys
from controlplane.contract.models import Outcome, OutcomeState, Scope, Status, SwarmStatus, utcnow
from controlplane.gateway import metrics
from controlplane.logs import get_logger
from controlplane.store import OperationRow, Store

log = get_logger("gateway.tracker")

SWEEP_INTERVAL_S = 0.5
PURGE_INTERVAL_S = 600


class Tracker:
    def __init__(self, store: Store, bus: Bus, retention_s: int) -> None:
        self.store, self.bus, self.retention_s = store, bus, retention_s
        self._consumer: Consumer | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> Tracker:
        decl = self.bus.topology.queue(keys.GATEWAY_QUEUE)
        self._consumer = await self.bus.consume(decl, self._on_event, prefetch=64)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="operation-sweeper")
        return self

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.cancel()

    # --- events ----------------------------------------------------------------------------

    async def _on_event(self, routing_key: str, body: dict[str, Any], _message: Any) -> None:
        parsed = keys.parse_key(routing_key)
        if parsed.kind in ("status-full", "status-delta") and parsed.role == keys.CONTROLLER_ROLE:
            await self._on_controller_status(Status.model_validate(body))
        elif parsed.kind in ("ready", "error") and parsed.signal != keys.CONTROLLER_ROLE:
            await self._on_outcome(Outcome.model_validate(body))

    async def _on_outcome(self, outcome: Outcome) -> None:
        # The read model moves first, so once an operation reads as closed its swarm shows the
        # result; it follows what really happened, even when the outcome came after a timeout.
        if outcome.signal.startswith("swarm-") and outcome.scope.swarm_id:
            await self._project_swarm(outcome)
        status = "succeeded" if outcome.result == "success" else "failed"
        op = await self.store.set_operation_status(outcome.correlation_id, status, outcome.to_dict(),
                                                   signal=outcome.signal, target=outcome.scope.key())
        if op is not None:
            metrics.OPERATIONS_FINISHED.labels(op.signal, status).inc()
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

    async def _on_controller_status(self, status: Status) -> None:
        if not status.swarm_id:
            return
        await self.store.update_swarm(status.swarm_id, bees=status.data.get("bees", []),
                                      last_heartbeat=status.ts, enabled=status.enabled)

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
            outcome = timeout_outcome(op)
            closed = await self.store.set_operation_status(op.correlation_id, "timed_out", outcome.to_dict())
            if closed is None:
                continue  # an outcome or another gateway got there first
            await self.bus.publish(outcome.routing_key(), outcome)
            metrics.OPERATIONS_FINISHED.labels(op.signal, "timed_out").inc()
            log.warning("operation timed out", signal=op.signal, target=op.target, correlation_id=op.correlation_id)
            if op.signal == "swarm-create" and op.swarm_id:
                await self.store.update_swarm(op.swarm_id, status=SwarmStatus.FAILED, last_error={
                    "signal": op.signal, "code": "timeout", "message": outcome.message,
                    "correlationId": op.correlation_id})


def timeout_outcome(op: OperationRow) -> Outcome:
    role, instance = keys.split_scope(op.target)
    scope = Scope(swarm_id=op.swarm_id, role=role, instance=instance)
    return Outcome(correlation_id=op.correlation_id, idempotency_key=op.idempotency_key, signal=op.signal,
                   scope=scope, result="error", state=OutcomeState(), phase="gateway", code="timeout",
                   message=f"no outcome for {op.signal} on {op.target} within {op.timeout_ms} ms", retryable=True)
