"""The swarms read model, in memory, with the store as its durable copy.

Reads never touch the database. Every change is applied here at once and handed to the
store's writer without waiting: a restart reloads what was committed, and the events that
follow bring it up to date. A swarm another gateway created is not in this memory until its
events arrive, so a miss asks the store once (``find``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from controlplane.store import Store, SwarmRow
from controlplane.store.models import utcnow
from controlplane.store.writer import detach


class Swarms:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._rows: dict[str, SwarmRow] = {}

    async def load(self) -> None:
        self._rows = {row.id: row for row in await self._store.list_swarms()}

    def get(self, swarm_id: str) -> SwarmRow | None:
        return self._rows.get(swarm_id)

    async def find(self, swarm_id: str) -> SwarmRow | None:
        """The swarm from memory, else from the store (created through another gateway)."""
        row = self._rows.get(swarm_id)
        if row is None:
            row = await self._store.get_swarm(swarm_id)
            if row is not None:
                self._rows.setdefault(swarm_id, row)
        return row

    def size(self) -> int:
        """Swarms in memory, whatever their status."""
        return len(self._rows)

    def all(self) -> list[SwarmRow]:
        return [self._rows[k] for k in sorted(self._rows)]

    def put(self, row: SwarmRow) -> None:
        """A row the store already holds (its begin committed it)."""
        self._rows[row.id] = row

    def update(self, swarm_id: str, persist: bool = True, **fields: Any) -> SwarmRow | None:
        """Change some fields; None if the swarm is unknown. ``persist=False`` when the caller
        writes the same change to the store itself."""
        row = self._rows.get(swarm_id)
        if row is None:
            return None
        fields.setdefault("updated_at", utcnow())
        row = self._rows[swarm_id] = dataclasses.replace(row, **fields)
        if persist:
            # A status decides what a later create may replace: it must not wait behind it.
            detach(self._store.save_swarm(row, at_once="status" in fields), "save swarm")
        return row

    def delete(self, swarm_id: str) -> None:
        self._rows.pop(swarm_id, None)
        detach(self._store.delete_swarm(swarm_id), "delete swarm")
