"""The engine-pool surface's durable copy: engines, streams and stream statistics.

Units of work and reads, each a function of a connection, for ``Store``'s pool methods. The
surface keeps everything in memory; these rows are what it loads again after a restart.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from controlplane.store.schema import pool_engines, pool_stream_stats, pool_streams


def save_engines(conn: Connection, items: list[tuple[str, list[dict[str, Any]]]]) -> None:
    """The newest engine list of each pool replaces what the store holds."""
    latest = dict(items)
    for pool_id, engines in latest.items():
        conn.execute(sa.delete(pool_engines).where(pool_engines.c.pool_id == pool_id))
        if engines:
            conn.execute(sa.insert(pool_engines), [{"pool_id": pool_id, "container_id": e["container_id"], "body": e}
                                                   for e in engines])


def save_streams(conn: Connection, items: list[tuple[str, dict[str, Any]]]) -> None:
    """Each stream as it was last given (a burst of events is one statement)."""
    latest = {(pool_id, stream["id"]): stream for pool_id, stream in items}
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(pool_streams)
    upsert = insert.on_conflict_do_update(
        index_elements=["pool_id", "id"],
        set_={name: insert.excluded[name] for name in ("status", "container_id", "started_at", "ended_at", "body")})
    conn.execute(upsert, [
        {"pool_id": pool_id, "id": stream["id"], "status": stream["status"], "container_id": stream["container_id"],
         "started_at": datetime.fromisoformat(stream["started_at"]),
         "ended_at": datetime.fromisoformat(stream["ended_at"]) if stream.get("ended_at") else None, "body": stream}
        for (pool_id, _), stream in latest.items()])


def add_stats(conn: Connection, items: list[tuple[str, str, dict[str, Any]]]) -> None:
    conn.execute(sa.insert(pool_stream_stats), [
        {"pool_id": pool_id, "stream_id": stream_id, "ts": datetime.fromisoformat(snapshot["ts"]), "body": snapshot}
        for pool_id, stream_id, snapshot in items])


def load(conn: Connection, pool_id: str, stats_since: datetime) -> dict[str, Any]:
    engines = [row.body for row in conn.execute(
        sa.select(pool_engines.c.body).where(pool_engines.c.pool_id == pool_id))]
    streams = [row.body for row in conn.execute(
        sa.select(pool_streams.c.body).where(pool_streams.c.pool_id == pool_id).order_by(pool_streams.c.started_at))]
    stats: dict[str, list[dict[str, Any]]] = {}
    for row in conn.execute(sa.select(pool_stream_stats.c.stream_id, pool_stream_stats.c.body)
                            .where(pool_stream_stats.c.pool_id == pool_id, pool_stream_stats.c.ts >= stats_since)
                            .order_by(pool_stream_stats.c.ts)):
        stats.setdefault(row.stream_id, []).append(row.body)
    return {"engines": engines, "streams": streams, "stats": stats}


def purge(conn: Connection, ended_before: datetime, stats_before: datetime) -> None:
    """Streams ended long ago, and statistics older than their retention."""
    conn.execute(sa.delete(pool_streams).where(pool_streams.c.ended_at < ended_before))
    conn.execute(sa.delete(pool_stream_stats).where(pool_stream_stats.c.ts < stats_before))
