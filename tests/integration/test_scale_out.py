"""Two gateways on one PostgreSQL store behave as one: the scale-out deployment."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from controlplane.contract import keys
from tests.conftest import fresh_postgres_database, new_key, new_swarm_id, running_stack

pytestmark = pytest.mark.integration


async def test_two_gateways_share_idempotency_and_lifecycle_locks(settings_factory: Any, runtime: Any,
                                                                   watch: Any) -> None:
    async with fresh_postgres_database() as url:
        settings = settings_factory(database_url=url)
        async with running_stack(settings.model_copy(update={"gateway_id": "gw-a"}), runtime, with_host=False) as a, \
                running_stack(settings.model_copy(update={"gateway_id": "gw-b"}), runtime, with_host=False) as b:
            swarm_id = new_swarm_id()
            watcher = await watch(f"sig.*.{swarm_id}")
            body = {"idempotencyKey": new_key(), "templateId": "generator-demo"}
            answers = await asyncio.gather(*(
                gw.post(f"/api/swarms/{swarm_id}/create", body) for gw in (a, b) * 8))
            assert {status for status, _ in answers} == {202}
            assert len({envelope["correlationId"] for _, envelope in answers}) == 1
            # A different key for the same swarm, on the other gateway: one lifecycle operation at a time.
            status, conflict = await b.post(f"/api/swarms/{swarm_id}/create",
                                            {"idempotencyKey": new_key(), "templateId": "generator-demo"})
            assert status == 409, conflict
            await asyncio.sleep(0.5)
            assert watcher.keys_seen() == [f"sig.swarm-create.{swarm_id}"], "published once across both gateways"
            status, op = await a.get(f"/api/operations/{answers[0][1]['correlationId']}")
            assert status == 200 and op["status"] == "dispatched"
            # No host controller ran here: drop the signal so no later test serves it.
            queue = await a.bus.declare_queue(a.bus.topology.queue(keys.HOST_CONTROLLER_QUEUE))
            await queue.purge()
