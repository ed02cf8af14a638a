"""The store: every read and write of idempotency records, operations and swarms.

``begin_action`` is the heart of it. Accepting a request means, atomically: remember the
idempotency key, open the operation and (for a create) claim the swarm id. The database's
unique constraints are the final word, so two gateways racing on the same key or the same
swarm cannot both win; the loser reads back what beat it.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from controlplane.store.engine import READ_ONLY, make_engine
from controlplane.store.migrate import upgrade
from controlplane.store.models import (
    FINAL_STATUSES,
    OPEN_STATUSES,
    REPLACEABLE_SWARM_STATUSES,
    BeginResult,
    Busy,
    ComponentRow,
    NewAction,
    OperationRow,
    OperationStatus,
    Recorded,
    RegistryBatch,
    Replayed,
    Started,
    SwarmExists,
    SwarmRow,
    TargetRow,
    utcnow,
)
from controlplane.store.schema import components, idempotency, operation_targets, operations, swarms

# A conflict whose winner then rolled back leaves nothing to report; try again this often.
BEGIN_ATTEMPTS = 3

_SWARM_UPDATABLE = frozenset(f.name for f in dataclasses.fields(SwarmRow)) - {"id"}


async def open_store(url: str) -> Store:
    """Connect to ``url`` and migrate its schema to head; safe to call from several processes."""
    engine = make_engine(url)
    try:
        await upgrade(engine)
    except BaseException:
        await engine.dispose()
        raise
    return Store(engine)


class Store:
    """One database, shared by every task of the process; each method is its own transaction."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._reader = engine.execution_options(**{READ_ONLY: True})

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def close(self) -> None:
        await self._engine.dispose()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    # --- actions and operations ---------------------------------------------------------

    async def begin_action(self, action: NewAction, create_swarm: SwarmRow | None = None) -> BeginResult:
        """Record ``action`` (and claim ``create_swarm``) in one transaction, or say why not."""
        if create_swarm is not None and action.swarm_id != create_swarm.id:
            raise ValueError("create_swarm.id must equal action.swarm_id")
        conflict: IntegrityError | None = None
        for _ in range(BEGIN_ATTEMPTS):
            try:
                async with self._engine.begin() as conn:
                    return await _begin(conn, action, create_swarm)
            except IntegrityError as exc:
                conflict = exc
            # Another transaction won a unique constraint; its rows are committed, read them.
            async with self._reader.begin() as conn:
                found = await _find_conflict(conn, action, create_swarm)
            if found is not None:
                return found
        assert conflict is not None
        raise conflict

    async def forget_action(self, correlation_id: str) -> None:
        """Undo a begin whose signal could not be published, so a retry starts fresh.

        Deletes the operation and its idempotency record, and the swarm row if that begin
        inserted it (otherwise a retried create would meet its own leftover: SwarmExists).
        """
        async with self._engine.begin() as conn:
            await conn.execute(sa.delete(operation_targets).where(operation_targets.c.correlation_id == correlation_id))
            op = (
                await conn.execute(
                    sa.delete(operations)
                    .where(operations.c.correlation_id == correlation_id)
                    .returning(operations.c.swarm_id, operations.c.creates_swarm)
                )
            ).first()
            await conn.execute(sa.delete(idempotency).where(idempotency.c.correlation_id == correlation_id))
            if op is not None and op.creates_swarm and op.swarm_id is not None:
                await conn.execute(sa.delete(swarms).where(swarms.c.id == op.swarm_id))

    async def find_action(
        self, action: str, target: str, idempotency_key: str, request_hash: str, now: datetime | None = None
    ) -> Replayed | None:
        """The replay for a key seen before (and not expired at ``now``), without writing anything.

        Lets a caller answer a retry before running its own preconditions; ``begin_action``
        still has the final word.
        """
        stmt = sa.select(idempotency).where(
            _key(action, target, idempotency_key), idempotency.c.expires_at >= (now or utcnow())
        )
        async with self._reader.begin() as conn:
            record = (await conn.execute(stmt)).first()
        return _replayed(record, request_hash) if record is not None else None

    async def set_operation_status(
        self, correlation_id: str, status: str, outcome: dict[str, Any] | None = None
    ) -> OperationRow | None:
        """Move an open operation on; None when it was already final (or absent, or no move).

        Allowed: accepted → dispatched, and accepted|dispatched → a final status. The check
        and the write are one UPDATE, so a late outcome cannot overwrite a timeout. Outcomes
        go through ``record_outcome``, which also matches signal and target.
        """
        new_status = OperationStatus(status)
        if new_status == OperationStatus.ACCEPTED:
            return None
        from_ = (OperationStatus.ACCEPTED,) if new_status == OperationStatus.DISPATCHED else OPEN_STATUSES
        values: dict[str, Any] = {"status": new_status.value, "updated_at": utcnow()}
        if outcome is not None:
            values["outcome"] = outcome
        stmt = (
            sa.update(operations)
            .where(operations.c.correlation_id == correlation_id, operations.c.status.in_(from_))
            .values(values)
            .returning(*operations.c)
        )
        async with self._engine.begin() as conn:
            row = (await conn.execute(stmt)).first()
        return _operation(row) if row is not None else None

    async def record_outcome(self, correlation_id: str, signal: str, target: str, status: str,
                             outcome: dict[str, Any]) -> Recorded:
        """Close what ``signal`` on ``target`` answers: the operation itself, or one target of a
        fan-out. ``Recorded.moved`` says whether this call closed anything; ``closed`` is the
        operation when this outcome closed it.

        A fan-out closes with its last open target: succeeded when every target succeeded,
        failed when any failed, otherwise timed_out. The operation row is locked first, so
        two gateways closing its last two targets at once cannot both leave it open.
        """
        final = OperationStatus(status)
        if final not in FINAL_STATUSES:
            raise ValueError(f"{status!r} is not a final status")
        async with self._engine.begin() as conn:
            op = (await conn.execute(sa.select(operations).where(operations.c.correlation_id == correlation_id)
                                     .with_for_update())).first()
            now = utcnow()  # after the lock wait, so updatedAt is when the change was made
            if op is None or op.status not in OPEN_STATUSES or op.signal != signal:
                return Recorded(moved=False)
            moved = await conn.execute(
                sa.update(operation_targets)
                .where(operation_targets.c.correlation_id == correlation_id, operation_targets.c.target == target,
                       operation_targets.c.status.in_(OPEN_STATUSES))
                .values(status=final.value, outcome=outcome, updated_at=now))
            if moved.rowcount == 0:
                # Not an open target. The operation's own target closes it, unless it is a
                # fan-out (whose addressed component is one target among others).
                fan_out = (await conn.execute(sa.select(operation_targets.c.target).where(
                    operation_targets.c.correlation_id == correlation_id).limit(1))).first()
                if op.target != target or fan_out is not None:
                    return Recorded(moved=False)
                return Recorded(True, await _close_operation(conn, correlation_id, final.value, outcome, now))
            counts: dict[str, int] = dict((await conn.execute(
                sa.select(operation_targets.c.status, sa.func.count())
                .where(operation_targets.c.correlation_id == correlation_id)
                .group_by(operation_targets.c.status))).all())
            if any(counts.get(s, 0) for s in OPEN_STATUSES):
                return Recorded(moved=True)
            summary = {s.value: counts.get(s.value, 0) for s in OperationStatus if s.value in FINAL_STATUSES}
            overall = (OperationStatus.FAILED if summary["failed"] else
                       OperationStatus.TIMED_OUT if summary["timed_out"] else OperationStatus.SUCCEEDED)
            return Recorded(True, await _close_operation(conn, correlation_id, overall.value, {"targets": summary}, now))

    async def operation_targets(self, correlation_id: str) -> list[TargetRow]:
        """The targets of a fan-out operation (empty for a single-target one)."""
        stmt = (sa.select(operation_targets.c.target, operation_targets.c.status, operation_targets.c.outcome,
                          operation_targets.c.updated_at)
                .where(operation_targets.c.correlation_id == correlation_id)
                .order_by(operation_targets.c.target))
        async with self._reader.begin() as conn:
            return [TargetRow(**row._mapping) for row in await conn.execute(stmt)]

    async def get_operation(self, correlation_id: str) -> OperationRow | None:
        async with self._reader.begin() as conn:
            return await _get_operation(conn, correlation_id)

    async def due_operations(self, now: datetime) -> list[OperationRow]:
        """Open operations whose deadline has passed, oldest deadline first."""
        stmt = (
            sa.select(operations)
            .where(operations.c.status.in_(OPEN_STATUSES), operations.c.deadline <= now)
            .order_by(operations.c.deadline, operations.c.correlation_id)
        )
        return await self._operations(stmt)

    async def open_operations(self) -> list[OperationRow]:
        stmt = (
            sa.select(operations)
            .where(operations.c.status.in_(OPEN_STATUSES))
            .order_by(operations.c.created_at, operations.c.correlation_id)
        )
        return await self._operations(stmt)

    async def open_lifecycle_operation(self, swarm_id: str) -> OperationRow | None:
        """The swarm's open lifecycle operation, if any (the partial unique index allows one)."""
        found = await self._operations(_open_lifecycle(swarm_id))
        return found[0] if found else None

    async def purge_expired(self, now: datetime, finished_before: datetime | None = None) -> int:
        """Delete idempotency records past their retention; returns how many.

        With ``finished_before``, also delete operations that closed before then, so the
        operations table keeps a bounded history; open operations always stay.
        """
        async with self._engine.begin() as conn:
            if finished_before is not None:
                old = sa.select(operations.c.correlation_id).where(
                    operations.c.status.in_(FINAL_STATUSES), operations.c.updated_at < finished_before)
                await conn.execute(sa.delete(operation_targets).where(operation_targets.c.correlation_id.in_(old)))
                await conn.execute(sa.delete(operations).where(operations.c.correlation_id.in_(old)))
            result = await conn.execute(sa.delete(idempotency).where(idempotency.c.expires_at < now))
        return result.rowcount

    async def _operations(self, stmt: sa.Select[Any]) -> list[OperationRow]:
        async with self._reader.begin() as conn:
            return [_operation(row) for row in await conn.execute(stmt)]

    # --- swarms ---------------------------------------------------------------------------

    async def get_swarm(self, swarm_id: str) -> SwarmRow | None:
        async with self._reader.begin() as conn:
            return await _get_swarm(conn, swarm_id)

    async def list_swarms(self) -> list[SwarmRow]:
        async with self._reader.begin() as conn:
            return [_swarm(row) for row in await conn.execute(sa.select(swarms).order_by(swarms.c.id))]

    async def upsert_swarm(self, row: SwarmRow) -> None:
        """Insert or overwrite the swarm; an existing row keeps its original created_at."""
        values = _swarm_values(row)
        stmt = self._upsert(swarms, values, update=[name for name in values if name != "created_at"])
        async with self._engine.begin() as conn:
            await conn.execute(stmt)

    async def update_swarm(self, swarm_id: str, **fields: Any) -> SwarmRow | None:
        """Change some columns; updated_at is set to now unless given. None if no such swarm."""
        unknown = set(fields) - _SWARM_UPDATABLE
        if unknown:
            raise TypeError(f"unknown swarm fields: {', '.join(sorted(unknown))}")
        fields.setdefault("updated_at", utcnow())
        stmt = sa.update(swarms).where(swarms.c.id == swarm_id).values(fields).returning(*swarms.c)
        async with self._engine.begin() as conn:
            row = (await conn.execute(stmt)).first()
        return _swarm(row) if row is not None else None

    async def delete_swarm(self, swarm_id: str) -> None:
        """Forget the swarm and every registry entry of its controller and bees."""
        async with self._engine.begin() as conn:
            await conn.execute(sa.delete(components).where(components.c.swarm_id == swarm_id))
            await conn.execute(sa.delete(swarms).where(swarms.c.id == swarm_id))

    # --- the component registry ----------------------------------------------------------

    async def save_registry(self, batch: RegistryBatch) -> None:
        """Save a batch of status reports and controller views in one transaction.

        Reports from swarms the store does not know (removed, or never created here) are
        dropped, so a late status cannot bring back a removed swarm's components. A
        controller's bee list is the truth about membership: bees it no longer lists, and
        that have not reported since, leave the registry.
        """
        swarm_ids = {r.swarm_id for r in batch.reports.values()} | set(batch.controllers)
        if not swarm_ids:
            return
        upsert = self._upsert
        async with self._engine.begin() as conn:
            known = set((await conn.execute(sa.select(swarms.c.id).where(swarms.c.id.in_(swarm_ids)))).scalars())
            for report in batch.reports.values():
                if report.swarm_id not in known:
                    continue
                values = {"role": report.role, "instance": report.instance, "swarm_id": report.swarm_id,
                          "enabled": report.enabled, "state": report.state, "totals": report.totals,
                          "queue_stats": report.queue_stats, "data": report.data, "version": report.version,
                          "last_seen": report.seen_at}
                await conn.execute(upsert(components, {**values, "first_seen": report.seen_at,
                                                       "container_state": None},
                                          update=list(values)))
            for view in batch.controllers.values():
                if view.swarm_id not in known:
                    continue
                await conn.execute(sa.update(swarms).where(swarms.c.id == view.swarm_id).values(
                    bees=view.bees, last_heartbeat=view.seen_at, enabled=view.enabled, updated_at=view.seen_at))
                listed = [b for b in view.bees if b.get("role") and b.get("instance")]
                for bee in listed:
                    await conn.execute(upsert(components, {
                        "role": bee["role"], "instance": bee["instance"], "swarm_id": view.swarm_id,
                        "enabled": bool(bee.get("enabled")), "state": "unknown",
                        "container_state": bee.get("state"), "totals": {}, "queue_stats": {}, "data": {},
                        "version": None, "first_seen": view.seen_at, "last_seen": None,
                    }, update=["container_state"]))
                if view.settled:
                    await conn.execute(sa.delete(components).where(
                        components.c.swarm_id == view.swarm_id,
                        components.c.instance.not_in([b["instance"] for b in listed]),
                        sa.not_(sa.and_(components.c.role == view.role, components.c.instance == view.instance)),
                        sa.or_(components.c.last_seen.is_(None), components.c.last_seen < view.seen_at)))

    def _upsert(self, table: sa.Table, values: dict[str, Any], update: list[str]) -> Any:
        insert = postgresql.insert if self._engine.dialect.name == "postgresql" else sqlite.insert
        stmt = insert(table).values(values)
        keys = [c.name for c in table.primary_key.columns]
        return stmt.on_conflict_do_update(index_elements=keys,
                                          set_={name: stmt.excluded[name] for name in update if name not in keys})

    async def list_components(self, swarm_id: str | None = None, role: str | None = None) -> list[ComponentRow]:
        stmt = sa.select(components).order_by(components.c.swarm_id, components.c.role, components.c.instance)
        if swarm_id is not None:
            stmt = stmt.where(components.c.swarm_id == swarm_id)
        if role is not None:
            stmt = stmt.where(components.c.role == role)
        async with self._reader.begin() as conn:
            return [ComponentRow(**row._mapping) for row in await conn.execute(stmt)]

    async def get_component(self, role: str, instance: str) -> ComponentRow | None:
        stmt = sa.select(components).where(components.c.role == role, components.c.instance == instance)
        async with self._reader.begin() as conn:
            row = (await conn.execute(stmt)).first()
        return ComponentRow(**row._mapping) if row is not None else None


# --- begin_action, inside its transaction -------------------------------------------------


async def _begin(conn: AsyncConnection, action: NewAction, create_swarm: SwarmRow | None) -> BeginResult:
    # A record past its retention is as good as absent; clear it so the key can be reused.
    await conn.execute(sa.delete(idempotency).where(_key_of(action), idempotency.c.expires_at < action.created_at))
    found = await _find_conflict(conn, action, create_swarm)
    if found is not None:
        return found
    if create_swarm is not None:
        await conn.execute(
            sa.delete(swarms).where(
                swarms.c.id == create_swarm.id, swarms.c.status.in_(REPLACEABLE_SWARM_STATUSES)
            )
        )
        await conn.execute(sa.insert(swarms).values(_swarm_values(create_swarm)))
    await conn.execute(
        sa.insert(idempotency).values(
            action=action.action,
            target=action.target,
            idempotency_key=action.idempotency_key,
            request_hash=action.request_hash,
            correlation_id=action.correlation_id,
            envelope=action.envelope,
            created_at=action.created_at,
            expires_at=action.expires_at,
        )
    )
    row = (
        await conn.execute(
            sa.insert(operations)
            .values(
                correlation_id=action.correlation_id,
                idempotency_key=action.idempotency_key,
                action=action.action,
                target=action.target,
                signal=action.signal,
                swarm_id=action.swarm_id,
                lifecycle=action.lifecycle,
                status=OperationStatus.ACCEPTED.value,
                envelope=action.envelope,
                timeout_ms=action.timeout_ms,
                deadline=action.deadline,
                created_at=action.created_at,
                updated_at=action.created_at,
                outcome=None,
                creates_swarm=create_swarm is not None,
            )
            .returning(*operations.c)
        )
    ).one()
    if action.targets:
        await conn.execute(sa.insert(operation_targets), [
            {"correlation_id": action.correlation_id, "target": target, "status": OperationStatus.DISPATCHED.value,
             "outcome": None, "updated_at": action.created_at} for target in action.targets])
    return Started(_operation(row))


async def _find_conflict(
    conn: AsyncConnection, action: NewAction, create_swarm: SwarmRow | None
) -> Replayed | Busy | SwarmExists | None:
    """What stands in the way of ``action``: a replay first, then Busy, then SwarmExists.

    The idempotency record is read last on purpose. Under READ COMMITTED each statement
    sees what had committed when it began, and a winner commits its record together with
    its operation and swarm; so if an earlier read saw those, the last read sees the record,
    and a racing duplicate of the same request is answered as a replay, never as Busy.
    """
    blocker: Busy | SwarmExists | None = None
    if create_swarm is not None:
        swarm = await _get_swarm(conn, create_swarm.id)
        if swarm is not None and swarm.status not in REPLACEABLE_SWARM_STATUSES:
            blocker = SwarmExists(swarm)
    if action.lifecycle:
        active = (await conn.execute(_open_lifecycle(action.swarm_id))).first()
        if active is not None:
            blocker = Busy(_operation(active))
    record = (
        await conn.execute(
            sa.select(idempotency).where(_key_of(action), idempotency.c.expires_at >= action.created_at)
        )
    ).first()
    if record is not None:
        return _replayed(record, action.request_hash)
    return blocker


def _open_lifecycle(swarm_id: str | None) -> sa.Select[Any]:
    return sa.select(operations).where(
        operations.c.swarm_id == swarm_id,
        operations.c.lifecycle.is_(sa.true()),
        operations.c.status.in_(OPEN_STATUSES),
    )


def _key_of(action: NewAction) -> sa.ColumnElement[bool]:
    return _key(action.action, action.target, action.idempotency_key)


def _key(action: str, target: str, idempotency_key: str) -> sa.ColumnElement[bool]:
    return sa.and_(
        idempotency.c.action == action,
        idempotency.c.target == target,
        idempotency.c.idempotency_key == idempotency_key,
    )


async def _close_operation(conn: AsyncConnection, correlation_id: str, status: str, outcome: dict[str, Any],
                           now: datetime) -> OperationRow:
    row = (await conn.execute(
        sa.update(operations).where(operations.c.correlation_id == correlation_id)
        .values(status=status, outcome=outcome, updated_at=now).returning(*operations.c))).one()
    return _operation(row)


# --- rows ---------------------------------------------------------------------------------


async def _get_operation(conn: AsyncConnection, correlation_id: str) -> OperationRow | None:
    row = (await conn.execute(sa.select(operations).where(operations.c.correlation_id == correlation_id))).first()
    return _operation(row) if row is not None else None


async def _get_swarm(conn: AsyncConnection, swarm_id: str) -> SwarmRow | None:
    row = (await conn.execute(sa.select(swarms).where(swarms.c.id == swarm_id))).first()
    return _swarm(row) if row is not None else None


def _replayed(record: sa.Row[Any], request_hash: str) -> Replayed:
    return Replayed(
        envelope=record.envelope,
        correlation_id=record.correlation_id,
        same_request=record.request_hash == request_hash,
    )


def _operation(row: sa.Row[Any]) -> OperationRow:
    return OperationRow(**row._mapping)


def _swarm(row: sa.Row[Any]) -> SwarmRow:
    return SwarmRow(**row._mapping)


def _swarm_values(row: SwarmRow) -> dict[str, Any]:
    return {f.name: getattr(row, f.name) for f in dataclasses.fields(row)}
