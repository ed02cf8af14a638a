"""The bus against the real broker: dead-lettering, recovery, request-reply, the CLI's watch."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import aio_pika
import pytest

from controlplane.bus import Bus, Requester, reply
from controlplane.contract import keys
from controlplane.contract.topology import QueueDecl, default_topology
from tests.conftest import Stack, drop_connections, new_key, new_swarm_id

pytestmark = pytest.mark.integration


@pytest.fixture
async def bus(stack: Stack) -> Bus:
    return stack.bus


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
    status, ready = await stack.get("/readyz")
    assert status == 200 and ready["checks"]["broker"] == "ok"


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
        with pytest.raises(asyncio.TimeoutError):
            await requester.request("sig.nobody.listens", {"n": 2}, timeout=0.5)
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
