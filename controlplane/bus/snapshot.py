"""A component's latest state, kept by the broker so a restarted process picks it up again.

Each controller and bee has a last-value queue (``ph.control.state.<role>.<instance>``:
durable, one message, the newest pushing the oldest out). The component publishes a
snapshot there on every change, through the default exchange, and reads it back when it
starts: ``basic.get``, then reject with requeue so the snapshot stays for the next restart.
The queue goes with the component's other queues when the component is torn down.

The broker is the store here because it already holds everything else a component needs
to resume, and a bee has no other durable place: its container may be replaced, not only
restarted. A snapshot carries a fingerprint of what the component was started with
(``base``): a component started from a new spec ignores the state of its predecessor.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from pydantic import Field, ValidationError

from controlplane.bus import Bus
from controlplane.contract.models import Wire, utcnow
from controlplane.contract.topology import QueueDecl
from controlplane.logs import get_logger

log = get_logger("snapshot")


class Snapshot(Wire):
    enabled: bool | None = None
    config: dict[str, Any] | None = None
    status: str | None = None
    data: dict[str, Any] | None = None  # what else the component remembers (a pool: its streams)
    base: str | None = None  # fingerprint of what the component was started with
    ts: datetime = Field(default_factory=utcnow)


def fingerprint(*parts: Any) -> str:
    """A stable digest of a component's starting point (its env config, its plan)."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


async def save(bus: Bus, decl: QueueDecl, snapshot: Snapshot) -> None:
    """Replace the stored snapshot (the queue keeps only the newest message)."""
    route = decl.bindings[0]  # the state queue's own key: see the topology's state_queue
    await bus.publish(route.key, snapshot, exchange=route.exchange)


async def load(bus: Bus, decl: QueueDecl, base: str | None = None) -> Snapshot | None:
    """The stored snapshot, left in place; None when there is none, it is unreadable or it
    belongs to another starting point than ``base``."""
    await bus.declare_queue(decl)
    channel = await bus.connection.channel()
    try:
        queue = await channel.get_queue(decl.name, ensure=False)
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            return None
        try:
            snapshot = Snapshot.model_validate_json(message.body)
        except ValidationError as exc:
            log.warning("unreadable snapshot discarded", queue=decl.name, error=str(exc))
            await message.ack()
            return None
        await message.reject(requeue=True)
    finally:
        if not channel.is_closed:
            await channel.close()
    if base is not None and snapshot.base != base:
        log.info("snapshot of another starting point ignored", queue=decl.name)
        return None
    return snapshot


class LatestSaver:
    """Saves the newest state, never more than one save at a time.

    Changes that come while a save is out share the one save after it, which reads the
    state when it starts: a burst of N changes costs two publishes, not N, and every
    change is covered by a save that began after it.
    """

    def __init__(self, save: Callable[[], Awaitable[None]]) -> None:
        self._save = save
        self._next: asyncio.Future[None] | None = None  # resolved by the save that covers what came since
        self._running: asyncio.Task[None] | None = None

    def request(self) -> asyncio.Future[None]:
        """A future resolved once a save that started after this call has finished."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        if self._running is None:
            self._running = asyncio.ensure_future(self._run())
        return self._next

    async def _run(self) -> None:
        try:
            while self._next is not None:
                covered, self._next = self._next, None
                try:
                    await self._save()
                except Exception as exc:  # the change itself stands; the next one saves again
                    log.warning("state not saved", error=repr(exc))
                finally:
                    if not covered.done():
                        covered.set_result(None)
        finally:
            self._running = None
