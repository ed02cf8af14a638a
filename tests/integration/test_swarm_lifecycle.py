"""A swarm's whole life through the real gateway, RabbitMQ and Docker engine."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from controlplane.contract import keys
from controlplane.bus.management import Management
from tests.conftest import OWNER, MANAGEMENT, Stack, new_key, new_swarm_id, running_stack

pytestmark = pytest.mark.integration

TEMPLATE = "generator-demo"


async def queue_depth(vhost: str, queue: str) -> int | None:
    """Messages in a queue per the management API (None when the queue does not exist)."""
    async with Management(MANAGEMENT) as management:
        details = await management.queue(vhost, queue)
    return None if details is None else int(details.get("messages", 0) or 0)


async def wait_depth_above(vhost: str, queue: str, floor: int, timeout: float = 30) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    depth = await queue_depth(vhost, queue) or 0
    while depth <= floor and loop.time() < deadline:
        await asyncio.sleep(1)  # management API statistics refresh every few seconds
        depth = await queue_depth(vhost, queue) or 0
    return depth


async def eventually(probe: Any, timeout: float = 10) -> Any:
    """Poll ``probe`` until it returns something truthy: read models follow events, shortly after."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await probe()
        if result or loop.time() > deadline:
            return result
        await asyncio.sleep(0.1)


async def act(stack: Stack, watcher: Any, swarm_id: str, action: str, body: dict[str, Any] | None = None,
              expect: str = "ready", timeout: float = 90) -> tuple[dict[str, Any], dict[str, Any]]:
    """POST an action, check its envelope, and wait for its outcome event."""
    body = {"idempotencyKey": new_key(), **(body or {})}
    status, envelope = await stack.post(f"/api/swarms/{swarm_id}/{action}", body)
    assert status == 202, envelope
    signal = f"swarm-{action}"
    assert envelope["idempotencyKey"] == body["idempotencyKey"]
    assert envelope["watch"] == {"successTopic": f"ev.ready.{signal}.{swarm_id}",
                                 "errorTopic": f"ev.error.{signal}.{swarm_id}"}
    topic = envelope["watch"]["successTopic" if expect == "ready" else "errorTopic"]
    event = await watcher.wait_for(topic, timeout, where=lambda b: b["correlationId"] == envelope["correlationId"])
    assert event["idempotencyKey"] == body["idempotencyKey"]
    assert event["signal"] == signal and event["scope"]["swarmId"] == swarm_id
    return envelope, event


async def test_full_lifecycle(stack: Stack, watch: Any, runtime: Any, vhost: str) -> None:
    swarm_id = new_swarm_id()
    watcher = await watch("ev.#", f"sig.*.{swarm_id}")

    envelope, created = await act(stack, watcher, swarm_id, "create", {"templateId": TEMPLATE})
    assert envelope["timeoutMs"] == 120000
    assert created["result"] == "success" and created["state"]["status"] == "Ready"
    # The create succeeded only after the controller's handshake.
    handshake = await watcher.wait_for(f"ev.ready.swarm-controller.{swarm_id}", 1)
    assert handshake["correlationId"] == envelope["correlationId"]
    assert watcher.keys_seen().index(f"ev.ready.swarm-controller.{swarm_id}") < \
        watcher.keys_seen().index(f"ev.ready.swarm-create.{swarm_id}")

    bee = await runtime.get(keys.container_name(OWNER, swarm_id, "generator"))
    assert bee is not None and bee.state == "running"
    assert bee.labels["controlplane.managed"] == "true"
    assert bee.labels["controlplane.kind"] == "bee"
    assert bee.labels["controlplane.swarm"] == swarm_id
    assert bee.labels["controlplane.role"] == "generator"
    assert bee.labels["controlplane.instance"] == keys.bee_instance(swarm_id, "generator")

    view = await eventually(lambda: _view_if(stack, swarm_id, "Ready"))
    assert view and view["templateId"] == TEMPLATE
    assert view["controller"]["instance"] == swarm_id
    assert [(b["role"], b["image"], b["instance"]) for b in view["bees"]] == \
        [("generator", "controlplane:local", keys.bee_instance(swarm_id, "generator"))]

    envelope, started = await act(stack, watcher, swarm_id, "start")
    assert envelope["timeoutMs"] == 180000 and started["state"]["status"] == "Running"
    # The bee confirms under the same correlation id; only the swarm's own outcome closes the operation.
    op = await eventually(lambda: _operation_if(stack, envelope["correlationId"], "succeeded"))
    assert op and op["outcome"]["signal"] == "swarm-start" and op["outcome"]["state"]["status"] == "Running"
    work_queue = keys.hive_queue(swarm_id, "generated")
    assert await wait_depth_above(vhost, work_queue, 0) > 0, "a running generator publishes work"
    view = await eventually(lambda: _view_if(stack, swarm_id, "Running"))
    assert view and view["health"] == "healthy" and view["lastHeartbeat"]

    envelope, stopped = await act(stack, watcher, swarm_id, "stop")
    assert envelope["timeoutMs"] == 90000 and stopped["state"]["status"] == "Stopped"
    kept = await runtime.get(keys.container_name(OWNER, swarm_id, "generator"))
    assert kept is not None and kept.id == bee.id, "stop keeps the containers"

    envelope, removed = await act(stack, watcher, swarm_id, "remove")
    assert envelope["timeoutMs"] == 180000 and removed["state"]["status"] == "Removed"
    assert await runtime.get(keys.container_name(OWNER, swarm_id, "generator")) is None
    assert await queue_depth(vhost, work_queue) is None, "the swarm's work queue is deleted"
    assert await eventually(lambda: _is_gone(stack, swarm_id)), "a removed swarm leaves the read model"

    op = await eventually(lambda: _operation_if(stack, envelope["correlationId"], "succeeded"))
    assert op and op["outcome"]["state"]["status"] == "Removed"


async def test_idempotent_replay_mismatch_and_concurrent_duplicates(stack: Stack, watch: Any) -> None:
    swarm_id = new_swarm_id()
    watcher = await watch("ev.#", f"sig.*.{swarm_id}")
    create = {"idempotencyKey": new_key(), "templateId": TEMPLATE}
    status, first = await stack.post(f"/api/swarms/{swarm_id}/create", create)
    assert status == 202
    status, again = await stack.post(f"/api/swarms/{swarm_id}/create", create)
    assert status == 202 and again == first, "same key and body: the same envelope"
    status, err = await stack.post(f"/api/swarms/{swarm_id}/create", {**create, "notes": "changed"})
    assert status == 422 and "idempotencyKey" in err["message"]
    status, err = await stack.post(f"/api/swarms/{swarm_id}/create", {**create, "idempotencyKey": new_key()})
    assert status == 409, "one lifecycle operation at a time (or the swarm exists)"
    await watcher.wait_for(f"ev.ready.swarm-create.{swarm_id}", 90)
    status, err = await stack.post(f"/api/swarms/{swarm_id}/create", {**create, "idempotencyKey": new_key()})
    assert status == 409 and err["error"] == "swarm-exists"
    assert watcher.keys_seen().count(f"sig.swarm-create.{swarm_id}") == 1

    start = {"idempotencyKey": new_key()}
    answers = await asyncio.gather(*(stack.post(f"/api/swarms/{swarm_id}/start", start) for _ in range(12)))
    assert {s for s, _ in answers} == {202}
    assert len({a["correlationId"] for _, a in answers}) == 1
    await watcher.wait_for(f"ev.ready.swarm-start.{swarm_id}", 60)
    await asyncio.sleep(1)
    assert watcher.keys_seen().count(f"sig.swarm-start.{swarm_id}") == 1, "concurrent duplicates publish once"

    status, err = await stack.post(f"/api/swarms/{swarm_id}/start", {"idempotencyKey": new_key()})
    assert status == 409 and err["currentState"] == "Running"
    status, replay = await stack.post(f"/api/swarms/{swarm_id}/start", start)
    assert status == 202 and replay["correlationId"] == answers[0][1]["correlationId"], \
        "a retry after the swarm moved on still gets its envelope, not a 409"
    await act(stack, watcher, swarm_id, "remove")


async def test_timeout_is_published_on_the_watched_error_topic(settings_factory: Any, runtime: Any,
                                                               watch: Any) -> None:
    settings = settings_factory(operation_timeouts_ms={"swarm-start": 2500})
    async with running_stack(settings, runtime) as stack:
        swarm_id = new_swarm_id()
        watcher = await watch("ev.#")
        await act(stack, watcher, swarm_id, "create", {"templateId": TEMPLATE})
        # The controller dies; its queue stays, so the start signal is never answered.
        stack.host.tasks[swarm_id].cancel()
        await asyncio.sleep(0.2)
        envelope, event = await act(stack, watcher, swarm_id, "start", expect="error", timeout=10)
        assert envelope["timeoutMs"] == 2500
        assert event["code"] == "timeout" and event["result"] == "error"
        assert await eventually(lambda: _operation_if(stack, envelope["correlationId"], "timed_out"))
        # With its controller gone, remove is done by the host controller.
        _, removed = await act(stack, watcher, swarm_id, "remove")
        assert removed["details"]["removedBy"] == "host-controller"
        assert await runtime.get(keys.container_name(OWNER, swarm_id, "generator")) is None


async def test_gateway_restart_keeps_idempotency_and_operations(settings_factory: Any, runtime: Any,
                                                                watch: Any) -> None:
    settings = settings_factory()
    swarm_id = new_swarm_id()
    create = {"idempotencyKey": new_key(), "templateId": TEMPLATE}
    watcher = await watch("ev.#", "sig.#")
    async with running_stack(settings, runtime, with_host=False) as gateway:
        status, first = await gateway.post(f"/api/swarms/{swarm_id}/create", create)
        assert status == 202
    async with running_stack(settings, runtime, with_host=False) as gateway:
        status, again = await gateway.post(f"/api/swarms/{swarm_id}/create", create)
        assert status == 202 and again == first
        status, op = await gateway.get(f"/api/operations/{first['correlationId']}")
        assert status == 200 and op["status"] == "dispatched"
    assert watcher.keys_seen().count(f"sig.swarm-create.{swarm_id}") == 1
    # The signal waited in its durable queue; a host controller coming up now serves it.
    async with running_stack(settings, runtime) as stack:
        await watcher.wait_for(f"ev.ready.swarm-create.{swarm_id}", 90)
        assert await eventually(lambda: _operation_if(stack, first["correlationId"], "succeeded"))
        await act(stack, watcher, swarm_id, "remove")


async def test_host_controller_restart_readopts_running_swarm(settings_factory: Any, runtime: Any,
                                                              watch: Any, vhost: str) -> None:
    from controlplane.controller.host import HostController

    settings = settings_factory()
    swarm_id = new_swarm_id()
    watcher = await watch("ev.#")
    async with running_stack(settings, runtime) as stack:
        await act(stack, watcher, swarm_id, "create", {"templateId": TEMPLATE})
        await act(stack, watcher, swarm_id, "start")
        bee = await runtime.get(keys.container_name(OWNER, swarm_id, "generator"))
        await stack.host.stop()
        still = await runtime.get(keys.container_name(OWNER, swarm_id, "generator"))
        assert still is not None and still.state == "running" and still.id == bee.id, "nothing is destroyed"

        stack.host = await HostController(stack.bus, runtime, settings).start()
        adopted = await watcher.wait_for(f"ev.ready.swarm-controller.{swarm_id}", 60,
                                         where=lambda b: b["details"].get("adopted") is True)
        assert adopted["state"]["status"] == "Running", "the adopted controller sees its bees enabled"
        _, stopped = await act(stack, watcher, swarm_id, "stop")
        assert stopped["state"]["status"] == "Stopped"
        same = await runtime.get(keys.container_name(OWNER, swarm_id, "generator"))
        assert same is not None and same.id == bee.id
        await act(stack, watcher, swarm_id, "remove")


@pytest.fixture
def broken_scenarios(tmp_path: Any) -> Any:
    scenarios = tmp_path / "scenarios"
    scenarios.mkdir()
    (scenarios / "no-image.yaml").write_text(
        "id: no-image\nbees:\n  - {name: ghost, role: generator, image: 'controlplane-missing:none'}\n")
    # The project image has no bee for this role: its container exits at once.
    (scenarios / "crashing.yaml").write_text(
        "id: crashing\nbees:\n  - {name: crash, role: no-such-role, image: 'controlplane:local'}\n")
    return scenarios


async def test_bee_that_exits_fails_create_with_its_logs(settings_factory: Any, runtime: Any, watch: Any,
                                                         broken_scenarios: Any) -> None:
    async with running_stack(settings_factory(scenarios_dir=broken_scenarios), runtime) as stack:
        swarm_id = new_swarm_id()
        watcher = await watch("ev.#")
        _, event = await act(stack, watcher, swarm_id, "create", {"templateId": "crashing"}, expect="error")
        assert event["code"] == "container-exited"
        assert "No module named bees.no_such_role" in event["message"], "the bee's last log lines explain the crash"
        assert await runtime.get(keys.container_name(OWNER, swarm_id, "crash")) is None, "a failed create cleans up"


async def test_missing_image_fails_create_with_its_code(settings_factory: Any, runtime: Any, watch: Any,
                                                        broken_scenarios: Any) -> None:
    settings = settings_factory(scenarios_dir=broken_scenarios)
    async with running_stack(settings, runtime) as stack:
        swarm_id = new_swarm_id()
        watcher = await watch("ev.#")
        _, event = await act(stack, watcher, swarm_id, "create", {"templateId": "no-image"}, expect="error")
        assert event["code"] == "image-missing" and "controlplane-missing:none" in event["message"]
        view = await eventually(lambda: _view_if(stack, swarm_id, "Failed"))
        assert view and view["lastError"]["code"] == "image-missing"
        # A failed swarm can be created again under the same id.
        status, _ = await stack.post(f"/api/swarms/{swarm_id}/create",
                                     {"idempotencyKey": new_key(), "templateId": "no-image"})
        assert status == 202


async def test_controller_in_a_container(settings_factory: Any, runtime: Any, watch: Any) -> None:
    from controlplane.controller.host import HostController

    settings = settings_factory(controller_mode="container")
    async with running_stack(settings, runtime) as stack:
        swarm_id = new_swarm_id()
        watcher = await watch("ev.#")
        await act(stack, watcher, swarm_id, "create", {"templateId": TEMPLATE})
        controller = await runtime.get(keys.container_name(OWNER, swarm_id, keys.CONTROLLER_PART))
        assert controller is not None and controller.state == "running"
        assert controller.labels["controlplane.kind"] == "swarm-controller"
        _, started = await act(stack, watcher, swarm_id, "start")
        assert started["state"]["status"] == "Running"
        # A host controller restart keeps the controller container as it is.
        await stack.host.stop()
        stack.host = await HostController(stack.bus, runtime, settings).start()
        kept = await runtime.get(keys.container_name(OWNER, swarm_id, keys.CONTROLLER_PART))
        assert kept is not None and kept.id == controller.id and kept.state == "running"
        _, stopped = await act(stack, watcher, swarm_id, "stop")
        assert stopped["state"]["status"] == "Stopped"
        await act(stack, watcher, swarm_id, "remove")
        for _ in range(50):
            if await runtime.get(keys.container_name(OWNER, swarm_id, keys.CONTROLLER_PART)) is None:
                break
            await asyncio.sleep(0.2)
        assert await runtime.get(keys.container_name(OWNER, swarm_id, keys.CONTROLLER_PART)) is None, "the controller is torn down"


async def _view_if(stack: Stack, swarm_id: str, status: str) -> dict[str, Any] | None:
    code, view = await stack.get(f"/api/swarms/{swarm_id}")
    return view if code == 200 and view["status"] == status else None


async def _is_gone(stack: Stack, swarm_id: str) -> bool:
    return (await stack.get(f"/api/swarms/{swarm_id}"))[0] == 404


async def _operation_if(stack: Stack, correlation_id: str, status: str) -> dict[str, Any] | None:
    code, op = await stack.get(f"/api/operations/{correlation_id}")
    return op if code == 200 and op["status"] == status else None


async def test_template_reapplies_a_plan(stack: Stack, watch: Any, runtime: Any) -> None:
    swarm_id = new_swarm_id()
    watcher = await watch("ev.#")
    await act(stack, watcher, swarm_id, "create", {"templateId": TEMPLATE})
    first = await runtime.get(keys.container_name(OWNER, swarm_id, "generator"))
    plan = {"bees": [
        {"name": "generator", "role": "generator", "image": "controlplane:local", "work": {"out": "generated"},
         "config": {"ratePerSec": 5, "message": {"kind": "demo"}}},
        {"name": "second", "role": "generator", "image": "controlplane:local", "work": {"out": "other"},
         "config": {"ratePerSec": 1}},
    ]}
    envelope, applied = await act(stack, watcher, swarm_id, "template", {"swarmPlan": plan})
    assert envelope["timeoutMs"] == 180000 and applied["state"]["status"] == "Ready"
    second = await runtime.get(keys.container_name(OWNER, swarm_id, "second"))
    assert second is not None and second.state == "running"
    unchanged = await runtime.get(keys.container_name(OWNER, swarm_id, "generator"))
    assert unchanged is not None and unchanged.id == first.id, "an unchanged bee keeps its container"
    view = await eventually(lambda: _bees_are(stack, swarm_id, 2), 10)
    assert view, "the read model shows both bees"

    plan["bees"] = [{**plan["bees"][1], "enabled": True}]
    _, applied = await act(stack, watcher, swarm_id, "template", {"swarmPlan": plan})
    assert await runtime.get(keys.container_name(OWNER, swarm_id, "generator")) is None, "a bee left out is removed"
    assert applied["state"]["status"] == "Running", "a plan that brings a bee in enabled runs it"
    replaced = await runtime.get(keys.container_name(OWNER, swarm_id, "second"))
    assert replaced is not None and replaced.id != second.id, "a changed bee gets a new container"
    _, stopped = await act(stack, watcher, swarm_id, "stop")
    assert stopped["state"]["status"] == "Stopped"
    await act(stack, watcher, swarm_id, "remove")
    assert await runtime.get(keys.container_name(OWNER, swarm_id, "second")) is None


async def _bees_are(stack: Stack, swarm_id: str, count: int) -> dict[str, Any] | None:
    code, view = await stack.get(f"/api/swarms/{swarm_id}")
    return view if code == 200 and len(view["bees"]) == count else None


async def test_duplicate_signal_deliveries_act_once(stack: Stack, watch: Any, runtime: Any) -> None:
    """A signal delivered twice, as after a reconnect or a retried publish, is acted on once
    and answered twice with the same outcome."""
    swarm_id = new_swarm_id()
    watcher = await watch("ev.#", "sig.#")
    status, envelope = await stack.post(f"/api/swarms/{swarm_id}/create",
                                        {"idempotencyKey": new_key(), "templateId": TEMPLATE})
    assert status == 202
    create = await watcher.wait_for(f"sig.swarm-create.{swarm_id}", 10)
    await stack.bus.publish(f"sig.swarm-create.{swarm_id}", create)  # while the first is in flight
    same = lambda b: b["correlationId"] == envelope["correlationId"]  # noqa: E731
    await watcher.wait_for(f"ev.ready.swarm-create.{swarm_id}", 60, where=same)
    for _ in range(50):
        if watcher.keys_seen().count(f"ev.ready.swarm-create.{swarm_id}") == 2:
            break
        await asyncio.sleep(0.1)
    assert watcher.keys_seen().count(f"ev.ready.swarm-create.{swarm_id}") == 2
    assert f"ev.error.swarm-create.{swarm_id}" not in watcher.keys_seen()
    assert len(await runtime.list({"controlplane.swarm": swarm_id})) == 1, "one bee container"

    await eventually(lambda: _view_if(stack, swarm_id, "Ready"))
    status, envelope = await stack.post(f"/api/swarms/{swarm_id}/start", {"idempotencyKey": new_key()})
    start = await watcher.wait_for(f"sig.swarm-start.{swarm_id}", 10)
    await stack.bus.publish(f"sig.swarm-start.{swarm_id}", start)
    await watcher.wait_for(f"ev.ready.swarm-start.{swarm_id}", 60, where=same)
    await asyncio.sleep(1)
    toggles = [k for k, b in watcher.seen if k.startswith("sig.config-update.generator.") and same(b)]
    assert len(toggles) == 1, "the bee is switched on once"
    assert watcher.keys_seen().count(f"ev.ready.swarm-start.{swarm_id}") == 2
    await act(stack, watcher, swarm_id, "remove")
