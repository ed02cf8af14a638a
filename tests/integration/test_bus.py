"""The bus against the real broker: dead-lettering, recovery, readiness, expiry, request-reply,
the CLI's watch."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import pytest
from prometheus_client import REGISTRY

from controlplane.bus import BrokerUnavailable, Bus, Poison, Requester, RequesterClosed, Unroutable, reply
from controlplane.config import Settings
from controlplane.contract import keys
from controlplane.contract.topology import QueueDecl, default_topology
from tests.conftest import Stack, drop_connections, new_key, new_swarm_id

pytestmark = pytest.mark.integration


@pytest.fixture
async def bus(stack: Stack) -> Bus:
    return stack.bus


@pytest.fixture
async def own_bus(settings_factory: Callable[..., Settings]) -> AsyncIterator[Bus]:
    """A bus under a connection name of its own, so dropping it touches nobody else."""
    url = settings_factory().amqp_url.get_secret_value()
    bus = await Bus(url, default_topology(), f"test-bus-{uuid.uuid4().hex[:8]}").connect()
    yield bus
    await bus.close()


@pytest.fixture
async def dead_letters(own_bus: Bus) -> aio_pika.abc.AbstractQueue:
    """The dead-letter queue, declared before anything is rejected: the DLX drops what no queue takes."""
    return await own_bus.declare_queue(own_bus.topology.queue(keys.DEAD_LETTER_QUEUE))


async def until(condition: Callable[[], Awaitable[bool] | bool], timeout: float, what: str) -> None:
    """Wait, polling, until ``condition`` holds; fail with ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if await result if isinstance(result, Awaitable) else result:
            return
        assert loop.time() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.05)


async def probe_ok(bus: Bus) -> bool:
    try:
        await bus.probe()
    except BrokerUnavailable:
        return False
    return True


async def raw_publish(bus: Bus, routing_key: str, body: bytes, message_id: str) -> None:
    """Publish bytes the bus itself would never produce, confirmed."""
    channel = await bus.connection.channel(publisher_confirms=True)
    try:
        exchange = await channel.get_exchange(keys.CONTROL_EXCHANGE, ensure=False)
        await exchange.publish(aio_pika.Message(body, message_id=message_id), routing_key=routing_key)
    finally:
        await channel.close()


async def find_dead_letter(dead: aio_pika.abc.AbstractQueue, message_id: str,
                           timeout: float = 10) -> aio_pika.abc.AbstractIncomingMessage:
    """Take messages off the dead-letter queue until the one with ``message_id`` shows up."""
    found: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def arrived() -> bool:
        message = await dead.get(no_ack=True, fail=False)
        if message is not None and message.message_id == message_id:
            found.append(message)
        return bool(found)

    await until(arrived, timeout, f"message {message_id} in {keys.DEAD_LETTER_QUEUE}")
    return found[0]


def scratch_queue(prefix: str, key: str) -> QueueDecl:
    """A non-durable queue on ph.control that dead-letters like the control queues do."""
    return QueueDecl(name=f"ph.control.{prefix}-{uuid.uuid4().hex[:8]}", durable=False,
                     arguments={"x-dead-letter-exchange": keys.DEAD_LETTER_EXCHANGE},
                     bindings=[{"exchange": keys.CONTROL_EXCHANGE, "key": key}])


async def test_unparseable_message_is_dead_lettered(bus: Bus) -> None:
    topology = bus.topology
    dead = await bus.declare_queue(topology.queue(keys.DEAD_LETTER_QUEUE))
    await dead.purge()
    # ev.error.* is bound to the gateway's queue, whose consumer cannot parse this body.
    await bus.publish(f"ev.error.swarm-start.{new_swarm_id()}", {"not": "used"})  # parseable JSON, wrong shape
    channel = await bus.connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(keys.CONTROL_EXCHANGE)
    await exchange.publish(aio_pika.Message(b"\xff not json"), routing_key=f"ev.ready.swarm-stop.{new_swarm_id()}")
    bodies: list[bytes] = []
    for _ in range(100):
        message = await dead.get(no_ack=True, fail=False)
        if message is not None:
            bodies.append(message.body)
            if b"\xff not json" in bodies:
                break
        await asyncio.sleep(0.1)
    await channel.close()
    assert b"\xff not json" in bodies, "the broken message waits in the dead-letter queue for an operator"


async def test_gateway_keeps_working_after_its_connection_drops(stack: Stack) -> None:
    assert await drop_connections("test") >= 1
    swarm_id = new_swarm_id()
    # The robust connection comes back by itself; a request during the gap gets a 503 or waits.
    for _ in range(60):
        status, body = await stack.post(f"/api/swarms/{swarm_id}/start", {"idempotencyKey": new_key()})
        if status == 404:
            break
        assert status == 503, body
        await asyncio.sleep(0.5)
    assert status == 404, "the gateway answers again once reconnected"
    # Ready again once a publish goes through: then an action goes all the way to its outcome.
    for _ in range(60):
        status, ready = await stack.get("/readyz")
        if status == 200:
            break
        await asyncio.sleep(0.5)
    assert status == 200 and ready["checks"]["broker"] == "ok"
    status, created = await stack.post(f"/api/swarms/{swarm_id}/create",
                                       {"idempotencyKey": new_key(), "templateId": "generator-demo"},
                                       headers={"Prefer": "wait=90"})
    assert status == 200 and created["status"] == "succeeded", created
    status, removed = await stack.post(f"/api/swarms/{swarm_id}/remove", {"idempotencyKey": new_key()},
                                       headers={"Prefer": "wait=90"})
    assert status == 200 and removed["status"] == "succeeded", removed


async def test_request_reply_round_trip(bus: Bus) -> None:
    decl = QueueDecl(name=f"ph.control.echo-{new_swarm_id()}", durable=False,
                     bindings=[{"exchange": keys.CONTROL_EXCHANGE, "key": "sig.echo.test"}])

    async def echo(_key: str, body: dict[str, Any], message: Any) -> None:
        await reply(bus, message, {"echo": body})

    consumer = await bus.consume(decl, echo)
    requester = await Requester(bus).start()
    try:
        answer = await requester.request("sig.echo.test", {"n": 1}, timeout=5)
        assert answer == {"echo": {"n": 1}}
        # Nobody bound: the broker returns the request, known at once rather than at the timeout.
        with pytest.raises(Unroutable):
            await asyncio.wait_for(requester.request("sig.nobody.listens", {"n": 2}, timeout=30), 10)
        # Bound but silent: the timeout.
        silent = await bus.declare_queue(QueueDecl(name=f"ph.control.silent-{new_swarm_id()}", durable=False,
                                                   bindings=[{"exchange": keys.CONTROL_EXCHANGE,
                                                              "key": "sig.silent.test"}]))
        with pytest.raises(asyncio.TimeoutError):
            await requester.request("sig.silent.test", {"n": 3}, timeout=0.5)
        assert requester.pending == 0, "a caller that timed out leaves nothing behind"
        await bus.delete_queue(silent.name)
    finally:
        await requester.close()
        await consumer.cancel()
        await bus.delete_queue(decl.name)


async def test_watch_prints_matching_events(stack: Stack) -> None:
    env = {**os.environ, "CP_AMQP_URL": stack.settings.amqp_url.get_secret_value()}
    swarm_id = new_swarm_id()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controlplane.cli", "watch", f"ev.*.swarm-start.{swarm_id}", "--count", "1",
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    await asyncio.wait_for(proc.stderr.readline(), 20)  # "watching …": bound and consuming
    await stack.bus.publish(f"ev.ready.swarm-start.{swarm_id}", {"hello": "watcher"})
    await stack.bus.publish(f"ev.ready.swarm-stop.{swarm_id}", {"not": "matched"})
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert lines == [{"routingKey": f"ev.ready.swarm-start.{swarm_id}", "body": {"hello": "watcher"}}]
    assert proc.returncode == 0


def test_topology_export_is_a_definitions_file() -> None:
    out = subprocess.run([sys.executable, "-m", "controlplane.cli", "topology", "export"],
                         check=True, capture_output=True, text=True).stdout
    data = json.loads(out)
    assert {e["name"] for e in data["exchanges"]} == {e.name for e in default_topology().exchanges}
    assert any(b["destination"] == keys.DEAD_LETTER_QUEUE and b["source"] == keys.DEAD_LETTER_EXCHANGE
               for b in data["bindings"])
    host = next(q for q in data["queues"] if q["name"] == keys.HOST_CONTROLLER_QUEUE)
    assert host["arguments"]["x-single-active-consumer"] is True


async def test_ready_and_probe_follow_the_connection(own_bus: Bus) -> None:
    assert own_bus.ready
    await own_bus.probe()
    assert await drop_connections(own_bus.name) >= 1
    # aio-pika waits a few seconds before reconnecting; meanwhile ``is_closed`` stays False.
    await until(lambda: not own_bus.ready, 10, "the bus reports the dropped connection")
    assert not own_bus.connection.is_closed
    with pytest.raises(BrokerUnavailable, match="down or reconnecting"):
        await own_bus.probe()
    await until(lambda: own_bus.ready, 30, "the bus is ready again once reconnected")
    await until(lambda: probe_ok(own_bus), 15, "the probe is confirmed again once reconnected")
    # And the bus works for real again.
    await own_bus.publish(f"probe.after.{own_bus.name}", {"back": True})


async def test_probe_really_publishes(own_bus: Bus) -> None:
    channel = await own_bus.connection.channel()
    try:
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        await queue.bind(keys.CONTROL_EXCHANGE, routing_key="probe.#")
        await own_bus.probe()
        mine: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def received() -> bool:
            message = await queue.get(no_ack=True, fail=False)
            if message is not None and message.routing_key == f"probe.{own_bus.name}":
                mine.append(message)
            return bool(mine)

        await until(received, 5, "the probe message reaches a queue bound to probe.#")
        assert mine[0].delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT
    finally:
        await channel.close()


async def test_probe_raises_when_the_bus_is_closed(own_bus: Bus) -> None:
    await own_bus.close()
    assert not own_bus.ready
    with pytest.raises(BrokerUnavailable):
        await own_bus.probe()


async def test_deeply_nested_message_does_not_wedge_its_consumer(
        own_bus: Bus, dead_letters: aio_pika.abc.AbstractQueue) -> None:
    key = f"sig.nest-test.{new_swarm_id()}"
    decl = scratch_queue("nest", key)
    handled = asyncio.Event()
    seen: list[dict[str, Any]] = []

    async def handler(_key: str, body: dict[str, Any], _message: Any) -> None:
        seen.append(body)
        handled.set()

    # One message in flight at a time: a poison message left unacked would block the next one.
    consumer = await own_bus.consume(decl, handler, prefetch=1)
    unparseable = {"reason": "unparseable"}
    before = REGISTRY.get_sample_value("cp_messages_dead_lettered_total", unparseable) or 0
    try:
        poison_id = f"nested-{uuid.uuid4().hex}"
        await raw_publish(own_bus, key, b"[" * 100_000 + b"]" * 100_000, poison_id)
        await own_bus.publish(key, {"valid": True})
        await asyncio.wait_for(handled.wait(), 2)
        assert seen == [{"valid": True}]
        dead = await find_dead_letter(dead_letters, poison_id)
        assert dead.body.startswith(b"[[[["), "the poison message waits for an operator, unchanged"
        assert (REGISTRY.get_sample_value("cp_messages_dead_lettered_total", unparseable) or 0) >= before + 1
    finally:
        await consumer.cancel()
        await own_bus.delete_queue(decl.name)


async def test_poison_from_a_handler_is_dead_lettered_at_once(
        own_bus: Bus, dead_letters: aio_pika.abc.AbstractQueue) -> None:
    key = f"sig.poison-test.{new_swarm_id()}"
    decl = scratch_queue("poison", key)
    calls: list[str] = []
    done = asyncio.Event()

    async def handler(_key: str, body: dict[str, Any], message: Any) -> None:
        calls.append(message.message_id)
        if body.get("poison"):
            raise Poison("this signal can never be served")
        done.set()

    consumer = await own_bus.consume(decl, handler, prefetch=1)
    try:
        poison_id = f"poison-{uuid.uuid4().hex}"
        await raw_publish(own_bus, key, b'{"poison": true}', poison_id)
        await own_bus.publish(key, {"poison": False})
        await asyncio.wait_for(done.wait(), 2)
        assert calls.count(poison_id) == 1, "poison is neither retried nor redelivered"
        await find_dead_letter(dead_letters, poison_id)
    finally:
        await consumer.cancel()
        await own_bus.delete_queue(decl.name)


async def test_a_flaky_handler_is_retried_in_process(own_bus: Bus) -> None:
    key = f"sig.flaky-test.{new_swarm_id()}"
    decl = scratch_queue("flaky", key)
    attempts: list[tuple[int, bool]] = []
    second = asyncio.Event()

    async def handler(_key: str, body: dict[str, Any], message: Any) -> None:
        attempts.append((body["n"], message.redelivered))
        if body["n"] == 1 and len(attempts) < 3:
            raise OSError("store busy")
        if body["n"] == 2:
            second.set()

    # One message in flight at a time: the second arrives only once the first is acked.
    consumer = await own_bus.consume(decl, handler, prefetch=1)
    try:
        await own_bus.publish(key, {"n": 1})
        await own_bus.publish(key, {"n": 2})
        await asyncio.wait_for(second.wait(), 10)
        assert attempts == [(1, False), (1, False), (1, False), (2, False)], \
            "retried in this process, then acked; never handed back to the broker"
    finally:
        await consumer.cancel()
        await own_bus.delete_queue(decl.name)


async def test_expired_signal_is_dropped_by_the_broker(own_bus: Bus) -> None:
    key = f"sig.expiry-test.{new_swarm_id()}"
    decl = scratch_queue("expiry", key)
    queue = await own_bus.declare_queue(decl)  # no consumer: messages wait in the queue

    async def depth_is(n: int) -> bool:
        declared = await own_bus.declare_queue(decl)  # re-declaring reports the current depth
        return declared.declaration_result.message_count == n

    try:
        await own_bus.publish(key, {"n": "late"}, expiration=0.2)
        await until(lambda: depth_is(0), 10, "the broker drops the expired message")
        await own_bus.publish(key, {"n": "fresh"})
        await until(lambda: depth_is(1), 10, "the fresh message waits")
        message = await queue.get(no_ack=True)
        assert json.loads(message.body) == {"n": "fresh"}
        assert await queue.get(no_ack=True, fail=False) is None, "the expired message was never delivered"
    finally:
        await own_bus.delete_queue(decl.name)


async def test_requester_close_fails_waiting_callers(own_bus: Bus) -> None:
    silent = await own_bus.declare_queue(QueueDecl(name=f"ph.control.silent-{new_swarm_id()}", durable=False,
                                                   bindings=[{"exchange": keys.CONTROL_EXCHANGE,
                                                              "key": "sig.silent.close"}]))
    requester = await Requester(own_bus).start()
    call = asyncio.create_task(requester.request("sig.silent.close", {}, timeout=30))
    await until(lambda: requester.pending == 1, 5, "the request is waiting")
    await requester.close()
    with pytest.raises(RequesterClosed):
        await asyncio.wait_for(call, 2)
    assert requester.pending == 0
    await own_bus.delete_queue(silent.name)
