"""The generator bee against the real RabbitMQ: start-up, config updates, status, work, stop.

The bee runs in-process as an asyncio task with a unique swarm id; the tests of this
module share it and run in file order, each one picking up the state the previous left.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from bees.env import BeeEnv
from bees.generator import Generator
from bees.sdk import Bee, BeeContext, Worker
from controlplane.bus import Bus
from tests.conftest import drop_connections
from controlplane.contract import keys
from controlplane.contract.models import Signal, Strict, new_id
from controlplane.contract.topology import default_topology

pytestmark = pytest.mark.integration

AMQP_URL = os.environ.get("CP_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
ROOT = Path(__file__).resolve().parents[2]
ROLE = "generator"
OUT = "out"


@dataclass
class Event:
    routing_key: str
    correlation_id: str | None
    body: dict[str, Any]


@dataclass
class Observer:
    """Everything a bee emits on ph.control, in arrival order."""

    queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        await self.queue.put(Event(message.routing_key or "", message.correlation_id, json.loads(message.body)))

    async def expect(self, match: Callable[[Event], bool], timeout: float = 10.0) -> Event:
        """The next event that matches; the ones before it are dropped."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.queue.get()
                if match(event):
                    return event


@dataclass
class Harness:
    swarm_id: str
    instance: str
    bus: Bus
    observer: Observer
    bee: Bee[Any]
    task: asyncio.Task[None]

    @property
    def scope(self) -> str:
        return keys.component_scope(ROLE, self.instance)

    @property
    def work_queue(self) -> str:
        return keys.hive_queue(self.swarm_id, OUT)

    async def send(self, name: str, args: dict[str, Any] | None = None, **fields: Any) -> Signal:
        sig = Signal(signal=name, correlation_id=new_id(), idempotency_key=new_id(), swarm_id=self.swarm_id,
                     role=ROLE, instance=self.instance, command_target="instance", args=args or {})
        sig = sig.model_copy(update=fields)
        await self.bus.publish(sig.routing_key(), sig)
        return sig

    async def update(self, patch: dict[str, Any]) -> tuple[Signal, Event]:
        """Send a config-update and wait for its outcome, success or error."""
        sig = await self.send("config-update", {"patch": patch})
        keys_ = {keys.ready_key("config-update", self.scope), keys.error_key("config-update", self.scope)}
        event = await self.observer.expect(lambda e: e.routing_key in keys_ and e.correlation_id == sig.correlation_id)
        return sig, event

    async def depth(self) -> int:
        channel = await self.bus.connection.channel()
        try:
            queue = await channel.declare_queue(self.work_queue, passive=True, robust=False)
            return queue.declaration_result.message_count or 0
        finally:
            await channel.close()

    async def published_over(self, seconds: float) -> int:
        before = await self.depth()
        await asyncio.sleep(seconds)
        return await self.depth() - before


async def _observe(bus: Bus, observer: Observer, routing_keys: list[str]) -> AbstractQueue:
    channel = await bus.connection.channel()
    queue = await channel.declare_queue(exclusive=True, auto_delete=True, robust=False)
    for key in routing_keys:
        await queue.bind(keys.CONTROL_EXCHANGE, routing_key=key)
    await queue.consume(observer.on_message, no_ack=True)
    return queue


async def _cleanup(bus: Bus, swarm_id: str, instance: str, role: str = ROLE, suffix: str = OUT) -> None:
    for queue in (keys.component_queue(role, instance), keys.hive_queue(swarm_id, suffix)):
        await bus.delete_queue(queue)
    await bus.delete_exchange(keys.hive_exchange(swarm_id))


def _outcome_keys(instance: str, role: str = ROLE) -> list[str]:
    scope = keys.component_scope(role, instance)
    return [keys.status_key("status-full", role, instance), keys.status_key("status-delta", role, instance),
            keys.ready_key("config-update", scope), keys.error_key("config-update", scope)]


@pytest_asyncio.fixture(scope="module")
async def harness() -> AsyncIterator[Harness]:
    swarm_id = f"t{uuid.uuid4().hex[:8]}"
    instance = keys.bee_instance(swarm_id, "gen")
    bus = await Bus(AMQP_URL, default_topology(), name="test-bee-sdk").connect()
    observer = Observer()
    await _observe(bus, observer, _outcome_keys(instance))
    env = BeeEnv(amqp_url=AMQP_URL, swarm_id=swarm_id, role=ROLE, instance=instance, work_out=OUT,
                 bee_config={"message": {"probe": swarm_id}}, enabled=False, status_interval_s=0.5)
    bee = Bee(env, Generator())
    task = asyncio.create_task(bee.run())
    try:
        yield Harness(swarm_id, instance, bus, observer, bee, task)
    finally:
        bee.stop()
        await asyncio.wait_for(task, 10)
        await _cleanup(bus, swarm_id, instance)
        await bus.close()


async def test_status_full_announces_the_bee(harness: Harness) -> None:
    event = await harness.observer.expect(lambda e: e.body.get("kind") == "status-full")
    assert event.routing_key == keys.status_key("status-full", ROLE, harness.instance)
    body = event.body
    assert body["swarmId"] == harness.swarm_id and body["instance"] == harness.instance
    assert body["enabled"] is False and body["state"] == "idle"
    assert body["data"]["config"] == {"ratePerSec": 1.0, "message": {"probe": harness.swarm_id}}
    assert body["queueStats"][harness.work_queue]["messages"] == 0


async def test_disabled_bee_publishes_nothing(harness: Harness) -> None:
    assert await harness.published_over(0.5) == 0


async def test_config_update_enables_work_at_the_requested_rate(harness: Harness) -> None:
    sig, event = await harness.update({"enabled": True, "ratePerSec": 20})
    assert event.routing_key == keys.ready_key("config-update", harness.scope)
    body = event.body
    assert body["result"] == "success" and body["idempotencyKey"] == sig.idempotency_key
    assert body["scope"] == {"swarmId": harness.swarm_id, "role": ROLE, "instance": harness.instance}
    assert body["state"]["enabled"] is True and body["state"]["status"] == "running"
    assert body["state"]["details"]["config"]["ratePerSec"] == 20
    await asyncio.sleep(0.3)
    assert 12 <= await harness.published_over(1.0) <= 28


async def test_work_messages_carry_template_seq_and_ts(harness: Harness) -> None:
    channel = await harness.bus.connection.channel()
    try:
        queue = await channel.get_queue(harness.work_queue, ensure=False)
        message = await queue.get(no_ack=True, fail=True)
        body = json.loads(message.body)
    finally:
        await channel.close()
    assert body["probe"] == harness.swarm_id
    assert isinstance(body["seq"], int) and body["seq"] >= 1 and body["ts"]


async def test_invalid_patch_is_refused_and_the_old_rate_continues(harness: Harness) -> None:
    sig, event = await harness.update({"ratePerSec": -5})
    assert event.routing_key == keys.error_key("config-update", harness.scope)
    body = event.body
    assert body["result"] == "error" and body["code"] == "invalid-config"
    assert "ratePerSec" in body["message"] and body["details"]["errors"][0]["field"] == "ratePerSec"
    assert body["state"]["details"]["config"]["ratePerSec"] == 20
    assert 12 <= await harness.published_over(1.0) <= 28


async def test_repeated_signal_re_emits_its_outcome_without_re_applying(harness: Harness) -> None:
    first, outcome = await harness.update({"ratePerSec": 10})
    _, _ = await harness.update({"ratePerSec": 20})
    await harness.send("config-update", first.args, correlation_id=first.correlation_id,
                       idempotency_key=first.idempotency_key)
    again = await harness.observer.expect(lambda e: e.correlation_id == first.correlation_id)
    assert again.body == outcome.body  # the same outcome, timestamp included
    status = await harness.send("status-request")
    full = await harness.observer.expect(lambda e: e.correlation_id == status.correlation_id)
    assert full.body["data"]["config"]["ratePerSec"] == 20  # the repeat did not set 10 again


async def test_status_request_answers_with_status_full(harness: Harness) -> None:
    sig = await harness.send("status-request")
    event = await harness.observer.expect(lambda e: e.correlation_id == sig.correlation_id)
    assert event.routing_key == keys.status_key("status-full", ROLE, harness.instance)
    body = event.body
    assert body["kind"] == "status-full" and body["enabled"] is True and body["state"] == "running"
    assert body["totals"]["published"] > 0 and body["totals"]["errors"] == 0
    assert body["queueStats"][harness.work_queue]["messages"] > 0


async def test_status_delta_reports_rates_every_interval(harness: Harness) -> None:
    await harness.observer.expect(lambda e: e.body.get("kind") == "status-delta")  # may span a rate change
    event = await harness.observer.expect(lambda e: e.body.get("kind") == "status-delta")
    body = event.body
    assert body["swarmId"] == harness.swarm_id and body["enabled"] is True
    assert 10 <= body["data"]["rates"]["published"] <= 30
    assert set(body["totals"]) == {"processed", "errors", "published"}
    assert harness.work_queue in body["queueStats"]


async def test_bee_keeps_going_when_its_connection_drops(harness: Harness) -> None:
    assert await drop_connections(harness.instance) >= 1
    sig = await harness.send("status-request")
    event = await harness.observer.expect(lambda e: e.correlation_id == sig.correlation_id, timeout=30)
    assert event.body["enabled"] is True
    await asyncio.sleep(0.2)
    assert 12 <= await harness.published_over(1.0) <= 28


async def test_disable_stops_publishing(harness: Harness) -> None:
    _, event = await harness.update({"enabled": False})
    assert event.body["state"]["enabled"] is False and event.body["state"]["status"] == "idle"
    await asyncio.sleep(0.2)
    assert await harness.published_over(1.0) == 0


async def test_stop_ends_the_bee_cleanly(harness: Harness) -> None:
    harness.bee.stop()
    await asyncio.wait_for(harness.task, 10)
    assert harness.task.exception() is None
    event = await harness.observer.expect(lambda e: e.body.get("state") == "stopped")
    assert event.body["kind"] == "status-delta"


async def test_bee_process_exits_zero_on_sigterm() -> None:
    swarm_id = f"t{uuid.uuid4().hex[:8]}"
    instance = keys.bee_instance(swarm_id, "proc")
    bus = await Bus(AMQP_URL, default_topology(), name="test-bee-sdk-proc").connect()
    observer = Observer()
    await _observe(bus, observer, _outcome_keys(instance))
    env = os.environ | {"CP_AMQP_URL": AMQP_URL, "CP_SWARM_ID": swarm_id, "CP_ROLE": ROLE, "CP_INSTANCE": instance,
                        "CP_WORK_OUT": OUT, "CP_ENABLED": "true", "CP_BEE_CONFIG": '{"ratePerSec": 5}'}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bees.generator", cwd=ROOT, env=env,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        full = await observer.expect(lambda e: e.body.get("kind") == "status-full", timeout=30)
        assert full.body["enabled"] is True and full.body["data"]["config"]["ratePerSec"] == 5
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 15)
        assert proc.returncode == 0, stderr.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await _cleanup(bus, swarm_id, instance)
        await bus.close()


class RecorderConfig(Strict):
    pass


class Recorder(Worker[RecorderConfig]):
    """A consumer for the test: keeps every body, fails on ``{"fail": true}``."""

    Config = RecorderConfig

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def handle(self, ctx: BeeContext[RecorderConfig], body: dict[str, Any]) -> None:
        if body.get("fail"):
            raise ValueError("asked to fail")
        self.bodies.append(body)


async def test_consumer_bee_consumes_only_while_enabled() -> None:
    swarm_id, role, suffix = f"t{uuid.uuid4().hex[:8]}", "recorder", "in"
    instance = keys.bee_instance(swarm_id, "rec")
    scope = keys.component_scope(role, instance)
    queue_name = keys.hive_queue(swarm_id, suffix)
    bus = await Bus(AMQP_URL, default_topology(), name="test-bee-sdk-consumer").connect()
    observer = Observer()
    await _observe(bus, observer, _outcome_keys(instance, role))
    worker = Recorder()
    env = BeeEnv(amqp_url=AMQP_URL, swarm_id=swarm_id, role=role, instance=instance, work_in=suffix,
                 status_interval_s=60)
    bee = Bee(env, worker)
    task = asyncio.create_task(bee.run())

    async def signal_bee(name: str, args: dict[str, Any] | None = None) -> Event:
        sig = Signal(signal=name, correlation_id=new_id(), idempotency_key=new_id(), swarm_id=swarm_id,
                     role=role, instance=instance, args=args or {})
        await bus.publish(sig.routing_key(), sig)
        return await observer.expect(lambda e: e.correlation_id == sig.correlation_id)

    async def send_work(*bodies: dict[str, Any]) -> None:
        for body in bodies:
            await bus.publish(suffix, body, exchange=hive)

    try:
        await observer.expect(lambda e: e.body.get("kind") == "status-full")
        hive = (await bus.declare_exchange(default_topology().hive_exchange(swarm_id))).name
        await send_work({"n": 1}, {"n": 2}, {"fail": True})
        await asyncio.sleep(0.3)
        idle = await signal_bee("status-request")
        assert idle.body["queueStats"][queue_name] == {"messages": 3, "consumers": 0}
        assert worker.bodies == []

        enabled = await signal_bee("config-update", {"patch": {"enabled": True}})
        assert enabled.routing_key == keys.ready_key("config-update", scope)
        async with asyncio.timeout(10):
            while len(worker.bodies) < 2 or bee.ctx.totals.errors < 1:
                await asyncio.sleep(0.05)
        assert worker.bodies == [{"n": 1}, {"n": 2}]
        running = await signal_bee("status-request")
        assert running.body["queueStats"][queue_name]["consumers"] == 1
        assert running.body["totals"]["processed"] == 2 and running.body["totals"]["errors"] >= 1

        await signal_bee("config-update", {"patch": {"enabled": False}})
        await send_work({"n": 3})
        await asyncio.sleep(0.3)
        stopped = await signal_bee("status-request")
        # The failing message was still being retried: retiring the consumer hands it back
        # to the queue, next to the one sent while disabled.
        assert stopped.body["queueStats"][queue_name] == {"messages": 2, "consumers": 0}
        assert worker.bodies == [{"n": 1}, {"n": 2}]
    finally:
        bee.stop()
        await asyncio.wait_for(task, 10)
        await _cleanup(bus, swarm_id, instance, role, suffix)
        await bus.close()
