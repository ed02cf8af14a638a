"""The gateway's memory of actions: idempotency records, operations and what each holds.

Replays, conflicts and operation reads are answered from here, so the hot path touches
memory and the broker. The store holds the same facts durably (it is loaded from at
start and written through the one writer); where several gateways race, the database's
unique constraints decide and the loser reads back what won.

Closing follows the store's rules: an operation closes with its own signal's outcome on
its own target; a fan-out closes with its last open target — failed if any failed, else
timed_out if any timed out, else succeeded. Waiting for a close (``Prefer: wait``, a
conflict settling) is an event, not polling.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from controlplane.store import OPEN_STATUSES, OperationRow, Recorded, Replayed, TargetRow
from controlplane.store.models import OperationStatus, utcnow
from controlplane.store.repo import fan_out_status, fan_out_summary

RECENT_CAPACITY = 10_000  # closed operations kept for reads and waits


@dataclass(frozen=True)
class Record:
    """An idempotency record: what a key was first used for, and the answer it got."""

    envelope: dict[str, Any]
    correlation_id: str
    request_hash: str
    expires_at: datetime

    def replay(self, request_hash: str) -> Replayed:
        return Replayed(envelope=self.envelope, correlation_id=self.correlation_id,
                        same_request=self.request_hash == request_hash)


@dataclass(eq=False)
class Tracked:
    """One operation as the gateway follows it."""

    op: OperationRow
    targets: dict[str, TargetRow] = field(default_factory=dict)  # a fan-out's targets
    counts: Counter[str] = field(default_factory=Counter)  # its targets by status, kept as they close
    published: bool = False  # the broker confirmed its signals
    dispatching: asyncio.Future[bool] | None = None  # the publish in flight, shared by duplicates
    signals: list[Any] | None = None  # the Signal models built for its first publish (else: op.signals)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def correlation_id(self) -> str:
        return self.op.correlation_id


class Ledger:
    def __init__(self, recent_capacity: int = RECENT_CAPACITY) -> None:
        self._records: dict[tuple[str, str, str], Record] = {}
        self._open: dict[str, Tracked] = {}
        self._recent: OrderedDict[str, Tracked] = OrderedDict()
        self._holders: dict[str, Tracked] = {}
        self._recent_capacity = recent_capacity

    # --- loading and adding -----------------------------------------------------------------

    def load(self, records: Iterable[dict[str, Any]], open_ops: Iterable[OperationRow],
             targets: dict[str, list[TargetRow]]) -> None:
        """Take what the store holds at start: live records, open operations with their targets."""
        for r in records:
            self._records[(r["action"], r["target"], r["idempotency_key"])] = Record(
                r["envelope"], r["correlation_id"], r["request_hash"], r["expires_at"])
        for op in open_ops:
            rows = targets.get(op.correlation_id, [])
            tracked = Tracked(op, {t.target: t for t in rows}, Counter(t.status for t in rows),
                              published=op.status == OperationStatus.DISPATCHED)
            self._open[op.correlation_id] = tracked
            if op.resource:
                self._holders[op.resource] = tracked

    def add(self, op: OperationRow, record: Record, targets: Iterable[str] = ()) -> Tracked:
        """An operation the store has just committed, with the record its key now maps to."""
        self._records[(op.action, op.target, op.idempotency_key)] = record
        rows = {t: TargetRow(target=t, status=OperationStatus.DISPATCHED, outcome=None, updated_at=op.created_at)
                for t in targets}
        tracked = Tracked(op, rows, Counter({OperationStatus.DISPATCHED.value: len(rows)}) if rows else Counter())
        self._open[op.correlation_id] = tracked
        if op.resource:
            self._holders[op.resource] = tracked
        return tracked

    def remember(self, action: str, target: str, key: str, record: Record) -> None:
        """A record learnt from the store (another gateway wrote it)."""
        self._records[(action, target, key)] = record

    # --- reads --------------------------------------------------------------------------------

    def find(self, action: str, target: str, key: str, request_hash: str,
             now: datetime | None = None) -> Replayed | None:
        record = self._records.get((action, target, key))
        if record is None or record.expires_at < (now or utcnow()):
            return None
        return record.replay(request_hash)

    def get(self, correlation_id: str) -> Tracked | None:
        return self._open.get(correlation_id) or self._recent.get(correlation_id)

    def holder(self, resource: str | None) -> Tracked | None:
        return self._holders.get(resource) if resource else None

    def open_operations(self) -> list[Tracked]:
        return list(self._open.values())

    def unpublished(self) -> list[Tracked]:
        return [t for t in self._open.values() if not t.published]

    def due(self, now: datetime) -> list[Tracked]:
        """Open operations whose deadline has passed, oldest deadline first."""
        return sorted((t for t in self._open.values() if t.op.deadline <= now), key=lambda t: t.op.deadline)

    # --- changes ------------------------------------------------------------------------------

    def mark_published(self, tracked: Tracked) -> None:
        tracked.published = True
        if tracked.op.status == OperationStatus.ACCEPTED:
            tracked.op = dataclasses.replace(tracked.op, status=OperationStatus.DISPATCHED.value)

    def close(self, correlation_id: str, signal: str, target: str, status: str, outcome: dict[str, Any],
              now: datetime | None = None) -> Recorded:
        """Close what ``signal`` on ``target`` answers (the operation, or one target of a fan-out)."""
        tracked = self._open.get(correlation_id)
        if tracked is None or tracked.op.signal != signal:
            return Recorded(moved=False)
        now = now or utcnow()
        if tracked.targets:
            current = tracked.targets.get(target)
            if current is None or current.status not in OPEN_STATUSES:
                return Recorded(moved=False)
            tracked.targets[target] = TargetRow(target=target, status=status, outcome=outcome, updated_at=now)
            counts = tracked.counts
            counts[current.status] -= 1
            counts[status] += 1
            if any(counts.get(s, 0) for s in OPEN_STATUSES):
                return Recorded(moved=True)
            return Recorded(True, self._finish(tracked, fan_out_status(counts).value,
                                               {"targets": fan_out_summary(counts)}, now))
        if tracked.op.target != target:
            return Recorded(moved=False)
        return Recorded(True, self._finish(tracked, status, outcome, now))

    def finish(self, tracked: Tracked, status: str, outcome: dict[str, Any] | None) -> OperationRow:
        """Close an operation as a whole (an empty fan-out, or what the store says another gateway did)."""
        return self._finish(tracked, status, outcome, utcnow())

    def purge(self, now: datetime) -> int:
        """Forget records past their retention."""
        expired = [k for k, r in self._records.items() if r.expires_at < now]
        for k in expired:
            del self._records[k]
        return len(expired)

    def _finish(self, tracked: Tracked, status: str, outcome: dict[str, Any] | None, now: datetime) -> OperationRow:
        tracked.op = dataclasses.replace(tracked.op, status=status, outcome=outcome, updated_at=now)
        self._open.pop(tracked.correlation_id, None)
        resource = tracked.op.resource
        if resource and self._holders.get(resource) is tracked:
            del self._holders[resource]
        self._recent[tracked.correlation_id] = tracked
        while len(self._recent) > self._recent_capacity:
            self._recent.popitem(last=False)
        tracked.closed.set()
        return tracked.op


async def wait_closed(tracked: Tracked, timeout_s: float) -> bool:
    """True once ``tracked`` is closed, False if ``timeout_s`` passes first."""
    if tracked.closed.is_set():
        return True
    try:
        async with asyncio.timeout(max(timeout_s, 0)):
            await tracked.closed.wait()
    except TimeoutError:
        return False
    return True
