"""Engines for a database URL: SQLite through the standard ``sqlite3`` driver, PostgreSQL
through asyncpg.

SQLite is tuned for several writers, in this process or others: WAL so readers never block
the writer, a busy timeout so a writer waits for the lock instead of failing, and write
transactions that take the lock up front (``BEGIN IMMEDIATE``), because a deferred
transaction that reads and then writes can fail at once with "database is locked".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Execution option for transactions that only read; on SQLite they begin without the write lock.
READ_ONLY = "controlplane_read_only"

_DRIVERS = {"sqlite": "sqlite", "sqlite+aiosqlite": "sqlite", "sqlite+pysqlite": "sqlite",
            "postgresql": "postgresql+asyncpg", "postgresql+asyncpg": "postgresql+asyncpg"}


def parse_url(url: str | URL) -> URL:
    """The URL with the driver the store runs it on; refuses what the store cannot run on.

    ``sqlite+aiosqlite`` URLs of older configurations are accepted and run on ``sqlite3``.
    """
    parsed = make_url(url)
    driver = _DRIVERS.get(parsed.drivername)
    if driver is None:
        raise ValueError(f"unsupported database URL {parsed!r}: use sqlite:///PATH or postgresql://...")
    parsed = parsed.set(drivername=driver)
    if driver == "sqlite" and parsed.database in (None, "", ":memory:"):
        # Every pooled connection would get its own empty database.
        raise ValueError("the SQLite store needs a file path, not an in-memory database")
    return parsed


def make_sqlite_engine(url: URL) -> Engine:
    """A synchronous engine on ``sqlite3``; the parent folder of the file is created."""
    Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
    # The store's threads take turns with a connection, never share one at the same time.
    engine = create_engine(url, connect_args={"check_same_thread": False})
    _tune_sqlite(engine)
    return engine


def make_postgres_engine(url: URL) -> AsyncEngine:
    return create_async_engine(url, pool_pre_ping=True)


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when a transaction begins (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            # Checkpoints run apart from commits (Database.checkpoint), so no commit pays for one.
            cursor.execute("PRAGMA wal_autocheckpoint = 0")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")
