"""The swarm-controller: one per swarm, the only thing that drives that swarm's bees.

It applies the swarm's plan (work exchange, queues, the system under test if the plan has
one, bee containers in dependency order, each bee's first status awaited), announces itself
with ``ev.ready.swarm-controller.<id>``, then obeys ``sig.swarm-*`` signals and its own
``sig.config-update`` and answers each with ``ev.ready.*`` or ``ev.error.*``. Applying a plan
is idempotent, so a controller that restarts next to running bees re-adopts them instead of
replacing them; its own switch and the swarm's status come back from its last-value queue.

Bees do work only while the swarm is Running *and* the controller is enabled: start and
stop move the first, a config patch ``{"enabled": ...}`` (the bulk toggle) the second, and
either way the controller fans the result out to every bee.

Signals arrive on the controller's control queue; what its handlers wait for (bee outcomes,
bee statuses) on a replies queue with a consumer of its own, so a handler never waits for a
message queued behind the signal it holds.
"""

from __future__ import annotations

import asyncio
import uuid
import weakref
from collections.abc import Mapping
from typing import Any

import aiohttp
from pydantic import ValidationError

from controlplane.bus import Bus, Consumer
from controlplane.bus.accounts import BrokerAccounts, bee_grant
from controlplane.config import Settings
from controlplane.contract import keys
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
from controlplane.contract.redact import safe_text
from controlplane.contract.receiver import Failure, SignalServer, remaining_s
from controlplane.bus import snapshot
from controlplane.controller.plan import (
    bee_container_spec,
    broker_user,
    check_plan,
    forget_component,
    plan_specs,
    plan_from_containers,
    plan_from_labels,
    sut_container_spec,
    sut_url,
    teardown_swarm,
)
from controlplane.controller import service_actions
from controlplane.controller.pool import PoolPolicy
from controlplane.controller.replies import Replies
from controlplane.logs import get_logger
from controlplane.runtime.docker import (
    ContainerInfo,
    ContainerRuntimeError,
    ContainerSpec,
    DockerRuntime,
    ImageMissing,
    PolicyViolation,
)
from controlplane.runtime.labels import INSTANCE, KIND, OWNER, ROLE, SPEC, SWARM, filter_for

__all__ = ["SwarmController", "SwarmFailure", "plan_from_containers", "plan_from_labels", "teardown_swarm"]

log = get_logger("swarm-controller")

BEE_TOGGLE_TIMEOUT_S = 30.0
MIN_TOGGLE_WAIT_S = 0.5
SUT_PROBE_INTERVAL_S = 0.2
# Statuses a restarted controller takes back from its snapshot; the others are transient
# or are read from the bees again.
RESUMABLE = (SwarmStatus.RUNNING, SwarmStatus.STOPPED)

# The least time between two announcements of a pool's changes (status and snapshot).
ANNOUNCE_GATHER_S = 0.1
# Signals served side by side, each under a lock of its own.
SIDE_BY_SIDE = frozenset({"pool-provision", "pool-remove", "pool-inspect"})

SwarmFailure = Failure  # a lifecycle step failed; ``code`` is what callers match on


class ControllerConfig(Strict):
    """What a ``config-update`` patch may change on a swarm-controller."""

    enabled: bool | None = None


class SwarmController:
    def __init__(self, bus: Bus, runtime: DockerRuntime, settings: Settings, swarm_id: str, plan: SwarmPlan,
                 owner: str, create_signal: Signal | None = None) -> None:
        self.bus, self.runtime, self.settings = bus, runtime, settings
        self.swarm_id = swarm_id
        self.instance = keys.controller_instance(swarm_id)
        self.plan = plan
        self.owner = owner
        self.create_signal = create_signal
        self.accounts = BrokerAccounts.from_settings(settings)
        self.status = SwarmStatus.CREATING
        self.enabled = True  # the controller's own switch (bulk toggles); bees follow it
        self.bees: dict[str, BeeState] = {}
        self.sut_url: str | None = None
        self.sut_state: str | None = None
        # Keys: ("status-full", bee instance) for a first status, (correlationId, bee instance)
        # for a bee's outcome.
        self._replies: Replies[tuple[str, str], Any] = Replies("bee replies")
        self._removed = asyncio.Event()
        self._consumers: list[Consumer] = []
        self.pool = PoolPolicy(bus, runtime, settings, swarm_id, plan.pool, owner, self._pool_changed, self._state) \
            if plan.pool is not None else None
        self._announcer = snapshot.LatestSaver(self._announce)
        self._last_announce = float("-inf")
        self._urgent = False
        self._shared_lock = asyncio.Lock()
        self._own_locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = weakref.WeakValueDictionary()
        templates = bus.topology.templates
        self._queue_decl = templates.swarm_controller_queue.render(swarm_id=swarm_id, instance=self.instance)
        self._replies_decl = templates.swarm_controller_replies_queue.render(swarm_id=swarm_id, instance=self.instance)
        self._state_decl = templates.state_queue.render(role=keys.CONTROLLER_ROLE, instance=self.instance)
        self.server = SignalServer(
            bus, f"swarm-controller.{self.instance}",
            commands={"swarm-start": self._start, "swarm-stop": self._stop, "swarm-remove": self._remove,
                      "swarm-template": self._template, "config-update": self._config_update,
                      **(self.pool.commands() if self.pool else {}),
                      **service_actions.commands(runtime, settings, self._serves)},
            queries={"status-request": self._status_request},
            answered_elsewhere=("swarm-create",),  # the host controller answers it
            state=self._state, after=self._after, lock_for=self._lock_for)

    def _serves(self, labels: Mapping[str, str]) -> bool:
        """The services this controller acts on: its swarm's containers, not itself (its host
        controller runs it)."""
        return labels.get(SWARM) == self.swarm_id and labels.get(OWNER) == self.owner and \
            labels.get(KIND) != keys.CONTROLLER_ROLE

    def _lock_for(self, sig: Signal) -> asyncio.Lock:
        """Lifecycle signals one at a time; provisions, removals and inspections side by side
        (a repeat of one waits for the first, so its outcome is published again, not redone)."""
        if sig.signal not in SIDE_BY_SIDE:
            return self._shared_lock
        key = (sig.signal, sig.idempotency_key)
        lock = self._own_locks.get(key)
        if lock is None:
            lock = self._own_locks[key] = asyncio.Lock()
        return lock

    # --- life of the controller -------------------------------------------------------

    async def run(self) -> None:
        """Apply the plan, hand-shake, serve signals until the swarm is removed."""
        restored = await self._restore()
        self._consumers.append(await self.bus.consume(self._replies_decl, self._on_reply, prefetch=256))
        if self.pool is not None:  # the streams the gateway records on the pool's engines
            await self.bus.bind(self._replies_decl.name, keys.CONTROL_EXCHANGE, keys.ready_key(keys.STREAM_EVENTS, self.swarm_id))
        self._consumers.append(await self.bus.consume(self._queue_decl, self.server.on_message, prefetch=64))
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            try:
                self._check_policy(self.plan)
                await self._apply(self.plan)
            except Failure as failure:
                self.status = SwarmStatus.FAILED
                await self._handshake(failure)
                await self._teardown()
                self._removed.set()  # nothing is left to serve: the queues go too
                return
            if self.pool is not None:
                await self.pool.start(restored.data if restored is not None else None)
            resumed = restored.status if restored is not None else None
            self.status = SwarmStatus(resumed) if resumed in RESUMABLE else self._status_from_bees()
            await self._save_state()
            await self._handshake(None)
            await self._removed.wait()
        finally:
            heartbeat.cancel()
            if self.pool is not None:
                await self.pool.stop()
            for consumer in self._consumers:
                await consumer.cancel()
            await self.server.close()
            self._replies.fail_all()
            if self._removed.is_set():
                await self.bus.delete_queue(self._queue_decl.name)
                await self.bus.delete_queue(self._replies_decl.name)

    async def _restore(self) -> snapshot.Snapshot | None:
        """Take back the switch and status a previous run of this controller left."""
        restored = await snapshot.load(self.bus, self._state_decl)
        if restored is not None:
            if restored.enabled is not None:
                self.enabled = restored.enabled
            log.info("controller state restored", swarm_id=self.swarm_id, enabled=self.enabled,
                     status=restored.status)
        return restored

    async def _save_state(self) -> None:
        try:
            await snapshot.save(self.bus, self._state_decl,
                                snapshot.Snapshot(enabled=self.enabled, status=self.status,
                                                  data=self.pool.remembered() if self.pool else None))
        except Exception:  # the next change saves again; serving must go on
            log.exception("controller state not saved", swarm_id=self.swarm_id)

    async def _after(self, sig: Signal, outcome: Outcome) -> None:
        """After an outcome went out: a removed swarm stops serving; any other command may
        have changed the state a restart must find."""
        if sig.signal == "swarm-remove" and outcome.result == "success":
            self._removed.set()
            return
        await self._save_state()

    def _pool_changed(self, urgent: bool) -> None:
        """The pool changed: watchers hear it and the snapshot keeps it. An engine's change at
        once; a burst of stream events at most once per ANNOUNCE_GATHER_S."""
        if not self._removed.is_set():
            self._urgent = self._urgent or urgent
            self._announcer.request()

    async def _announce(self) -> None:
        loop = asyncio.get_running_loop()
        wait = self._last_announce + ANNOUNCE_GATHER_S - loop.time()
        if wait > 0 and not self._urgent:
            await asyncio.sleep(wait)
        self._urgent = False
        self._last_announce = loop.time()
        await self.bus.publish(*self._status("status-delta"))
        await self._save_state()

    def _status_from_bees(self) -> SwarmStatus:
        if self.pool is not None:
            return SwarmStatus.RUNNING  # a pool serves from the start
        if any(b.enabled for b in self.bees.values()):
            return SwarmStatus.RUNNING
        return SwarmStatus.READY

    async def _handshake(self, failure: Failure | None) -> None:
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
        if self.pool is not None:
            details["engines"] = len(self.pool.engines)
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
                  **({"sut": {"url": self.sut_url, "state": self.sut_state}} if self.plan.sut else {}),
                  **({"pool": self.pool.view()} if self.pool else {})},
        )
        return status.routing_key(), status

    async def _status_request(self, sig: Signal) -> None:
        key, status = self._status("status-full", sig.correlation_id)
        await self.bus.publish(key, status, correlation_id=sig.correlation_id)

    async def _refresh_containers(self) -> None:
        """Docker is the truth for container state: a killed bee shows as exited or missing."""
        listed = await self.runtime.list(filter_for(swarm_id=self.swarm_id, owner=self.owner))
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
            raise Failure("image-missing", f"image {spec.image!r} of {what} is not present on the "
                          "Docker engine (images are built locally, never pulled)", "apply") from None
        except PolicyViolation as exc:
            raise Failure(exc.code, f"{what}: {exc}", "apply") from None
        except ContainerRuntimeError as exc:
            raise Failure("runtime-error", f"{what}: {exc}", "apply", retryable=True) from None

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
                    raise Failure("container-exited", f"the system under test exited before answering "
                                  f"{sut.health_path}; last log lines: {safe_text(logs.strip())}", "apply")
                if loop.time() >= deadline:
                    raise Failure("sut-timeout", f"the system under test did not answer {url}{sut.health_path} "
                                  f"within {self.settings.bee_ready_timeout_s:g}s", "apply", retryable=True)
                await asyncio.sleep(SUT_PROBE_INTERVAL_S)

    async def _run_bee(self, bee: BeeSpec) -> None:
        instance = keys.bee_instance(self.swarm_id, bee.name)
        amqp_url = await self._broker_user(bee.role, instance)
        spec = bee_container_spec(self.settings, self.swarm_id, bee, self.owner, self.sut_url, amqp_url)
        for key in keys.component_event_patterns(bee.role, instance):
            await self.bus.bind(self._replies_decl.name, keys.CONTROL_EXCHANGE, key)
        state = self.bees[instance] = BeeState(name=bee.name, role=bee.role, instance=instance, image=bee.image)
        first_status = self._replies.expect(("status-full", instance))
        try:
            info = await self._ensure_running(spec, f"bee {bee.name!r}")
            state.container_id, state.state = info.id, info.state
            await self._await_first_status(bee, instance, first_status)
        finally:
            first_status.cancel()  # a no-op once answered; otherwise it leaves the reply table

    async def _broker_user(self, role: str, instance: str) -> str | None:
        """The bee's own broker URL, its user made (or refreshed) first; None: the shared URL."""
        if self.accounts is None:
            return None
        return await broker_user(self.accounts, role, instance, bee_grant(self.swarm_id, role, instance), "apply")

    async def _await_first_status(self, bee: BeeSpec, instance: str, first_status: asyncio.Future[Any]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.bee_ready_timeout_s
        while not first_status.done():
            # A bee that was already running (re-adoption) only reports when asked.
            await self._send_bee_signal(bee.role, instance, "status-request", {}, new_id(), new_id())
            await asyncio.wait({first_status}, timeout=min(2.0, max(deadline - loop.time(), 0.01)))
            if first_status.done():
                break
            name = keys.container_name(self.owner, self.swarm_id, bee.name)
            info = await self.runtime.get(name)
            if info is None or info.state in ("exited", "dead"):
                logs = await self.runtime.logs_tail(name, 20) if info else ""
                code = info.exit_code if info else None
                raise Failure("container-exited", f"bee {bee.name!r} exited (code {code}) before reporting "
                              f"its status; last log lines: {safe_text(logs.strip())}", "apply")
            if loop.time() >= deadline:
                raise Failure("bee-timeout", f"bee {bee.name!r} did not report its status within "
                              f"{self.settings.bee_ready_timeout_s:g}s", "apply", retryable=True)

    async def _send_bee_signal(self, role: str, instance: str, signal: str, args: dict[str, Any],
                               correlation_id: str, idempotency_key: str) -> None:
        sig = Signal(signal=signal, correlation_id=correlation_id, idempotency_key=idempotency_key,
                     swarm_id=self.swarm_id, role=role, instance=instance, command_target="instance",
                     args=args, origin=f"swarm-controller.{self.instance}")
        await self.bus.publish(sig.routing_key(), sig)

    # --- replies -------------------------------------------------------------------------

    async def _on_reply(self, routing_key: str, body: dict[str, Any], _message: Any) -> None:
        parsed = keys.parse_key(routing_key)
        if parsed.kind in ("status-full", "status-delta"):
            self._on_bee_status(Status.model_validate(body))
        elif parsed.kind in ("ready", "error"):
            outcome = Outcome.model_validate(body)
            if self.pool is not None and parsed.signal == keys.STREAM_EVENTS:
                self.pool.on_stream_events(outcome)
                return
            self._replies.resolve((outcome.correlation_id, parsed.instance or ""), outcome)

    def _on_bee_status(self, status: Status) -> None:
        bee = self.bees.get(status.instance)
        if bee is not None:
            bee.enabled, bee.last_seen = status.enabled, utcnow()
        if status.kind == "status-full":
            self._replies.resolve(("status-full", status.instance), status)

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
            raise Failure("invalid-config", f"invalid config: {reasons}", "config-update") from None
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
            # Derived from the signal as the gateway files it, (signal, key): a key reused
            # for start and then stop must give the bee two different keys.
            key = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{sig.signal}/{sig.idempotency_key}/{instance}"))
            reply = self._replies.expect((sig.correlation_id, instance))
            await self._send_bee_signal(bee.role, instance, "config-update", {"patch": {"enabled": enabled}},
                                        sig.correlation_id, key)
            # No longer than the caller waits: past its deadline the gateway has said timeout.
            wait_s = max(min(BEE_TOGGLE_TIMEOUT_S, remaining_s(sig, BEE_TOGGLE_TIMEOUT_S)), MIN_TOGGLE_WAIT_S)
            try:
                async with asyncio.timeout(wait_s):
                    outcome: Outcome = await reply
            except TimeoutError:
                raise Failure("bee-timeout", f"bee {bee.name!r} did not confirm enabled={enabled} within "
                              f"{wait_s:.3g}s", sig.signal, retryable=True) from None
            if outcome.result != "success":
                raise Failure(outcome.code or "bee-error", f"bee {bee.name!r}: {outcome.message}", sig.signal)
            self.bees[instance].enabled = enabled

    async def _template(self, sig: Signal) -> OutcomeState:
        plan = SwarmPlan.model_validate(sig.args.get("swarmPlan", {}))
        self._check_policy(plan)  # before anything of the running plan is removed
        wanted = {keys.bee_instance(self.swarm_id, b.name) for b in plan.bees}
        for instance in [i for i in self.bees if i not in wanted]:
            bee = self.bees.pop(instance)
            await self.runtime.remove(keys.container_name(self.owner, self.swarm_id, bee.name))
            await forget_component(self.bus, self.accounts, bee.role, instance)
        for name, spec in [(b.name, b) for b in plan.bees] + [(SUT_NAME, plan.sut)]:
            # A changed spec means a new container; an unchanged one is left running.
            info = await self.runtime.get(keys.container_name(self.owner, self.swarm_id, name))
            if info and (spec is None or info.labels.get(SPEC) != spec.model_dump_json(by_alias=True)):
                await self.runtime.remove(info.id)
                if info.labels.get(KIND) == "bee" and info.labels.get(ROLE) and info.labels.get(INSTANCE):
                    # The new bee starts from its new spec, not from its predecessor's state.
                    await self.bus.delete_queue(keys.state_queue(info.labels[ROLE], info.labels[INSTANCE]))
        self.plan = plan
        await self._apply(plan)
        # A plan may bring bees in enabled: the swarm is then running; otherwise it keeps its state.
        if self._status_from_bees() == SwarmStatus.RUNNING or self.status == SwarmStatus.CREATING:
            self.status = self._status_from_bees()
        return self._state()

    def _check_policy(self, plan: SwarmPlan) -> None:
        check_plan(self.runtime.policy, plan_specs(self.settings, self.swarm_id, plan, self.owner), "apply")

    async def _remove(self, sig: Signal) -> OutcomeState:
        self.status = SwarmStatus.REMOVING
        await self._teardown()
        self.status = SwarmStatus.REMOVED
        return self._state()

    async def _teardown(self) -> None:
        if self.pool is not None:
            await self.pool.stop()
        await teardown_swarm(self.bus, self.runtime, self.accounts, self.owner, self.swarm_id, self.plan)
        self.bees.clear()
