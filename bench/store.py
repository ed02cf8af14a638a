"""The store's write path against bare sqlite3, measured in one run.

``Store.begin_action`` (the commit a 202 waits for: idempotency record, operation, through
the one writer) at concurrency 1 and 64, beside the same three rows written by bare
``sqlite3``, one transaction per action, on a file of its own. With one writer and group
commit, concurrent actions share transactions, so the store can outrun the bare
one-transaction-per-action loop; alone, it should cost little more.

    .venv/bin/python -m bench.store [--n 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from bench.common import environment, progress
from controlplane import logs
from controlplane.store import NewAction, open_store
from controlplane.store.models import utcnow


def new_action() -> NewAction:
    cid = str(uuid.uuid4())
    return NewAction(action="config-update", target="generator.bench", idempotency_key=str(uuid.uuid4()),
                     request_hash="h", correlation_id=cid, envelope={"correlationId": cid}, signal="config-update",
                     swarm_id="bench", lifecycle=False, timeout_ms=60_000, created_at=utcnow(), retention_s=3600,
                     signals=[{"signal": "config-update", "correlationId": cid}])


async def store_run(path: Path, n: int, concurrency: int) -> tuple[float, float]:
    """(p50 ms of one begin_action, actions per second)."""
    store = await open_store(f"sqlite:///{path}")
    latencies: list[float] = []
    try:
        async def worker(count: int) -> None:
            for _ in range(count):
                started = time.perf_counter()
                await store.begin_action(new_action())
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        await store.close()
    return statistics.median(latencies) * 1000, len(latencies) / elapsed


def bare_run(template: Path, path: Path, n: int) -> tuple[float, float]:
    """The same rows through sqlite3, one transaction each, on a copy of the migrated schema."""
    path.write_bytes(template.read_bytes())
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    latencies: list[float] = []
    started_all = time.perf_counter()
    for _ in range(n):
        a = new_action()
        now = a.created_at.strftime("%Y-%m-%d %H:%M:%S.%f")
        started = time.perf_counter()
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO idempotency VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (a.action, a.target, a.idempotency_key, a.request_hash, a.correlation_id,
                    json.dumps(a.envelope), now, now))
        db.execute("INSERT INTO operations (correlation_id, idempotency_key, action, target, signal, swarm_id, "
                   "lifecycle, status, envelope, timeout_ms, deadline, created_at, updated_at, creates_swarm, "
                   "signals) VALUES (?, ?, ?, ?, ?, ?, 0, 'accepted', ?, ?, ?, ?, ?, 0, ?)",
                   (a.correlation_id, a.idempotency_key, a.action, a.target, a.signal, a.swarm_id,
                    json.dumps(a.envelope), a.timeout_ms, now, now, now, json.dumps(a.signals)))
        db.execute("COMMIT")
        latencies.append(time.perf_counter() - started)
    elapsed = time.perf_counter() - started_all
    db.close()
    return statistics.median(latencies) * 1000, n / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="actions per run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        template = folder / "schema.db"
        await (await open_store(f"sqlite:///{template}")).close()  # migrated, empty
        progress("bare sqlite3, one transaction per action")
        bare_p50, bare_rate = bare_run(template, folder / "bare.db", args.n)
        rows = []
        for concurrency in (1, 64):
            progress(f"Store.begin_action, concurrency {concurrency}")
            path = folder / f"store-{concurrency}.db"
            path.write_bytes(template.read_bytes())
            rows.append((concurrency, *await store_run(path, args.n, concurrency)))
    print("  ".join(f"{k}={v}" for k, v in environment("-").items() if k != "broker"))
    print(f"\nStore.begin_action against bare sqlite3 ({args.n} actions each; bare: "
          f"p50 {bare_p50:.3f} ms, {bare_rate:,.0f} actions/s)")
    print(f"  {'concurrency':>11}  {'p50 ms':>8}  {'actions/s':>10}  {'rate / bare':>11}")
    for concurrency, p50, rate in rows:
        print(f"  {concurrency:>11}  {p50:8.3f}  {rate:10,.0f}  {rate / bare_rate:10.2f}x")


if __name__ == "__main__":
    logs.configure("WARNING")
    asyncio.run(main())
