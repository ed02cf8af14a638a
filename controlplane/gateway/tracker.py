"""Follows every operation to its outcome and keeps the gateway's read models current.

Each gateway consumes every event from queues of its own: outcomes, acked once what they
close is committed, and statuses, consumed without acks. Outcome events close
operations (by correlation id, signal and target) and move the swarm read model; status
events go to the registry, and a ``status-full`` sent in answer to a status request closes
that request's operation. Memory changes at once; the store follows through the writer's
next batch, so a thousand outcomes cost a few transactions, and an outcome that matches
no open operation costs none.

A sweeper times out operations whose deadline passed and publishes
``ev.error.<signal>.<scope>`` with ``code: "timeout"`` on the very topic the caller was told
to watch (for a fan-out: on each silent target's topic). The store's compare-and-set
decides, so with several gateways exactly one publishes each timeout. The sweeper also
runs the outbox for operations kept after a failed publish.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from controlplane.bus import Consumer
from controlplane.bus.metrics import KEY_MISMATCHES, MessageKind
from controlplane.contract import keys
from controlplane.contract.models import Outcome, OutcomeState, Scope, Status, SwarmStatus, utcnow
from controlplane.gateway.context import GatewayContext
from controlplane.gateway.dispatch import close_target, count_finished, republish_pending
from controlplane.gateway.ledger import Tracked
from controlplane.gateway.surface import Projections
from controlplane.logs import get_logger
from controlplane.store import OPEN_STATUSES, OperationRow

log = get_logger("gateway.tracker")

SWEEP_INTERVAL_S = 0.5
PURGE_INTERVAL_S = 600


class Tracker:
    def __init__(self, ctx: GatewayContext, projections: Projections) -> None:
        self.ctx = ctx
        self.projections = projections
        self._consumers: list[Consumer] = []
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> Tracker:
        ctx = self.ctx
        # The static queues exist before any signal goes out, whichever process started first:
        # a signal published before its receiver's queue is declared would be dropped.
        for static in ctx.bus.topology.queues:
            await ctx.bus.declare_queue(static)
        templates, name = ctx.bus.topology.templates, ctx.settings.gateway_name
        self._consumers = [
            await ctx.bus.consume(templates.gateway_queue.render(instance=name), self._on_event, prefetch=256),
            # Statuses are many and each is replaced by the next: no ack per message.
            await ctx.bus.consume(templates.gateway_status_queue.render(instance=name), self._on_event,
                                  prefetch=1024, acks=False),
        ]
        await republish_pending(ctx)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="operation-sweeper")
        return self

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for consumer in self._consumers:
            await consumer.cancel()

    # --- events ----------------------------------------------------------------------------

    async def _on_event(self, routing_key: str, body: dict[str, Any], message: Any) -> None:
        parsed = keys.parse_key(routing_key)
        written: asyncio.Future[None] | None = None
        if parsed.kind in ("status-full", "status-delta"):
            status = Status.model_validate(body)
            if _mismatch("status", routing_key, status.routing_key()):
                return
            self.ctx.registry.observe(status)
            await self.projections.apply(self.ctx, routing_key, body)
            if status.kind == "status-full" and message.correlation_id:
                # A status request is answered by the component's status-full, not by ev.ready.
                written = close_target(self.ctx, message.correlation_id, "status-request",
                                       keys.component_scope(status.role, status.instance), "succeeded", body)
        elif parsed.kind == "ready" and parsed.signal in keys.FACT_EVENTS:
            # Facts a process saw happen (the streams registry's, an engine's services), not
            # the outcome of a signal.
            await self.projections.apply(self.ctx, routing_key, body)
            if parsed.signal in (keys.STREAM_HEARTBEATS, keys.SERVICE_REPORT):
                return  # bookkeeping, large and frequent: not streamed
        elif parsed.kind in ("ready", "error") and parsed.signal != keys.CONTROLLER_ROLE:
            outcome = Outcome.model_validate(body)
            if _mismatch("outcome", routing_key, outcome.routing_key()):
                return
            # Read models move first: an operation read as closed already shows its effect.
            await self.projections.apply(self.ctx, routing_key, body)
            written = close_target(self.ctx, outcome.correlation_id, outcome.signal, outcome.scope.key(),
                                   "succeeded" if outcome.result == "success" else "failed", body)
        # Streamed once it is understood and projected: a retried delivery is not streamed twice.
        self.ctx.events.publish(routing_key, body, getattr(message, "body", None))
        if written is not None:
            # Acked only once the store holds what it closed: a crash before then redelivers it.
            await asyncio.shield(written)

    # --- timeouts ----------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        last_purge = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self.sweep()
                await republish_pending(self.ctx)
                if loop.time() - last_purge > PURGE_INTERVAL_S:
                    await self.purge()
                    last_purge = loop.time()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("operation sweep failed")
            await asyncio.sleep(SWEEP_INTERVAL_S)

    async def purge(self) -> None:
        now = utcnow()
        self.ctx.ledger.purge(now)
        await self.ctx.store.purge_expired(
            now, finished_before=now - timedelta(seconds=self.ctx.settings.idempotency_retention_s))

    async def sweep(self) -> None:
        for tracked in self.ctx.ledger.due(utcnow()):
            if tracked.targets:
                for target in [t.target for t in tracked.targets.values() if t.status in OPEN_STATUSES]:
                    await self._time_out(tracked, target)
                continue
            outcome = await self._time_out(tracked, tracked.op.target)
            op = tracked.op
            if outcome is not None and op.signal == "swarm-create" and op.swarm_id:
                self.ctx.swarms.update(op.swarm_id, status=SwarmStatus.FAILED, last_error={
                    "signal": op.signal, "code": "timeout", "message": outcome.message,
                    "correlationId": op.correlation_id})

    async def _time_out(self, tracked: Tracked, target: str) -> Outcome | None:
        """Close ``target`` as timed out and say so on its error topic; None when an outcome or
        another gateway got there first."""
        ctx, op = self.ctx, tracked.op
        outcome = timeout_outcome(op, target)
        closed = ctx.ledger.close(op.correlation_id, op.signal, target, "timed_out", outcome.to_dict())
        if not closed.moved:
            return None
        if closed.closed is not None:
            count_finished(closed.closed)
        recorded = await ctx.store.record_outcome(op.correlation_id, op.signal, target, "timed_out", outcome.to_dict())
        if not recorded.moved:
            return None
        await ctx.bus.publish(outcome.routing_key(), outcome)
        log.warning("operation timed out", signal=op.signal, target=target, correlation_id=op.correlation_id)
        return outcome


def _mismatch(kind: MessageKind, routing_key: str, from_body: str) -> bool:
    """A body that says another scope or signal than its routing key: whoever was allowed
    to publish under that key did not send this. Dropped and counted."""
    if routing_key == from_body:
        return False
    KEY_MISMATCHES.labels(kind).inc()
    log.warning("event dropped: body disagrees with its routing key", routing_key=routing_key, body_key=from_body)
    return True


def timeout_outcome(op: OperationRow, target: str | None = None) -> Outcome:
    target = target or op.target
    role, instance = keys.split_scope(target)
    scope = Scope(swarm_id=op.swarm_id, role=role, instance=instance)
    return Outcome(correlation_id=op.correlation_id, idempotency_key=op.idempotency_key, signal=op.signal,
                   scope=scope, result="error", state=OutcomeState(), phase="gateway", code="timeout",
                   message=f"no outcome for {op.signal} on {target} within {op.timeout_ms} ms", retryable=True)
