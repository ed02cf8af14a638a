"""What a swarm is made of in Docker and RabbitMQ: container specs, the plan read back from
labels, and the teardown that removes it all.

Module functions, because the host controller needs them without a swarm-controller: to
re-adopt a swarm from its containers' labels, and to clean up after a controller that died.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from controlplane.bus import Bus
from controlplane.bus.accounts import BrokerAccounts, Grant
from controlplane.bus.management import ManagementError
from controlplane.config import Settings
from controlplane.contract import keys
from controlplane.contract.models import SUT_NAME, BeeSpec, OutcomeState, SutSpec, SwarmPlan
from controlplane.contract.receiver import Failure
from controlplane.runtime.docker import ContainerInfo, ContainerSpec, DockerRuntime, PolicyViolation
from controlplane.runtime.policy import DEFAULT_SUT_COMMAND, RuntimePolicy
from controlplane.runtime.labels import INSTANCE, KIND, ROLE, SPEC, filter_for, managed_labels


def bee_container_spec(settings: Settings, swarm_id: str, bee: BeeSpec, owner: str,
                       sut_url: str | None = None, amqp_url: str | None = None) -> ContainerSpec:
    """``amqp_url``: the bee's own broker user (see ``bus.accounts``); None: the shared URL."""
    instance = keys.bee_instance(swarm_id, bee.name)
    env = dict(bee.env)
    if sut_url:
        env["CP_SUT_URL"] = sut_url
    # The control plane's own variables win over a plan's env: a plan cannot redirect a bee.
    env.update({
        "CP_AMQP_URL": amqp_url or settings.container_amqp_url(),
        "CP_SWARM_ID": swarm_id,
        "CP_ROLE": bee.role,
        "CP_INSTANCE": instance,
        "CP_BEE_CONFIG": _json(bee.config),
        "CP_ENABLED": "true" if bee.enabled else "false",
        "CP_STATUS_INTERVAL_S": str(settings.status_interval_s),
        "CP_ALLOWED_TARGETS": json.dumps(settings.allowed_targets),
        "CP_SECRET_KEYS": json.dumps(bee.secrets),
    })
    if bee.work.in_:
        env["CP_WORK_IN"] = bee.work.in_
    if bee.work.out:
        env["CP_WORK_OUT"] = bee.work.out
    return ContainerSpec(
        name=keys.container_name(owner, swarm_id, bee.name),
        image=bee.image,
        labels=managed_labels("bee", owner, swarm_id=swarm_id, role=bee.role, instance=instance,
                              spec_json=bee.model_dump_json(by_alias=True)),
        env=env,
        command=["python", "-m", f"bees.{bee.role.replace('-', '_')}"] if bee.image == settings.project_image else None,
        network=settings.bee_network,
    )


def sut_container_spec(settings: Settings, swarm_id: str, sut: SutSpec, owner: str) -> ContainerSpec:
    # On the host network the SUT is the host's: it listens on loopback only.
    listen = "127.0.0.1" if settings.bee_network == "host" else "0.0.0.0"
    env = {**sut.env, "CP_SUT_PORT": str(sut.port), "CP_SUT_HOST": listen}
    command = sut.command or (list(DEFAULT_SUT_COMMAND) if sut.image == settings.project_image else None)
    return ContainerSpec(
        name=keys.container_name(owner, swarm_id, SUT_NAME),
        image=sut.image,
        labels=managed_labels("sut", owner, swarm_id=swarm_id, spec_json=sut.model_dump_json(by_alias=True)),
        env=env,
        command=command,
        network=settings.bee_network,
    )


def plan_specs(settings: Settings, swarm_id: str, plan: SwarmPlan, owner: str) -> list[ContainerSpec]:
    """Every container of ``plan``, for checking the whole plan against the policy before any
    of it runs (a plan refused halfway would leave half a swarm)."""
    specs = [bee_container_spec(settings, swarm_id, bee, owner) for bee in plan.bees]
    if plan.sut is not None:
        specs.append(sut_container_spec(settings, swarm_id, plan.sut, owner))
    return specs


def check_plan(policy: RuntimePolicy, specs: Iterable[ContainerSpec], phase: str,
               state: OutcomeState | None = None) -> None:
    """Every container of a plan against the container policy, as the outcome a caller reads."""
    try:
        policy.check_all(specs)
    except PolicyViolation as exc:
        raise Failure(exc.code, str(exc), phase, state=state) from None


async def broker_user(accounts: BrokerAccounts, role: str, instance: str, grant: Grant, phase: str,
                      state: OutcomeState | None = None) -> str:
    """A component's own broker URL, its user made (or refreshed) first."""
    try:
        return await accounts.ensure(role, instance, grant)
    except ManagementError as exc:
        raise Failure("broker-user-failed", f"the broker user of {role} {instance!r} could not be made: {exc}",
                      phase, retryable=True, state=state) from None


def sut_url(settings: Settings, sut: SutSpec, info: ContainerInfo) -> str:
    """Where bees reach the SUT: loopback when everything shares the host network."""
    host = "127.0.0.1" if settings.bee_network == "host" or not info.ip else info.ip
    return f"http://{host}:{sut.port}"


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


async def teardown_swarm(bus: Bus, runtime: DockerRuntime, accounts: BrokerAccounts | None, owner: str,
                         swarm_id: str, plan: SwarmPlan | None = None) -> None:
    """Remove everything a swarm owns in Docker and RabbitMQ; parts already gone are fine.

    What to remove is read from the bees' labels as well as the plan, so this also cleans
    up after a controller that died half-way.
    """
    # Only this owner's: another control plane on the engine may run a swarm of the same id.
    containers = [i for i in await runtime.list(filter_for(swarm_id=swarm_id, owner=owner))
                  if i.labels.get(KIND) in ("bee", "sut", "engine")]
    suffixes = plan.work_suffixes() if plan else set()
    labelled = plan_from_containers(containers)
    if labelled is not None:
        suffixes |= labelled.work_suffixes()
    for info in containers:
        await runtime.remove(info.id)
        role, instance = info.labels.get(ROLE), info.labels.get(INSTANCE)
        if role and instance:
            await forget_component(bus, accounts, role, instance)
    for suffix in suffixes:
        await bus.delete_queue(keys.hive_queue(swarm_id, suffix))
    await bus.delete_exchange(keys.hive_exchange(swarm_id))
    # The controller's remembered state goes with its swarm: a swarm created again under
    # the same id starts afresh. Its control and reply queues go when it stops consuming.
    await bus.delete_queue(keys.state_queue(keys.CONTROLLER_ROLE, keys.controller_instance(swarm_id)))


async def forget_component(bus: Bus, accounts: BrokerAccounts | None, role: str, instance: str) -> None:
    """A bee's control queue, its remembered state and its broker user."""
    await bus.delete_queue(keys.component_queue(role, instance))
    await bus.delete_queue(keys.state_queue(role, instance))
    if accounts is not None:
        await accounts.remove(role, instance)


def plan_from_containers(containers: Iterable[ContainerInfo]) -> SwarmPlan | None:
    """Rebuild a swarm's plan from its containers' labels (for re-adoption); None without bees."""
    containers = list(containers)
    bees = [BeeSpec.model_validate_json(info.labels[SPEC]) for info in containers
            if info.labels.get(KIND) == "bee" and info.labels.get(SPEC)]
    suts = [SutSpec.model_validate_json(info.labels[SPEC]) for info in containers
            if info.labels.get(KIND) == "sut" and info.labels.get(SPEC)]
    return SwarmPlan(bees=bees, sut=suts[0] if suts else None) if bees else None


async def plan_from_labels(runtime: DockerRuntime, owner: str, swarm_id: str) -> SwarmPlan | None:
    return plan_from_containers(await runtime.list(filter_for(swarm_id=swarm_id, owner=owner)))
