"""Registry health and the component request models: pure logic, no broker."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from controlplane.contract.models import CommandTarget, ComponentConfigRequest, ControllersConfigRequest, utcnow
from controlplane.gateway.registry import FAILED_AFTER, STALE_AFTER, health, worst

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
