"""Two gateways on one PostgreSQL store behave as one: the scale-out deployment."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from controlplane.contract import keys
from controlplane.contract.models import Outcome, OutcomeState, Scope
from tests.conftest import fresh_postgres_database, new_key, new_swarm_id, running_stack

pytestmark = pytest.mark.integration


async def test_two_gateways_share_keys_and_locks_and_each_sees_every_outcome(settings_factory: Any, runtime: Any,
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
            assert {status for status, _ in answers} == {202}, [a for a in answers if a[0] != 202]
            assert len({envelope["correlationId"] for _, envelope in answers}) == 1
            # A different key for the same swarm, on the other gateway: one lifecycle operation at a time.
            status, conflict = await b.post(f"/api/swarms/{swarm_id}/create",
                                            {"idempotencyKey": new_key(), "templateId": "generator-demo"})
            assert status == 409, conflict
            correlation_id = answers[0][1]["correlationId"]

            async def reads(gw: Any, what: str, wanted: str) -> None:
                async with asyncio.timeout(30):
                    while (await gw.get(what))[1].get("status") != wanted:
                        await asyncio.sleep(0.1)

            # Once the broker confirmed the create, a marker published after it arrives after it:
            # had either gateway published the create again, the watcher would hold it by then.
            await asyncio.gather(*(reads(gw, f"/api/operations/{correlation_id}", "dispatched") for gw in (a, b)))
            await a.bus.publish(f"sig.marker.{swarm_id}", {"marker": True})
            async with asyncio.timeout(30):
                while f"sig.marker.{swarm_id}" not in watcher.keys_seen():
                    await asyncio.sleep(0.05)
            assert watcher.keys_seen() == [f"sig.swarm-create.{swarm_id}", f"sig.marker.{swarm_id}"], \
                "published once across both gateways"

            # Each gateway consumes every event from a queue of its own: both see the outcome.
            outcome = Outcome(correlation_id=correlation_id, idempotency_key=body["idempotencyKey"],
                              signal="swarm-create", scope=Scope(swarm_id=swarm_id), result="success",
                              state=OutcomeState(status="Ready"))
            await a.bus.publish(outcome.routing_key(), outcome)
            await asyncio.gather(*(reads(gw, f"/api/swarms/{swarm_id}", "Ready") for gw in (a, b)),
                                 *(reads(gw, f"/api/operations/{correlation_id}", "succeeded") for gw in (a, b)))
            # No host controller ran here: drop the signal so no later test serves it.
            queue = await a.bus.declare_queue(a.bus.topology.queue(keys.HOST_CONTROLLER_QUEUE))
            await queue.purge()
