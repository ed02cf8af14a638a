"""Publishing an operation's signals: right after its commit, or later from the outbox.

An operation's signal bodies are committed with it, so what a request could not publish
(the broker was away, the gateway died between commit and publish) can be published later
from the store: by a retry of the same request, by the sweeper for an operation a
duplicate was already answered with, and at start-up for everything left unpublished.
One publish per operation is in flight at a time; duplicates wait for it. Signals expire
at the operation's deadline, so the broker drops a command whose caller was told
``timeout`` instead of delivering it late.
"""

from __future__ import annotations

import asyncio
from typing import Any

from controlplane.contract.models import Outcome, Signal, utcnow
from controlplane.gateway import metrics
from controlplane.gateway.context import GatewayContext
from controlplane.gateway.ledger import Tracked
from controlplane.logs import get_logger
from controlplane.store import OperationRow
from controlplane.store.writer import detach

log = get_logger("gateway.dispatch")


async def dispatch(ctx: GatewayContext, tracked: Tracked) -> bool:
    """Publish ``tracked``'s signals unless done already; False when the broker took none."""
    if tracked.published:
        return True
    if tracked.dispatching is None or tracked.dispatching.done():
        tracked.dispatching = asyncio.ensure_future(_publish(ctx, tracked))
    return await asyncio.shield(tracked.dispatching)


async def _publish(ctx: GatewayContext, tracked: Tracked) -> bool:
    op = tracked.op
    remaining_s = (op.deadline - utcnow()).total_seconds()
    if remaining_s <= 0:
        return False  # the sweeper times it out on its watched topic
    signals = [Signal.model_validate(body) for body in op.signals or ()]
    results = await asyncio.gather(*(ctx.bus.publish(s.routing_key(), s, expiration=remaining_s) for s in signals),
                                   return_exceptions=True)
    failed = [(s, r) for s, r in zip(signals, results) if isinstance(r, BaseException)]
    if signals and len(failed) == len(signals):
        log.error("signal publish failed", signal=op.signal, error=repr(failed[0][1]),
                  correlation_id=op.correlation_id)
        return False
    ctx.ledger.mark_published(tracked)
    detach(ctx.store.mark_published([op.correlation_id]), "mark published")
    for sig, exc in failed:  # part of a fan-out went out: the rest is answered as failed, not retried
        outcome = Outcome.for_signal(sig, result="error", phase="gateway", code="broker-unavailable",
                                     message=f"the broker did not accept the signal: {exc}", retryable=True)
        close_target(ctx, op.correlation_id, sig.signal, sig.scope, "failed", outcome.to_dict())
    metrics.SIGNALS_PUBLISHED.labels(op.signal).inc(len(signals) - len(failed))
    log.info("signal published", signal=op.signal, scope=op.target, correlation_id=op.correlation_id,
             idempotency_key=op.idempotency_key, targets=len(signals))
    return True


def close_target(ctx: GatewayContext, correlation_id: str, signal: str, target: str, status: str,
                 outcome: dict[str, Any]) -> None:
    """Close in memory at once; the store follows in the writer's next batch."""
    recorded = ctx.ledger.close(correlation_id, signal, target, status, outcome)
    if not recorded.moved:
        return  # matches no open operation here: nothing to write
    detach(ctx.store.record_outcome(correlation_id, signal, target, status, outcome), "record outcome")
    if recorded.closed is not None:
        count_finished(recorded.closed)


def count_finished(op: OperationRow) -> None:
    metrics.OPERATIONS_FINISHED.labels(op.signal, op.status).inc()
    metrics.OPERATION_SECONDS.labels(op.signal).observe((utcnow() - op.created_at).total_seconds())


async def republish_pending(ctx: GatewayContext) -> int:
    """The outbox: publish what was committed but never published (and may still be in time)."""
    pending = [t for t in ctx.ledger.unpublished() if t.op.deadline > utcnow()
               and (t.dispatching is None or t.dispatching.done())]
    sent = 0
    for tracked in pending:
        if await dispatch(ctx, tracked):
            sent += 1
    if sent:
        log.info("outbox published pending operations", count=sent)
    return sent
