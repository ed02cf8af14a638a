"""The services surface's webhooks in the store: subscriptions, and deliveries with each
attempt's outcome.

Units of work and reads, each a function of a connection, for ``Store``'s webhook methods.
Every gateway queues and sends from the same rows, so the database decides: a delivery is
unique per (webhook, event id), whoever queued it first; a gateway sends only what its
``claim`` leased, and records an attempt only while its lease holds. A claimed delivery's
``next_attempt_at`` is when the lease lapses, so one whose gateway died is due again then,
on any gateway, without a sweeper.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from controlplane.store.schema import webhook_deliveries as deliveries
from controlplane.store.schema import webhooks

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


@dataclass(frozen=True)
class Webhook:
    id: str
    url: str
    events: list[str]
    created_at: datetime
    secret: str = field(repr=False)  # signs deliveries; kept out of every view and log line


@dataclass(frozen=True)
class Claimed:
    """A delivery this gateway may send now: what to send, where, signed with what."""

    id: str
    webhook_id: str
    event: str
    body: str
    attempts: int  # made before this one
    history: list[dict[str, Any]]  # theirs: the lease holder alone adds to it
    url: str
    lease: str
    secret: str = field(repr=False)


@dataclass(frozen=True)
class Attempted:
    """How one attempt ended, and what follows: delivered, failed for good, or due again."""

    delivery_id: str
    lease: str
    status: str
    attempts: int  # made so far, this one included
    history: list[dict[str, Any]]  # every attempt's entry: attempt, at, statusCode, error, durationMs
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    at: datetime


# --- webhooks --------------------------------------------------------------------------------


def add(conn: Connection, hook: Webhook, limit: int) -> bool:
    """False when ``limit`` webhooks exist already (counted in the same transaction)."""
    if conn.execute(sa.select(sa.func.count()).select_from(webhooks)).scalar_one() >= limit:
        return False
    conn.execute(sa.insert(webhooks).values(id=hook.id, url=hook.url, events=hook.events, secret=hook.secret,
                                            created_at=hook.created_at))
    return True


def remove(conn: Connection, webhook_id: str) -> bool:
    """The webhook and its deliveries (pending ones are not sent); False when it was not there."""
    conn.execute(sa.delete(deliveries).where(deliveries.c.webhook_id == webhook_id))
    return bool(conn.execute(sa.delete(webhooks).where(webhooks.c.id == webhook_id)).rowcount)


def get(conn: Connection, webhook_id: str) -> Webhook | None:
    row = conn.execute(sa.select(webhooks).where(webhooks.c.id == webhook_id)).first()
    return _webhook(row) if row is not None else None


def list_all(conn: Connection) -> list[Webhook]:
    """Oldest first."""
    return [_webhook(row) for row in conn.execute(sa.select(webhooks).order_by(webhooks.c.created_at, webhooks.c.id))]


def _webhook(row: sa.Row[Any]) -> Webhook:
    return Webhook(id=row.id, url=row.url, events=list(row.events), created_at=row.created_at, secret=row.secret)


# --- deliveries ------------------------------------------------------------------------------

# Built once, with bind parameters: a statement's compiled form is reused on every call, where
# building one per delivery cost more than running it.
_SUBSCRIPTIONS = sa.select(webhooks.c.id, webhooks.c.events)
_LIVE_WEBHOOK = deliveries.c.webhook_id.in_(sa.select(webhooks.c.id))
_DUE = (sa.select(deliveries.c.id)
        .where(deliveries.c.status == PENDING, deliveries.c.next_attempt_at <= sa.bindparam("b_now"), _LIVE_WEBHOOK)
        .order_by(deliveries.c.next_attempt_at).limit(sa.bindparam("b_limit")))
# PostgreSQL: rows another gateway is claiming at the same moment are skipped, not waited for.
_DUE_PG = _DUE.with_for_update(skip_locked=True, of=deliveries)
_LEASE = (sa.update(deliveries).where(deliveries.c.id.in_(sa.bindparam("b_ids", expanding=True)))
          .values(lease=sa.bindparam("b_lease"), next_attempt_at=sa.bindparam("b_until")))
_CLAIMED = (sa.select(deliveries.c.id, deliveries.c.webhook_id, deliveries.c.event, deliveries.c.body,
                      deliveries.c.attempts, deliveries.c.history, webhooks.c.url, webhooks.c.secret)
            .join(webhooks, webhooks.c.id == deliveries.c.webhook_id)
            .where(deliveries.c.id.in_(sa.bindparam("b_ids", expanding=True))).order_by(deliveries.c.created_at))
_NEXT_DUE = sa.select(sa.func.min(deliveries.c.next_attempt_at)).where(deliveries.c.status == PENDING, _LIVE_WEBHOOK)
_RECORD = (sa.update(deliveries)
           .where(deliveries.c.id == sa.bindparam("b_id"), deliveries.c.lease == sa.bindparam("b_lease"))
           .values(status=sa.bindparam("b_status"), attempts=sa.bindparam("b_attempts"),
                   last_status_code=sa.bindparam("b_code"), last_error=sa.bindparam("b_error"),
                   history=sa.bindparam("b_history", type_=deliveries.c.history.type),
                   next_attempt_at=sa.bindparam("b_next", type_=deliveries.c.next_attempt_at.type), lease=None,
                   updated_at=sa.bindparam("b_at", type_=deliveries.c.updated_at.type),
                   delivered_at=sa.bindparam("b_delivered", type_=deliveries.c.delivered_at.type)))
_QUEUE = {name: insert(deliveries).on_conflict_do_nothing(index_elements=["webhook_id", "event_id"])
          .returning(deliveries.c.id) for name, insert in (("postgresql", postgresql.insert), ("sqlite", sqlite.insert))}


def queue(conn: Connection, event: str, event_id: str, body: str, now: datetime) -> int:
    """One delivery of ``event`` for every webhook subscribed to it, due now; how many this
    call queued (one that another gateway queued for the same event id first is left alone)."""
    subscribed = [row.id for row in conn.execute(_SUBSCRIPTIONS) if event in row.events]
    if not subscribed:
        return 0
    rows = [{"id": str(uuid.uuid4()), "webhook_id": webhook_id, "event": event, "event_id": event_id, "body": body,
             "status": PENDING, "attempts": 0, "history": [], "next_attempt_at": now, "created_at": now,
             "updated_at": now} for webhook_id in subscribed]
    # What the insert returns are the rows that were new.
    return len(conn.execute(_QUEUE[conn.dialect.name], rows).all())


def claim(conn: Connection, lease: str, now: datetime, lease_until: datetime,
          limit: int) -> tuple[list[Claimed], datetime | None]:
    """Lease up to ``limit`` due deliveries to ``lease`` until ``lease_until``; and when the
    next one falls due. On SQLite the one writer makes claims take turns anyway."""
    due = _DUE_PG if conn.dialect.name == "postgresql" else _DUE
    ids = list(conn.execute(due, {"b_now": now, "b_limit": limit}).scalars())
    claimed: list[Claimed] = []
    if ids:
        conn.execute(_LEASE, {"b_ids": ids, "b_lease": lease, "b_until": lease_until})
        claimed = [Claimed(id=r.id, webhook_id=r.webhook_id, event=r.event, body=r.body, attempts=r.attempts,
                           history=list(r.history), url=r.url, lease=lease, secret=r.secret)
                   for r in conn.execute(_CLAIMED, {"b_ids": ids})]
    return claimed, conn.execute(_NEXT_DUE).scalar()


def record(conn: Connection, attempted: Attempted) -> bool:
    """An attempt's outcome, if the lease still holds (False: another gateway took the delivery
    over after the lease lapsed, or the webhook was removed). While it holds, the row is as
    it was claimed: the history given is the claimed one and this attempt."""
    return bool(conn.execute(_RECORD, {
        "b_id": attempted.delivery_id, "b_lease": attempted.lease, "b_status": attempted.status,
        "b_attempts": attempted.attempts, "b_code": attempted.last_status_code, "b_error": attempted.last_error,
        "b_history": attempted.history, "b_next": attempted.next_attempt_at, "b_at": attempted.at,
        "b_delivered": attempted.at if attempted.status == DELIVERED else None}).rowcount)


def release(conn: Connection, lease_prefix: str, now: datetime) -> int:
    """Deliveries leased under ``lease_prefix`` (this gateway stopping, or its predecessor of
    the same name that died), due again now rather than when their leases lapse."""
    return conn.execute(sa.update(deliveries).where(
        deliveries.c.status == PENDING, deliveries.c.lease.startswith(lease_prefix, autoescape=True)
    ).values(lease=None, next_attempt_at=now)).rowcount


def history(conn: Connection, webhook_id: str, status: str | None, limit: int) -> list[dict[str, Any]]:
    """A webhook's deliveries, newest first."""
    stmt = (sa.select(deliveries).where(deliveries.c.webhook_id == webhook_id)
            .order_by(deliveries.c.created_at.desc(), deliveries.c.id.desc()).limit(limit))
    if status is not None:
        stmt = stmt.where(deliveries.c.status == status)
    return [dict(row._mapping) for row in conn.execute(stmt)]


def purge(conn: Connection, finished_before: datetime) -> int:
    """Deliveries that finished before the retention's start, and any left by a webhook removed
    while one of its events was being queued."""
    old = conn.execute(sa.delete(deliveries).where(
        deliveries.c.status.in_((DELIVERED, FAILED)), deliveries.c.updated_at < finished_before)).rowcount
    return old + conn.execute(sa.delete(deliveries).where(sa.not_(_LIVE_WEBHOOK))).rowcount
