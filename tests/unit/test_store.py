"""Tests of the persistence layer, run against a temporary SQLite file and a real PostgreSQL.

Each test gets a fresh database: a new SQLite file, or a ``cp_test_<random>`` PostgreSQL
database created through ``CP_TEST_POSTGRES_URL`` (default: postgres@127.0.0.1:5432/test)
and dropped afterwards. PostgreSQL being unreachable is a failure, not a skip.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from controlplane.store import (
    Busy,
    ControllerView,
    NewAction,
    OperationRow,
    RegistryBatch,
    Replayed,
    Started,
    StatusReport,
    Store,
    SwarmExists,
    SwarmRow,
    open_store,
)
from controlplane.store.models import utcnow
from controlplane.store import repo
from controlplane.store.schema import operations
from tests.conftest import fresh_postgres_database

PROJECT_ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2024, 1, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """URL of a fresh, empty database on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'nested' / 'store.db'}"
        return
    async with fresh_postgres_database() as url:
        yield url


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    opened = await open_store(db_url)
    try:
        yield opened
    finally:
        await opened.close()


def action(**overrides: Any) -> NewAction:
    values: dict[str, Any] = dict(
        action="swarm-start",
        target="sw1",
        idempotency_key="key-1",
        request_hash="hash-1",
        correlation_id=str(uuid.uuid4()),
        envelope={"accepted": True, "nested": {"list": [1, 2]}},
        signal="swarm-start",
        swarm_id="sw1",
        lifecycle=True,
        timeout_ms=30_000,
        created_at=T0,
        retention_s=3600,
    )
    values.update(overrides)
    return NewAction(**values)


def swarm(swarm_id: str = "sw1", status: str = "Ready", **overrides: Any) -> SwarmRow:
    values: dict[str, Any] = dict(template_id="tpl", created_at=T0, updated_at=T0)
    values.update(overrides)
    return SwarmRow(id=swarm_id, status=status, **values)


def assert_utc(value: datetime) -> None:
    assert value.tzinfo is not None and value.utcoffset() == timedelta(0)


async def started(store: Store, new: NewAction, create_swarm: SwarmRow | None = None) -> OperationRow:
    result = await store.begin_action(new, create_swarm)
    assert isinstance(result, Started), result
    return result.operation


# --- migrations ---------------------------------------------------------------------------


async def test_migrations_run_twice(db_url: str) -> None:
    for _ in range(2):
        opened = await open_store(db_url)
        try:
            version = await opened.database.read(
                lambda c: c.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all())
            tables = await opened.database.read(lambda c: set(sa.inspect(c).get_table_names()))
        finally:
            await opened.close()
        assert version == ["0006"]
        assert {"idempotency", "operations", "swarms", "components", "operation_targets", "pool_engines",
                "pool_streams", "pool_stream_stats", "webhooks", "webhook_deliveries"} <= tables


async def test_concurrent_first_open(db_url: str) -> None:
    stores = await asyncio.gather(*(open_store(db_url) for _ in range(4)))
    try:
        await started(stores[0], action())
        replay = await stores[3].begin_action(action())
        assert isinstance(replay, Replayed)
    finally:
        await asyncio.gather(*(s.close() for s in stores))


_PROCESS_SCRIPT = """
import asyncio, sys
from datetime import datetime, timezone
from controlplane.store import NewAction, open_store

async def main(url: str, n: str) -> None:
    store = await open_store(url)
    try:
        result = await store.begin_action(NewAction(
            action="swarm-start", target="sw1", idempotency_key="shared", request_hash="h",
            correlation_id=f"process-{n}", envelope={}, signal="swarm-start", swarm_id="sw1",
            lifecycle=True, timeout_ms=1000, created_at=datetime.now(timezone.utc), retention_s=60))
        print(type(result).__name__)
    finally:
        await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_processes_open_and_begin_at_once(db_url: str) -> None:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _PROCESS_SCRIPT, db_url, str(n),
            cwd=PROJECT_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        for n in range(4)
    ]
    outputs = [await proc.communicate() for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err.decode()
    assert sorted(out.decode().strip() for out, _ in outputs) == ["Replayed", "Replayed", "Replayed", "Started"]


def test_alembic_cli_upgrade_and_check(db_url: str) -> None:
    def alembic(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "alembic", "-c", "controlplane/store/alembic.ini", "-x", f"url={db_url}", *args],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout + proc.stderr

    alembic("upgrade", "head")
    assert "0006 (head)" in alembic("current")
    # The migrations and schema.py describe the same tables.
    alembic("check")


async def test_partial_unique_index_is_enforced_by_the_database(store: Store) -> None:
    row = dict(
        idempotency_key="k",
        action="swarm-start",
        target="sw1",
        signal="swarm-start",
        swarm_id="sw1",
        lifecycle=True,
        resource="swarm:sw1",
        envelope={},
        timeout_ms=1,
        deadline=T0,
        created_at=T0,
        updated_at=T0,
    )

    def insert_three(conn: Any) -> None:
        # Closed or non-lifecycle operations do not count.
        conn.execute(sa.insert(operations).values(correlation_id="a", status="succeeded", **row))
        not_lifecycle = {**row, "lifecycle": False, "resource": None}
        conn.execute(sa.insert(operations).values(correlation_id="b", status="accepted", **not_lifecycle))
        conn.execute(sa.insert(operations).values(correlation_id="c", status="dispatched", **row))

    await store.database.write(insert_three)
    with pytest.raises(IntegrityError):
        await store.database.write(
            lambda conn: conn.execute(sa.insert(operations).values(correlation_id="d", status="accepted", **row)))


# --- begin_action -------------------------------------------------------------------------


async def test_start_then_replay(store: Store) -> None:
    first = action()
    op = await started(store, first)
    assert op.correlation_id == first.correlation_id
    assert op.status == "accepted"
    assert op.envelope == first.envelope and op.outcome is None
    assert op.deadline == T0 + timedelta(seconds=30)
    assert await store.get_operation(first.correlation_id) == op

    same = await store.begin_action(action())
    assert same == Replayed(envelope=first.envelope, correlation_id=first.correlation_id, same_request=True)

    other = await store.begin_action(action(request_hash="hash-2"))
    assert other == Replayed(envelope=first.envelope, correlation_id=first.correlation_id, same_request=False)

    # The key is scoped by action and target.
    await started(store, action(action="swarm-stop", signal="swarm-stop", lifecycle=False))
    await started(store, action(target="sw2", swarm_id="sw2"))
    assert len(await store.open_operations()) == 3


async def test_concurrent_same_key_starts_once(store: Store) -> None:
    # Several rounds: the interleavings that matter do not show up every time.
    for n in range(5):
        same = dict(idempotency_key=f"key-{n}", swarm_id=f"sw-{n}", target=f"sw-{n}")
        results = await asyncio.gather(*(store.begin_action(action(**same)) for _ in range(20)))
        winners = [r for r in results if isinstance(r, Started)]
        assert len(winners) == 1, results
        winner = winners[0].operation.correlation_id
        losers = [r for r in results if r is not winners[0]]
        assert all(isinstance(r, Replayed) and r.correlation_id == winner and r.same_request for r in losers), results
    assert len(await store.open_operations()) == 5


async def test_lifecycle_busy_until_first_finishes(store: Store) -> None:
    a, b = action(idempotency_key="a"), action(idempotency_key="b", signal="swarm-stop", action="swarm-stop")
    results = await asyncio.gather(store.begin_action(a), store.begin_action(b))
    (won,) = [r for r in results if isinstance(r, Started)]
    (busy,) = [r for r in results if isinstance(r, Busy)]
    assert busy.active == won.operation
    loser = b if won.operation.correlation_id == a.correlation_id else a

    # A non-lifecycle action on the same swarm is not blocked.
    await started(store, action(idempotency_key="c", action="config-update", signal="config-update", lifecycle=False))
    # Still busy while the winner is merely dispatched.
    assert await store.set_operation_status(won.operation.correlation_id, "dispatched") is not None
    assert isinstance(await store.begin_action(loser), Busy)

    await store.set_operation_status(won.operation.correlation_id, "succeeded", {"ok": True})
    again = await started(store, loser)
    assert again.correlation_id == loser.correlation_id


async def test_conflict_whose_winner_rolled_back_is_retried(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    real_begin, calls = repo._begin, []

    def flaky_begin(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            raise IntegrityError("INSERT", {}, Exception("lost a race to a transaction that rolled back"))
        return real_begin(*args, **kwargs)

    monkeypatch.setattr(repo, "_begin", flaky_begin)
    await started(store, action())
    assert len(calls) == 2


async def test_create_swarm(store: Store) -> None:
    created = await started(store, action(action="swarm-create", signal="swarm-create"), swarm(status="Creating"))
    assert (await store.get_swarm("sw1")).status == "Creating"  # type: ignore[union-attr]
    await store.set_operation_status(created.correlation_id, "succeeded")
    await store.save_swarm(replace((await store.get_swarm("sw1")), status="Ready"), at_once=True)  # type: ignore[type-var]

    create_again = action(action="swarm-create", signal="swarm-create", idempotency_key="key-2")
    exists = await store.begin_action(create_again, swarm(status="Creating", template_id="other"))
    assert isinstance(exists, SwarmExists) and exists.swarm.status == "Ready"
    # Nothing was recorded: no operation, no idempotency record.
    assert await store.get_operation(create_again.correlation_id) is None
    assert isinstance(await store.begin_action(create_again, swarm(status="Creating")), SwarmExists)

    for dead in ("Failed", "Removed"):
        await store.save_swarm(replace((await store.get_swarm("sw1")), status=dead), at_once=True)  # type: ignore[type-var]
        retry = action(action="swarm-create", signal="swarm-create", idempotency_key=f"retry-{dead}")
        op = await started(store, retry, swarm(status="Creating", template_id=f"tpl-{dead}", bees=[{"role": "gen"}]))
        replaced = await store.get_swarm("sw1")
        assert replaced is not None
        assert (replaced.status, replaced.template_id, replaced.bees) == ("Creating", f"tpl-{dead}", [{"role": "gen"}])
        await store.set_operation_status(op.correlation_id, "failed", {"error": "boom"})

    with pytest.raises(ValueError):
        await store.begin_action(action(swarm_id="sw1"), swarm("sw9"))


async def test_find_action(store: Store) -> None:
    first = action(created_at=datetime.now(timezone.utc))
    assert await store.find_action("swarm-start", "sw1", "key-1", "hash-1") is None
    await started(store, first)
    found = await store.find_action("swarm-start", "sw1", "key-1", "hash-1")
    assert found == Replayed(envelope=first.envelope, correlation_id=first.correlation_id, same_request=True)
    other = await store.find_action("swarm-start", "sw1", "key-1", "hash-2")
    assert other is not None and not other.same_request
    assert await store.find_action("swarm-stop", "sw1", "key-1", "hash-1") is None
    expired = first.expires_at + timedelta(seconds=1)
    assert await store.find_action("swarm-start", "sw1", "key-1", "hash-1", now=expired) is None


# --- operations ---------------------------------------------------------------------------


async def test_final_status_is_sticky(store: Store) -> None:
    op = await started(store, action())
    cid = op.correlation_id
    dispatched = await store.set_operation_status(cid, "dispatched")
    assert dispatched is not None and dispatched.status == "dispatched"
    assert dispatched.updated_at > op.updated_at
    assert await store.set_operation_status(cid, "dispatched") is None
    assert await store.set_operation_status(cid, "accepted") is None

    done = await store.set_operation_status(cid, "timed_out", {"reason": "deadline"})
    assert done is not None and (done.status, done.outcome) == ("timed_out", {"reason": "deadline"})
    for late in ("succeeded", "failed", "timed_out", "dispatched"):
        assert await store.set_operation_status(cid, late, {"late": True}) is None
    assert await store.get_operation(cid) == done

    # accepted may go straight to a final status.
    other = await started(store, action(idempotency_key="k2", swarm_id="sw2", target="sw2"))
    failed = await store.set_operation_status(other.correlation_id, "failed")
    assert failed is not None and failed.status == "failed"

    assert await store.set_operation_status("missing", "succeeded") is None
    with pytest.raises(ValueError):
        await store.set_operation_status(cid, "finished")


async def test_open_operations_and_their_targets(store: Store) -> None:
    done = await started(store, action(idempotency_key="done", swarm_id="s1", target="s1"))
    dispatched = await started(store, action(idempotency_key="disp", swarm_id="s3", target="s3"))
    fanned = await started(store, fan_out("open-fan-out"))
    await store.set_operation_status(dispatched.correlation_id, "dispatched")
    await store.set_operation_status(done.correlation_id, "timed_out")
    assert {o.correlation_id for o in await store.open_operations()} == {dispatched.correlation_id,
                                                                         fanned.correlation_id}
    targets = await store.open_targets()
    assert set(targets) == {fanned.correlation_id}
    assert sorted(t.target for t in targets[fanned.correlation_id]) == sorted(FAN_OUT)


async def test_marks_and_gathered_closes(store: Store) -> None:
    """What the gateway writes without waiting: publish marks and outcomes, gathered."""
    single = await started(store, action(idempotency_key="single", lifecycle=False))
    fanned = await started(store, fan_out("gathered"))
    await asyncio.gather(store.mark_published(single.correlation_id), store.mark_published(fanned.correlation_id))
    assert (await store.get_operation(single.correlation_id)).status == "dispatched"  # type: ignore[union-attr]
    # An outcome of another signal, or for another target, closes nothing.
    await store.close_later(single.correlation_id, "swarm-stop", single.target, "succeeded", {}, fan_out=False)
    await store.close_later(single.correlation_id, single.signal, "elsewhere", "succeeded", {}, fan_out=False)
    assert (await store.get_operation(single.correlation_id)).status == "dispatched"  # type: ignore[union-attr]
    await asyncio.gather(
        store.close_later(single.correlation_id, single.signal, single.target, "failed", {"code": "x"}, fan_out=False),
        *(store.close_later(fanned.correlation_id, "config-update", target, status, {}, fan_out=True)
          for target, status in zip(FAN_OUT, ("succeeded", "succeeded", "timed_out"))))
    closed = await store.get_operation(single.correlation_id)
    assert closed is not None and (closed.status, closed.outcome) == ("failed", {"code": "x"})
    whole = await store.get_operation(fanned.correlation_id)
    assert whole is not None and whole.status == "timed_out"
    assert whole.outcome == {"targets": {"succeeded": 2, "failed": 0, "timed_out": 1}}
    # A late outcome does not reopen or overwrite what is closed.
    await store.close_later(single.correlation_id, single.signal, single.target, "succeeded", {}, fan_out=False)
    assert (await store.get_operation(single.correlation_id)).status == "failed"  # type: ignore[union-attr]


async def test_expired_keys(store: Store) -> None:
    old = await started(store, action(idempotency_key="old", lifecycle=False, retention_s=60))
    keep = await started(store, action(idempotency_key="keep", lifecycle=False, retention_s=3600))

    # Past its retention a key is absent even before it is purged.
    later = T0 + timedelta(seconds=61)
    fresh = await started(store, action(idempotency_key="old", lifecycle=False, created_at=later, retention_s=60))
    assert fresh.correlation_id != old.correlation_id

    assert await store.purge_expired(T0 + timedelta(seconds=30)) == 0
    assert await store.purge_expired(later + timedelta(seconds=61)) == 1
    assert await store.purge_expired(later + timedelta(seconds=61)) == 0
    # Operations outlive their idempotency records, until their own history is purged.
    assert await store.get_operation(old.correlation_id) is not None
    await store.set_operation_status(old.correlation_id, "succeeded")
    await store.purge_expired(later, finished_before=datetime.now(timezone.utc) - timedelta(hours=1))
    assert await store.get_operation(old.correlation_id) is not None
    await store.purge_expired(later, finished_before=datetime.now(timezone.utc) + timedelta(seconds=1))
    assert await store.get_operation(old.correlation_id) is None
    assert await store.get_operation(fresh.correlation_id) is not None, "open operations always stay"
    replay = await store.begin_action(action(idempotency_key="keep", lifecycle=False))
    assert isinstance(replay, Replayed) and replay.correlation_id == keep.correlation_id


# --- swarms -------------------------------------------------------------------------------


async def test_swarm_crud(store: Store) -> None:
    await store.upsert_swarm(swarm("b", status="Creating"))
    await store.upsert_swarm(swarm("a", enabled=False, bees=[{"role": "gen", "instance": "g1"}]))
    assert [s.id for s in await store.list_swarms()] == ["a", "b"]
    a = await store.get_swarm("a")
    assert a is not None and (a.enabled, a.health) == (False, "unknown")
    assert a.bees == [{"role": "gen", "instance": "g1"}]

    # Upsert overwrites everything but created_at.
    later = T0 + timedelta(minutes=1)
    await store.upsert_swarm(SwarmRow(id="b", template_id="t2", status="Ready", created_at=later, updated_at=later))
    b = await store.get_swarm("b")
    assert b is not None and (b.status, b.template_id, b.created_at, b.updated_at) == ("Ready", "t2", T0, later)

    beat = datetime(2024, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    class Phase(StrEnum):
        STOPPED = "Stopped"

    await store.save_swarm(replace(b, health="healthy", controller_instance="host", last_heartbeat=beat,
                                   last_error={"code": "x"}, status=Phase.STOPPED))
    saved = await store.get_swarm("b")
    assert saved is not None and (saved.health, saved.controller_instance, saved.status) == ("healthy", "host",
                                                                                            "Stopped")
    assert saved.last_heartbeat == beat and saved.last_error == {"code": "x"}
    await store.save_swarm(replace(saved, last_error=None))
    assert (await store.get_swarm("b")).last_error is None  # type: ignore[union-attr]

    await store.delete_swarm("a")
    await store.delete_swarm("a")
    assert [s.id for s in await store.list_swarms()] == ["b"]
    assert await store.get_swarm("a") is None


async def test_timestamps_are_aware_utc(store: Store) -> None:
    plus2 = timezone(timedelta(hours=2))
    op = await started(store, action(created_at=T0.astimezone(plus2)))
    read = await store.get_operation(op.correlation_id)
    assert read is not None
    for value in (read.created_at, read.updated_at, read.deadline):
        assert_utc(value)
    assert read.created_at == T0

    await store.upsert_swarm(swarm(last_heartbeat=T0.astimezone(plus2)))
    sw = await store.get_swarm("sw1")
    assert sw is not None
    for value in (sw.created_at, sw.updated_at, sw.last_heartbeat):
        assert value is not None
        assert_utc(value)

    with pytest.raises(ValueError):
        action(created_at=datetime(2030, 1, 1))
    with pytest.raises(ValueError):
        SwarmRow(id="x", template_id="t", status="Ready", created_at=datetime(2030, 1, 1))


async def test_only_the_operations_own_signal_closes_it(store: Store) -> None:
    op = await started(store, action(idempotency_key="own"))
    # A bee's config-update under the same correlation id leaves the swarm's operation open.
    bee = await store.record_outcome(op.correlation_id, "config-update", "generator.sw1-gen", "succeeded", {})
    assert not bee.moved and bee.closed is None
    assert not (await store.record_outcome(op.correlation_id, "config-update", op.target, "succeeded", {})).moved
    closed = await store.record_outcome(op.correlation_id, op.signal, op.target, "succeeded", {"signal": op.signal})
    assert closed.moved and closed.closed is not None and closed.closed.outcome == {"signal": op.signal}
    assert not (await store.record_outcome(op.correlation_id, op.signal, op.target, "failed", {})).moved


FAN_OUT = ("swarm-controller.a", "swarm-controller.b", "swarm-controller.c")


def fan_out(key: str) -> NewAction:
    return action(action="config-update", idempotency_key=key, signal="config-update", target="controllers", swarm_id=None, lifecycle=False,
                  targets=FAN_OUT)


async def test_fan_out_closes_with_its_last_target(store: Store) -> None:
    op = await started(store, fan_out("bulk"))
    first = await store.record_outcome(op.correlation_id, "config-update", FAN_OUT[0], "succeeded", {"n": 0})
    assert first.moved and first.closed is None
    # Each target closes once; a repeated outcome changes nothing.
    assert not (await store.record_outcome(op.correlation_id, "config-update", FAN_OUT[0], "failed", {})).moved
    # Outcomes of other signals or unknown targets under the same correlation id are ignored.
    assert not (await store.record_outcome(op.correlation_id, "config-update", "generator.x", "failed", {})).moved
    assert not (await store.record_outcome(op.correlation_id, "swarm-start", FAN_OUT[1], "failed", {})).moved
    await store.record_outcome(op.correlation_id, "config-update", FAN_OUT[1], "succeeded", {"n": 1})
    assert (await store.get_operation(op.correlation_id)).is_open
    last = await store.record_outcome(op.correlation_id, "config-update", FAN_OUT[2], "succeeded", {"n": 2})
    assert last.closed is not None and last.closed.status == "succeeded"
    assert last.closed.outcome == {"targets": {"succeeded": 3, "failed": 0, "timed_out": 0}}
    targets = await store.operation_targets(op.correlation_id)
    assert [(t.target, t.status, t.outcome) for t in targets] == [
        (FAN_OUT[0], "succeeded", {"n": 0}), (FAN_OUT[1], "succeeded", {"n": 1}), (FAN_OUT[2], "succeeded", {"n": 2})]


async def test_fan_out_status_is_the_worst_of_its_targets(store: Store) -> None:
    failed = await started(store, fan_out("one-failed"))
    for target, status in zip(FAN_OUT, ("succeeded", "timed_out", "failed")):
        result = await store.record_outcome(failed.correlation_id, "config-update", target, status, {})
    assert result.closed is not None and result.closed.status == "failed"
    timed = await started(store, fan_out("one-timed-out"))
    for target, status in zip(FAN_OUT, ("succeeded", "timed_out", "succeeded")):
        result = await store.record_outcome(timed.correlation_id, "config-update", target, status, {})
    assert result.closed is not None and result.closed.status == "timed_out"


async def test_fan_out_rows_go_with_their_operation(store: Store) -> None:
    old = await started(store, fan_out("purged"))
    for target in FAN_OUT:
        await store.record_outcome(old.correlation_id, "config-update", target, "succeeded", {})
    await store.purge_expired(utcnow(), finished_before=utcnow() + timedelta(seconds=1))
    assert await store.get_operation(old.correlation_id) is None
    assert await store.operation_targets(old.correlation_id) == []


def report(instance: str, swarm_id: str = "sw1", role: str = "generator", seen_at: datetime | None = None,
           **fields: Any) -> StatusReport:
    values: dict[str, Any] = {"enabled": True, "state": "running", "totals": {"published": 1.0}, "queue_stats": {},
                              "data": {}, "version": "1"}
    values.update(fields)
    return StatusReport(role=role, instance=instance, swarm_id=swarm_id, seen_at=seen_at or utcnow(), **values)


def controller_view(bees: list[str], seen_at: datetime, settled: bool = True, swarm_id: str = "sw1") -> ControllerView:
    return ControllerView(role="swarm-controller", instance=swarm_id, swarm_id=swarm_id, seen_at=seen_at,
                          enabled=True, settled=settled,
                          bees=[{"role": "generator", "instance": b, "state": "running", "enabled": True} for b in bees])


async def test_registry_keeps_the_latest_status_of_known_swarms(store: Store) -> None:
    await store.upsert_swarm(swarm())
    t1 = utcnow()
    await store.save_registry(RegistryBatch(reports={
        ("generator", "sw1-gen"): report("sw1-gen", seen_at=t1),
        ("generator", "gone-gen"): report("gone-gen", swarm_id="gone", seen_at=t1),  # no such swarm: dropped
    }))
    await store.save_registry(RegistryBatch(reports={("generator", "sw1-gen"): report(
        "sw1-gen", seen_at=t1 + timedelta(seconds=1), totals={"published": 7.0}, enabled=False)}))
    rows = await store.list_components()
    assert [(r.instance, r.totals, r.enabled, r.first_seen, r.last_seen) for r in rows] == [
        ("sw1-gen", {"published": 7.0}, False, t1, t1 + timedelta(seconds=1))]
    assert await store.list_components(swarm_id="gone") == []


async def test_controller_view_sets_container_state_and_prunes_unlisted_bees(store: Store) -> None:
    await store.upsert_swarm(swarm())
    t0 = utcnow()
    await store.save_registry(RegistryBatch(reports={
        ("generator", "sw1-a"): report("sw1-a", seen_at=t0), ("generator", "sw1-b"): report("sw1-b", seen_at=t0),
        ("swarm-controller", "sw1"): report("sw1", role="swarm-controller", seen_at=t0)}))
    # Still applying its plan: a partial list prunes nothing.
    await store.save_registry(RegistryBatch(controllers={"sw1": controller_view(["sw1-a"], t0 + timedelta(seconds=1), False)}))
    assert {r.instance for r in await store.list_components()} == {"sw1", "sw1-a", "sw1-b"}
    # Settled: sw1-b is gone, sw1-c (listed, never reported) appears with its container state.
    view = controller_view(["sw1-a", "sw1-c"], t0 + timedelta(seconds=1))
    view.bees[0]["state"] = "exited"
    await store.save_registry(RegistryBatch(controllers={"sw1": view}))
    rows = {r.instance: r for r in await store.list_components(swarm_id="sw1")}
    assert set(rows) == {"sw1", "sw1-a", "sw1-c"}
    assert rows["sw1-a"].container_state == "exited" and rows["sw1-a"].last_seen == t0
    assert rows["sw1-c"].last_seen is None and rows["sw1-c"].state == "unknown"
    swarm_row = await store.get_swarm("sw1")
    assert swarm_row.last_heartbeat == view.seen_at and [b["instance"] for b in swarm_row.bees] == ["sw1-a", "sw1-c"]
    # A bee that reported after the controller's view is kept even though unlisted.
    await store.save_registry(RegistryBatch(reports={("generator", "sw1-d"): report("sw1-d", seen_at=t0 + timedelta(seconds=3))},
                                            controllers={"sw1": controller_view(["sw1-a"], t0 + timedelta(seconds=2))}))
    assert {r.instance for r in await store.list_components(swarm_id="sw1")} == {"sw1", "sw1-a", "sw1-d"}
    await store.delete_swarm("sw1")
    assert await store.list_components() == []


async def test_a_fan_out_addressed_to_one_of_its_targets_waits_for_all(store: Store) -> None:
    # commandTarget=swarm: filed under the addressed component, which is one target among others.
    op = await started(store, action(action="config-update", signal="config-update", target=FAN_OUT[0],
                                     swarm_id=None, lifecycle=False, idempotency_key="widened", targets=FAN_OUT))
    first = await store.record_outcome(op.correlation_id, "config-update", FAN_OUT[0], "succeeded", {})
    assert first.moved and first.closed is None
    for target in FAN_OUT[1:]:
        last = await store.record_outcome(op.correlation_id, "config-update", target, "succeeded", {})
    assert last.closed is not None and last.closed.status == "succeeded"


async def test_save_swarm_updates_only_the_same_incarnation(store: Store) -> None:
    first = swarm(status="Creating")
    await store.upsert_swarm(first)
    await store.save_swarm(replace(first, status="Running", bees=[{"instance": "sw1-gen"}]))
    saved = await store.get_swarm("sw1")
    assert saved is not None and saved.status == "Running" and saved.bees == [{"instance": "sw1-gen"}]

    # Gathered before a removal: once the row is gone, the write does not bring it back ...
    await store.delete_swarm("sw1")
    await store.save_swarm(replace(first, status="Stopped"))
    assert await store.get_swarm("sw1") is None
    # ... nor does it land on a new swarm created under the same id.
    second = swarm(status="Creating", created_at=T0 + timedelta(hours=1))
    await store.upsert_swarm(second)
    await store.save_swarm(replace(first, status="Stopped"))
    assert (await store.get_swarm("sw1")).status == "Creating"  # type: ignore[union-attr]
