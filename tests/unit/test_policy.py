"""The container policy, the plan rules and redaction: pure logic, no engine."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from controlplane.bus.accounts import controller_grant
from controlplane.config import Settings
from controlplane.contract import keys
from controlplane.contract.models import MAX_BEES, SwarmPlan
from controlplane.contract.redact import redact, safe_text
from controlplane.runtime import ContainerSpec, Mount, PolicyViolation
from controlplane.runtime.labels import managed_labels
from controlplane.runtime.policy import RuntimePolicy

POLICY = RuntimePolicy.from_settings(Settings(allowed_mounts=["/var/run/docker.sock", "/srv"]))


def spec(kind: str, image: str = "controlplane:local", **fields: object) -> ContainerSpec:
    return ContainerSpec(name=f"cp-x-{kind}", image=image, labels=managed_labels(kind, "host", swarm_id="x"),
                         **fields)  # type: ignore[arg-type]


def test_the_docker_socket_goes_to_controllers_only_whatever_the_mounts_allow() -> None:
    socket = (Mount("/var/run/docker.sock", "/var/run/docker.sock"),)
    POLICY.check(spec("swarm-controller", mounts=socket))
    for kind in ("bee", "sut", "provisioned"):
        with pytest.raises(PolicyViolation, match="swarm-controllers only") as caught:
            POLICY.check(spec(kind, mounts=socket))
        assert caught.value.code == "policy-refused"
    POLICY.check(spec("bee", mounts=(Mount("/srv/data", "/data"),)))


def test_images_are_allowed_per_kind() -> None:
    with pytest.raises(PolicyViolation) as caught:
        POLICY.check(spec("bee", image="evil:latest"))
    assert caught.value.code == "image-not-allowed"
    custom = RuntimePolicy.from_settings(Settings(allowed_images=["my/bee:1"]))
    custom.check(spec("bee", image="my/bee:1"))
    with pytest.raises(PolicyViolation):  # a bee image is no controller image
        custom.check(spec("swarm-controller", image="my/bee:1"))
    with pytest.raises(PolicyViolation, match="kind"):
        POLICY.check(ContainerSpec(name="x", image="controlplane:local", labels={}))


def test_a_sut_command_of_its_own_needs_the_operator() -> None:
    POLICY.check(spec("sut", command=["python", "-m", "bees.sut"]))
    with pytest.raises(PolicyViolation, match="CP_ALLOW_SUT_COMMAND"):
        POLICY.check(spec("sut", command=["sh", "-c", "id"]))
    RuntimePolicy.from_settings(Settings(allow_sut_command=True)).check(spec("sut", command=["sh", "-c", "id"]))


def test_hardening_of_every_container() -> None:
    options = POLICY.hardening(spec("bee"))
    assert options["cap_drop"] == ["ALL"] and options["security_opt"] == ["no-new-privileges:true"]
    assert options["mem_limit"] == "512m" and options["pids_limit"] == 256 and options["nano_cpus"] == 10**9
    assert options["read_only"] is True, "the project's image runs on a read-only root"
    assert "read_only" not in POLICY.hardening(spec("bee", image="other:1")), "another image may need to write"


def _bee(name: str, **fields: object) -> dict[str, object]:
    return {"name": name, "role": "generator", "image": "i", **fields}


def test_a_large_plan_orders_its_bees_through_shared_queues() -> None:
    # Many producers and consumers on one queue: every consumer comes up before any producer.
    bees = [_bee(f"c{i}", work={"in": "q"}) for i in range(MAX_BEES // 2)]
    bees += [_bee(f"p{i}", work={"out": "q"}) for i in range(MAX_BEES // 2)]
    order = [b.name for b in SwarmPlan.model_validate({"bees": bees}).start_order()]
    assert len(order) == MAX_BEES
    assert max(order.index(f"c{i}") for i in range(MAX_BEES // 2)) < min(order.index(f"p{i}") for i in range(MAX_BEES // 2))
    # A bee reading what it writes waits for the queue's other readers only.
    plan = SwarmPlan.model_validate({"bees": [_bee("loop", work={"in": "q", "out": "q"}), _bee("reader", work={"in": "q"})]})
    assert [b.name for b in plan.start_order()] == ["reader", "loop"]


def test_plan_limits_and_reserved_names() -> None:
    with pytest.raises(ValidationError, match="at most 1000"):
        SwarmPlan.model_validate({"bees": [_bee(f"b{i}") for i in range(MAX_BEES + 1)]})
    for name in ("ctl", "sut"):
        with pytest.raises(ValidationError, match="reserved"):
            SwarmPlan.model_validate({"bees": [_bee(name)]})
    with pytest.raises(ValidationError, match="repeated: a"):
        SwarmPlan.model_validate({"bees": [_bee("a"), _bee("a")]})


def test_redaction_masks_maps_named_keys_and_the_keys_a_plan_marks() -> None:
    config = {"env": {"A": "1"}, "headers": {"X-Key": "k"}, "apiKey": "k", "password": "", "dsn": "pg://u:p@h/db",
              "nested": [{"token": "t", "path": "/x"}], "rate": 5}
    assert redact(config, ["dsn"]) == {"env": {"A": "***"}, "headers": {"X-Key": "***"}, "apiKey": "***",
                                       "password": "", "dsn": "***", "nested": [{"token": "***", "path": "/x"}],
                                       "rate": 5}
    assert redact(config)["dsn"] == "pg://u:p@h/db", "only when the plan marks it"
    assert safe_text("a\x1b[2Jb\r\nc") == "a\ufffd[2Jb\nc"
    assert safe_text("x" * 900, limit=10) == "…" + "x" * 9


def test_an_instance_id_reads_one_way_only() -> None:
    assert keys.bee_instance("a", "b-gen") == "a--b-gen" != keys.bee_instance("a-b", "gen")
    for bad_swarm, bad_bee in (("a--b", "gen"), ("a", "b--gen")):
        with pytest.raises(keys.InvalidKey, match="--"):
            keys.bee_instance(bad_swarm, bad_bee)
    with pytest.raises(ValidationError, match="--"):
        SwarmPlan.model_validate({"bees": [_bee("b--gen")]})
    # Swarm a's controller may signal its own bees, not those of swarm a-b.
    pattern = re.compile(controller_grant("a").topic_write)
    assert pattern.match(keys.signal_key("config-update", f"generator.{keys.bee_instance('a', 'b-gen')}"))
    assert not pattern.match(keys.signal_key("config-update", f"generator.{keys.bee_instance('a-b', 'gen')}"))
