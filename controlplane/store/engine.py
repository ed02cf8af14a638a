"""Builds the async engine for a database URL (SQLite via aiosqlite, or PostgreSQL via asyncpg).

SQLite is tuned for several writers, in this process or others: WAL so readers never block
the writer, a busy timeout so a writer waits for the lock instead of failing, and write
transactions that take the lock up front (``BEGIN IMMEDIATE``), because a deferred
transaction that reads and then writes can fail at once with "database is locked".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Execution option for transactions that only read; on SQLite they begin without the write lock.
READ_ONLY = "controlplane_read_only"

_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}
_SUPPORTED = set(_ASYNC_DRIVERS.values())


def parse_url(url: str | URL) -> URL:
    """The URL with its async driver filled in; refuses what the store cannot run on."""
    parsed = make_url(url)
    parsed = parsed.set(drivername=_ASYNC_DRIVERS.get(parsed.drivername, parsed.drivername))
    if parsed.drivername not in _SUPPORTED:
        raise ValueError(f"unsupported database URL {parsed!r}: use sqlite+aiosqlite or postgresql+asyncpg")
    if parsed.drivername.startswith("sqlite") and parsed.database in (None, "", ":memory:"):
        # Every pooled connection would get its own empty database.
        raise ValueError("the SQLite store needs a file path, not an in-memory database")
    return parsed


def make_engine(url: str | URL) -> AsyncEngine:
    """An engine for ``url``; for SQLite the parent folder of the file is created."""
    parsed = parse_url(url)
    if parsed.drivername.startswith("sqlite"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
        engine = create_async_engine(parsed)
        _tune_sqlite(engine)
        return engine
    return create_async_engine(parsed, pool_pre_ping=True)


def _tune_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when a transaction begins (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")
