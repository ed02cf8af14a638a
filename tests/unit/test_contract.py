"""The wire contract: routing keys, slugs, plans and envelopes."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from controlplane.contract import keys
from controlplane.contract.models import CreateSwarmRequest, Envelope, Outcome, Scope, Signal, SwarmPlan, Watch


def test_keys_follow_the_specification() -> None:
    assert keys.signal_key("swarm-start", keys.swarm_scope("alpha")) == "sig.swarm-start.alpha"
    assert keys.ready_key("swarm-create", "alpha") == "ev.ready.swarm-create.alpha"
    assert keys.error_key("config-update", keys.component_scope("generator", "a-gen")) == \
        "ev.error.config-update.generator.a-gen"
    assert keys.status_key("status-full", "generator", "a-gen") == "ev.status-full.generator.a-gen"
    assert keys.controller_handshake_key("alpha") == "ev.ready.swarm-controller.alpha"
    assert keys.hive_exchange("alpha") == "ph.alpha.hive"
    assert keys.hive_queue("alpha", "generated") == "ph.alpha.generated"
    assert keys.scope_of("alpha") == "alpha" and keys.scope_of("alpha", "generator", "a-gen") == "generator.a-gen"
    assert keys.split_scope("generator.a-gen") == ("generator", "a-gen") and keys.split_scope("alpha") == (None, None)
    assert keys.component_event_patterns("generator", "a-gen") == ("ev.*.generator.a-gen", "ev.*.*.generator.a-gen")


@pytest.mark.parametrize("key", [
    "sig.swarm-start.alpha", "ev.ready.swarm-create.alpha", "ev.error.config-update.generator.a-gen",
    "ev.status-delta.swarm-controller.alpha",
])
def test_parse_inverts_build(key: str) -> None:
    parsed = keys.parse_key(key)
    rebuilt = {
        "sig": lambda: keys.signal_key(parsed.signal, parsed.scope),
        "ready": lambda: keys.ready_key(parsed.signal, parsed.scope),
        "error": lambda: keys.error_key(parsed.signal, parsed.scope),
    }.get(parsed.kind, lambda: keys.status_key(parsed.kind, parsed.role, parsed.instance))()
    assert rebuilt == key


@pytest.mark.parametrize("bad", ["", "a.b", "Upper", "x" * 33, "-a", "a-", "a_b", "a b"])
def test_bad_slugs_never_become_keys(bad: str) -> None:
    assert keys.slug_problem(bad)
    with pytest.raises(keys.InvalidKey):
        keys.swarm_scope(bad)


def test_plan_orders_consumers_before_producers_and_refuses_cycles() -> None:
    plan = SwarmPlan.model_validate({"bees": [
        {"name": "gen", "role": "generator", "image": "i", "work": {"out": "a"}},
        {"name": "mod", "role": "moderator", "image": "i", "work": {"in": "a", "out": "b"}},
        {"name": "proc", "role": "processor", "image": "i", "work": {"in": "b"}},
    ]})
    assert [b.name for b in plan.start_order()] == ["proc", "mod", "gen"]
    with pytest.raises(ValidationError, match="cycle"):
        SwarmPlan.model_validate({"bees": [
            {"name": "a", "role": "x", "image": "i", "dependsOn": ["b"]},
            {"name": "b", "role": "x", "image": "i", "dependsOn": ["a"]},
        ]})
    with pytest.raises(ValidationError, match="privileged"):
        SwarmPlan.model_validate({"bees": [{"name": "a", "role": "x", "image": "i", "privileged": True}]})


def test_wire_models_speak_camel_case() -> None:
    request = CreateSwarmRequest.model_validate({"idempotencyKey": "6f1c1b38-8d1b-4c8a-9d0e-2f8a1f0e9b11",
                                                 "templateId": "demo"})
    assert request.template_id == "demo"
    env = Envelope(correlation_id="c", idempotency_key="k", timeout_ms=5,
                   watch=Watch(success_topic="ev.ready.x.y", error_topic="ev.error.x.y"))
    assert env.to_dict() == {"correlationId": "c", "idempotencyKey": "k", "timeoutMs": 5,
                             "watch": {"successTopic": "ev.ready.x.y", "errorTopic": "ev.error.x.y"}}
    sig = Signal(signal="swarm-start", correlation_id="c", idempotency_key="k", swarm_id="alpha")
    assert sig.routing_key() == "sig.swarm-start.alpha"
    outcome = Outcome.for_signal(sig, result="error", code="timeout")
    assert outcome.routing_key() == "ev.error.swarm-start.alpha"
    assert outcome.scope == Scope(swarm_id="alpha")


def test_queue_names_agree_between_keys_and_topology() -> None:
    from controlplane.contract.topology import default_topology

    templates = default_topology().templates
    assert keys.state_queue("generator", "a-gen") == "ph.control.state.generator.a-gen" == \
        templates.state_queue.render(role="generator", instance="a-gen").name
    assert templates.state_queue.arguments == {"x-max-length": 1, "x-overflow": "drop-head"}
    assert keys.replies_queue(keys.CONTROLLER_ROLE, "alpha") == "ph.control.swarm-controller.alpha.replies" == \
        templates.swarm_controller_replies_queue.render(instance="alpha").name
    replies = default_topology().queue(keys.HOST_CONTROLLER_REPLIES_QUEUE)
    assert {b.key for b in replies.bindings} >= {"ev.ready.swarm-controller.*", "ev.error.swarm-controller.*"}
    commands = default_topology().queue(keys.HOST_CONTROLLER_QUEUE)
    assert not [b for b in commands.bindings if b.key.startswith("ev.")], "commands and replies never share a queue"


def test_id_kinds_have_their_own_checks() -> None:
    from controlplane.contract import ids

    assert ids.problem("uuid", "550e8400-e29b-41d4-a716-446655440000") is None
    assert ids.problem("uuid", "not-a-uuid")
    assert ids.problem("container", "a" * 64) is None
    assert ids.problem("container", "0123456789ab") is None
    assert ids.problem("container", "cp-demo-generator") is None
    assert ids.problem("container", "bad name!")
    assert ids.problem("container", "x" * 200)
    assert ids.problem("slug", "Demo") and ids.problem("slug", "demo") is None


def test_times_are_read_as_the_wire_and_docker_write_them() -> None:
    from datetime import datetime, timezone

    from controlplane.contract.models import parse_time

    utc = timezone.utc
    assert parse_time("2026-12-03T15:16:55.123456789Z") == datetime(2026, 12, 3, 15, 16, 55, 123456, tzinfo=utc)
    assert parse_time("2026-12-03T15:16:55") == datetime(2026, 12, 3, 15, 16, 55, tzinfo=utc)  # no zone: UTC
    assert parse_time("0001-01-01T00:00:00Z") is None  # Docker's "never started"
    assert parse_time("yesterday") is None and parse_time(None) is None and parse_time("") is None
