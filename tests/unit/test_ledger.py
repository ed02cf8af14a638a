"""The gateway's in-memory ledger: replays, holders, closing rules and waiting (pure logic)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from controlplane.gateway.ledger import Ledger, Record, wait_closed
from controlplane.store import OperationRow, TargetRow

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


def op(cid: str = "c1", target: str = "generator.g1", signal: str = "config-update",
       resource: str | None = None, key: str = "k1", status: str = "accepted") -> OperationRow:
    return OperationRow(correlation_id=cid, idempotency_key=key, action=signal, target=target, signal=signal,
                        swarm_id="s1", lifecycle=resource is not None, status=status, envelope={"correlationId": cid},
                        timeout_ms=1000, deadline=T0 + timedelta(seconds=1), created_at=T0, updated_at=T0,
                        resource=resource)


def record(cid: str = "c1", request_hash: str = "h1", expires: datetime = T0 + timedelta(hours=1)) -> Record:
    return Record({"correlationId": cid}, cid, request_hash, expires)


def test_find_replays_same_and_other_body_until_expiry() -> None:
    ledger = Ledger()
    ledger.add(op(), record())
    same = ledger.find("config-update", "generator.g1", "k1", "h1", now=T0)
    other = ledger.find("config-update", "generator.g1", "k1", "h2", now=T0)
    assert same is not None and same.same_request and same.correlation_id == "c1"
    assert other is not None and not other.same_request
    assert ledger.find("config-update", "generator.g2", "k1", "h1", now=T0) is None  # another target
    assert ledger.find("config-update", "generator.g1", "k1", "h1", now=T0 + timedelta(hours=2)) is None
    assert ledger.purge(T0 + timedelta(hours=2)) == 1


def test_single_operation_closes_only_with_its_signal_and_target() -> None:
    ledger = Ledger()
    tracked = ledger.add(op(resource="swarm:s1"), record())
    assert ledger.holder("swarm:s1") is tracked
    assert not ledger.close("c1", "swarm-start", "generator.g1", "succeeded", {}).moved
    assert not ledger.close("c1", "config-update", "generator.other", "succeeded", {}).moved
    recorded = ledger.close("c1", "config-update", "generator.g1", "failed", {"code": "x"})
    assert recorded.moved and recorded.closed is not None and recorded.closed.status == "failed"
    assert tracked.closed.is_set() and ledger.holder("swarm:s1") is None
    assert not ledger.close("c1", "config-update", "generator.g1", "succeeded", {}).moved  # a late outcome
    assert ledger.get("c1") is tracked and tracked.op.outcome == {"code": "x"}


def test_fan_out_closes_with_its_last_target() -> None:
    ledger = Ledger()
    ledger.add(op(target="controllers"), record(), targets=("swarm-controller.a", "swarm-controller.b",
                                                            "swarm-controller.c"))
    assert ledger.close("c1", "config-update", "swarm-controller.a", "succeeded", {}).closed is None
    # The fan-out's own target is not one of its targets: nothing moves.
    assert not ledger.close("c1", "config-update", "controllers", "succeeded", {}).moved
    assert ledger.close("c1", "config-update", "swarm-controller.b", "timed_out", {}).closed is None
    closed = ledger.close("c1", "config-update", "swarm-controller.c", "succeeded", {}).closed
    assert closed is not None and closed.status == "timed_out"
    assert closed.outcome == {"targets": {"succeeded": 2, "failed": 0, "timed_out": 1}}


def test_loaded_state_keeps_published_flag_and_holders() -> None:
    ledger = Ledger()
    dispatched = op(cid="c2", status="dispatched", resource="swarm:s2", key="k2")
    target = TargetRow(target="generator.g1", status="dispatched", outcome=None, updated_at=T0)
    ledger.load([{"action": "config-update", "target": "generator.g1", "idempotency_key": "k1",
                  "correlation_id": "c1", "request_hash": "h1", "envelope": {}, "expires_at": T0 + timedelta(hours=1)}],
                [op(), dispatched], {"c1": [target]})
    assert [t.correlation_id for t in ledger.unpublished()] == ["c1"]
    assert ledger.holder("swarm:s2") is ledger.get("c2")
    assert ledger.find("config-update", "generator.g1", "k1", "h1", now=T0) is not None
    assert [t.correlation_id for t in ledger.due(T0 + timedelta(seconds=2))] == ["c1", "c2"]


async def test_wait_closed_wakes_on_close_and_gives_up_after_its_bound() -> None:
    ledger = Ledger()
    tracked = ledger.add(op(), record())
    assert not await wait_closed(tracked, 0.01)
    waiter = asyncio.ensure_future(wait_closed(tracked, 10))
    await asyncio.sleep(0)
    ledger.close("c1", "config-update", "generator.g1", "succeeded", {})
    assert await asyncio.wait_for(waiter, 1)
