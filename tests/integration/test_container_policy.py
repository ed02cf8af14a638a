"""The container policy, enforced by the runtime whatever path asked: real Docker, real RabbitMQ."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import quote

import docker
import pytest

from controlplane.contract import keys
from controlplane.contract.models import Signal, new_id
from controlplane.runtime import ContainerSpec, PolicyViolation
from controlplane.runtime.labels import managed_labels
from tests.conftest import BROKER, OWNER, Stack, fresh_vhost, new_key, new_swarm_id, running_stack
from tests.integration.test_swarm_lifecycle import TEMPLATE, act

pytestmark = pytest.mark.integration

FOREIGN_IMAGE = "controlplane-busybox:local"  # present on the engine, allowed for nothing


def _plan(image: str, sut: dict[str, Any] | None = None) -> dict[str, Any]:
    plan: dict[str, Any] = {"bees": [{"name": "intruder", "role": "generator", "image": image}]}
    if sut:
        plan["sut"] = sut
    return plan


def _inspect(container_id: str) -> dict[str, Any]:
    """What the engine itself says, not what the runtime reads of it."""
    with docker.APIClient(base_url=runtime_url(), version="auto") as client:
        return client.inspect_container(container_id)


def runtime_url() -> str:
    return "unix:///var/run/docker.sock"


async def _publish(stack: Stack, signal: str, swarm_id: str, args: dict[str, Any]) -> Signal:
    """A signal put on ph.control by hand, past the gateway and its checks."""
    sig = Signal(signal=signal, correlation_id=new_id(), idempotency_key=new_id(), swarm_id=swarm_id, args=args)
    await stack.bus.publish(sig.routing_key(), sig)
    return sig


async def test_every_kind_of_container_is_hardened(settings_factory: Any, runtime: Any, watch: Any) -> None:
    settings = settings_factory(controller_mode="container", container_memory_mb=384, container_pids=200)
    async with running_stack(settings, runtime) as stack:
        swarm_id = new_swarm_id()
        watcher = await watch("ev.#")
        await act(stack, watcher, swarm_id, "create", {"templateId": "http-trigger"})
        # A controller gets the Docker socket: only the project's image or a template's may be one.
        other = new_swarm_id()
        sig = await _publish(stack, "swarm-create", other, {"swarmPlan": _plan("controlplane:local"),
                                                            "controllerImage": FOREIGN_IMAGE})
        refused = await watcher.wait_for(f"ev.error.swarm-create.{other}",
                                         where=lambda b: b["correlationId"] == sig.correlation_id)
        assert refused["code"] == "image-not-allowed" and FOREIGN_IMAGE in refused["message"]
        assert await runtime.get(keys.container_name(OWNER, other, keys.CONTROLLER_PART)) is None
        try:
            for part in (keys.CONTROLLER_PART, keys.SUT_PART, "trigger"):
                info = await runtime.get(keys.container_name(OWNER, swarm_id, part))
                assert info is not None and info.state == "running", part
                attrs = await asyncio.to_thread(_inspect, info.id)
                host = attrs["HostConfig"]
                assert host["Memory"] == 384 * 1024 * 1024, part
                assert host["NanoCpus"] == 1_000_000_000, part
                assert host["PidsLimit"] == 200, part
                assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd"), part
                assert "no-new-privileges:true" in host["SecurityOpt"], part
                assert host["Privileged"] is False, part
                assert host["ReadonlyRootfs"] is True, part
                assert host["LogConfig"] == {"Type": "json-file", "Config": {"max-file": "3", "max-size": "10m"}}, part
                assert attrs["Config"]["User"] == "10001:10001", part
                mounts = [m["Source"] for m in attrs["Mounts"]]
                assert mounts == (["/var/run/docker.sock"] if part == keys.CONTROLLER_PART else []), part
        finally:
            await act(stack, watcher, swarm_id, "remove")


async def test_a_signal_past_the_gateway_runs_no_image_it_may_not(stack: Stack, watch: Any, runtime: Any) -> None:
    swarm_id = new_swarm_id()
    watcher = await watch("ev.#")
    await act(stack, watcher, swarm_id, "create", {"templateId": TEMPLATE})
    bee = await runtime.get(keys.container_name(OWNER, swarm_id, "generator"))
    assert bee is not None

    sig = await _publish(stack, "swarm-template", swarm_id, {"swarmPlan": _plan(FOREIGN_IMAGE)})
    refused = await watcher.wait_for(f"ev.error.swarm-template.{swarm_id}",
                                     where=lambda b: b["correlationId"] == sig.correlation_id)
    assert refused["code"] == "image-not-allowed" and FOREIGN_IMAGE in refused["message"]
    assert await runtime.get(keys.container_name(OWNER, swarm_id, "intruder")) is None
    kept = await runtime.get(keys.container_name(OWNER, swarm_id, "generator"))
    assert kept is not None and kept.id == bee.id and kept.state == "running", "nothing of the running plan is lost"

    # A create straight to the host controller.
    other = new_swarm_id()
    sig = await _publish(stack, "swarm-create", other, {"swarmPlan": _plan(FOREIGN_IMAGE)})
    refused = await watcher.wait_for(f"ev.error.swarm-create.{other}",
                                     where=lambda b: b["correlationId"] == sig.correlation_id)
    assert refused["code"] == "image-not-allowed"
    assert await runtime.get(keys.container_name(OWNER, other, "intruder")) is None
    await act(stack, watcher, swarm_id, "remove")


async def test_a_sut_command_needs_the_operator(stack: Stack, watch: Any, runtime: Any) -> None:
    swarm_id = new_swarm_id()
    plan = _plan("controlplane:local", {"image": "controlplane:local", "command": ["sh", "-c", "id"], "port": 18090})
    status, body = await stack.post(f"/api/swarms/{swarm_id}/template", {"idempotencyKey": new_key(), "swarmPlan": plan})
    assert status == 422 and body["error"] == "sut-command-not-allowed"
    assert body["fields"] == [{"field": "swarmPlan.sut.command", "reason": "not allowed by the operator"}]

    watcher = await watch("ev.#")
    sig = await _publish(stack, "swarm-create", swarm_id, {"swarmPlan": plan})
    refused = await watcher.wait_for(f"ev.error.swarm-create.{swarm_id}",
                                     where=lambda b: b["correlationId"] == sig.correlation_id)
    assert refused["code"] == "policy-refused" and "CP_ALLOW_SUT_COMMAND" in refused["message"]
    assert await runtime.get(keys.container_name(OWNER, swarm_id, keys.SUT_PART)) is None


async def test_plans_are_bounded_and_names_reserved(stack: Stack) -> None:
    too_many = {"bees": [{"name": f"b{i}", "role": "generator", "image": "controlplane:local"} for i in range(1001)]}
    status, body = await stack.post(f"/api/swarms/{new_swarm_id()}/template",
                                    {"idempotencyKey": new_key(), "swarmPlan": too_many})
    assert status == 422 and body["error"] == "invalid-plan"
    assert body["fields"][0]["field"] == "swarmPlan.bees" and "1000" in body["fields"][0]["reason"]
    for reserved in (keys.CONTROLLER_PART, keys.SUT_PART):
        plan = {"bees": [{"name": reserved, "role": "generator", "image": "controlplane:local"}]}
        status, body = await stack.post(f"/api/swarms/{new_swarm_id()}/template",
                                        {"idempotencyKey": new_key(), "swarmPlan": plan})
        assert status == 422 and body["fields"][0]["field"] == "swarmPlan.bees.0.name", body
        assert "reserved" in body["fields"][0]["reason"]


async def test_a_name_alone_does_not_make_a_container_ours(runtime: Any) -> None:
    swarm_id = new_swarm_id()
    name = keys.container_name(OWNER, swarm_id, "squatter")
    foreign = ContainerSpec(name=name, image="controlplane:local", command=["sleep", "60"],
                            labels=managed_labels("bee", "somebody-else", swarm_id=swarm_id, role="generator",
                                                  instance=keys.bee_instance(swarm_id, "squatter")))
    ours = ContainerSpec(name=name, image="controlplane:local", command=["sleep", "60"],
                         labels=managed_labels("bee", OWNER, swarm_id=swarm_id, role="generator",
                                               instance=keys.bee_instance(swarm_id, "squatter")))
    squatter = await runtime.ensure_running(foreign)
    try:
        with pytest.raises(PolicyViolation) as caught:
            await runtime.ensure_running(ours)
        assert caught.value.code == "name-taken"
        still = await runtime.get(name)
        assert still is not None and still.id == squatter.id
    finally:
        await runtime.remove(name)


async def test_two_control_planes_on_one_engine_keep_their_own_swarms(settings_factory: Any, runtime: Any,
                                                                       watch: Any, tmp_path: Path) -> None:
    swarm_id = new_swarm_id()
    other_owner = f"{OWNER}-b"
    async with fresh_vhost() as other_vhost:
        other_settings = settings_factory(
            instance_id=other_owner, database_url=f"sqlite:///{tmp_path / 'other.db'}",
            amqp_url=f"amqp://guest:guest@{BROKER}/{quote(other_vhost, safe='')}")
        async with running_stack(settings_factory(), runtime) as mine, running_stack(other_settings, runtime) as theirs:
            watcher = await watch("ev.#")
            await act(mine, watcher, swarm_id, "create", {"templateId": TEMPLATE})
            status, envelope = await theirs.post(f"/api/swarms/{swarm_id}/create",
                                                 {"idempotencyKey": new_key(), "templateId": TEMPLATE})
            assert status == 202
            closed = await theirs.get(f"/api/operations/{envelope['correlationId']}?wait=90")
            assert closed[1]["status"] == "succeeded", closed
            their_bee = await runtime.get(keys.container_name(other_owner, swarm_id, "generator"))
            assert their_bee is not None and their_bee.state == "running"

            await act(mine, watcher, swarm_id, "remove")
            assert await runtime.get(keys.container_name(OWNER, swarm_id, "generator")) is None
            kept = await runtime.get(keys.container_name(other_owner, swarm_id, "generator"))
            assert kept is not None and kept.id == their_bee.id and kept.state == "running"

            status, envelope = await theirs.post(f"/api/swarms/{swarm_id}/remove", {"idempotencyKey": new_key()})
            closed = await theirs.get(f"/api/operations/{envelope['correlationId']}?wait=60")
            assert closed[1]["status"] == "succeeded", closed
            assert await runtime.get(keys.container_name(other_owner, swarm_id, "generator")) is None
