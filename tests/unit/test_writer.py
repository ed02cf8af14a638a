"""The store's one writer, on a real SQLite file: group commit, failure isolation, gathering."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from controlplane.store.database import Database, open_database
from controlplane.store.writer import Writer

TABLE = sa.Table("t", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))


class CountingDatabase:
    """The real database, counting the transactions the writer opens."""

    def __init__(self, inner: Database) -> None:
        self.inner, self.transactions = inner, 0

    async def write(self, fn: Any, *args: Any) -> Any:
        self.transactions += 1
        return await self.inner.write(fn, *args)

    async def write_small(self, fn: Any, *args: Any) -> Any:
        self.transactions += 1
        return await self.inner.write_small(fn, *args)


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    db = open_database(f"sqlite:///{tmp_path / 'w.db'}")
    await db.write(lambda conn: TABLE.create(conn))
    yield db
    await db.close()


def insert(value: int) -> Any:
    return lambda conn: conn.execute(sa.insert(TABLE).values(id=value)) and value


async def ids(db: Database) -> list[int]:
    return await db.read(lambda conn: list(conn.execute(sa.select(TABLE.c.id).order_by(TABLE.c.id)).scalars()))


async def test_pending_units_commit_together_and_a_failing_one_fails_alone(database: Database) -> None:
    counting = CountingDatabase(database)
    writer = Writer(counting).start()  # type: ignore[arg-type]
    try:
        # Submitted in one go: one transaction; the duplicate key fails only its own caller.
        futures = [writer.submit(insert(i)) for i in (1, 2, 2, 3)]
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert results[0] == 1 and results[1] == 2 and results[3] == 3
        assert isinstance(results[2], sa.exc.IntegrityError)
        assert counting.transactions == 1
        assert await ids(database) == [1, 2, 3]
    finally:
        await writer.stop()


async def test_gathered_items_are_one_unit_and_stop_commits_them(database: Database) -> None:
    counting = CountingDatabase(database)
    writer = Writer(counting).start()  # type: ignore[arg-type]
    seen: list[list[int]] = []

    def insert_all(conn: Any, items: list[int]) -> int:
        seen.append(list(items))
        conn.execute(sa.insert(TABLE), [{"id": i} for i in items])
        return len(items)

    shared = [writer.gather(insert_all, i) for i in range(10, 20)]
    assert len({id(f) for f in shared}) == 1  # one future for the whole group
    assert await shared[0] == 10
    assert seen == [list(range(10, 20))] and counting.transactions == 1
    late = writer.gather(insert_all, 99)  # a new group; stop must not lose it
    await writer.stop()
    assert late.done() and late.result() == 1
    assert await ids(database) == [*range(10, 20), 99]


async def test_a_flush_commits_a_gathering_before_its_window_ends(database: Database) -> None:
    writer = Writer(database).start()
    try:
        def insert_all(conn: Any, items: list[int]) -> None:
            conn.execute(sa.insert(TABLE), [{"id": i} for i in items])

        gathered = writer.gather(insert_all, 7, window_s=3600)
        flushed = writer.flush(insert_all)
        assert flushed is gathered  # the caller can wait for what it flushed
        await asyncio.wait_for(flushed, 10)
        assert await ids(database) == [7]
        assert writer.flush(insert_all) is None  # nothing gathered any more

        # A flushed group's timer is gone: it must not cut the next group's window short.
        writer.gather(insert_all, 8, window_s=0.05)
        writer.flush(insert_all)
        later = writer.gather(insert_all, 9, window_s=3600)
        after_that_timer = writer.gather(lambda conn, items: None, None, window_s=0.1)
        await asyncio.wait_for(after_that_timer, 10)  # committed after the flushed timer was due
        assert not later.done() and await ids(database) == [7, 8]
    finally:
        await writer.stop()
