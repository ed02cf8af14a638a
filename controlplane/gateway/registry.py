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
import dataclasses
from datetime import datetime, timedelta
from typing import Any

from controlplane.contract import keys
from controlplane.contract.redact import redact
from controlplane.contract.models import Status, SwarmStatus, utcnow
from controlplane.gateway import metrics
from controlplane.gateway.readmodels import Swarms
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
        "data": redact(row.data),
        "version": row.version,
        "firstSeen": row.first_seen.isoformat(),
        "lastSeen": row.last_seen.isoformat() if row.last_seen else None,
    }


class Registry:
    """Components in memory, answered from memory; the store gets a batch per flush."""

    def __init__(self, store: Store, swarms: Swarms) -> None:
        self.store = store
        self.swarms = swarms
        self._rows: dict[tuple[str, str], ComponentRow] = {}
        self._members: dict[str | None, set[tuple[str, str]]] = {}  # swarm id → its components
        self._batch = RegistryBatch()
        self._flusher: asyncio.Task[None] | None = None

    async def load(self) -> None:
        for row in await self.store.list_components():
            self._put(row)

    def _put(self, row: ComponentRow) -> None:
        key = (row.role, row.instance)
        previous = self._rows.get(key)
        if previous is not None and previous.swarm_id != row.swarm_id:
            self._members.get(previous.swarm_id, set()).discard(key)
        self._rows[key] = row
        self._members.setdefault(row.swarm_id, set()).add(key)

    def _drop(self, key: tuple[str, str]) -> None:
        row = self._rows.pop(key, None)
        if row is not None:
            members = self._members.get(row.swarm_id)
            if members is not None:
                members.discard(key)
                if not members:
                    del self._members[row.swarm_id]

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

    # --- reads ------------------------------------------------------------------------------

    def get(self, role: str, instance: str) -> ComponentRow | None:
        return self._rows.get((role, instance))

    def list(self, swarm_id: str | None = None, role: str | None = None) -> list[ComponentRow]:
        if swarm_id is not None:
            candidates = [self._rows[k] for k in self._members.get(swarm_id, ())]
        else:
            candidates = list(self._rows.values())
        rows = [r for r in candidates if role is None or r.role == role]
        return sorted(rows, key=lambda r: (r.swarm_id or "", r.role, r.instance))

    # --- changes ------------------------------------------------------------------------------

    def observe(self, status: Status) -> None:
        """Take one status event: memory at once, the store at the next flush.

        The rules are the store's (``save_registry``): reports from swarms not known are
        dropped, so a late status cannot bring back a removed swarm; a settled controller's
        bee list is the truth about membership.
        """
        metrics.STATUS_EVENTS.labels(metrics.role_label(status.role), status.kind).inc()
        if not status.swarm_id or self.swarms.get(status.swarm_id) is None:
            return
        now = utcnow()
        report = StatusReport(
            role=status.role, instance=status.instance, swarm_id=status.swarm_id, enabled=status.enabled,
            state=status.state, totals=status.totals, queue_stats=status.queue_stats,
            data=_own_data(status), version=status.version, seen_at=now)
        self._batch.reports[(status.role, status.instance)] = report
        previous = self._rows.get((status.role, status.instance))
        self._put(ComponentRow(
            role=report.role, instance=report.instance, swarm_id=report.swarm_id, enabled=report.enabled,
            state=report.state, container_state=previous.container_state if previous else None,
            totals=report.totals, queue_stats=report.queue_stats, data=report.data, version=report.version,
            first_seen=previous.first_seen if previous else now, last_seen=now))
        if status.role == keys.CONTROLLER_ROLE:
            bees = status.data.get("bees")
            view = ControllerView(role=status.role, instance=status.instance, swarm_id=status.swarm_id, seen_at=now,
                                  enabled=status.enabled, bees=bees if isinstance(bees, list) else [],
                                  settled=status.state != SwarmStatus.CREATING)
            self._batch.controllers[status.swarm_id] = view
            self._apply_controller_view(view)

    def _apply_controller_view(self, view: ControllerView) -> None:
        self.swarms.update(view.swarm_id, persist=False, bees=view.bees, last_heartbeat=view.seen_at,
                           enabled=view.enabled, updated_at=view.seen_at)
        listed = [b for b in view.bees if b.get("role") and b.get("instance")]
        for bee in listed:
            key = (bee["role"], bee["instance"])
            row = self._rows.get(key)
            if row is None:
                self._put(ComponentRow(
                    role=bee["role"], instance=bee["instance"], swarm_id=view.swarm_id,
                    enabled=bool(bee.get("enabled")), state="unknown", container_state=bee.get("state"),
                    totals={}, queue_stats={}, data={}, version=None, first_seen=view.seen_at, last_seen=None))
            elif row.container_state != bee.get("state"):
                self._put(dataclasses.replace(row, container_state=bee.get("state")))
        if view.settled:
            keep = {b["instance"] for b in listed}
            for key in list(self._members.get(view.swarm_id, ())):
                row = self._rows[key]
                if (row.instance not in keep and key != (view.role, view.instance)
                        and (row.last_seen is None or row.last_seen < view.seen_at)):
                    self._drop(key)

    def forget_swarm(self, swarm_id: str) -> None:
        """A removed swarm's components leave with it (the store deletes them with the swarm)."""
        for key in list(self._members.get(swarm_id, ())):
            self._drop(key)
        self._batch.reports = {k: r for k, r in self._batch.reports.items() if r.swarm_id != swarm_id}
        self._batch.controllers.pop(swarm_id, None)

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


# A controller's lists kept by read models of their own: its bees on its swarm, a pool's engines
# by the engine-pool surface. The rest of its data stays here.
_KEPT_ELSEWHERE = frozenset({"bees", "pool"})


def _own_data(status: Status) -> dict[str, Any]:
    if status.role != keys.CONTROLLER_ROLE:
        return status.data
    return {k: v for k, v in status.data.items() if k not in _KEPT_ELSEWHERE}
