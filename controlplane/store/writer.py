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
BULKY_ITEMS = 64  # a batch (or a gathered unit) of more than this commits off the event loop
GATHER_S = 0.02  # how long writes nobody waits on are gathered before they are committed

BATCH_SIZE = Histogram("cp_store_batch_units", "Units of work committed per store transaction",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
COMMIT_SECONDS = Histogram("cp_store_commit_seconds", "Duration of one group commit",
                           buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))


class Writer:
    def __init__(self, database: Database, max_batch: int = MAX_BATCH) -> None:
        self._database = database
        self._max_batch = max_batch
        self._pending: list[tuple[Unit, asyncio.Future[Any], bool]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        # fn -> (its items, their future, the timer that submits them)
        self._groups: dict[Callable[..., Any], tuple[list[Any], asyncio.Future[Any], asyncio.TimerHandle]] = {}
        self._bulky: set[Callable[..., Any]] = set()

    def start(self) -> Writer:
        self._task = asyncio.create_task(self._run(), name="store-writer")
        return self

    def submit(self, unit: Unit, bulky: bool = False) -> asyncio.Future[Any]:
        """Queue ``unit``; the future resolves once its transaction has committed.

        ``bulky``: a unit of many statements (a registry flush, a purge); its batch runs off
        the event loop."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((unit, future, bulky))
        self._idle.clear()
        self._wake.set()
        return future

    def gather(self, fn: Callable[[Connection, list[Any]], Any], item: Any, bulky: bool = False,
               window_s: float = GATHER_S) -> asyncio.Future[Any]:
        """Queue ``item`` for ``fn``, which takes every item gathered within ``window_s`` as one
        unit: a thousand outcomes cost one unit, not a thousand. All share one future.

        For writes nobody waits on (read models kept durable): gathering them a moment keeps
        them out of the way of the commits that requests do wait on. ``bulky``: the unit runs
        off the event loop however few items it has (a hot path's own writes).
        """
        group = self._groups.get(fn)
        if group is None:
            loop = asyncio.get_running_loop()
            items: list[Any] = []
            group = self._groups[fn] = (items, loop.create_future(),
                                        loop.call_later(window_s, self._submit_gathered, fn))
            if bulky:
                self._bulky.add(fn)
            self._idle.clear()
        group[0].append(item)
        return group[1]

    def flush(self, fn: Callable[[Connection, list[Any]], Any]) -> asyncio.Future[Any] | None:
        """Submit what is gathered for ``fn`` now: a unit submitted next commits after it (the
        writer commits in order), e.g. a row's update after its gathered insert. The gathered
        items' future, None when nothing was gathered."""
        return self._submit_gathered(fn)

    def _submit_gathered(self, fn: Callable[[Connection, list[Any]], Any]) -> asyncio.Future[Any] | None:
        group = self._groups.pop(fn, None)
        if group is None:  # nothing gathered
            return None
        items, future, timer = group
        timer.cancel()  # flushed early: the next group must get its whole window
        committed = self.submit(_Gathered(fn, items), bulky=len(items) > BULKY_ITEMS or fn in self._bulky)
        committed.add_done_callback(lambda done: _chain(done, future))
        return future

    async def stop(self) -> None:
        """Commit everything already submitted or gathered, then stop."""
        if self._task is None:
            return
        for fn in list(self._groups):
            self._submit_gathered(fn)
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
            if not self._groups:
                self._idle.set()

    async def _commit(self, batch: list[tuple[Unit, asyncio.Future[Any], bool]]) -> None:
        BATCH_SIZE.observe(len(batch))
        units = [unit for unit, _, _ in batch]
        bulky = len(batch) > BULKY_ITEMS or any(b for _, _, b in batch)
        write = self._database.write if bulky else self._database.write_small
        try:
            with COMMIT_SECONDS.time():
                results = await write(_apply, units)
        except Exception as exc:  # the transaction as a whole failed: every unit in it did
            log.warning("store commit failed", units=len(batch), error=repr(exc))
            results = [(False, exc)] * len(batch)
        for (_, future, _), (ok, value) in zip(batch, results):
            if future.done():  # its caller gave up waiting
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)


class _Gathered:
    """A unit over the items gathered for one function."""

    def __init__(self, fn: Callable[[Connection, list[Any]], Any], items: list[Any]) -> None:
        self.fn, self.items = fn, items

    def __call__(self, conn: Connection) -> Any:
        return self.fn(conn, self.items)


def _apply(conn: Connection, units: list[Unit]) -> list[tuple[bool, Any]]:
    # Savepoints straight on the driver's cursor: SQLAlchemy's nested transactions cost more
    # than the statements they wrap, and these never outlive this function.
    cursor = conn.connection.cursor()
    results: list[tuple[bool, Any]] = []
    try:
        for unit in units:
            cursor.execute("SAVEPOINT unit")
            try:
                value = unit(conn)
            except Exception as exc:
                cursor.execute("ROLLBACK TO SAVEPOINT unit")
                results.append((False, exc))
            else:
                results.append((True, value))
            cursor.execute("RELEASE SAVEPOINT unit")
    finally:
        cursor.close()
    return results


def _chain(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]
    else:
        target.set_result(source.result())


def detach(future: asyncio.Future[Any], what: str) -> None:
    """Let a write go on without waiting for it; a failure is logged, not lost silently."""

    def done(f: asyncio.Future[Any]) -> None:
        if not f.cancelled() and f.exception() is not None:
            log.warning("background store write failed", write=what, error=repr(f.exception()))

    future.add_done_callback(done)
