"""Bounds on what the broker keeps and on what one request may start. Real RabbitMQ."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import pytest
from prometheus_client import REGISTRY

from controlplane.bus.management import Management
from controlplane.contract import keys
from controlplane.contract.models import Status
from tests.conftest import BROKER, MANAGEMENT, fresh_vhost, new_key, new_swarm_id, running_stack

pytestmark = pytest.mark.integration


def _dead_lettered() -> float:
    return REGISTRY.get_sample_value("cp_messages_dead_lettered_total", {"reason": "unparseable"}) or 0.0


async def test_the_dead_letter_queue_is_bounded_and_every_message_counted(settings_factory: Any, runtime: Any,
                                                                          tmp_path: Path) -> None:
    async with fresh_vhost() as vhost:
        url = f"amqp://guest:guest@{BROKER}/{quote(vhost, safe='')}"
        settings = settings_factory(amqp_url=url, dead_letter_max_messages=3,
                                    database_url=f"sqlite:///{tmp_path / 'bounds.db'}")
        async with running_stack(settings, runtime):
            # What an operator sees in the management UI (its statistics lag a few seconds).
            async with Management(MANAGEMENT) as management, asyncio.timeout(30):
                while (await _policy(management, vhost, keys.DEAD_LETTER_QUEUE) != keys.DEAD_LETTER_POLICY
                       or await _policy(management, vhost, keys.HOST_CONTROLLER_QUEUE) != "cp-control"):
                    await asyncio.sleep(0.5)
            before = _dead_lettered()
            connection = await aio_pika.connect(url)
            try:
                channel = await connection.channel(publisher_confirms=True)
                exchange = await channel.get_exchange(keys.CONTROL_EXCHANGE, ensure=False)
                for n in range(6):  # to the host controller's queue, which cannot parse them
                    await exchange.publish(aio_pika.Message(f"not json {n}".encode()), f"sig.swarm-create.x{n}")
                async with asyncio.timeout(20):
                    while _dead_lettered() < before + 6:
                        await asyncio.sleep(0.05)
                dead = await channel.declare_queue(keys.DEAD_LETTER_QUEUE, passive=True)
                assert dead.declaration_result.message_count == 3, "the oldest went first"
            finally:
                await connection.close()


async def _policy(management: Management, vhost: str, queue: str) -> str | None:
    details = await management.queue(vhost, queue)
    return (details or {}).get("policy")


async def test_how_much_one_request_may_start_is_bounded(settings_factory: Any, runtime: Any) -> None:
    settings = settings_factory(max_swarms=2, max_fanout_targets=1)
    async with running_stack(settings, runtime, with_host=False) as gateway:
        swarms = [new_swarm_id(), new_swarm_id()]
        for swarm_id in swarms:  # no host controller: they stay Creating, which counts
            status, _ = await gateway.post(f"/api/swarms/{swarm_id}/create",
                                           {"idempotencyKey": new_key(), "templateId": "generator-demo"})
            assert status == 202
        status, body = await gateway.post(f"/api/swarms/{new_swarm_id()}/create",
                                          {"idempotencyKey": new_key(), "templateId": "generator-demo"})
        assert status == 409 and body["error"] == "swarm-limit" and body["limit"] == 2

        for swarm_id in swarms:
            report = Status(kind="status-full", role=keys.CONTROLLER_ROLE, instance=swarm_id, swarm_id=swarm_id)
            await gateway.bus.publish(report.routing_key(), report)
        async with asyncio.timeout(10):
            while len((await gateway.get("/api/components", params={"role": keys.CONTROLLER_ROLE}))[1]["components"]) < 2:
                await asyncio.sleep(0.05)
        status, body = await gateway.post("/api/controllers/config", {"idempotencyKey": new_key(), "enabled": False})
        assert status == 422 and body["error"] == "too-many-targets", body
        status, _ = await gateway.post("/api/controllers/config", {
            "idempotencyKey": new_key(), "enabled": False, "targets": [f"{keys.CONTROLLER_ROLE}.{swarms[0]}"]})
        assert status == 202, "a request within the bound goes through"
