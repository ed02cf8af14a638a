"""The HTTP load scenario end to end, through the real gateway, RabbitMQ and Docker engine.

One swarm of the shipped ``http-load`` scenario serves the whole module (its containers take
a few seconds to start); the tests run in file order and each leaves it running for the
next, except the last, which breaks a bee on purpose. Traffic is counted where it lands: at
the system under test's own ``/_sut/stats``.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from controlplane.contract import keys
from tests.conftest import OWNER, Stack, make_settings, new_key, new_swarm_id, running_stack
from tests.integration.test_swarm_lifecycle import act, eventually

pytestmark = pytest.mark.integration

SUT_URL = "http://127.0.0.1:18080"  # the scenario's SUT port, on the host network


@dataclass
class LoadSwarm:
    stack: Stack
    swarm_id: str

    def instance(self, bee: str) -> str:
        return keys.bee_instance(self.swarm_id, bee)


@pytest.fixture(scope="module")
async def load(vhost: str, owner: str, runtime: Any, tmp_path_factory: pytest.TempPathFactory,
               ) -> AsyncIterator[LoadSwarm]:
    settings = make_settings(vhost, owner, tmp_path_factory.mktemp("http-load"))
    async with running_stack(settings, runtime) as stack:
        swarm_id = new_swarm_id("load")
        status, envelope = await stack.post(f"/api/swarms/{swarm_id}/create",
                                            {"idempotencyKey": new_key(), "templateId": "http-load"})
        assert status == 202, envelope
        assert await eventually(lambda: _swarm_status(stack, swarm_id, "Ready"), 120), "the swarm became Ready"
        yield LoadSwarm(stack, swarm_id)
        await stack.post(f"/api/swarms/{swarm_id}/remove", {"idempotencyKey": new_key()})
        await eventually(lambda: _gone(stack, swarm_id), 60)


async def _swarm_status(stack: Stack, swarm_id: str, status: str) -> dict[str, Any] | None:
    code, view = await stack.get(f"/api/swarms/{swarm_id}")
    return view if code == 200 and view["status"] == status else None


async def _gone(stack: Stack, swarm_id: str) -> bool:
    return (await stack.get(f"/api/swarms/{swarm_id}"))[0] == 404


async def sut_requests() -> int:
    async with aiohttp.ClientSession() as http, http.get(f"{SUT_URL}/_sut/stats") as response:
        assert response.status == 200
        return int((await response.json())["requests"])


async def request_rate(seconds: float) -> float:
    """Requests per second arriving at the SUT over the next ``seconds``."""
    before = await sut_requests()
    await asyncio.sleep(seconds)
    return (await sut_requests() - before) / seconds


async def assert_quiet(seconds: float = 2.0) -> None:
    await asyncio.sleep(0.5)  # requests already on the wire finish
    before = await sut_requests()
    await asyncio.sleep(seconds)
    assert await sut_requests() == before, "no request reaches the SUT"


async def component(load: LoadSwarm, role: str, bee: str) -> dict[str, Any]:
    status, view = await load.stack.get(f"/api/components/{role}/{load.instance(bee)}")
    assert status == 200, view
    return view


async def patch(load: LoadSwarm, watcher: Any, role: str, bee: str, body: dict[str, Any],
                expect: str = "ready") -> dict[str, Any]:
    """POST a config patch to one bee; check the envelope; return the outcome event."""
    scope = f"{role}.{load.instance(bee)}"
    status, envelope = await load.stack.post(f"/api/components/{scope.replace('.', '/')}/config",
                                             {"idempotencyKey": new_key(), "patch": body})
    assert status == 202, envelope
    assert envelope["watch"] == {"successTopic": f"ev.ready.config-update.{scope}",
                                 "errorTopic": f"ev.error.config-update.{scope}"}
    assert envelope["timeoutMs"] == 60000
    topic = envelope["watch"]["successTopic" if expect == "ready" else "errorTopic"]
    return await watcher.wait_for(topic, 30, where=lambda b: b["correlationId"] == envelope["correlationId"])


async def test_running_swarm_sends_http_requests_and_stop_ends_them(load: LoadSwarm, watch: Any) -> None:
    watcher = await watch("ev.#")
    assert await sut_requests() == 0, "a Ready swarm sends nothing"
    view = await _swarm_status(load.stack, load.swarm_id, "Ready")
    assert view and view["sut"]["url"] == SUT_URL

    await act(load.stack, watcher, load.swarm_id, "start")
    assert await request_rate(3) >= 10, "the generator's 20/s arrive at the SUT"

    await act(load.stack, watcher, load.swarm_id, "stop")
    await assert_quiet()

    await act(load.stack, watcher, load.swarm_id, "start")
    post = await eventually(lambda: _latency_reported(load), 20)
    assert post, "the postprocessor reports latency percentiles"
    latency = post["data"]["latency"]
    assert latency["count"] > 0 and 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    view = await eventually(lambda: _swarm_status(load.stack, load.swarm_id, "Running"))
    assert view and view["health"] == "healthy"
    assert {b["role"]: b["health"] for b in view["bees"]} == {
        "generator": "healthy", "moderator": "healthy", "processor": "healthy", "postprocessor": "healthy"}
    status, listing = await load.stack.get(f"/api/components?swarmId={load.swarm_id}")
    assert status == 200
    assert sorted(c["role"] for c in listing["components"]) == [
        "generator", "moderator", "postprocessor", "processor", "swarm-controller"]


async def _latency_reported(load: LoadSwarm) -> dict[str, Any] | None:
    view = await component(load, "postprocessor", "postprocessor")
    return view if view["data"].get("latency", {}).get("count") else None


async def test_rate_change_changes_the_request_rate(load: LoadSwarm, watch: Any) -> None:
    watcher = await watch("ev.#")
    before = await request_rate(3)
    outcome = await patch(load, watcher, "generator", "generator", {"ratePerSec": 60})
    assert outcome["result"] == "success" and outcome["state"]["details"]["config"]["ratePerSec"] == 60
    await asyncio.sleep(0.5)
    after = await request_rate(3)
    assert after > 2 * before, f"{before:.1f}/s before, {after:.1f}/s after raising the rate to 60/s"


async def test_invalid_patch_is_refused_and_the_bee_keeps_working(load: LoadSwarm, watch: Any) -> None:
    watcher = await watch("ev.#")
    outcome = await patch(load, watcher, "generator", "generator", {"ratePerSec": -5}, expect="error")
    assert outcome["code"] == "invalid-config" and "ratePerSec" in outcome["message"]
    assert await request_rate(2) > 30, "the generator goes on at its previous 60/s"
    unknown = await patch(load, watcher, "processor", "processor", {"noSuchField": 1}, expect="error")
    assert unknown["code"] == "invalid-config" and "noSuchField" in unknown["message"]


async def test_status_request_returns_the_full_status(load: LoadSwarm, watch: Any) -> None:
    watcher = await watch("ev.status-full.#")
    scope = f"processor.{load.instance('processor')}"
    status, envelope = await load.stack.post(f"/api/components/processor/{load.instance('processor')}/status-request",
                                             {"idempotencyKey": new_key()})
    assert status == 202, envelope
    assert envelope["watch"] == {"infoTopic": f"ev.status-full.{scope}"} and envelope["timeoutMs"] == 10000
    full = await watcher.wait_for(f"ev.status-full.{scope}", 10)
    assert full["kind"] == "status-full" and full["enabled"] is True
    assert full["data"]["config"]["timeoutMs"] == 2000, "the full status carries the bee's config"
    assert full["totals"]["processed"] > 0
    # The gateway ties the answer to the request by its correlation id.
    op = await eventually(lambda: _operation(load.stack, envelope["correlationId"], "succeeded"))
    assert op and op["outcome"]["kind"] == "status-full" and op["outcome"]["instance"] == load.instance("processor")

    status, body = await load.stack.post("/api/components/processor/no-such-bee/status-request",
                                         {"idempotencyKey": new_key()})
    assert status == 404 and body["error"] == "unknown-component"


async def _operation(stack: Stack, correlation_id: str, status: str) -> dict[str, Any] | None:
    code, op = await stack.get(f"/api/operations/{correlation_id}")
    return op if code == 200 and op["status"] == status else None


async def toggle(load: LoadSwarm, watcher: Any, enabled: bool, targets: list[str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"idempotencyKey": new_key(), "enabled": enabled}
    if targets is not None:
        body["targets"] = targets
    status, envelope = await load.stack.post("/api/controllers/config", body)
    assert status == 202, envelope
    controller = f"swarm-controller.{load.swarm_id}"
    assert envelope["targets"] == [{"instance": controller,
                                    "successTopic": f"ev.ready.config-update.{controller}",
                                    "errorTopic": f"ev.error.config-update.{controller}"}]
    assert envelope["timeoutMs"] == 60000 and "watch" not in envelope
    event = await watcher.wait_for(f"ev.ready.config-update.{controller}", 30,
                                   where=lambda b: b["correlationId"] == envelope["correlationId"])
    assert event["state"]["enabled"] is enabled
    op = await eventually(lambda: _operation(load.stack, envelope["correlationId"], "succeeded"))
    assert op and [(t["target"], t["status"]) for t in op["targets"]] == [(controller, "succeeded")]
    return event


async def test_bulk_disable_stops_all_traffic_and_enable_brings_it_back(load: LoadSwarm, watch: Any) -> None:
    watcher = await watch("ev.#")
    assert await request_rate(2) > 0
    await toggle(load, watcher, False)  # no targets: every registered controller
    await assert_quiet()
    # Already disabled: acknowledged all the same.
    await toggle(load, watcher, False, targets=[f"swarm-controller.{load.swarm_id}"])
    bees = (await load.stack.get(f"/api/components?swarmId={load.swarm_id}"))[1]["components"]
    assert await eventually(lambda: _all_bees_disabled(load), 10), bees

    await toggle(load, watcher, True, targets=[])
    assert await request_rate(3) > 10, "traffic is back"

    status, body = await load.stack.post("/api/controllers/config", {
        "idempotencyKey": new_key(), "enabled": False, "targets": ["swarm-controller.nobody"]})
    assert status == 404 and body["fields"] == [
        {"field": "targets", "reason": "swarm-controller.nobody is not registered"}]


async def _all_bees_disabled(load: LoadSwarm) -> bool:
    components = (await load.stack.get(f"/api/components?swarmId={load.swarm_id}"))[1]["components"]
    return all(not c["enabled"] for c in components if c["kind"] == "bee")


async def test_command_target_swarm_sends_the_patch_to_every_component(load: LoadSwarm, watch: Any) -> None:
    watcher = await watch("ev.#")
    generator = load.instance("generator")
    status, envelope = await load.stack.post(f"/api/components/generator/{generator}/config", {
        "idempotencyKey": new_key(), "patch": {"enabled": True}, "commandTarget": "swarm"})
    assert status == 202, envelope
    assert envelope["watch"]["successTopic"] == f"ev.ready.config-update.generator.{generator}"
    expected = {f"swarm-controller.{load.swarm_id}"} | {
        f"{role}.{load.instance(role)}" for role in ("generator", "moderator", "processor", "postprocessor")}
    assert {t["instance"] for t in envelope["targets"]} == expected
    for target in envelope["targets"]:
        event = await watcher.wait_for(target["successTopic"], 30,
                                       where=lambda b: b["correlationId"] == envelope["correlationId"])
        assert event["result"] == "success"
    op = await eventually(lambda: _operation(load.stack, envelope["correlationId"], "succeeded"))
    assert op and {t["target"] for t in op["targets"] if t["status"] == "succeeded"} == expected


async def test_silent_bee_goes_stale_then_failed_and_a_killed_bee_fails(load: LoadSwarm, runtime: Any) -> None:
    # Paused, the postprocessor's container runs on but says nothing: its health degrades.
    paused = keys.container_name(OWNER, load.swarm_id, "postprocessor")
    subprocess.run(["docker", "pause", paused], check=True, capture_output=True)
    try:
        assert await eventually(lambda: _health_is(load, "postprocessor", "stale"), 10)
        assert await eventually(lambda: _health_is(load, "postprocessor", "failed"), 10)
    finally:
        subprocess.run(["docker", "unpause", paused], check=True, capture_output=True)
    assert await eventually(lambda: _health_is(load, "postprocessor", "healthy"), 10), "it recovers once it reports"

    killed = keys.container_name(OWNER, load.swarm_id, "moderator")
    subprocess.run(["docker", "kill", killed], check=True, capture_output=True)
    view = await eventually(lambda: _health_is(load, "moderator", "failed"), 10)
    assert view and view["containerState"] == "exited"
    swarm = await eventually(lambda: _swarm_health(load, "failed"), 10)
    assert swarm and {b["role"]: b["health"] for b in swarm["bees"]}["moderator"] == "failed"
    status, failed = await load.stack.get("/api/components?health=failed")
    assert status == 200 and [c["instance"] for c in failed["components"]] == [load.instance("moderator")]


async def _health_is(load: LoadSwarm, bee: str, health: str) -> dict[str, Any] | None:
    view = await component(load, bee, bee)
    return view if view["health"] == health else None


async def _swarm_health(load: LoadSwarm, health: str) -> dict[str, Any] | None:
    code, view = await load.stack.get(f"/api/swarms/{load.swarm_id}")
    return view if code == 200 and view["health"] == health else None
