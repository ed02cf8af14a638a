"""The SQLite store's writer process: bulk writes go to a child of their own, reads see them,
errors come back as they were raised, and what cannot go to the child (or comes after it has
gone) runs in the gateway's process as before; small writes stay on the event loop. A real
child and a real SQLite file."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError

from controlplane.store.database import SqliteDatabase, open_database
from controlplane.store.process import WriterExited
from tests.store_work import add_note, all_notes, create_notes, sleep

@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[SqliteDatabase]:
    db = open_database(f"sqlite:///{tmp_path / 'store.db'}")
    assert isinstance(db, SqliteDatabase)
    await db.write(create_notes)
    yield db
    await db.close()


def writer_pid(db: SqliteDatabase) -> int:
    proc = db._process._proc
    assert proc is not None, "the writer process has not started"
    return proc.pid


async def test_bulk_writes_run_in_the_child_small_ones_here_and_reads_see_both(database: SqliteDatabase) -> None:
    bulk = await database.write(add_note, 1, "bulk")
    small = await database.write_small(add_note, 2, "small")
    assert bulk == writer_pid(database) != os.getpid()
    assert small == os.getpid()
    assert await database.read(all_notes) == [(1, "bulk", bulk), (2, "small", small)]


async def test_an_error_in_the_child_comes_back_as_raised_and_rolls_back(database: SqliteDatabase) -> None:
    await database.write(add_note, 1, "first")
    with pytest.raises(IntegrityError, match="UNIQUE"):
        await database.write(add_note, 1, "again")
    # The child goes on after a failed transaction, and nothing of it was kept.
    await database.write(add_note, 2, "second")
    assert [text for _, text, _ in await database.read(all_notes)] == ["first", "second"]


async def test_work_that_does_not_pickle_or_load_runs_here(database: SqliteDatabase) -> None:
    assert await database.write(lambda conn: add_note(conn, 1, "from a lambda")) == os.getpid()
    # Pickles here, but the writer process cannot import this test module.
    assert await database.write(add_note_here, 2, "from this module") == os.getpid()
    assert await database.write(add_note, 3, "the child goes on") == writer_pid(database)
    assert [text for _, text, _ in await database.read(all_notes)] == ["from a lambda", "from this module",
                                                                       "the child goes on"]


def add_note_here(conn: Any, note_id: int, text: str) -> int:
    return add_note(conn, note_id, text)


async def test_once_the_child_is_gone_writes_run_here(database: SqliteDatabase) -> None:
    child = writer_pid(database)
    os.kill(child, signal.SIGKILL)
    async with asyncio.timeout(10):
        while not database._process.exited:
            await asyncio.sleep(0.01)
    assert await database.write(add_note, 1, "after") == os.getpid()
    assert [text for _, text, _ in await database.read(all_notes)] == ["after"]


async def test_a_transaction_in_flight_when_the_child_dies_fails(database: SqliteDatabase) -> None:
    async def slow_then_die() -> Any:
        return await database.write(sleep, 30.0)

    waiting = asyncio.create_task(slow_then_die())
    async with asyncio.timeout(10):
        while not database._process._waiting:
            await asyncio.sleep(0.01)
    os.kill(writer_pid(database), signal.SIGKILL)
    with pytest.raises(WriterExited):
        async with asyncio.timeout(10):
            await waiting


async def test_close_ends_the_child_after_what_it_was_sent(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'store.db'}")
    assert isinstance(db, SqliteDatabase)
    await db.write(create_notes)
    proc = db._process._proc
    assert proc is not None
    pending = asyncio.ensure_future(db.write(add_note, 1, "last"))
    await asyncio.sleep(0)  # sent, not yet answered
    await db.close()
    assert await pending == proc.pid
    assert proc.returncode == 0
    reopened = open_database(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        assert [text for _, text, _ in await reopened.read(all_notes)] == ["last"]
    finally:
        await reopened.close()
