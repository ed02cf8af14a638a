"""The gateway's registry of controllers and bees, built from their status events.

Every component reports ``ev.status-full`` on start and when asked, and ``ev.status-delta``
every status interval; a swarm-controller's status also lists its bees' containers as Docker
sees them. The registry keeps the latest of each in memory and saves them in one
transaction every ``FLUSH_INTERVAL_S``, so a thousand components cost a few writes a second,
not a thousand. Health is derived when read: a component that goes silent turns ``stale``
after ``STALE_AFTER`` missed intervals and ``failed`` after ``FAILED_AFTER``; a container its
controller sees exited or missing is ``failed`` at once.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

from controlplane.contract import keys
from controlplane.contract.models import Status, SwarmStatus, utcnow
from controlplane.gateway import metrics
from controlplane.logs import get_logger
from controlplane.store import ComponentRow, ControllerView, RegistryBatch, StatusReport, Store

log = get_logger("gateway.registry")

FLUSH_INTERVAL_S = 0.25
# Health from the age of the last status, in status intervals.
STALE_AFTER, FAILED_AFTER = 3, 6
DEAD_CONTAINER_STATES = frozenset({"exited", "dead", "missing"})
HEALTH_RANK = {"healthy": 0, "unknown": 1, "stale": 2, "failed": 3}


def health(last_seen: datetime | None, interval_s: float, container_state: str | None = None,
           now: datetime | None = None) -> str:
    """``healthy``, ``stale``, ``failed`` or ``unknown`` (never heard from)."""
    if container_state in DEAD_CONTAINER_STATES:
        return "failed"
    if last_seen is None:
        return "unknown"
    age = (now or utcnow()) - last_seen
    if age > timedelta(seconds=FAILED_AFTER * interval_s):
        return "failed"
    if age > timedelta(seconds=STALE_AFTER * interval_s):
        return "stale"
    return "healthy"


def worst(*healths: str) -> str:
    return max(healths, key=HEALTH_RANK.__getitem__, default="unknown")


def component_view(row: ComponentRow, interval_s: float, now: datetime | None = None) -> dict[str, Any]:
    """A registry entry as ``GET /api/components`` shows it."""
    return {
        "role": row.role,
        "instance": row.instance,
        "swarmId": row.swarm_id,
        "kind": "controller" if row.role == keys.CONTROLLER_ROLE else "bee",
        "health": health(row.last_seen, interval_s, row.container_state, now),
        "enabled": row.enabled,
        "state": row.state,
        "containerState": row.container_state,
        "totals": row.totals,
        "queueStats": row.queue_stats,
        "data": row.data,
        "version": row.version,
        "firstSeen": row.first_seen.isoformat(),
        "lastSeen": row.last_seen.isoformat() if row.last_seen else None,
    }


class Registry:
    """Buffers status events and saves them in batches; reads go straight to the store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._batch = RegistryBatch()
        self._flusher: asyncio.Task[None] | None = None

    def start(self) -> Registry:
        self._flusher = asyncio.create_task(self._flush_forever(), name="registry-flush")
        return self

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        try:
            await self.flush()
        except Exception as exc:  # shutting down: the next status interval refills the registry
            log.warning("last registry flush failed", error=repr(exc))

    def observe(self, status: Status) -> None:
        """Take one status event; only the latest per component is kept until the next flush."""
        metrics.STATUS_EVENTS.labels(status.role, status.kind).inc()
        if not status.swarm_id:
            return
        now = utcnow()
        self._batch.reports[(status.role, status.instance)] = StatusReport(
            role=status.role, instance=status.instance, swarm_id=status.swarm_id, enabled=status.enabled,
            state=status.state, totals=status.totals, queue_stats=status.queue_stats,
            data=_without_bees(status), version=status.version, seen_at=now)
        if status.role == keys.CONTROLLER_ROLE:
            bees = status.data.get("bees")
            self._batch.controllers[status.swarm_id] = ControllerView(
                role=status.role, instance=status.instance, swarm_id=status.swarm_id, seen_at=now,
                enabled=status.enabled, bees=bees if isinstance(bees, list) else [],
                settled=status.state != SwarmStatus.CREATING)

    async def flush(self) -> None:
        batch, self._batch = self._batch, RegistryBatch()
        if batch:
            with metrics.REGISTRY_FLUSH_SECONDS.time():
                await self.store.save_registry(batch)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:  # the store may be briefly away; the next batch carries newer news
                log.exception("registry flush failed")


def _without_bees(status: Status) -> dict[str, Any]:
    """A controller's bee list is kept once, on its swarm; the rest of its data stays here."""
    if status.role != keys.CONTROLLER_ROLE:
        return status.data
    return {k: v for k, v in status.data.items() if k != "bees"}
