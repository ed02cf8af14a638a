"""What every receiver (controllers, bees) does with the signals it gets, on the real broker:
keys scoped by signal, unknown signals answered, poison that does not block the queue."""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import aio_pika
import pytest

from bees.env import BeeEnv
from bees.generator import Generator
from bees.sdk import Bee
from controlplane.bus import Bus
from controlplane.contract import keys
from controlplane.contract.models import Signal, new_id
from controlplane.contract.topology import default_topology
from tests.conftest import OWNER, new_key, new_swarm_id
from tests.integration.test_bee_sdk import Observer, _cleanup, _observe, _outcome_keys
from tests.integration.test_controller_faults import Controllers, controllers  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

AMQP_URL = os.environ.get("CP_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


async def test_a_key_reused_for_start_then_stop_really_stops(controllers: Controllers, watch: Any,
                                                             runtime: Any) -> None:
    swarm_id = new_swarm_id()
    watcher = await watch("ev.#")
    assert (await controllers.act(watcher, "swarm-create", swarm_id))["result"] == "success"
    key = new_key()
    started = await controllers.act(watcher, "swarm-start", swarm_id, key=key)
    assert started["result"] == "success" and started["state"]["status"] == "Running"
    stopped = await controllers.act(watcher, "swarm-stop", swarm_id, key=key)
    assert stopped["result"] == "success" and stopped["state"]["status"] == "Stopped", \
        "the stop really stops: it is not answered from the start's memory"
    bee = keys.bee_instance(swarm_id, "generator")
    off = await watcher.wait_for(f"ev.ready.config-update.generator.{bee}", 10,
                                 where=lambda b: b["state"]["enabled"] is False)
    assert off["correlationId"] == stopped["correlationId"], "the bee was switched off too"

    # A signal the controller does not know is answered, not left to time out.
    sig = await controllers.send("swarm-dance", swarm_id)
    error = await watcher.wait_for(f"ev.error.swarm-dance.{swarm_id}", 10)
    assert error["code"] == "unknown-signal" and error["correlationId"] == sig.correlation_id
    removed = await controllers.act(watcher, "swarm-remove", swarm_id, key=key)
    assert removed["result"] == "success" and removed["state"]["status"] == "Removed"
    assert await runtime.get(keys.container_name(OWNER, swarm_id, "generator")) is None


@pytest.fixture
async def bee() -> Any:
    """A generator bee in-process, with an observer of everything it emits."""
    swarm_id = f"t{uuid.uuid4().hex[:8]}"
    instance = keys.bee_instance(swarm_id, "gen")
    bus = await Bus(AMQP_URL, default_topology(), name="test-receivers").connect()
    observer = Observer()
    await _observe(bus, observer, _outcome_keys(instance) + [f"ev.error.*.generator.{instance}"])
    env = BeeEnv(amqp_url=AMQP_URL, swarm_id=swarm_id, role="generator", instance=instance, work_out="out",
                 status_interval_s=30)
    running = Bee(env, Generator())
    task = asyncio.create_task(running.run())
    await observer.expect(lambda e: e.body.get("kind") == "status-full")
    try:
        yield bus, observer, swarm_id, instance
    finally:
        running.stop()
        await asyncio.wait_for(task, 10)
        await _cleanup(bus, swarm_id, instance)
        await bus.delete_queue(keys.state_queue("generator", instance))
        await bus.close()


def _signal(name: str, swarm_id: str, instance: str, **fields: Any) -> Signal:
    return Signal(signal=name, correlation_id=new_id(), idempotency_key=new_key(), swarm_id=swarm_id,
                  role="generator", instance=instance, command_target="instance", **fields)


async def test_an_unknown_signal_to_a_bee_gets_an_error(bee: Any) -> None:
    bus, observer, swarm_id, instance = bee
    sig = _signal("dance", swarm_id, instance)
    await bus.publish(sig.routing_key(), sig)
    event = await observer.expect(lambda e: e.correlation_id == sig.correlation_id)
    assert event.routing_key == f"ev.error.dance.generator.{instance}"
    assert event.body["code"] == "unknown-signal" and event.body["result"] == "error"


@pytest.mark.parametrize("poison", [b"[" * 100_000 + b"]" * 100_000, b"\xff not json", b'{"signal": 3}'],
                         ids=["deeply-nested", "not-json", "not-a-signal"])
async def test_poison_on_a_bee_control_queue_does_not_block_it(bee: Any, poison: bytes) -> None:
    bus, observer, swarm_id, instance = bee
    channel = await bus.connection.channel()
    try:
        exchange = await channel.get_exchange(keys.CONTROL_EXCHANGE, ensure=False)
        await exchange.publish(aio_pika.Message(poison, content_type="application/json"),
                               routing_key=keys.signal_key("status-request", keys.component_scope("generator", instance)))
    finally:
        await channel.close()
    sig = _signal("status-request", swarm_id, instance)
    await bus.publish(sig.routing_key(), sig)
    event = await observer.expect(lambda e: e.correlation_id == sig.correlation_id, timeout=2)
    assert event.body["kind"] == "status-full"


async def test_a_signal_whose_body_names_another_bee_is_dropped(bee: Any) -> None:
    bus, observer, swarm_id, instance = bee
    stray = _signal("config-update", swarm_id, "someone-else", args={"patch": {"ratePerSec": 7}})
    await bus.publish(keys.signal_key("config-update", keys.component_scope("generator", instance)), stray)
    probe = _signal("status-request", swarm_id, instance)
    await bus.publish(probe.routing_key(), probe)
    full = await observer.expect(lambda e: e.correlation_id in (stray.correlation_id, probe.correlation_id))
    assert full.correlation_id == probe.correlation_id, "the stray signal got no outcome"
    assert full.body["data"]["config"]["ratePerSec"] == 1.0, "and changed nothing"


async def test_a_bee_restarted_in_place_keeps_its_config_and_switch(bee: Any) -> None:
    bus, observer, swarm_id, instance = bee
    sig = _signal("config-update", swarm_id, instance, args={"patch": {"ratePerSec": 3, "enabled": True}})
    await bus.publish(sig.routing_key(), sig)
    await observer.expect(lambda e: e.correlation_id == sig.correlation_id)
    # A second bee process with the same environment: a container restarted by Docker.
    env = BeeEnv(amqp_url=AMQP_URL, swarm_id=swarm_id, role="generator", instance=instance, work_out="out",
                 status_interval_s=30)
    again = Bee(env, Generator())
    task = asyncio.create_task(again.run())
    try:
        full = await observer.expect(lambda e: e.body.get("kind") == "status-full" and e.correlation_id is None)
        assert full.body["data"]["config"]["ratePerSec"] == 3 and full.body["enabled"] is True
    finally:
        again.stop()
        await asyncio.wait_for(task, 10)
    # Another starting point (a bee replaced by a new spec) does not take that state.
    other = BeeEnv(amqp_url=AMQP_URL, swarm_id=swarm_id, role="generator", instance=instance, work_out="out",
                   bee_config={"ratePerSec": 2}, status_interval_s=30)
    fresh = Bee(other, Generator())
    task = asyncio.create_task(fresh.run())
    try:
        full = await observer.expect(lambda e: e.body.get("kind") == "status-full" and e.correlation_id is None)
        assert full.body["data"]["config"]["ratePerSec"] == 2 and full.body["enabled"] is False
    finally:
        fresh.stop()
        await asyncio.wait_for(task, 10)
