"""The cost of one store read, the floor under every gateway request that touches the store.

    .venv/bin/python -m bench.store [--n 1000]

Times ``Store.find_action`` (the only store call of an idempotent replay) on a temporary
SQLite database, one caller and 20 concurrent callers, against the same transaction
(BEGIN, one indexed SELECT, COMMIT) through aiosqlite alone and through the sqlite3 module.
It also counts, for one call, the statements sent and the hand-offs to aiosqlite's thread.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import aiosqlite
from sqlalchemy import event

from controlplane.store import open_store

QUERY = ("SELECT * FROM idempotency WHERE action = ? AND target = ? AND idempotency_key = ? "
         "AND expires_at >= ?")
ARGS = ("swarm-start", "bench", "key", "2026-01-01 00:00:00")


async def store_calls(path: Path, n: int) -> dict[str, float]:
    store = await open_store(f"sqlite+aiosqlite:///{path}")
    try:
        for _ in range(50):  # warm the pool and the statement cache
            await store.find_action("swarm-start", "bench", "key", "h")
        figures: dict[str, float] = {}
        for concurrency in (1, 20):
            async def caller(calls: int) -> None:
                for _ in range(calls):
                    await store.find_action("swarm-start", "bench", "key", "h")

            started = time.perf_counter()
            await asyncio.gather(*(caller(n // concurrency) for _ in range(concurrency)))
            figures[f"c{concurrency}"] = (time.perf_counter() - started) / n
        statements: list[str] = []
        event.listen(store.engine.sync_engine, "before_cursor_execute",
                     lambda _c, _cur, stmt, *_: statements.append(stmt.split()[0]))
        handoffs = 0
        original = aiosqlite.Connection._execute

        async def counting(self: aiosqlite.Connection, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal handoffs
            handoffs += 1
            return await original(self, fn, *args, **kwargs)

        aiosqlite.Connection._execute = counting  # type: ignore[method-assign]
        try:
            await store.find_action("swarm-start", "bench", "key", "h")
        finally:
            aiosqlite.Connection._execute = original  # type: ignore[method-assign]
        figures["statements"] = len(statements)
        figures["handoffs"] = handoffs
        return figures
    finally:
        await store.close()


async def aiosqlite_calls(path: Path, n: int) -> float:
    async with aiosqlite.connect(path, isolation_level=None) as db:
        started = time.perf_counter()
        for _ in range(n):
            await db.execute("BEGIN")
            cursor = await db.execute(QUERY, ARGS)
            await cursor.fetchall()
            await cursor.close()
            await db.execute("COMMIT")
        return (time.perf_counter() - started) / n


def sqlite3_calls(path: Path, n: int) -> float:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        started = time.perf_counter()
        for _ in range(n):
            db.execute("BEGIN")
            db.execute(QUERY, ARGS).fetchall()
            db.execute("COMMIT")
        return (time.perf_counter() - started) / n
    finally:
        db.close()


async def main(n: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="cp-bench-store-"))
    try:
        path = tmp / "controlplane.db"
        store = await store_calls(path, n)
        bare_async = await aiosqlite_calls(path, n)
        bare_sync = sqlite3_calls(path, n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"one idempotency read (BEGIN, indexed SELECT, COMMIT), n={n}")
    print(f"  {'':<44} {'ms/call':>9} {'calls/s':>9}")
    rows = [("Store.find_action, 1 caller", store["c1"]), ("Store.find_action, 20 concurrent callers", store["c20"]),
            ("aiosqlite alone, 1 caller", bare_async), ("sqlite3 module, 1 caller", bare_sync)]
    for label, seconds in rows:
        print(f"  {label:<44} {seconds * 1000:>9.3f} {1 / seconds:>9.0f}")
    print(f"  Store.find_action: {store['statements']:.0f} statements, "
          f"{store['handoffs']:.0f} hand-offs to the aiosqlite thread per call")
    print(f"  ratio Store.find_action / aiosqlite alone: {store['c1'] / bare_async:.1f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.store")
    parser.add_argument("--n", type=int, default=1000)
    asyncio.run(main(parser.parse_args().n))
