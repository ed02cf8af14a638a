"""Publishing an operation's signals: right after its commit, or later from the outbox.

An operation's signal bodies are committed with it, so the caller's 202 waits for that
commit and not for the broker's confirm of the publish (a persistent message is confirmed
once it is on the broker's disk, which costs milliseconds). A signal not confirmed stays
unpublished in the store, and the outbox sends it again: from the sweeper while the
gateway runs, and at start-up for what a crashed gateway left behind. One publish per
operation is in flight at a time; duplicates share it. Signals expire at the operation's
deadline, so the broker drops a command whose caller was told ``timeout`` instead of
delivering it late.
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


def start_dispatch(ctx: GatewayContext, tracked: Tracked) -> asyncio.Future[bool]:
    """Publish ``tracked``'s signals unless done or under way; the future says whether the
    broker confirmed any."""
    if tracked.published:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        done.set_result(True)
        return done
    if tracked.dispatching is None or tracked.dispatching.done():
        tracked.dispatching = asyncio.ensure_future(_publish(ctx, tracked))
    return tracked.dispatching


async def dispatch(ctx: GatewayContext, tracked: Tracked) -> bool:
    """``start_dispatch`` and wait for the broker's confirm."""
    return await asyncio.shield(start_dispatch(ctx, tracked))


async def _publish(ctx: GatewayContext, tracked: Tracked) -> bool:
    op = tracked.op
    remaining_s = (op.deadline - utcnow()).total_seconds()
    if remaining_s <= 0:
        return False  # the sweeper times it out on its watched topic
    # Built by the request that committed it; read back from the store by the outbox.
    signals = tracked.signals or [Signal.model_validate(body) for body in op.signals or ()]
    results = await asyncio.gather(*(ctx.bus.publish(s.routing_key(), s, expiration=remaining_s) for s in signals),
                                   return_exceptions=True)
    failed = [(s, r) for s, r in zip(signals, results) if isinstance(r, BaseException)]
    if signals and len(failed) == len(signals):
        log.error("signal publish failed", signal=op.signal, error=repr(failed[0][1]),
                  correlation_id=op.correlation_id)
        return False
    ctx.ledger.mark_published(tracked)
    detach(ctx.store.mark_published(op.correlation_id), "mark published")
    for sig, exc in failed:  # part of a fan-out went out: the rest is answered as failed, not retried
        outcome = Outcome.for_signal(sig, result="error", phase="gateway", code="broker-unavailable",
                                     message=f"the broker did not accept the signal: {exc}", retryable=True)
        close_target(ctx, op.correlation_id, sig.signal, sig.scope, "failed", outcome.to_dict())
    metrics.SIGNALS_PUBLISHED.labels(op.signal).inc(len(signals) - len(failed))
    log.info("signal published", signal=op.signal, scope=op.target, correlation_id=op.correlation_id,
             idempotency_key=op.idempotency_key, targets=len(signals))
    return True


def close_target(ctx: GatewayContext, correlation_id: str, signal: str, target: str, status: str,
                 outcome: dict[str, Any]) -> asyncio.Future[None] | None:
    """Close in memory at once; the store follows in the writer's next batch, whose commit
    the returned future is (None when this matched no open operation: nothing to write)."""
    tracked = ctx.ledger.get(correlation_id)
    recorded = ctx.ledger.close(correlation_id, signal, target, status, outcome)
    if not recorded.moved or tracked is None:
        return None
    releases = recorded.closed is not None and recorded.closed.resource is not None
    written = ctx.store.close_later(correlation_id, signal, target, status, outcome, fan_out=bool(tracked.targets),
                                    releases=releases)
    if recorded.closed is not None:
        count_finished(recorded.closed)
    return written


def count_finished(op: OperationRow) -> None:
    metrics.OPERATIONS_FINISHED.labels(op.signal, op.status).inc()
    metrics.OPERATION_SECONDS.labels(op.signal).observe((utcnow() - op.created_at).total_seconds())


async def settle_dispatches(ctx: GatewayContext, timeout_s: float = 5.0) -> None:
    """On shutdown: let the publishes under way get their confirms, so the next gateway's
    outbox does not send again what already went out (bounded: the outbox covers the rest)."""
    pending = [t.dispatching for t in ctx.ledger.unpublished() if t.dispatching is not None and not t.dispatching.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout_s)


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
