"""The host controller: one per Docker engine, owner of everything outside a swarm.

It launches a swarm-controller per swarm (as a task of this process, or as a container of
the project's image), turns the controller's handshake into the outcome of the create, tears
the controller down after a remove, and on start re-adopts every swarm it finds running by
its containers' labels. It never destroys anything at start-up.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any
from urllib.parse import urlparse

from controlplane.bus import Bus, Consumer
from controlplane.config import Settings
from controlplane.contract import keys
from controlplane.contract.dedup import OutcomeMemory
from controlplane.contract.models import (
    Outcome,
    OutcomeState,
    Signal,
    SwarmPlan,
    SwarmStatus,
)
from controlplane.controller.swarm import (
    SwarmController,
    plan_from_containers,
    teardown_swarm,
)
from controlplane.logs import get_logger
from controlplane.runtime.docker import (
    ContainerInfo,
    ContainerRuntimeError,
    ContainerSpec,
    DockerRuntime,
    Mount,
)
from controlplane.runtime.labels import KIND, SWARM, filter_for, managed_labels

log = get_logger("host-controller")

# Settings a controller container inherits from its host controller.
_FORWARDED = ("bee_network", "allow_host_network", "allow_privileged", "allowed_mounts", "project_image",
              "bee_ready_timeout_s", "status_interval_s", "log_format", "log_level")


class HostController:
    def __init__(self, bus: Bus, runtime: DockerRuntime, settings: Settings) -> None:
        self.bus, self.runtime, self.settings = bus, runtime, settings
        self.owner = settings.instance_id
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._handshakes: dict[str, asyncio.Future[Outcome]] = {}
        self._outcomes = OutcomeMemory()
        self._create_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._consumer: Consumer | None = None

    async def start(self) -> HostController:
        await self.adopt()
        decl = self.bus.topology.queue(keys.HOST_CONTROLLER_QUEUE)
        self._consumer = await self.bus.consume(decl, self._on_message, prefetch=32)
        return self

    async def stop(self) -> None:
        """Stop serving; the swarms keep running and the next host controller adopts them."""
        if self._consumer is not None:
            await self._consumer.cancel()
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.tasks.clear()

    # --- re-adoption ----------------------------------------------------------------------

    async def adopt(self) -> list[str]:
        """Serve again every swarm this owner launched: launching is idempotent by name, so a
        running controller container or bee is kept as it is."""
        # Only what this host controller's owner id launched: another control plane on the
        # same engine keeps its own swarms.
        by_swarm: dict[str, list[ContainerInfo]] = defaultdict(list)
        for info in await self.runtime.list(filter_for(owner=self.owner)):
            if info.labels.get(SWARM) and info.labels.get(KIND) in ("bee", "sut", "swarm-controller"):
                by_swarm[info.labels[SWARM]].append(info)
        for swarm_id, containers in sorted(by_swarm.items()):
            plan = plan_from_containers(containers)
            if plan is not None or self.settings.controller_mode == "container":
                await self._launch(swarm_id, plan, None)
        if by_swarm:
            log.info("re-adopted swarms", swarms=sorted(by_swarm))
        return sorted(by_swarm)

    # --- messages -------------------------------------------------------------------------

    async def _on_message(self, routing_key: str, body: dict[str, Any], _message: Any) -> None:
        parsed = keys.parse_key(routing_key)
        if parsed.kind == "sig" and parsed.signal == "swarm-create":
            await self._create(Signal.model_validate(body))
        elif parsed.kind == "sig" and parsed.signal == "swarm-remove":
            await self._remove_orphan(Signal.model_validate(body))
        elif parsed.signal == keys.CONTROLLER_ROLE and parsed.kind in ("ready", "error"):
            outcome = Outcome.model_validate(body)
            future = self._handshakes.get(outcome.scope.swarm_id or "")
            if future is not None and not future.done():
                future.set_result(outcome)
        elif parsed.kind == "ready" and parsed.signal == "swarm-remove" and parsed.swarm_id:
            await self._retire(parsed.swarm_id)

    def controller_alive(self, swarm_id: str) -> bool:
        task = self.tasks.get(swarm_id)
        return task is not None and not task.done()

    async def _controller_running(self, swarm_id: str) -> bool:
        if self.settings.controller_mode == "inprocess":
            return self.controller_alive(swarm_id)
        info = await self.runtime.get(keys.container_name(swarm_id, "ctl"))
        return info is not None and info.state == "running"

    async def _create(self, sig: Signal) -> None:
        # One create per swarm at a time: a duplicate delivery (after a reconnect, or a retried
        # publish) waits for the first and is then answered from memory.
        async with self._create_locks[sig.swarm_id or ""]:
            remembered = self._outcomes.get(sig.idempotency_key)
            if remembered is not None:
                await self.bus.publish(remembered.routing_key(), remembered)
                return
            await self._launch_and_await_handshake(sig)

    async def _launch_and_await_handshake(self, sig: Signal) -> None:
        swarm_id = sig.swarm_id or ""
        timeout_s = max(float(sig.args.get("timeoutMs", 120_000)) / 1000 - 5, 1)
        handshake = asyncio.get_running_loop().create_future()
        self._handshakes[swarm_id] = handshake
        try:
            plan = SwarmPlan.model_validate(sig.args.get("swarmPlan", {}))
            await self._launch(swarm_id, plan, sig)
            reply = await asyncio.wait_for(handshake, timeout_s)
            if reply.result == "success":
                outcome = Outcome.for_signal(sig, result="success", state=reply.state, details=reply.details)
            else:
                outcome = Outcome.for_signal(sig, result="error", state=reply.state, details=reply.details,
                                             phase=reply.phase, code=reply.code, message=reply.message,
                                             retryable=reply.retryable)
        except asyncio.TimeoutError:
            outcome = self._create_error(sig, "controller-timeout",
                                         f"swarm-controller did not hand-shake within {timeout_s:g}s", retryable=True)
        except ContainerRuntimeError as exc:
            outcome = self._create_error(sig, "controller-launch-failed", str(exc), retryable=True)
        except Exception as exc:  # never leave the caller waiting for a timeout on a bug
            log.exception("swarm create failed", swarm_id=swarm_id)
            outcome = self._create_error(sig, "internal-error", f"{type(exc).__name__}: {exc}")
        finally:
            self._handshakes.pop(swarm_id, None)
        if outcome.result == "error":
            await self._retire(swarm_id)
            await teardown_swarm(self.bus, self.runtime, swarm_id)
        self._outcomes.remember(sig.idempotency_key, outcome)
        await self.bus.publish(outcome.routing_key(), outcome)
        log.info("swarm create finished", swarm_id=swarm_id, result=outcome.result, code=outcome.code,
                 correlation_id=sig.correlation_id)

    def _create_error(self, sig: Signal, code: str, message: str, retryable: bool = False) -> Outcome:
        return Outcome.for_signal(sig, result="error", state=OutcomeState(status=SwarmStatus.FAILED),
                                  phase="launch", code=code, message=message, retryable=retryable)

    async def _remove_orphan(self, sig: Signal) -> None:
        """Remove a swarm whose controller is gone; a live controller answers for itself."""
        swarm_id = sig.swarm_id or ""
        if await self._controller_running(swarm_id):
            return
        await self._retire(swarm_id)
        await teardown_swarm(self.bus, self.runtime, swarm_id)
        await self.bus.delete_queue(self.bus.topology.templates.swarm_controller_queue.render(
            swarm_id=swarm_id, instance=keys.controller_instance(swarm_id)).name)
        outcome = Outcome.for_signal(sig, result="success", state=OutcomeState(status=SwarmStatus.REMOVED),
                                     details={"removedBy": "host-controller"})
        await self.bus.publish(outcome.routing_key(), outcome)

    # --- controller runtimes ---------------------------------------------------------------

    async def _launch(self, swarm_id: str, plan: SwarmPlan | None, sig: Signal | None) -> None:
        """Start the swarm's controller; ``plan`` may be None only for a controller container
        that already exists (it reads its plan from its bees)."""
        if self.settings.controller_mode == "container":
            await self.runtime.ensure_running(self._controller_container(swarm_id, plan, sig))
            return
        if self.controller_alive(swarm_id) or plan is None:
            return
        controller = SwarmController(self.bus, self.runtime, self.settings, swarm_id, plan, self.owner, sig)
        task = asyncio.create_task(controller.run(), name=f"swarm-controller.{swarm_id}")
        self.tasks[swarm_id] = task
        task.add_done_callback(lambda t, s=swarm_id: self._forget(s, t))

    def _forget(self, swarm_id: str, task: asyncio.Task[None]) -> None:
        if self.tasks.get(swarm_id) is task:
            del self.tasks[swarm_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("swarm-controller crashed", swarm_id=swarm_id, error=repr(task.exception()))

    async def _retire(self, swarm_id: str) -> None:
        """Tear the controller runtime down (after a remove, or a failed create)."""
        task = self.tasks.get(swarm_id)
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), 10)
            except (asyncio.TimeoutError, Exception):
                task.cancel()
        await self.runtime.remove(keys.container_name(swarm_id, "ctl"))

    def _controller_container(self, swarm_id: str, plan: SwarmPlan | None, sig: Signal | None) -> ContainerSpec:
        socket = urlparse(self.settings.docker_url).path or "/var/run/docker.sock"
        env = {f"CP_{name.upper()}": _env_value(getattr(self.settings, name)) for name in _FORWARDED}
        env.update({
            "CP_AMQP_URL": self.settings.container_amqp_url(),
            "CP_INSTANCE_ID": self.owner,
            "CP_DOCKER_URL": "unix:///var/run/docker.sock",
        })
        if plan is not None:
            env["CP_SWARM_PLAN"] = plan.model_dump_json(by_alias=True)
        if sig is not None:
            env["CP_CREATE_SIGNAL"] = sig.model_dump_json(by_alias=True)
        return ContainerSpec(
            name=keys.container_name(swarm_id, "ctl"),
            # A scenario may name its own controller image (the gateway checked it is allowed).
            image=str((sig.args if sig else {}).get("controllerImage") or self.settings.project_image),
            labels=managed_labels("swarm-controller", self.owner, swarm_id=swarm_id, role=keys.CONTROLLER_ROLE,
                                  instance=keys.controller_instance(swarm_id)),
            env=env,
            command=["controlplane", "swarm-controller", swarm_id],
            network=self.settings.bee_network,
            mounts=(Mount(socket, "/var/run/docker.sock"),),
        )


def _env_value(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
