"""Runs the alembic migrations from code, so opening the store brings its schema to head.

The alembic configuration is built here rather than read from a cwd-relative alembic.ini.
``Database.migrate`` serialises concurrent upgrades: across processes on PostgreSQL by a
transaction-scoped advisory lock, on SQLite by the write lock ``BEGIN IMMEDIATE`` takes.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Arbitrary but fixed: every process that migrates this database must use the same key.
PG_MIGRATION_LOCK_KEY = 0x63705F73746F7265  # "cp_store"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def run_migrations(conn: Connection, revision: str = "head") -> None:
    """Upgrade over ``conn`` (inside the caller's transaction) to ``revision``."""
    config = alembic_config()
    # env.py migrates over this connection instead of opening its own.
    config.attributes["connection"] = conn
    command.upgrade(config, revision)
