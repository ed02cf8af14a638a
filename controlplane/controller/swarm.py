"""The swarm-controller: one per swarm, the only thing that drives that swarm's bees.

It applies the swarm's plan (work exchange, queues, the system under test if the plan has
one, bee containers in dependency order, each bee's first status awaited), announces itself
with ``ev.ready.swarm-controller.<id>``, then obeys ``sig.swarm-*`` signals and its own
``sig.config-update`` and answers each with ``ev.ready.*`` or ``ev.error.*``. Applying a plan
is idempotent, so a controller that restarts next to running bees re-adopts them instead of
replacing them.

Bees do work only while the swarm is Running *and* the controller is enabled: start and
stop move the first, a config patch ``{"enabled": ...}`` (the bulk toggle) the second, and
either way the controller fans the result out to every bee.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import aiohttp
from pydantic import ValidationError

from controlplane.bus import Bus
from controlplane.config import Settings
from controlplane.contract import keys
from controlplane.contract.dedup import OutcomeMemory
from controlplane.contract.models import (
    SUT_NAME,
    BeeSpec,
    BeeState,
    Outcome,
    OutcomeState,
    Scope,
    Signal,
    Status,
    Strict,
    SutSpec,
    SwarmPlan,
    SwarmStatus,
    new_id,
    utcnow,
)
from controlplane.logs import get_logger
from controlplane.runtime.docker import (
    ContainerInfo,
    ContainerRuntimeError,
    ContainerSpec,
    DockerRuntime,
    ImageMissing,
    PolicyViolation,
)
from controlplane.runtime.labels import INSTANCE, KIND, ROLE, SPEC, filter_for, managed_labels

log = get_logger("swarm-controller")

BEE_TOGGLE_TIMEOUT_S = 30.0
SUT_PROBE_INTERVAL_S = 0.2


class ControllerConfig(Strict):
    """What a ``config-update`` patch may change on a swarm-controller."""

    enabled: bool | None = None


class SwarmFailure(Exception):
    """A lifecycle step failed; ``code`` is what callers match on."""

    def __init__(self, code: str, message: str, phase: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.code, self.message, self.phase, self.retryable = code, message, phase, retryable


def bee_container_spec(settings: Settings, swarm_id: str, bee: BeeSpec, owner: str,
                       sut_url: str | None = None) -> ContainerSpec:
    instance = keys.bee_instance(swarm_id, bee.name)
    env = dict(bee.env)
    if sut_url:
        env["CP_SUT_URL"] = sut_url
    # The control plane's own variables win over a plan's env: a plan cannot redirect a bee.
    env.update({
        "CP_AMQP_URL": settings.container_amqp_url(),
        "CP_SWARM_ID": swarm_id,
        "CP_ROLE": bee.role,
        "CP_INSTANCE": instance,
        "CP_BEE_CONFIG": _json(bee.config),
        "CP_ENABLED": "true" if bee.enabled else "false",
        "CP_STATUS_INTERVAL_S": str(settings.status_interval_s),
    })
    if bee.work.in_:
        env["CP_WORK_IN"] = bee.work.in_
    if bee.work.out:
        env["CP_WORK_OUT"] = bee.work.out
    return ContainerSpec(
        name=keys.container_name(swarm_id, bee.name),
        image=bee.image,
        labels=managed_labels("bee", owner, swarm_id=swarm_id, role=bee.role, instance=instance,
                              spec_json=bee.model_dump_json(by_alias=True)),
        env=env,
        command=["python", "-m", f"bees.{bee.role.replace('-', '_')}"] if bee.image == settings.project_image else None,
        network=settings.bee_network,
    )


def sut_container_spec(settings: Settings, swarm_id: str, sut: SutSpec, owner: str) -> ContainerSpec:
    env = {**sut.env, "CP_SUT_PORT": str(sut.port), "CP_SUT_HOST": "0.0.0.0"}
    command = sut.command or (["python", "-m", "bees.sut"] if sut.image == settings.project_image else None)
    return ContainerSpec(
        name=keys.container_name(swarm_id, SUT_NAME),
        image=sut.image,
        labels=managed_labels("sut", owner, swarm_id=swarm_id, spec_json=sut.model_dump_json(by_alias=True)),
        env=env,
        command=command,
        network=settings.bee_network,
    )


def sut_url(settings: Settings, sut: SutSpec, info: ContainerInfo) -> str:
    """Where bees reach the SUT: loopback when everything shares the host network."""
    host = "127.0.0.1" if settings.bee_network == "host" or not info.ip else info.ip
    return f"http://{host}:{sut.port}"


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class SwarmController:
    def __init__(self, bus: Bus, runtime: DockerRuntime, settings: Settings, swarm_id: str, plan: SwarmPlan,
                 owner: str, create_signal: Signal | None = None) -> None:
        self.bus, self.runtime, self.settings = bus, runtime, settings
        self.swarm_id = swarm_id
        self.instance = keys.controller_instance(swarm_id)
        self.plan = plan
        self.owner = owner
        self.create_signal = create_signal
        self.status = SwarmStatus.CREATING
        self.enabled = True  # the controller's own switch (bulk toggles); bees follow it
        self.bees: dict[str, BeeState] = {}
        self.sut_url: str | None = None
        self.sut_state: str | None = None
        self._outcomes = OutcomeMemory()
        self._waiters: dict[tuple[str, str], asyncio.Future[Any]] = {}
        self._lifecycle = asyncio.Lock()
        self._removed = asyncio.Event()
        self._consumer = None
        self._queue_decl = bus.topology.templates.swarm_controller_queue.render(
            swarm_id=swarm_id, instance=self.instance)

    # --- life of the controller -------------------------------------------------------

    async def run(self) -> None:
        """Apply the plan, hand-shake, serve signals until the swarm is removed."""
        self._consumer = await self.bus.consume(self._queue_decl, self._on_message, prefetch=64)
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            try:
                await self._apply(self.plan)
            except SwarmFailure as failure:
                self.status = SwarmStatus.FAILED
                await self._handshake(failure)
                await self._teardown()
                self._removed.set()  # nothing is left to serve: the queue goes too
                return
            self.status = self._status_from_bees()
            await self._handshake(None)
            await self._removed.wait()
        finally:
            heartbeat.cancel()
            if self._consumer is not None:
                await self._consumer.cancel()
            if self._removed.is_set():
                await self.bus.delete_queue(self._queue_decl.name)

    def _status_from_bees(self) -> SwarmStatus:
        if any(b.enabled for b in self.bees.values()):
            return SwarmStatus.RUNNING
        return SwarmStatus.READY

    async def _handshake(self, failure: SwarmFailure | None) -> None:
        sig = self.create_signal
        outcome = Outcome(
            correlation_id=sig.correlation_id if sig else new_id(),
            idempotency_key=sig.idempotency_key if sig else new_id(),
            signal=keys.CONTROLLER_ROLE,
            scope=Scope(swarm_id=self.swarm_id, role=keys.CONTROLLER_ROLE, instance=self.instance),
            result="error" if failure else "success",
            state=self._state(),
            details={"adopted": sig is None, "bees": [b.to_dict() for b in self.bees.values()]},
        )
        if failure:
            outcome.phase, outcome.code, outcome.message = failure.phase, failure.code, failure.message
            outcome.retryable = failure.retryable
        await self.bus.publish(keys.controller_handshake_key(self.instance, ok=failure is None), outcome)
        log.info("controller handshake", swarm_id=self.swarm_id, result=outcome.result, code=outcome.code)

    def _state(self) -> OutcomeState:
        details: dict[str, Any] = {"bees": len(self.bees), "controller": self.instance}
        if self.sut_url:
            details["sut"] = {"url": self.sut_url}
        return OutcomeState(status=self.status, enabled=self.enabled, details=details)

    def _workload_on(self) -> bool:
        return self.enabled and self.status == SwarmStatus.RUNNING

    async def _heartbeat(self) -> None:
        kind = "status-full"
        while True:
            try:
                await self._refresh_containers()
                await self.bus.publish(*self._status(kind))
                kind = "status-delta"
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("controller status failed", swarm_id=self.swarm_id)
            await asyncio.sleep(self.settings.status_interval_s)

    def _status(self, kind: str, correlation_id: str | None = None) -> tuple[str, Status]:
        status = Status(
            kind=kind, role=keys.CONTROLLER_ROLE, instance=self.instance, swarm_id=self.swarm_id,
            enabled=self.enabled, state=self.status,
            totals={"bees": len(self.bees), "running": sum(b.state == "running" for b in self.bees.values())},
            data={"swarmStatus": self.status, "bees": [b.to_dict() for b in self.bees.values()],
                  "correlationId": correlation_id,
                  **({"sut": {"url": self.sut_url, "state": self.sut_state}} if self.plan.sut else {})},
        )
        return status.routing_key(), status

    async def _refresh_containers(self) -> None:
        """Docker is the truth for container state: a killed bee shows as exited or missing."""
        listed = await self.runtime.list(filter_for(swarm_id=self.swarm_id))
        found = {i.labels.get(INSTANCE): i for i in listed if i.labels.get(KIND) == "bee"}
        for instance, bee in self.bees.items():
            info = found.get(instance)
            bee.state = info.state if info else "missing"
            bee.container_id = info.id if info else None
        if self.plan.sut is not None:
            sut = next((i for i in listed if i.labels.get(KIND) == "sut"), None)
            self.sut_state = sut.state if sut else "missing"

    # --- applying a plan ----------------------------------------------------------------

    async def _apply(self, plan: SwarmPlan) -> None:
        topology = self.bus.topology
        await self.bus.declare_exchange(topology.hive_exchange(self.swarm_id))
        for suffix in sorted(plan.work_suffixes()):
            await self.bus.declare_queue(topology.templates.work_queue.render(swarm_id=self.swarm_id, suffix=suffix))
        self.sut_url = await self._run_sut(plan.sut) if plan.sut else None
        for bee in plan.start_order():
            await self._run_bee(bee)

    async def _ensure_running(self, spec: ContainerSpec, what: str) -> ContainerInfo:
        try:
            return await self.runtime.ensure_running(spec)
        except ImageMissing:
            raise SwarmFailure("image-missing", f"image {spec.image!r} of {what} is not present on the "
                               "Docker engine (images are built locally, never pulled)", "apply") from None
        except PolicyViolation as exc:
            raise SwarmFailure("policy-refused", f"{what}: {exc}", "apply") from None
        except ContainerRuntimeError as exc:
            raise SwarmFailure("runtime-error", f"{what}: {exc}", "apply", retryable=True) from None

    async def _run_sut(self, sut: SutSpec) -> str:
        """Start the system under test and wait until it answers its health path."""
        spec = sut_container_spec(self.settings, self.swarm_id, sut, self.owner)
        info = await self._ensure_running(spec, "the system under test")
        url = sut_url(self.settings, sut, info)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.bee_ready_timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                try:
                    async with http.get(url + sut.health_path) as response:
                        if response.status < 400:
                            self.sut_state = "running"
                            return url
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                current = await self.runtime.get(spec.name)
                if current is None or current.state in ("exited", "dead"):
                    logs = await self.runtime.logs_tail(spec.name, 20) if current else ""
                    raise SwarmFailure("container-exited", f"the system under test exited before answering "
                                       f"{sut.health_path}; last log lines: {logs.strip()[-800:]}", "apply")
                if loop.time() >= deadline:
                    raise SwarmFailure("sut-timeout", f"the system under test did not answer {url}{sut.health_path} "
                                       f"within {self.settings.bee_ready_timeout_s:g}s", "apply", retryable=True)
                await asyncio.sleep(SUT_PROBE_INTERVAL_S)

    async def _run_bee(self, bee: BeeSpec) -> None:
        spec = bee_container_spec(self.settings, self.swarm_id, bee, self.owner, self.sut_url)
        instance = spec.labels[INSTANCE]
        for key in keys.component_event_patterns(bee.role, instance):
            await self.bus.bind(self._queue_decl.name, keys.CONTROL_EXCHANGE, key)
        state = self.bees[instance] = BeeState(name=bee.name, role=bee.role, instance=instance, image=bee.image)
        first_status = self._expect(("status-full", instance))
        info = await self._ensure_running(spec, f"bee {bee.name!r}")
        state.container_id, state.state = info.id, info.state
        await self._await_first_status(bee, instance, first_status)

    async def _await_first_status(self, bee: BeeSpec, instance: str, first_status: asyncio.Future[Any]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.bee_ready_timeout_s
        while not first_status.done():
            # A bee that was already running (re-adoption) only reports when asked.
            await self._send_bee_signal(bee.role, instance, "status-request", {}, new_id(), new_id())
            try:
                await asyncio.wait_for(asyncio.shield(first_status), timeout=min(2.0, max(deadline - loop.time(), 0.01)))
                break
            except asyncio.TimeoutError:
                pass
            info = await self.runtime.get(keys.container_name(self.swarm_id, bee.name))
            if info is None or info.state in ("exited", "dead"):
                logs = await self.runtime.logs_tail(keys.container_name(self.swarm_id, bee.name), 20) if info else ""
                code = info.exit_code if info else None
                raise SwarmFailure("container-exited", f"bee {bee.name!r} exited (code {code}) before reporting "
                                   f"its status; last log lines: {logs.strip()[-800:]}", "apply")
            if loop.time() >= deadline:
                raise SwarmFailure("bee-timeout", f"bee {bee.name!r} did not report its status within "
                                   f"{self.settings.bee_ready_timeout_s:g}s", "apply", retryable=True)
        self._waiters.pop(("status-full", instance), None)

    def _expect(self, key: tuple[str, str]) -> asyncio.Future[Any]:
        future = self._waiters.get(key)
        if future is None or future.done():
            future = asyncio.get_running_loop().create_future()
            self._waiters[key] = future
        return future

    async def _send_bee_signal(self, role: str, instance: str, signal: str, args: dict[str, Any],
                               correlation_id: str, idempotency_key: str) -> None:
        sig = Signal(signal=signal, correlation_id=correlation_id, idempotency_key=idempotency_key,
                     swarm_id=self.swarm_id, role=role, instance=instance, command_target="instance",
                     args=args, origin=f"swarm-controller.{self.instance}")
        await self.bus.publish(sig.routing_key(), sig)

    # --- messages ------------------------------------------------------------------------

    async def _on_message(self, routing_key: str, body: dict[str, Any], _message: Any) -> None:
        parsed = keys.parse_key(routing_key)
        if parsed.kind in ("status-full", "status-delta"):
            self._on_bee_status(Status.model_validate(body))
        elif parsed.kind in ("ready", "error"):
            future = self._waiters.pop((body.get("correlationId", ""), parsed.instance or ""), None)
            if future is not None and not future.done():
                future.set_result(Outcome.model_validate(body))
        elif parsed.kind == "sig":
            await self._on_signal(Signal.model_validate(body))

    def _on_bee_status(self, status: Status) -> None:
        bee = self.bees.get(status.instance)
        if bee is not None:
            bee.enabled, bee.last_seen = status.enabled, utcnow()
        if status.kind == "status-full":
            future = self._waiters.get(("status-full", status.instance))
            if future is not None and not future.done():
                future.set_result(status)

    async def _on_signal(self, sig: Signal) -> None:
        handlers: dict[str, Callable[[Signal], Awaitable[OutcomeState]]] = {
            "swarm-start": self._start, "swarm-stop": self._stop, "swarm-remove": self._remove,
            "swarm-template": self._template, "config-update": self._config_update,
        }
        if sig.signal == "status-request":
            key, status = self._status("status-full", sig.correlation_id)
            await self.bus.publish(key, status, correlation_id=sig.correlation_id)
            return
        handler = handlers.get(sig.signal)
        if handler is None:
            log.warning("signal not handled by swarm-controller", signal=sig.signal, swarm_id=self.swarm_id)
            return
        async with self._lifecycle:
            # Checked under the lock, so a redelivery that arrives mid-action waits for it.
            remembered = self._outcomes.get(sig.idempotency_key)
            if remembered is not None:
                # A retried or redelivered signal: say again what happened, do nothing again.
                await self.bus.publish(remembered.routing_key(), remembered)
                return
            try:
                state = await handler(sig)
                outcome = Outcome.for_signal(sig, result="success", state=state)
            except SwarmFailure as failure:
                outcome = Outcome.for_signal(sig, result="error", state=self._state(), phase=failure.phase,
                                             code=failure.code, message=failure.message, retryable=failure.retryable)
            except Exception as exc:  # never leave a caller waiting for a timeout on a bug
                log.exception("signal failed", signal=sig.signal, swarm_id=self.swarm_id)
                outcome = Outcome.for_signal(sig, result="error", state=self._state(), phase=sig.signal,
                                             code="internal-error", message=f"{type(exc).__name__}: {exc}",
                                             retryable=False)
            self._outcomes.remember(sig.idempotency_key, outcome)
        await self.bus.publish(outcome.routing_key(), outcome)
        log.info("signal handled", signal=sig.signal, swarm_id=self.swarm_id, result=outcome.result,
                 correlation_id=sig.correlation_id)
        if sig.signal == "swarm-remove" and outcome.result == "success":
            self._removed.set()

    # --- lifecycle steps -------------------------------------------------------------------

    async def _start(self, sig: Signal) -> OutcomeState:
        self.status = SwarmStatus.RUNNING
        await self._set_bees_enabled(self._workload_on(), sig)
        return self._state()

    async def _stop(self, sig: Signal) -> OutcomeState:
        await self._set_bees_enabled(False, sig)
        self.status = SwarmStatus.STOPPED
        return self._state()

    async def _config_update(self, sig: Signal) -> OutcomeState:
        """Apply the controller's own patch and fan the outcome out to every bee, even when
        nothing changed: a caller asking for the state the swarm is in gets a plain success."""
        try:
            patch = ControllerConfig.model_validate(sig.args.get("patch"))
        except ValidationError as exc:
            reasons = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'patch'}: {e['msg']}" for e in exc.errors())
            raise SwarmFailure("invalid-config", f"invalid config: {reasons}", "config-update") from None
        if patch.enabled is not None:
            self.enabled = patch.enabled
        await self._set_bees_enabled(self._workload_on(), sig)
        return self._state()

    async def _set_bees_enabled(self, enabled: bool, sig: Signal) -> None:
        order = self.plan.start_order()
        if not enabled:
            order.reverse()  # producers go quiet before their consumers
        for bee in order:
            instance = keys.bee_instance(self.swarm_id, bee.name)
            key = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{sig.idempotency_key}/{instance}"))
            reply = self._expect((sig.correlation_id, instance))
            await self._send_bee_signal(bee.role, instance, "config-update", {"patch": {"enabled": enabled}},
                                        sig.correlation_id, key)
            try:
                outcome: Outcome = await asyncio.wait_for(reply, BEE_TOGGLE_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise SwarmFailure("bee-timeout", f"bee {bee.name!r} did not confirm enabled={enabled} within "
                                   f"{BEE_TOGGLE_TIMEOUT_S:g}s", sig.signal, retryable=True) from None
            if outcome.result != "success":
                raise SwarmFailure(outcome.code or "bee-error", f"bee {bee.name!r}: {outcome.message}", sig.signal)
            self.bees[instance].enabled = enabled

    async def _template(self, sig: Signal) -> OutcomeState:
        plan = SwarmPlan.model_validate(sig.args.get("swarmPlan", {}))
        wanted = {keys.bee_instance(self.swarm_id, b.name) for b in plan.bees}
        for instance in [i for i in self.bees if i not in wanted]:
            bee = self.bees.pop(instance)
            await self.runtime.remove(keys.container_name(self.swarm_id, bee.name))
            await self.bus.delete_queue(keys.component_queue(bee.role, instance))
        for name, spec in [(b.name, b) for b in plan.bees] + [(SUT_NAME, plan.sut)]:
            # A changed spec means a new container; an unchanged one is left running.
            info = await self.runtime.get(keys.container_name(self.swarm_id, name))
            if info and (spec is None or info.labels.get(SPEC) != spec.model_dump_json(by_alias=True)):
                await self.runtime.remove(info.id)
        self.plan = plan
        await self._apply(plan)
        # A plan may bring bees in enabled: the swarm is then running; otherwise it keeps its state.
        if self._status_from_bees() == SwarmStatus.RUNNING or self.status == SwarmStatus.CREATING:
            self.status = self._status_from_bees()
        return self._state()

    async def _remove(self, sig: Signal) -> OutcomeState:
        self.status = SwarmStatus.REMOVING
        await self._teardown()
        self.status = SwarmStatus.REMOVED
        return self._state()

    async def _teardown(self) -> None:
        await teardown_swarm(self.bus, self.runtime, self.swarm_id, self.plan)
        self.bees.clear()


async def teardown_swarm(bus: Bus, runtime: DockerRuntime, swarm_id: str, plan: SwarmPlan | None = None) -> None:
    """Remove everything a swarm owns in Docker and RabbitMQ; parts already gone are fine.

    What to remove is read from the bees' labels as well as the plan, so this also cleans
    up after a controller that died half-way.
    """
    containers = [i for i in await runtime.list(filter_for(swarm_id=swarm_id)) if i.labels.get(KIND) in ("bee", "sut")]
    suffixes = plan.work_suffixes() if plan else set()
    labelled = plan_from_containers(containers)
    if labelled is not None:
        suffixes |= labelled.work_suffixes()
    for info in containers:
        await runtime.remove(info.id)
        role, instance = info.labels.get(ROLE), info.labels.get(INSTANCE)
        if role and instance:
            await bus.delete_queue(keys.component_queue(role, instance))
    for suffix in suffixes:
        await bus.delete_queue(keys.hive_queue(swarm_id, suffix))
    await bus.delete_exchange(keys.hive_exchange(swarm_id))


def plan_from_containers(containers: Iterable[ContainerInfo]) -> SwarmPlan | None:
    """Rebuild a swarm's plan from its containers' labels (for re-adoption); None without bees."""
    containers = list(containers)
    bees = [BeeSpec.model_validate_json(info.labels[SPEC]) for info in containers
            if info.labels.get(KIND) == "bee" and info.labels.get(SPEC)]
    suts = [SutSpec.model_validate_json(info.labels[SPEC]) for info in containers
            if info.labels.get(KIND) == "sut" and info.labels.get(SPEC)]
    return SwarmPlan(bees=bees, sut=suts[0] if suts else None) if bees else None


async def plan_from_labels(runtime: DockerRuntime, swarm_id: str) -> SwarmPlan | None:
    return plan_from_containers(await runtime.list(filter_for(swarm_id=swarm_id)))
