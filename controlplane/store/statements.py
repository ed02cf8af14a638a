"""The statements every request pays for, written once as SQL and run at the driver's speed.

On the per-request path SQLAlchemy's statement handling cost more than SQLite itself
(about 0.1 ms a statement against 0.01 ms), and the writer thread that pays it holds the
GIL the event loop needs. So these few statements are plain SQL text: SQLite runs them
straight on ``sqlite3``, with values stored exactly as SQLAlchemy stores them (naive UTC
timestamps as text, JSON as text), so every other query reads them unchanged; PostgreSQL
runs the same text through SQLAlchemy with typed parameters. Everything else stays in
SQLAlchemy Core.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection

from controlplane.store.schema import UTCDateTime


@dataclass(frozen=True)
class Statement:
    sql: str  # named parameters, ``:name``
    times: frozenset[str] = field(default_factory=frozenset)  # timezone-aware datetimes
    json: frozenset[str] = field(default_factory=frozenset)  # JSON documents (None is NULL)

    @cached_property
    def text(self) -> sa.TextClause:
        binds = [sa.bindparam(name, type_=UTCDateTime()) for name in self.times]
        binds += [sa.bindparam(name, type_=sa.JSON(none_as_null=True)) for name in self.json]
        return sa.text(self.sql).bindparams(*binds)

    def for_sqlite(self, params: dict[str, Any]) -> dict[str, Any]:
        converted = dict(params)
        for name in self.times:
            value = converted.get(name)
            if value is not None:
                converted[name] = _sqlite_time(value)
        for name in self.json:
            value = converted.get(name)
            converted[name] = None if value is None else json.dumps(value)
        return converted


def _sqlite_time(value: datetime) -> str:
    if value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: the store needs timezone-aware values")
    # SQLAlchemy's SQLite DATETIME format, so reads through it parse what is written here.
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")


def execute(conn: Connection, statement: Statement, params: dict[str, Any]) -> int:
    """Run ``statement`` once; returns the rows it changed."""
    if conn.dialect.name == "sqlite":
        with _as_sqlalchemy_error(statement, params):
            return conn.connection.driver_connection.execute(statement.sql, statement.for_sqlite(params)).rowcount
    return conn.execute(statement.text, params).rowcount


def execute_many(conn: Connection, statement: Statement, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    if conn.dialect.name == "sqlite":
        with _as_sqlalchemy_error(statement, rows):
            conn.connection.driver_connection.executemany(statement.sql, [statement.for_sqlite(r) for r in rows])
    else:
        conn.execute(statement.text, rows)


@contextmanager
def _as_sqlalchemy_error(statement: Statement, params: Any) -> Iterator[None]:
    """The driver's errors as SQLAlchemy raises them, so callers handle one kind."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        raise sa_exc.IntegrityError(statement.sql, params, exc) from exc
    except sqlite3.Error as exc:
        raise sa_exc.DBAPIError(statement.sql, params, exc) from exc


_OPEN = "('accepted', 'dispatched')"

INSERT_RECORD = Statement(
    "INSERT INTO idempotency (action, target, idempotency_key, request_hash, correlation_id, envelope, "
    "created_at, expires_at) VALUES (:action, :target, :idempotency_key, :request_hash, :correlation_id, "
    ":envelope, :created_at, :expires_at)",
    times=frozenset({"created_at", "expires_at"}), json=frozenset({"envelope"}))

INSERT_OPERATION = Statement(
    "INSERT INTO operations (correlation_id, idempotency_key, action, target, signal, swarm_id, lifecycle, "
    "status, envelope, timeout_ms, deadline, created_at, updated_at, outcome, creates_swarm, signals, resource) "
    "VALUES (:correlation_id, :idempotency_key, :action, :target, :signal, :swarm_id, :lifecycle, :status, "
    ":envelope, :timeout_ms, :deadline, :created_at, :updated_at, :outcome, :creates_swarm, :signals, :resource)",
    times=frozenset({"deadline", "created_at", "updated_at"}), json=frozenset({"envelope", "outcome", "signals"}))

INSERT_TARGET = Statement(
    "INSERT INTO operation_targets (correlation_id, target, status, outcome, updated_at) "
    "VALUES (:correlation_id, :target, :status, :outcome, :updated_at)",
    times=frozenset({"updated_at"}), json=frozenset({"outcome"}))

MARK_PUBLISHED = Statement(
    "UPDATE operations SET status = 'dispatched', updated_at = :now "
    "WHERE correlation_id = :correlation_id AND status = 'accepted'",
    times=frozenset({"now"}))

# An operation that is not a fan-out, closed by its own signal's outcome on its own target.
CLOSE_SINGLE = Statement(
    f"UPDATE operations SET status = :status, outcome = :outcome, updated_at = :now "
    f"WHERE correlation_id = :correlation_id AND status IN {_OPEN} AND signal = :signal AND target = :target",
    times=frozenset({"now"}), json=frozenset({"outcome"}))

CLOSE_TARGET = Statement(
    f"UPDATE operation_targets SET status = :status, outcome = :outcome, updated_at = :now "
    f"WHERE correlation_id = :correlation_id AND target = :target AND status IN {_OPEN}",
    times=frozenset({"now"}), json=frozenset({"outcome"}))

# The swarm read model, written whole from the gateway's memory. An UPDATE, never an insert,
# and of the same incarnation only (created_at): a write gathered before a swarm's removal
# must neither bring the row back nor land on a new swarm created under the same id.
UPDATE_SWARM = Statement(
    "UPDATE swarms SET template_id = :template_id, status = :status, controller_instance = :controller_instance, "
    "health = :health, enabled = :enabled, bees = :bees, last_heartbeat = :last_heartbeat, "
    "last_error = :last_error, updated_at = :updated_at WHERE id = :id AND created_at = :created_at",
    times=frozenset({"last_heartbeat", "updated_at", "created_at"}), json=frozenset({"bees", "last_error"}))
