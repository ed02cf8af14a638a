"""The streams registry's durable part: created types, advertised streams, sessions' history.

Units of work and reads, each a function of a connection, for ``Store``'s stream methods. The
registry itself lives in each gateway's memory; these rows are what a restarted gateway
loads, and what ``GET /streams/sessions/history`` reads. ``close`` is also the registry's
compare-and-set: with several gateways sweeping, the one whose statement removed a row is
the one that announces the expiry.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from controlplane.store.schema import stream_sessions, stream_types, streams_advertised


@dataclass(frozen=True)
class Ending:
    """A session to close: how it ended, when, and how long it lasted."""

    session_id: str
    status: str
    ended_at: datetime
    duration_seconds: float


def add_type(conn: Connection, name: str, body: dict[str, Any], created_at: datetime) -> None:
    """Raises ``IntegrityError`` when the name is taken (by another gateway, say)."""
    conn.execute(sa.insert(stream_types).values(name=name, body=body, created_at=created_at))


def save_streams(conn: Connection, items: list[tuple[str, dict[str, Any], datetime]]) -> None:
    """Advertised streams, each as last given (a burst of advertisements is one statement)."""
    latest = {stream_id: (body, advertised_at) for stream_id, body, advertised_at in items}
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(streams_advertised)
    upsert = insert.on_conflict_do_update(index_elements=["id"], set_={"body": insert.excluded.body})
    conn.execute(upsert, [{"id": stream_id, "body": body, "advertised_at": advertised_at}
                          for stream_id, (body, advertised_at) in latest.items()])


def open_sessions(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Sessions' history rows, open (status active, no end)."""
    conn.execute(sa.insert(stream_sessions), rows)


def close(conn: Connection, stream_ids: list[str], endings: list[Ending]) -> tuple[list[str], list[str]]:
    """Forget advertised streams and close open sessions; which of each this call changed."""
    dropped: list[str] = []
    for stream_id in stream_ids:
        if conn.execute(sa.delete(streams_advertised).where(streams_advertised.c.id == stream_id)).rowcount:
            dropped.append(stream_id)
    closed: list[str] = []
    for ending in endings:
        result = conn.execute(
            sa.update(stream_sessions)
            .where(stream_sessions.c.session_id == ending.session_id, stream_sessions.c.ended_at.is_(None))
            .values(status=ending.status, ended_at=ending.ended_at, duration_seconds=ending.duration_seconds))
        if result.rowcount:
            closed.append(ending.session_id)
    return dropped, closed


def history(conn: Connection, stream_id: str | None, publisher_id: str | None, consumer_id: str | None,
            limit: int) -> list[dict[str, Any]]:
    """Newest first."""
    stmt = sa.select(stream_sessions).order_by(stream_sessions.c.started_at.desc()).limit(limit)
    for column, value in (("stream_id", stream_id), ("publisher_id", publisher_id), ("consumer_id", consumer_id)):
        if value is not None:
            stmt = stmt.where(stream_sessions.c[column] == value)
    return [{**row._mapping, "time": row.started_at} for row in conn.execute(stmt)]


def load(conn: Connection) -> dict[str, Any]:
    """Created types, advertised streams and open sessions, for a gateway that starts."""
    types = [row.body for row in conn.execute(sa.select(stream_types.c.body).order_by(stream_types.c.name))]
    streams = [row.body for row in conn.execute(
        sa.select(streams_advertised.c.body).order_by(streams_advertised.c.advertised_at))]
    sessions = [dict(row._mapping) for row in conn.execute(
        sa.select(stream_sessions).where(stream_sessions.c.ended_at.is_(None)).order_by(stream_sessions.c.started_at))]
    return {"types": types, "streams": streams, "sessions": sessions}


def purge(conn: Connection, ended_before: datetime) -> int:
    """History rows of sessions that ended before the retention's start."""
    return conn.execute(sa.delete(stream_sessions).where(stream_sessions.c.ended_at < ended_before)).rowcount
