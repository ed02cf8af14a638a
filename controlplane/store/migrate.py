"""Runs the alembic migrations from code, so opening the store brings its schema to head.

The alembic configuration is built here rather than read from a cwd-relative alembic.ini.
Concurrent upgrades are serialised: across processes on PostgreSQL by a transaction-scoped
advisory lock, on SQLite by the write lock that ``BEGIN IMMEDIATE`` takes (see ``engine``);
within a process by an asyncio lock, because alembic keeps the running migration context
in module globals and two interleaved upgrades would trample each other's.
"""

from __future__ import annotations

import asyncio
import weakref
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Arbitrary but fixed: every process that migrates this database must use the same key.
PG_MIGRATION_LOCK_KEY = 0x63705F73746F7265  # "cp_store"

_process_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


async def lock_for_migration(conn: AsyncConnection) -> None:
    """Wait until no other process is migrating; released when the transaction ends."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK_KEY})


def _upgrade(sync_conn: Connection, revision: str) -> None:
    config = alembic_config()
    # env.py migrates over this connection instead of opening its own.
    config.attributes["connection"] = sync_conn
    command.upgrade(config, revision)


def _process_lock() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lock = _process_locks.get(loop)
    if lock is None:
        lock = _process_locks[loop] = asyncio.Lock()
    return lock


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` in one transaction; a no-op when already there."""
    async with _process_lock(), engine.begin() as conn:
        await lock_for_migration(conn)
        await conn.run_sync(_upgrade, revision)
