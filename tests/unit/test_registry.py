"""Registry health and the component request models: pure logic, no broker."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from controlplane.contract import keys
from controlplane.contract.models import (
    CommandTarget, ComponentConfigRequest, ControllersConfigRequest, Status, utcnow,
)
from controlplane.gateway.readmodels import Swarms
from controlplane.gateway.registry import FAILED_AFTER, STALE_AFTER, Registry, health, worst
from controlplane.store import SwarmRow

KEY = "6f1c7a0e-3b1c-4d8e-9a51-0c2c3f4a5b6d"


@pytest.mark.parametrize(("age_intervals", "expected"), [
    (0, "healthy"), (STALE_AFTER - 0.1, "healthy"), (STALE_AFTER + 0.1, "stale"),
    (FAILED_AFTER - 0.1, "stale"), (FAILED_AFTER + 0.1, "failed"),
])
def test_health_degrades_with_silence(age_intervals: float, expected: str) -> None:
    now = utcnow()
    interval = 2.0
    assert health(now - timedelta(seconds=age_intervals * interval), interval, now=now) == expected


@pytest.mark.parametrize("container_state", ["exited", "dead", "missing"])
def test_a_dead_container_is_failed_whatever_it_last_said(container_state: str) -> None:
    now = utcnow()
    assert health(now, 5.0, container_state, now=now) == "failed"
    assert health(None, 5.0, container_state, now=now) == "failed"


def test_never_heard_from_is_unknown_and_worst_ranks() -> None:
    assert health(None, 5.0, "running") == "unknown"
    assert worst("healthy", "unknown") == "unknown"
    assert worst("healthy", "stale", "unknown") == "stale"
    assert worst("stale", "failed", "healthy") == "failed"
    assert worst("healthy") == "healthy"


def test_config_request_needs_a_non_empty_patch_and_a_known_command_target() -> None:
    request = ComponentConfigRequest.model_validate({"idempotencyKey": KEY, "patch": {"enabled": True}})
    assert request.command_target == CommandTarget.INSTANCE
    with pytest.raises(ValidationError, match="patch"):
        ComponentConfigRequest.model_validate({"idempotencyKey": KEY, "patch": {}})
    with pytest.raises(ValidationError, match="commandTarget"):
        ComponentConfigRequest.model_validate({"idempotencyKey": KEY, "patch": {"a": 1}, "commandTarget": "planet"})


def test_bulk_targets_must_name_swarm_controllers() -> None:
    ok = ControllersConfigRequest.model_validate({"idempotencyKey": KEY, "enabled": False, "targets": [
        "swarm-controller.alpha", "swarm-controller.bravo", "swarm-controller.alpha"]})
    assert ok.targets == ["swarm-controller.alpha", "swarm-controller.bravo"]
    assert ControllersConfigRequest.model_validate({"idempotencyKey": KEY, "enabled": True}).targets is None
    for bad in ("generator.alpha", "swarm-controller", "swarm-controller.Alpha", "swarm-controller.a.b"):
        with pytest.raises(ValidationError, match="targets"):
            ControllersConfigRequest.model_validate({"idempotencyKey": KEY, "enabled": False, "targets": [bad]})
    with pytest.raises(ValidationError, match="enabled"):
        ControllersConfigRequest.model_validate({"idempotencyKey": KEY, "enabled": "yes please"})


def _status(role: str, instance: str, swarm_id: str, **fields: Any) -> Status:
    return Status(kind="status-delta", role=role, instance=instance, swarm_id=swarm_id, **fields)


def test_registry_in_memory_follows_the_store_rules() -> None:
    swarms = Swarms(store=None)  # type: ignore[arg-type]  # no store call on this path
    swarms.put(SwarmRow(id="s1", template_id="t", status="Running"))
    registry = Registry(store=None, swarms=swarms)  # type: ignore[arg-type]

    registry.observe(_status("generator", "s2-gen", "s2"))  # a swarm this gateway does not know
    assert registry.list() == []

    registry.observe(_status("generator", "s1-gen", "s1", enabled=True))
    registry.observe(_status(keys.CONTROLLER_ROLE, "s1", "s1", state="Running", data={"bees": [
        {"role": "generator", "instance": "s1-gen", "state": "running", "enabled": True},
        {"role": "moderator", "instance": "s1-mod", "state": "created", "enabled": False}]}))
    rows = {(r.role, r.instance): r for r in registry.list(swarm_id="s1")}
    assert set(rows) == {("generator", "s1-gen"), ("moderator", "s1-mod"), (keys.CONTROLLER_ROLE, "s1")}
    assert rows[("generator", "s1-gen")].container_state == "running" and rows[("generator", "s1-gen")].enabled
    assert rows[("moderator", "s1-mod")].last_seen is None  # listed by its controller, never heard from
    assert swarms.get("s1").bees[0]["instance"] == "s1-gen"  # type: ignore[union-attr]

    # A settled controller's list is the truth: a bee it no longer lists leaves the registry.
    registry.observe(_status(keys.CONTROLLER_ROLE, "s1", "s1", state="Running", data={"bees": [
        {"role": "generator", "instance": "s1-gen", "state": "exited", "enabled": True}]}))
    assert {r.instance for r in registry.list(swarm_id="s1")} == {"s1-gen", "s1"}
    assert registry.get("generator", "s1-gen").container_state == "exited"  # type: ignore[union-attr]
    assert [r.instance for r in registry.list(role="generator")] == ["s1-gen"]

    registry.forget_swarm("s1")
    assert registry.list() == [] and registry.get("generator", "s1-gen") is None
