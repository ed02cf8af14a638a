"""Controllers under load and across restarts, on the real broker and Docker engine.

Most tests drive the host controller with signals published directly, as the gateway would
publish them, so they exercise the controllers alone; the load test goes through the gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from controlplane.bus import Bus
from controlplane.config import Settings
from controlplane.contract import keys
from controlplane.contract.models import Signal, new_id
from controlplane.contract.topology import load_topology
from controlplane.controller.host import HostController
from controlplane.runtime.docker import DockerRuntime
from controlplane.scenarios import load_catalog
from tests.conftest import OWNER, Stack, Watcher, new_key, new_swarm_id, running_stack
from tests.integration.test_swarm_lifecycle import queue_depth

pytestmark = pytest.mark.integration

TEMPLATE = "generator-demo"


class Controllers:
    """A host controller on its own, and a way to send it signals."""

    def __init__(self, settings: Settings, bus: Bus, runtime: DockerRuntime) -> None:
        self.settings, self.bus, self.runtime = settings, bus, runtime
        self.host: HostController | None = None
        self.plan = load_catalog(settings.scenarios_dir).templates[TEMPLATE].plan().model_dump(
            mode="json", by_alias=True)

    async def restart_host(self) -> None:
        if self.host is not None:
            await self.host.stop()
        self.host = await HostController(self.bus, self.runtime, self.settings).start()

    async def send(self, name: str, swarm_id: str | None = None, role: str | None = None,
                   instance: str | None = None, key: str | None = None, timeout_ms: int = 120_000,
                   **args: Any) -> Signal:
        sig = Signal(signal=name, correlation_id=new_id(), idempotency_key=key or new_key(), swarm_id=swarm_id,
                     role=role, instance=instance, command_target="instance" if instance else "swarm",
                     args={**args, "timeoutMs": timeout_ms})
        await self.bus.publish(sig.routing_key(), sig)
        return sig

    async def act(self, watcher: Watcher, name: str, swarm_id: str, key: str | None = None,
                  **args: Any) -> dict[str, Any]:
        if name == "swarm-create":
            args.setdefault("swarmPlan", self.plan)
        sig = await self.send(name, swarm_id, key=key, **args)
        return await outcome_of(watcher, name, swarm_id, sig.correlation_id, 90)


@asynccontextmanager
async def running_controllers(settings: Settings, runtime: DockerRuntime) -> AsyncIterator[Controllers]:
    bus = await Bus(settings.amqp_url.get_secret_value(), load_topology(settings.topology_file), "test").connect()
    controllers = Controllers(settings, bus, runtime)
    try:
        await controllers.restart_host()
        yield controllers
    finally:
        if controllers.host is not None:
            await controllers.host.stop()
        await bus.close()


@pytest.fixture
async def controllers(settings_factory: Callable[..., Settings], runtime: DockerRuntime) -> AsyncIterator[Controllers]:
    async with running_controllers(settings_factory(), runtime) as c:
        yield c


async def create(stack: Stack, watcher: Watcher, swarm_id: str, timeout: float = 90) -> dict[str, Any]:
    status, envelope = await stack.post(f"/api/swarms/{swarm_id}/create",
                                        {"idempotencyKey": new_key(), "templateId": TEMPLATE})
    assert status == 202, envelope
    return await outcome_of(watcher, "swarm-create", swarm_id, envelope["correlationId"], timeout)


async def remove(stack: Stack, watcher: Watcher, swarm_id: str, timeout: float = 90) -> dict[str, Any]:
    status, envelope = await stack.post(f"/api/swarms/{swarm_id}/remove", {"idempotencyKey": new_key()})
    assert status == 202, envelope
    return await outcome_of(watcher, "swarm-remove", swarm_id, envelope["correlationId"], timeout)


async def outcome_of(watcher: Watcher, signal: str, scope: str, correlation_id: str, timeout: float) -> dict[str, Any]:
    """The success or error outcome of one signal, whichever comes first."""
    same = lambda b: b["correlationId"] == correlation_id  # noqa: E731
    ready = asyncio.ensure_future(watcher.wait_for(f"ev.ready.{signal}.{scope}", timeout, where=same))
    error = asyncio.ensure_future(watcher.wait_for(f"ev.error.{signal}.{scope}", timeout, where=same))
    done, pending = await asyncio.wait({ready, error}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return done.pop().result()


def arriving(watcher: Watcher) -> Any:
    """A ``where`` that matches only events arriving from now on."""
    before = {id(body) for _, body in watcher.seen}
    return lambda body: id(body) not in before


async def ask_status(stack: Stack | Controllers, watcher: Watcher, role: str, instance: str) -> dict[str, Any]:
    later = arriving(watcher)
    sig = Signal(signal="status-request", correlation_id=new_id(), idempotency_key=new_key(),
                 role=role, instance=instance, command_target="instance", args={"timeoutMs": 10_000})
    await stack.bus.publish(sig.routing_key(), sig)
    return await watcher.wait_for(keys.status_key("status-full", role, instance), 15, where=later)


async def configure(stack: Stack | Controllers, watcher: Watcher, role: str, instance: str, patch: dict[str, Any],
                    swarm_id: str) -> dict[str, Any]:
    sig = Signal(signal="config-update", correlation_id=new_id(), idempotency_key=new_key(), swarm_id=swarm_id,
                 role=role, instance=instance, command_target="instance",
                 args={"patch": patch, "timeoutMs": 60_000})
    await stack.bus.publish(sig.routing_key(), sig)
    return await outcome_of(watcher, "config-update", keys.component_scope(role, instance), sig.correlation_id, 60)


async def test_forty_concurrent_creates_all_succeed(settings_factory: Callable[..., Settings], watch: Any,
                                                    runtime: Any) -> None:
    """More creates at once than the host controller's prefetch: a create waiting for its
    handshake must not hold back the handshakes (they come on a consumer of their own)."""
    # Forty bee processes starting at once on a small machine take their time: give them the
    # create's whole budget, and keep the heartbeats from adding to the load.
    settings = settings_factory(bee_ready_timeout_s=110.0, status_interval_s=5.0)
    swarm_ids = [new_swarm_id("c") for _ in range(40)]
    watcher = await watch("ev.ready.swarm-create.*", "ev.error.swarm-create.*",
                          "ev.ready.swarm-remove.*", "ev.error.swarm-remove.*")
    async with running_stack(settings, runtime) as stack:
        try:
            outcomes = await asyncio.gather(*(create(stack, watcher, s, timeout=150) for s in swarm_ids))
            failed = [(o["scope"]["swarmId"], o.get("code"), o.get("message"))
                      for o in outcomes if o["result"] != "success"]
            assert not failed, f"{len(failed)} of 40 failed: {failed[:3]}"
        finally:
            removed = await asyncio.gather(*(remove(stack, watcher, s, timeout=120) for s in swarm_ids),
                                           return_exceptions=True)
    assert all(not isinstance(r, BaseException) and r["result"] == "success" for r in removed), removed
    left = [s for s in swarm_ids if await runtime.list({"controlplane.swarm": s})]
    assert not left, f"containers left behind by {left}"


async def test_controller_restart_after_disable_stays_disabled(controllers: Controllers, watch: Any,
                                                               vhost: str) -> None:
    swarm_id = new_swarm_id()
    bee = keys.bee_instance(swarm_id, "generator")
    watcher = await watch("ev.#")
    assert (await controllers.act(watcher, "swarm-create", swarm_id))["result"] == "success"
    started = await controllers.act(watcher, "swarm-start", swarm_id)
    assert started["state"]["status"] == "Running"
    disabled = await configure(controllers, watcher, keys.CONTROLLER_ROLE, swarm_id, {"enabled": False}, swarm_id)
    assert disabled["result"] == "success" and disabled["state"]["enabled"] is False

    # The controller dies with its host controller; the next one re-adopts the swarm.
    await controllers.restart_host()
    adopted = await watcher.wait_for(f"ev.ready.swarm-controller.{swarm_id}", 60,
                                     where=lambda b: b["details"].get("adopted") is True)
    assert adopted["state"]["enabled"] is False, "the controller's switch survived its restart"
    assert adopted["state"]["status"] == "Running"
    full = await ask_status(controllers, watcher, "generator", bee)
    assert full["enabled"] is False, "its bee stays off"
    controller = await ask_status(controllers, watcher, keys.CONTROLLER_ROLE, swarm_id)
    assert controller["enabled"] is False and controller["data"]["swarmStatus"] == "Running"
    state_queue = keys.state_queue(keys.CONTROLLER_ROLE, swarm_id)
    assert await queue_depth(vhost, state_queue) is not None
    assert (await controllers.act(watcher, "swarm-remove", swarm_id))["result"] == "success"
    assert await queue_depth(vhost, state_queue) is None, "the controller's state goes with its swarm"
    assert await queue_depth(vhost, keys.state_queue("generator", bee)) is None, "so does its bee's"
    # The controller's own queues go once it has acked the remove, just after its outcome.
    replies = keys.replies_queue(keys.CONTROLLER_ROLE, swarm_id)
    async with asyncio.timeout(10):
        while await queue_depth(vhost, replies) is not None:
            await asyncio.sleep(0.1)


async def test_bee_container_restart_keeps_its_config(controllers: Controllers, watch: Any, runtime: Any) -> None:
    swarm_id = new_swarm_id()
    bee = keys.bee_instance(swarm_id, "generator")
    watcher = await watch("ev.#")
    assert (await controllers.act(watcher, "swarm-create", swarm_id))["result"] == "success"
    changed = await configure(controllers, watcher, "generator", bee, {"ratePerSec": 7}, swarm_id)
    assert changed["result"] == "success", changed
    container = keys.container_name(OWNER, swarm_id, "generator")
    before = await runtime.get(container)
    assert before is not None
    restart = await asyncio.create_subprocess_exec("docker", "restart", "-t", "5", container)
    assert await asyncio.wait_for(restart.wait(), 60) == 0
    after = await runtime.get(container)
    assert after is not None and after.id == before.id and after.state == "running"
    full = await ask_status(controllers, watcher, "generator", bee)
    assert full["data"]["config"]["ratePerSec"] == 7, "the bee kept its config across the restart"
    assert (await controllers.act(watcher, "swarm-remove", swarm_id))["result"] == "success"


async def test_host_controller_restarted_mid_create_finishes_it(controllers: Controllers, watch: Any,
                                                                runtime: Any) -> None:
    swarm_id = new_swarm_id()
    watcher = await watch("ev.#")
    sig = await controllers.send("swarm-create", swarm_id, swarmPlan=controllers.plan)
    # Stop the host controller once the create is under way: its bee is being started.
    async with asyncio.timeout(60):
        while await runtime.get(keys.container_name(OWNER, swarm_id, "generator")) is None:
            await asyncio.sleep(0.05)
    await controllers.restart_host()
    outcome = await outcome_of(watcher, "swarm-create", swarm_id, sig.correlation_id, 90)
    assert outcome["result"] == "success", outcome
    assert outcome["state"]["status"] == "Ready"
    await asyncio.sleep(0)
    assert watcher.keys_seen().count(f"ev.ready.swarm-create.{swarm_id}") == 1, "answered once, by the new one"
    assert (await controllers.act(watcher, "swarm-remove", swarm_id))["result"] == "success"
