"""Where store work runs: plain functions of a synchronous SQLAlchemy ``Connection``.

Every query of the store is written once, as a function of a connection, and runs the same
on both backends. PostgreSQL runs it over asyncpg through SQLAlchemy's ``run_sync``.

SQLite runs it with the standard ``sqlite3`` driver. A small write transaction (the ones
requests wait for) runs right on the event loop: it takes tens of microseconds, where handing
it to a thread and back cost milliseconds here, mostly waiting for the GIL while the loop was
busy, and a round trip to another process about half a millisecond. A bulk write (many rows:
a hot path's gathered rows, a registry flush) runs in a process of its own (``process``):
SQLite's work then has a core and a GIL of its own, and the loop only pickles the rows and
reads the answer; a thread did not help, it and the loop contend for the GIL. A bulk write
that does not pickle runs on a thread, as before. Reads run on a thread of their own. The one
writer (``Writer``) never runs two write transactions at once, so nothing here waits on
SQLite's lock held by this gateway; WAL checkpoints, the one slow part of a commit, are taken
off the commit path and run on the read thread (``checkpoint``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import text
from sqlalchemy.engine import Connection

from controlplane.store.engine import READ_ONLY, make_postgres_engine, make_sqlite_engine, parse_url
from controlplane.store.migrate import PG_MIGRATION_LOCK_KEY, run_migrations
from controlplane.store.process import NotPortable, WriterProcess

T = TypeVar("T")
Work = Callable[..., T]

_migration_lock: asyncio.Lock | None = None


class Database:
    """One database: ``write`` and ``read`` run a function in a transaction of their own."""

    dialect: str

    async def write(self, fn: Work[T], *args: Any) -> T:
        raise NotImplementedError

    async def write_small(self, fn: Work[T], *args: Any) -> T:
        """``write`` for a transaction of a few statements (SQLite: on the event loop, where
        ``write`` runs in a writer process)."""
        return await self.write(fn, *args)

    async def checkpoint(self) -> None:
        """Housekeeping the backend needs now and then (SQLite: a WAL checkpoint)."""

    async def read(self, fn: Work[T], *args: Any) -> T:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def migrate(self, revision: str = "head") -> None:
        """Bring the schema to ``revision``; serialised across this process and others."""
        global _migration_lock
        # alembic keeps the running migration in module globals: one at a time per process.
        _migration_lock = _migration_lock or asyncio.Lock()
        async with _migration_lock:
            await self.write(_migrate, revision)


def lock_for_migration(conn: Connection) -> None:
    """Wait until no other process is migrating; released when the transaction ends."""
    if conn.dialect.name == "postgresql":  # SQLite's BEGIN IMMEDIATE already serialises
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK_KEY})


def _migrate(conn: Connection, revision: str) -> None:
    lock_for_migration(conn)
    run_migrations(conn, revision)


class SqliteDatabase(Database):
    dialect = "sqlite"

    def __init__(self, url: Any) -> None:
        self.engine = make_sqlite_engine(url)
        self._reader = self.engine.execution_options(**{READ_ONLY: True})
        # One thread writes (SQLite has one writer anyway); reads go on beside it under WAL.
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="store-write")
        self._read_thread = ThreadPoolExecutor(1, thread_name_prefix="store-read")
        self._held: Connection | None = None  # write_small's, used on the event loop only
        self._process = WriterProcess(url.render_as_string(hide_password=False))

    async def write(self, fn: Work[T], *args: Any) -> T:
        try:
            return await self._process.run(fn, args)
        except NotPortable:
            return await asyncio.get_running_loop().run_in_executor(
                self._write_thread, partial(_in_transaction, self.engine, fn, args))

    async def write_small(self, fn: Work[T], *args: Any) -> T:
        # A connection of its own, held: checking one out of the pool and back for every
        # commit cost more than the commit.
        if self._held is None:
            self._held = self.engine.connect()
        try:
            with self._held.begin():
                return fn(self._held, *args)
        except Exception:
            if self._held.invalidated or self._held.closed:
                self._held = None
            raise

    async def checkpoint(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._read_thread, self._checkpoint)

    def _checkpoint(self) -> None:
        raw = self.engine.raw_connection()
        try:
            # PASSIVE: copy what no reader needs, never wait for the writer.
            raw.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            raw.close()

    async def read(self, fn: Work[T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._read_thread, partial(_in_transaction, self._reader, fn, args))

    async def close(self) -> None:
        await self._process.stop()
        loop = asyncio.get_running_loop()
        for thread in (self._write_thread, self._read_thread):
            await loop.run_in_executor(None, thread.shutdown)
        if self._held is not None:
            self._held.close()
            self._held = None
        self.engine.dispose()


def _in_transaction(engine: Any, fn: Work[T], args: tuple[Any, ...]) -> T:
    with engine.begin() as conn:
        return fn(conn, *args)


class PostgresDatabase(Database):
    dialect = "postgresql"

    def __init__(self, url: Any) -> None:
        self.engine = make_postgres_engine(url)

    async def write(self, fn: Work[T], *args: Any) -> T:
        async with self.engine.begin() as conn:
            return await conn.run_sync(fn, *args)

    read = write

    async def close(self) -> None:
        await self.engine.dispose()


def open_database(url: str) -> Database:
    parsed = parse_url(url)
    return SqliteDatabase(parsed) if parsed.drivername == "sqlite" else PostgresDatabase(parsed)
