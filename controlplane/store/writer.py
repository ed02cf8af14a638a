"""The store's one writer: every write of a process, committed in groups.

Callers hand in a *unit*, a function of a connection that does one piece of work, and get
a future for its result. One task takes whatever is pending and commits it as a single
transaction, each unit inside a savepoint of its own: a unit that fails (a constraint
another gateway won, a bug) rolls back alone and fails only its own caller. While one
batch commits, the next one gathers, so under load a commit carries many requests and
when idle a lone request commits at once.

A request that must not be answered before its record is durable awaits its future; a
write that only keeps a read model current is ``detach``-ed and goes on by itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client import Histogram
from sqlalchemy.engine import Connection

from controlplane.logs import get_logger
from controlplane.store.database import Database

log = get_logger("store.writer")

T = TypeVar("T")
Unit = Callable[[Connection], Any]

MAX_BATCH = 512

BATCH_SIZE = Histogram("cp_store_batch_units", "Units of work committed per store transaction",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
COMMIT_SECONDS = Histogram("cp_store_commit_seconds", "Duration of one group commit",
                           buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))


class Writer:
    def __init__(self, database: Database, max_batch: int = MAX_BATCH) -> None:
        self._database = database
        self._max_batch = max_batch
        self._pending: list[tuple[Unit, asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Writer:
        self._task = asyncio.create_task(self._run(), name="store-writer")
        return self

    def submit(self, unit: Unit) -> asyncio.Future[Any]:
        """Queue ``unit``; the future resolves once its transaction has committed."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((unit, future))
        self._idle.clear()
        self._wake.set()
        return future

    async def stop(self) -> None:
        """Commit everything already submitted, then stop."""
        if self._task is None:
            return
        if self._pending or not self._idle.is_set():
            await self._idle.wait()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending[:self._max_batch], self._pending[self._max_batch:]
                await self._commit(batch)
            self._idle.set()

    async def _commit(self, batch: list[tuple[Unit, asyncio.Future[Any]]]) -> None:
        BATCH_SIZE.observe(len(batch))
        try:
            with COMMIT_SECONDS.time():
                results = await self._database.write(_apply, [unit for unit, _ in batch])
        except Exception as exc:  # the transaction as a whole failed: every unit in it did
            log.warning("store commit failed", units=len(batch), error=repr(exc))
            results = [(False, exc)] * len(batch)
        for (_, future), (ok, value) in zip(batch, results):
            if future.done():  # its caller gave up waiting
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)


def _apply(conn: Connection, units: list[Unit]) -> list[tuple[bool, Any]]:
    results: list[tuple[bool, Any]] = []
    for unit in units:
        savepoint = conn.begin_nested()
        try:
            value = unit(conn)
        except Exception as exc:
            savepoint.rollback()
            results.append((False, exc))
        else:
            savepoint.commit()
            results.append((True, value))
    return results


def detach(future: asyncio.Future[Any], what: str) -> None:
    """Let a write go on without waiting for it; a failure is logged, not lost silently."""

    def done(f: asyncio.Future[Any]) -> None:
        if not f.cancelled() and f.exception() is not None:
            log.warning("background store write failed", write=what, error=repr(f.exception()))

    future.add_done_callback(done)
