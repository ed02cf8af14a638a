"""The store: every read and write of idempotency records, operations and the read models.

Queries are plain functions of a connection (see ``database``). Reads run in a transaction
of their own; writes go through the one ``Writer``, which commits whatever is pending as a
single transaction, so a write method returns the future of its unit's commit.

``begin_action`` is the heart of it. Accepting a request means, atomically: remember the
idempotency key, open the operation and (for a create) claim the swarm id. The database's
unique constraints are the final word, so two gateways racing on the same key or the same
swarm cannot both win; the loser reads back what beat it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import datetime
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from controlplane.store import pools, statements, streams, webhooks
from controlplane.store.database import Database, open_database
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
from controlplane.store.writer import BULKY_ITEMS, Writer
from controlplane.logs import get_logger

# A conflict whose winner then rolled back leaves nothing to report; try again this often.
BEGIN_ATTEMPTS = 3
HOUSEKEEPING_INTERVAL_S = 5.0
SESSION_ROWS_GATHER_S = 0.05  # at 1,000 sessions a second, about 50 rows a commit

log = get_logger("store")



async def open_store(url: str) -> Store:
    """Connect to ``url`` and migrate its schema to head; safe to call from several processes."""
    database = open_database(url)
    try:
        await database.migrate()
    except BaseException:
        await database.close()
        raise
    return Store(database)


class Store:
    """One database, shared by every task of the process, written by one writer."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.writer = Writer(database).start()
        self._housekeeping = asyncio.create_task(self._keep_house(), name="store-housekeeping")

    async def _keep_house(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)
            try:
                await self.database.checkpoint()
            except Exception as exc:  # the next round tries again
                log.warning("store housekeeping failed", error=repr(exc))

    @property
    def dialect(self) -> str:
        return self.database.dialect

    async def close(self) -> None:
        self._housekeeping.cancel()
        await asyncio.gather(self._housekeeping, return_exceptions=True)
        await self.writer.stop()
        await self.database.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    # --- actions and operations ---------------------------------------------------------

    async def begin_action(self, action: NewAction, create_swarm: SwarmRow | None = None) -> BeginResult:
        """Record ``action`` (and claim ``create_swarm``) in one transaction, or say why not.

        The inserts are tried first: a unique constraint refusing them is the rare path,
        answered by reading what won (or by clearing an expired record and trying again).
        """
        if create_swarm is not None and action.swarm_id != create_swarm.id:
            raise ValueError("create_swarm.id must equal action.swarm_id")
        for attempt in range(BEGIN_ATTEMPTS):
            try:
                return await self.writer.submit(partial(_begin, action=action, create_swarm=create_swarm))
            except IntegrityError:
                found = await self.writer.submit(partial(_conflict, action=action, create_swarm=create_swarm))
                if found is not None:
                    return found
                if attempt == BEGIN_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def find_action(
        self, action: str, target: str, idempotency_key: str, request_hash: str, now: datetime | None = None
    ) -> Replayed | None:
        """The replay for a key seen before (and not expired at ``now``), without writing anything."""
        return await self.database.read(_find_action, action, target, idempotency_key, request_hash, now or utcnow())

    def set_operation_status(
        self, correlation_id: str, status: str, outcome: dict[str, Any] | None = None
    ) -> asyncio.Future[OperationRow | None]:
        """Move an open operation on; None when it was already final (or absent, or no move).

        Allowed: accepted → dispatched, and accepted|dispatched → a final status. The check
        and the write are one UPDATE, so a late outcome cannot overwrite a timeout.
        """
        return self.writer.submit(partial(_set_operation_status, correlation_id=correlation_id, status=status,
                                          outcome=outcome, now=utcnow()))

    def mark_published(self, correlation_id: str) -> asyncio.Future[int]:
        """accepted → dispatched for an operation whose signals the broker confirmed (gathered:
        every mark pending when the writer's next batch starts is one statement)."""
        return self.writer.gather(_mark_all_published, correlation_id)

    def close_later(self, correlation_id: str, signal: str, target: str, status: str, outcome: dict[str, Any],
                    fan_out: bool, releases: bool = False) -> asyncio.Future[None]:
        """``record_outcome`` for a caller that does not need its answer, gathered with the
        others pending: a burst of outcomes costs one unit of the writer's next batch.

        ``releases``: closing frees a resource. That close goes into the queue at once, so it
        commits before any later begin that takes the resource again (the writer keeps order).
        """
        closing = (correlation_id, signal, target, OperationStatus(status), outcome, fan_out)
        if releases:
            return self.writer.submit(partial(_record_outcomes, outcomes=[closing]))
        return self.writer.gather(_record_outcomes, closing)

    def record_outcome(self, correlation_id: str, signal: str, target: str, status: str,
                       outcome: dict[str, Any]) -> asyncio.Future[Recorded]:
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
        return self.writer.submit(partial(_record_outcome, correlation_id=correlation_id, signal=signal,
                                          target=target, final=final, outcome=outcome))

    async def operation_targets(self, correlation_id: str) -> list[TargetRow]:
        """The targets of a fan-out operation (empty for a single-target one)."""
        return await self.database.read(_operation_targets, correlation_id)

    async def get_operation(self, correlation_id: str) -> OperationRow | None:
        return await self.database.read(_get_operation, correlation_id)

    async def open_operations(self) -> list[OperationRow]:
        stmt = (
            sa.select(operations)
            .where(operations.c.status.in_(OPEN_STATUSES))
            .order_by(operations.c.created_at, operations.c.correlation_id)
        )
        return await self.database.read(_operations, stmt)

    async def open_targets(self) -> dict[str, list[TargetRow]]:
        """Targets of every open fan-out operation, by correlation id (for loading at start)."""
        return await self.database.read(_open_targets)

    async def live_records(self, now: datetime) -> list[dict[str, Any]]:
        """Idempotency records still within their retention (for loading at start)."""
        return await self.database.read(_live_records, now)

    def purge_expired(self, now: datetime, finished_before: datetime | None = None) -> asyncio.Future[int]:
        """Delete idempotency records past their retention; returns how many.

        With ``finished_before``, also delete operations that closed before then, so the
        operations table keeps a bounded history; open operations always stay.
        """
        return self.writer.submit(partial(_purge_expired, now=now, finished_before=finished_before), bulky=True)

    # --- swarms ---------------------------------------------------------------------------

    async def get_swarm(self, swarm_id: str) -> SwarmRow | None:
        return await self.database.read(_get_swarm, swarm_id)

    async def list_swarms(self) -> list[SwarmRow]:
        return await self.database.read(_list_swarms)

    def upsert_swarm(self, row: SwarmRow) -> asyncio.Future[None]:
        """Insert or overwrite the swarm; an existing row keeps its original created_at."""
        values = _swarm_values(row)
        stmt = self._upsert(swarms, values, update=[name for name in values if name != "created_at"])
        return self.writer.submit(lambda conn: conn.execute(stmt) and None)

    def save_swarm(self, row: SwarmRow, at_once: bool = False) -> asyncio.Future[None]:
        """Write an existing swarm's row as the caller holds it, gathered with the others pending
        (the newest of each swarm wins); a swarm the store no longer has stays gone.

        ``at_once``: into the writer's queue now, so it commits before any later begin reads
        it (a status that decides whether a create may replace the swarm)."""
        if at_once:
            return self.writer.submit(partial(_save_swarms, rows=[row]))
        return self.writer.gather(_save_swarms, row)

    def delete_swarm(self, swarm_id: str) -> asyncio.Future[None]:
        """Forget the swarm and every registry entry of its controller and bees."""
        return self.writer.submit(partial(_delete_swarm, swarm_id=swarm_id))

    # --- the component registry ----------------------------------------------------------

    def save_registry(self, batch: RegistryBatch) -> asyncio.Future[None]:
        """Save a batch of status reports and controller views in one transaction.

        Reports from swarms the store does not know (removed, or never created here) are
        dropped, so a late status cannot bring back a removed swarm's components. A
        controller's bee list is the truth about membership: bees it no longer lists, and
        that have not reported since, leave the registry.
        """
        return self.writer.submit(partial(_save_registry, batch=batch, upsert=self._upsert), bulky=True)

    def _upsert(self, table: sa.Table, values: dict[str, Any], update: list[str]) -> Any:
        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        stmt = insert(table).values(values)
        keys = [c.name for c in table.primary_key.columns]
        return stmt.on_conflict_do_update(index_elements=keys,
                                          set_={name: stmt.excluded[name] for name in update if name not in keys})

    # --- engine pools ------------------------------------------------------------------------

    def save_pool_engines(self, pool_id: str, engines: list[dict[str, Any]]) -> asyncio.Future[None]:
        """Gathered: a burst of engine lists costs one write, the newest of each pool wins."""
        return self.writer.gather(pools.save_engines, (pool_id, engines))

    def save_pool_stream(self, pool_id: str, stream: dict[str, Any]) -> asyncio.Future[None]:
        """Gathered: a thousand stream events a second cost a few statements."""
        return self.writer.gather(pools.save_streams, (pool_id, stream), bulky=True)

    def add_pool_stats(self, pool_id: str, stats: list[tuple[str, dict[str, Any]]]) -> asyncio.Future[None]:
        items = [(pool_id, stream_id, snapshot) for stream_id, snapshot in stats]
        return self.writer.submit(partial(pools.add_stats, items=items), bulky=len(items) > BULKY_ITEMS)

    async def load_pool(self, pool_id: str, stats_since: datetime) -> dict[str, Any]:
        return await self.database.read(pools.load, pool_id, stats_since)

    def purge_pool(self, ended_before: datetime, stats_before: datetime) -> asyncio.Future[None]:
        return self.writer.submit(partial(pools.purge, ended_before=ended_before, stats_before=stats_before),
                                  bulky=True)

    # --- streams registry ---------------------------------------------------------------------

    def add_stream_type(self, name: str, body: dict[str, Any], created_at: datetime) -> asyncio.Future[None]:
        """Fails with ``IntegrityError`` when the name is taken."""
        return self.writer.submit(partial(streams.add_type, name=name, body=body, created_at=created_at))

    def save_advertised_stream(self, stream_id: str, body: dict[str, Any], advertised_at: datetime) -> asyncio.Future[None]:
        """Gathered: a burst of advertisements is one statement."""
        return self.writer.gather(streams.save_streams, (stream_id, body, advertised_at), bulky=True)

    def open_stream_session(self, row: dict[str, Any]) -> asyncio.Future[None]:
        """Gathered for ``SESSION_ROWS_GATHER_S``: a thousand negotiations a second cost a few
        statements, and a commit's own cost (a WAL page per index touched) is shared by many
        rows. Bulky: SQLite's inserting them was the largest part of a negotiation that the
        gateway's loop did itself; in SQLite's writer process it runs beside the loop."""
        return self.writer.gather(streams.open_sessions, row, bulky=True, window_s=SESSION_ROWS_GATHER_S)

    def close_streams(self, stream_ids: list[str], endings: list[streams.Ending]) -> asyncio.Future[tuple[list[str], list[str]]]:
        """The stream ids and session ids this write was the one to remove or close."""
        # Openings still gathered go first, so a session's close never reaches the store
        # before its opening.
        self.writer.flush(streams.open_sessions)
        return self.writer.submit(partial(streams.close, stream_ids=stream_ids, endings=endings),
                                  bulky=len(stream_ids) + len(endings) > BULKY_ITEMS)

    async def stream_session_history(self, stream_id: str | None, publisher_id: str | None,
                                     consumer_id: str | None, limit: int) -> list[dict[str, Any]]:
        """Sessions this gateway opened are in it, even those whose rows were still gathered."""
        opened = self.writer.flush(streams.open_sessions)
        if opened is not None:  # a failure is logged where the rows were handed in; read what is there
            await asyncio.wait([opened])
        return await self.database.read(streams.history, stream_id, publisher_id, consumer_id, limit)

    async def load_streams(self) -> dict[str, Any]:
        return await self.database.read(streams.load)

    def purge_stream_history(self, ended_before: datetime) -> asyncio.Future[int]:
        return self.writer.submit(partial(streams.purge, ended_before=ended_before), bulky=True)

    # --- webhooks (the services surface) ------------------------------------------------------

    def add_webhook(self, hook: webhooks.Webhook, limit: int) -> asyncio.Future[bool]:
        """False when ``limit`` webhooks exist already."""
        return self.writer.submit(partial(webhooks.add, hook=hook, limit=limit))

    def remove_webhook(self, webhook_id: str) -> asyncio.Future[bool]:
        """With its deliveries; False when there was no such webhook."""
        return self.writer.submit(partial(webhooks.remove, webhook_id=webhook_id))

    async def get_webhook(self, webhook_id: str) -> webhooks.Webhook | None:
        return await self.database.read(webhooks.get, webhook_id)

    async def list_webhooks(self) -> list[webhooks.Webhook]:
        return await self.database.read(webhooks.list_all)

    def queue_webhook_deliveries(self, event: str, event_id: str, body: str, now: datetime) -> asyncio.Future[int]:
        """One delivery per webhook subscribed to ``event``, once per event id; how many were new."""
        return self.writer.submit(partial(webhooks.queue, event=event, event_id=event_id, body=body, now=now))

    def claim_webhook_deliveries(self, lease: str, now: datetime, lease_until: datetime, limit: int
                                 ) -> asyncio.Future[tuple[list[webhooks.Claimed], datetime | None]]:
        """Due deliveries leased to ``lease``, and when the next one is due."""
        return self.writer.submit(partial(webhooks.claim, lease=lease, now=now, lease_until=lease_until, limit=limit))

    def record_webhook_attempt(self, attempted: webhooks.Attempted) -> asyncio.Future[bool]:
        """False when the lease had lapsed and another gateway took the delivery over."""
        return self.writer.submit(partial(webhooks.record, attempted=attempted))

    def release_webhook_leases(self, lease_prefix: str, now: datetime) -> asyncio.Future[int]:
        return self.writer.submit(partial(webhooks.release, lease_prefix=lease_prefix, now=now))

    async def webhook_deliveries(self, webhook_id: str, status: str | None, limit: int) -> list[dict[str, Any]]:
        """Newest first."""
        return await self.database.read(webhooks.history, webhook_id, status, limit)

    def purge_webhook_deliveries(self, finished_before: datetime) -> asyncio.Future[int]:
        return self.writer.submit(partial(webhooks.purge, finished_before=finished_before), bulky=True)

    async def list_components(self, swarm_id: str | None = None, role: str | None = None) -> list[ComponentRow]:
        stmt = sa.select(components).order_by(components.c.swarm_id, components.c.role, components.c.instance)
        if swarm_id is not None:
            stmt = stmt.where(components.c.swarm_id == swarm_id)
        if role is not None:
            stmt = stmt.where(components.c.role == role)
        return await self.database.read(lambda conn: [ComponentRow(**row._mapping) for row in conn.execute(stmt)])



# --- units of work and reads, each a function of a connection ------------------------------


def _find_action(conn: Connection, action: str, target: str, idempotency_key: str, request_hash: str,
                 now: datetime) -> Replayed | None:
    stmt = sa.select(idempotency).where(_key(action, target, idempotency_key), idempotency.c.expires_at >= now)
    record = conn.execute(stmt).first()
    return _replayed(record, request_hash) if record is not None else None


def _set_operation_status(conn: Connection, correlation_id: str, status: str, outcome: dict[str, Any] | None,
                          now: datetime) -> OperationRow | None:
    new_status = OperationStatus(status)
    if new_status == OperationStatus.ACCEPTED:
        return None
    from_ = (OperationStatus.ACCEPTED,) if new_status == OperationStatus.DISPATCHED else OPEN_STATUSES
    values: dict[str, Any] = {"status": new_status.value, "updated_at": now}
    if outcome is not None:
        values["outcome"] = outcome
    row = conn.execute(
        sa.update(operations)
        .where(operations.c.correlation_id == correlation_id, operations.c.status.in_(from_))
        .values(values)
        .returning(*operations.c)
    ).first()
    return _operation(row) if row is not None else None


_LOCK_OPERATION = (sa.select(operations.c.status, operations.c.signal, operations.c.target)
                   .where(operations.c.correlation_id == sa.bindparam("b_id")).with_for_update())
_CLOSE_TARGET = (
    sa.update(operation_targets)
    .where(operation_targets.c.correlation_id == sa.bindparam("b_id"),
           operation_targets.c.target == sa.bindparam("b_target"),
           operation_targets.c.status.in_(OPEN_STATUSES))
    .values(status=sa.bindparam("b_status"), outcome=sa.bindparam("b_outcome"), updated_at=sa.bindparam("b_now")))
_HAS_TARGETS = (sa.select(operation_targets.c.target)
                .where(operation_targets.c.correlation_id == sa.bindparam("b_id")).limit(1))
_COUNT_TARGETS = (sa.select(operation_targets.c.status, sa.func.count())
                  .where(operation_targets.c.correlation_id == sa.bindparam("b_id"))
                  .group_by(operation_targets.c.status))
_CLOSE_OPERATION = (
    sa.update(operations).where(operations.c.correlation_id == sa.bindparam("b_id"))
    .values(status=sa.bindparam("b_status"), outcome=sa.bindparam("b_outcome"), updated_at=sa.bindparam("b_now"))
    .returning(*operations.c))


def _mark_all_published(conn: Connection, correlation_ids: list[str]) -> None:
    now = utcnow()
    statements.execute_many(conn, statements.MARK_PUBLISHED,
                            [{"correlation_id": cid, "now": now} for cid in correlation_ids])


Closing = tuple[str, str, str, OperationStatus, dict[str, Any], bool]  # cid, signal, target, status, outcome, fan-out


def _record_outcomes(conn: Connection, outcomes: list[Closing]) -> None:
    """Outcomes the gateway already applied in memory. An operation that is not a fan-out
    closes with one statement; a fan-out's targets close together, then it is counted once."""
    now = utcnow()
    statements.execute_many(conn, statements.CLOSE_SINGLE, [
        {"correlation_id": cid, "signal": signal, "target": target, "status": final.value, "outcome": outcome,
         "now": now} for cid, signal, target, final, outcome, fan_out in outcomes if not fan_out])
    by_operation: dict[str, list[Closing]] = {}
    for closing in outcomes:
        if closing[5]:
            by_operation.setdefault(closing[0], []).append(closing)
    for cid, closings in by_operation.items():
        op = conn.execute(_LOCK_OPERATION, {"b_id": cid}).first()
        if op is None or op.status not in OPEN_STATUSES:
            continue
        statements.execute_many(conn, statements.CLOSE_TARGET, [
            {"correlation_id": cid, "target": target, "status": final.value, "outcome": outcome, "now": now}
            for _, signal, target, final, outcome, _ in closings if signal == op.signal])
        counts: dict[str, int] = dict(conn.execute(_COUNT_TARGETS, {"b_id": cid}).all())
        if not any(counts.get(s, 0) for s in OPEN_STATUSES):
            _close_operation(conn, cid, fan_out_status(counts).value, {"targets": fan_out_summary(counts)}, now)


def _record_outcome(conn: Connection, correlation_id: str, signal: str, target: str, final: OperationStatus,
                    outcome: dict[str, Any]) -> Recorded:
    op = conn.execute(_LOCK_OPERATION, {"b_id": correlation_id}).first()
    now = utcnow()  # after the lock wait, so updatedAt is when the change was made
    if op is None or op.status not in OPEN_STATUSES or op.signal != signal:
        return Recorded(moved=False)
    moved = conn.execute(_CLOSE_TARGET, {"b_id": correlation_id, "b_target": target, "b_status": final.value,
                                         "b_outcome": outcome, "b_now": now})
    if moved.rowcount == 0:
        # Not an open target. The operation's own target closes it, unless it is a
        # fan-out (whose addressed component is one target among others).
        if op.target != target or conn.execute(_HAS_TARGETS, {"b_id": correlation_id}).first() is not None:
            return Recorded(moved=False)
        return Recorded(True, _close_operation(conn, correlation_id, final.value, outcome, now))
    counts: dict[str, int] = dict(conn.execute(_COUNT_TARGETS, {"b_id": correlation_id}).all())
    if any(counts.get(s, 0) for s in OPEN_STATUSES):
        return Recorded(moved=True)
    return Recorded(True, _close_operation(conn, correlation_id, fan_out_status(counts).value,
                                           {"targets": fan_out_summary(counts)}, now))


def fan_out_summary(counts: dict[str, int]) -> dict[str, int]:
    return {s: counts.get(s, 0) for s in FINAL_STATUSES}


def fan_out_status(counts: dict[str, int]) -> OperationStatus:
    """A closed fan-out: failed if any target failed, else timed_out if any did, else succeeded."""
    if counts.get(OperationStatus.FAILED, 0):
        return OperationStatus.FAILED
    if counts.get(OperationStatus.TIMED_OUT, 0):
        return OperationStatus.TIMED_OUT
    return OperationStatus.SUCCEEDED


def _operation_targets(conn: Connection, correlation_id: str) -> list[TargetRow]:
    stmt = (sa.select(operation_targets.c.target, operation_targets.c.status, operation_targets.c.outcome,
                      operation_targets.c.updated_at)
            .where(operation_targets.c.correlation_id == correlation_id)
            .order_by(operation_targets.c.target))
    return [TargetRow(**row._mapping) for row in conn.execute(stmt)]


def _open_targets(conn: Connection) -> dict[str, list[TargetRow]]:
    stmt = (sa.select(operation_targets)
            .join(operations, operations.c.correlation_id == operation_targets.c.correlation_id)
            .where(operations.c.status.in_(OPEN_STATUSES))
            .order_by(operation_targets.c.correlation_id, operation_targets.c.target))
    found: dict[str, list[TargetRow]] = {}
    for row in conn.execute(stmt):
        found.setdefault(row.correlation_id, []).append(
            TargetRow(target=row.target, status=row.status, outcome=row.outcome, updated_at=row.updated_at))
    return found


def _live_records(conn: Connection, now: datetime) -> list[dict[str, Any]]:
    stmt = sa.select(idempotency).where(idempotency.c.expires_at >= now)
    return [dict(row._mapping) for row in conn.execute(stmt)]


def _operations(conn: Connection, stmt: sa.Select[Any]) -> list[OperationRow]:
    return [_operation(row) for row in conn.execute(stmt)]


def _purge_expired(conn: Connection, now: datetime, finished_before: datetime | None) -> int:
    if finished_before is not None:
        old = sa.select(operations.c.correlation_id).where(
            operations.c.status.in_(FINAL_STATUSES), operations.c.updated_at < finished_before)
        conn.execute(sa.delete(operation_targets).where(operation_targets.c.correlation_id.in_(old)))
        conn.execute(sa.delete(operations).where(operations.c.correlation_id.in_(old)))
    return conn.execute(sa.delete(idempotency).where(idempotency.c.expires_at < now)).rowcount


def _list_swarms(conn: Connection) -> list[SwarmRow]:
    return [_swarm(row) for row in conn.execute(sa.select(swarms).order_by(swarms.c.id))]


def _save_swarms(conn: Connection, rows: list[SwarmRow]) -> None:
    newest = {row.id: row for row in rows}
    statements.execute_many(conn, statements.UPDATE_SWARM, [_row_values(row) for row in newest.values()])


def _delete_swarm(conn: Connection, swarm_id: str) -> None:
    conn.execute(sa.delete(components).where(components.c.swarm_id == swarm_id))
    conn.execute(sa.delete(swarms).where(swarms.c.id == swarm_id))


def _save_registry(conn: Connection, batch: RegistryBatch, upsert: Any) -> None:
    swarm_ids = {r.swarm_id for r in batch.reports.values()} | set(batch.controllers)
    if not swarm_ids:
        return
    known = set(conn.execute(sa.select(swarms.c.id).where(swarms.c.id.in_(swarm_ids))).scalars())
    for report in batch.reports.values():
        if report.swarm_id not in known:
            continue
        values = {"role": report.role, "instance": report.instance, "swarm_id": report.swarm_id,
                  "enabled": report.enabled, "state": report.state, "totals": report.totals,
                  "queue_stats": report.queue_stats, "data": report.data, "version": report.version,
                  "last_seen": report.seen_at}
        conn.execute(upsert(components, {**values, "first_seen": report.seen_at, "container_state": None},
                            update=list(values)))
    for view in batch.controllers.values():
        if view.swarm_id not in known:
            continue
        conn.execute(sa.update(swarms).where(swarms.c.id == view.swarm_id).values(
            bees=view.bees, last_heartbeat=view.seen_at, enabled=view.enabled, updated_at=view.seen_at))
        listed = [b for b in view.bees if b.get("role") and b.get("instance")]
        for bee in listed:
            conn.execute(upsert(components, {
                "role": bee["role"], "instance": bee["instance"], "swarm_id": view.swarm_id,
                "enabled": bool(bee.get("enabled")), "state": "unknown",
                "container_state": bee.get("state"), "totals": {}, "queue_stats": {}, "data": {},
                "version": None, "first_seen": view.seen_at, "last_seen": None,
            }, update=["container_state"]))
        if view.settled:
            conn.execute(sa.delete(components).where(
                components.c.swarm_id == view.swarm_id,
                components.c.instance.not_in([b["instance"] for b in listed]),
                sa.not_(sa.and_(components.c.role == view.role, components.c.instance == view.instance)),
                sa.or_(components.c.last_seen.is_(None), components.c.last_seen < view.seen_at)))


# --- begin_action, inside its transaction -------------------------------------------------


# Built once: a statement object's compiled form and cache key are reused on every call,
# where building one per call cost more than running it.
_INSERT_SWARM = sa.insert(swarms)
_DELETE_REPLACEABLE_SWARM = sa.delete(swarms).where(
    swarms.c.id == sa.bindparam("b_id"), swarms.c.status.in_(REPLACEABLE_SWARM_STATUSES))
_DELETE_EXPIRED_RECORD = sa.delete(idempotency).where(
    idempotency.c.action == sa.bindparam("b_action"), idempotency.c.target == sa.bindparam("b_target"),
    idempotency.c.idempotency_key == sa.bindparam("b_key"), idempotency.c.expires_at < sa.bindparam("b_now"))


def _begin(conn: Connection, action: NewAction, create_swarm: SwarmRow | None) -> BeginResult:
    """Insert what accepting ``action`` means; a unique constraint refusing it raises
    ``IntegrityError`` (a known key, a held resource, a live swarm) and ``_conflict`` says which."""
    if create_swarm is not None:
        conn.execute(_DELETE_REPLACEABLE_SWARM, {"b_id": create_swarm.id})
        conn.execute(_INSERT_SWARM, _swarm_values(create_swarm))
    statements.execute(conn, statements.INSERT_RECORD, {
        "action": action.action, "target": action.target, "idempotency_key": action.idempotency_key,
        "request_hash": action.request_hash, "correlation_id": action.correlation_id, "envelope": action.envelope,
        "created_at": action.created_at, "expires_at": action.expires_at})
    row = OperationRow(
        correlation_id=action.correlation_id, idempotency_key=action.idempotency_key, action=action.action,
        target=action.target, signal=action.signal, swarm_id=action.swarm_id, lifecycle=action.lifecycle,
        status=OperationStatus.ACCEPTED.value, envelope=action.envelope, timeout_ms=action.timeout_ms,
        deadline=action.deadline, created_at=action.created_at, updated_at=action.created_at, outcome=None,
        creates_swarm=create_swarm is not None, signals=action.signals, resource=action.resource)
    statements.execute(conn, statements.INSERT_OPERATION, _row_values(row))
    statements.execute_many(conn, statements.INSERT_TARGET, [
        {"correlation_id": action.correlation_id, "target": target, "status": OperationStatus.DISPATCHED.value,
         "outcome": None, "updated_at": action.created_at} for target in action.targets])
    return Started(row)


def _conflict(conn: Connection, action: NewAction, create_swarm: SwarmRow | None) -> BeginResult | None:
    """After a refused begin: what stood in the way, or None once an expired record that held
    the key is cleared (a record past its retention is as good as absent)."""
    found = _find_conflict(conn, action, create_swarm)
    if found is None:
        conn.execute(_DELETE_EXPIRED_RECORD, {"b_action": action.action, "b_target": action.target,
                                              "b_key": action.idempotency_key, "b_now": action.created_at})
    return found


def _find_conflict(
    conn: Connection, action: NewAction, create_swarm: SwarmRow | None
) -> Replayed | Busy | SwarmExists | None:
    """What stands in the way of ``action``: a replay first, then Busy, then SwarmExists.

    The idempotency record is read last on purpose. Under READ COMMITTED each statement
    sees what had committed when it began, and a winner commits its record together with
    its operation and swarm; so if an earlier read saw those, the last read sees the record,
    and a racing duplicate of the same request is answered as a replay, never as Busy.
    """
    blocker: Busy | SwarmExists | None = None
    if create_swarm is not None:
        swarm = _get_swarm(conn, create_swarm.id)
        if swarm is not None and swarm.status not in REPLACEABLE_SWARM_STATUSES:
            blocker = SwarmExists(swarm)
    if action.resource is not None:
        active = (conn.execute(_open_holding(action.resource))).first()
        if active is not None:
            blocker = Busy(_operation(active))
    record = (
        conn.execute(
            sa.select(idempotency).where(_key_of(action), idempotency.c.expires_at >= action.created_at)
        )
    ).first()
    if record is not None:
        return _replayed(record, action.request_hash)
    return blocker


def _open_holding(resource: str) -> sa.Select[Any]:
    return sa.select(operations).where(operations.c.resource == resource, operations.c.status.in_(OPEN_STATUSES))


def _key_of(action: NewAction) -> sa.ColumnElement[bool]:
    return _key(action.action, action.target, action.idempotency_key)


def _key(action: str, target: str, idempotency_key: str) -> sa.ColumnElement[bool]:
    return sa.and_(
        idempotency.c.action == action,
        idempotency.c.target == target,
        idempotency.c.idempotency_key == idempotency_key,
    )


def _close_operation(conn: Connection, correlation_id: str, status: str, outcome: dict[str, Any],
                     now: datetime) -> OperationRow:
    row = conn.execute(_CLOSE_OPERATION, {"b_id": correlation_id, "b_status": status, "b_outcome": outcome,
                                          "b_now": now}).one()
    return _operation(row)


# --- rows ---------------------------------------------------------------------------------


def _get_operation(conn: Connection, correlation_id: str) -> OperationRow | None:
    row = (conn.execute(sa.select(operations).where(operations.c.correlation_id == correlation_id))).first()
    return _operation(row) if row is not None else None


def _get_swarm(conn: Connection, swarm_id: str) -> SwarmRow | None:
    row = (conn.execute(sa.select(swarms).where(swarms.c.id == swarm_id))).first()
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
    return _row_values(row)


def _row_values(row: Any) -> dict[str, Any]:
    """A row's fields as they are (``dataclasses.asdict`` would copy every JSON value deeply)."""
    return {f.name: getattr(row, f.name) for f in dataclasses.fields(row)}
