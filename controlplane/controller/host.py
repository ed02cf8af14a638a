"""The host controller: one per Docker engine, owner of everything outside a swarm.

It launches a swarm-controller per swarm (as a task of this process, or as a container of
the project's image), turns the controller's handshake into the outcome of the create, tears
the controller down after a remove, and on start re-adopts every swarm it finds running by
its containers' labels. It never destroys anything at start-up. For the services dashboard it
runs the services monitor (``services``), answers logs requests, and serves the lifecycle
actions on every container of its owner's that no served swarm's controller answers for, and
on the containers that opted in (``service_actions``).

Creates run side by side (one at a time per swarm). The handshakes they wait for arrive on
a queue of their own, ``ph.control.host-controller.replies``: were they queued behind the
creates, a full prefetch of creates would wait for handshakes that could never be delivered.
A host controller that stops abandons the creates in flight; their signals go back to the
queue and the next host controller, having re-adopted the swarm, answers them.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from controlplane.bus import Bus, Consumer
from controlplane.bus.accounts import BrokerAccounts, apply_policies, controller_grant
from controlplane.config import Settings
from controlplane.contract import keys
from controlplane.contract.models import Outcome, OutcomeState, Signal, SwarmPlan, SwarmStatus
from controlplane.contract.receiver import Done, Failure, SignalServer, remaining_s
from controlplane.controller.plan import broker_user, check_plan, plan_from_containers, plan_specs, teardown_swarm
from controlplane.controller import service_actions
from controlplane.controller.replies import Replies
from controlplane.controller.services import ServiceMonitor
from controlplane.controller.swarm import SwarmController
from controlplane.logs import get_logger
from controlplane.runtime.docker import (
    ContainerInfo,
    ContainerRuntimeError,
    ContainerSpec,
    DockerRuntime,
    Mount,
)
from controlplane.runtime.labels import KIND, MANAGED, OWNER, SERVICE, SWARM, filter_for, managed_labels
from controlplane.scenarios import configured_pool, load_catalog

log = get_logger("host-controller")

# Settings a controller container inherits from its host controller.
_FORWARDED = ("bee_network", "allow_host_network", "allow_privileged", "allowed_mounts", "allowed_images",
              "allowed_targets", "allow_sut_command", "container_memory_mb", "container_cpus", "container_pids",
              "container_log_max_size", "container_log_max_files", "container_user", "project_image",
              "bee_ready_timeout_s", "status_interval_s", "log_format", "log_level",
              "ace_pool_id", "ace_image")  # a pool's controller runs the engine image the operator named

# A create without a deadline waits this long for the handshake.
CREATE_WAIT_S = 120.0
# The create's outcome must reach the caller before its deadline: stop waiting this much earlier.
HANDSHAKE_MARGIN_S = 5.0


class HostController:
    def __init__(self, bus: Bus, runtime: DockerRuntime, settings: Settings) -> None:
        self.bus, self.runtime, self.settings = bus, runtime, settings
        self.owner = settings.instance_id
        self.accounts = BrokerAccounts.from_settings(settings)
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._handshakes: Replies[str, Outcome] = Replies("controller handshakes")
        # The latest handshake of each swarm's controller: a create redelivered after a host
        # controller restart finds the adopted controller's answer here.
        self._ready: dict[str, Outcome] = {}
        self._swarm_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._consumers: list[Consumer] = []
        self.services = ServiceMonitor(bus, runtime, settings, self.owner)
        self.server = SignalServer(
            bus, keys.host_controller_scope(self.owner),
            commands={"swarm-create": self._create, "swarm-remove": self._remove_orphan,
                      **service_actions.commands(runtime, settings, self._serves)},
            queries={keys.SERVICE_REPORT_REQUEST: lambda _sig: self.services.publish_full()},
            state=_failed,
            # Creates of different swarms run side by side, and actions on different services;
            # one swarm's (one service's) signals one at a time.
            lock_for=lambda sig: self._swarm_locks[sig.swarm_id or f"service:{sig.args.get('containerId', '')}"])

    async def start(self) -> HostController:
        topology = self.bus.topology
        await apply_policies(self.settings, topology)
        # Replies first: an adopted controller's handshake must find a consumer.
        replies = topology.queue(keys.HOST_CONTROLLER_REPLIES_QUEUE)
        self._consumers.append(await self.bus.consume(replies, self._on_reply, prefetch=64))
        await self.adopt()
        await self.services.start()
        requests = topology.queue(keys.HOST_CONTROLLER_REQUESTS_QUEUE)
        self._consumers.append(await self.bus.consume(requests, self.services.answer_logs, prefetch=16))
        commands = topology.queue(keys.HOST_CONTROLLER_QUEUE)
        self._consumers.append(await self.bus.consume(commands, self.server.on_message, prefetch=32))
        return self

    def _serves(self, labels: Mapping[str, str]) -> bool:
        """The services this host controller acts on: what its owner launched, and the
        containers that opted in."""
        mine = labels.get(MANAGED) == "true" and labels.get(OWNER) == self.owner
        return mine or (labels.get(SERVICE) == "true" and labels.get(MANAGED) != "true")

    async def stop(self) -> None:
        """Stop serving; the swarms keep running and the next host controller adopts them.
        Creates in flight are abandoned unanswered: their signals go back to the queue."""
        for consumer in self._consumers:
            await consumer.cancel()
        self._consumers.clear()
        await self.services.stop()
        await self.server.close()
        self._handshakes.fail_all()
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
            if info.labels.get(SWARM) and info.labels.get(KIND) in ("bee", "sut", "engine", "swarm-controller"):
                by_swarm[info.labels[SWARM]].append(info)
        # The configured engine pool runs whether or not it has engines: its floor may need some.
        pool = configured_pool(self.settings, load_catalog(self.settings.scenarios_dir))
        if pool is not None:
            by_swarm.setdefault(self.settings.ace_pool_id, [])
        for swarm_id, containers in sorted(by_swarm.items()):
            plan = pool if pool is not None and swarm_id == self.settings.ace_pool_id else plan_from_containers(containers)
            if plan is not None or self.settings.controller_mode == "container":
                await self._launch(swarm_id, plan, None)
        if by_swarm:
            log.info("re-adopted swarms", swarms=sorted(by_swarm))
        return sorted(by_swarm)

    # --- replies --------------------------------------------------------------------------

    async def _on_reply(self, routing_key: str, body: dict[str, Any], _message: Any) -> None:
        parsed = keys.parse_key(routing_key)
        if parsed.signal == keys.CONTROLLER_ROLE and parsed.kind in ("ready", "error"):
            outcome = Outcome.model_validate(body)
            swarm_id = outcome.scope.swarm_id or parsed.swarm_id or ""
            self._ready[swarm_id] = outcome
            self._handshakes.resolve(swarm_id, outcome)
        elif parsed.kind == "ready" and parsed.signal == "swarm-remove" and parsed.swarm_id:
            await self._retire(parsed.swarm_id)

    # --- signals --------------------------------------------------------------------------

    def controller_alive(self, swarm_id: str) -> bool:
        task = self.tasks.get(swarm_id)
        return task is not None and not task.done()

    async def _controller_running(self, swarm_id: str) -> bool:
        if self.settings.controller_mode == "inprocess":
            return self.controller_alive(swarm_id)
        info = await self.runtime.get(keys.container_name(self.owner, swarm_id, keys.CONTROLLER_PART))
        return info is not None and info.state == "running"

    async def _create(self, sig: Signal) -> Done:
        """Launch the swarm's controller and answer with its handshake. A failed create
        leaves nothing behind, so the swarm may be created again under the same id."""
        swarm_id = sig.swarm_id or ""
        try:
            reply = await self._controller_ready(sig)
            if reply.result != "success":
                raise Failure(reply.code or "controller-failed", reply.message or "the swarm-controller failed",
                              reply.phase or "apply", bool(reply.retryable), state=reply.state,
                              details=reply.details)
        except Exception:
            await self._tear_down(swarm_id)
            raise
        log.info("swarm created", swarm_id=swarm_id, correlation_id=sig.correlation_id)
        return Done(reply.state, reply.details)

    async def _controller_ready(self, sig: Signal) -> Outcome:
        """The handshake of the swarm's controller, launching it unless it already runs."""
        swarm_id = sig.swarm_id or ""
        timeout_s = max(remaining_s(sig, CREATE_WAIT_S) - HANDSHAKE_MARGIN_S, 1.0)
        handshake = self._handshakes.expect(swarm_id)  # before launching: the answer may be quick
        try:
            known = self._ready.get(swarm_id)
            if known is not None and known.result == "success" and await self._controller_running(swarm_id):
                # A create redelivered to a restarted host controller: the controller it
                # re-adopted has answered already.
                return known
            try:
                plan = SwarmPlan.model_validate(sig.args.get("swarmPlan", {}))
            except ValidationError as exc:
                raise Failure("invalid-plan", f"swarmPlan: {exc}", "launch", state=_failed()) from None
            self._check_policy(swarm_id, plan, sig)
            await self._launch(swarm_id, plan, sig)
            async with asyncio.timeout(timeout_s):
                return await handshake
        except TimeoutError:
            raise Failure("controller-timeout", f"swarm-controller did not hand-shake within {timeout_s:g}s",
                          "launch", retryable=True, state=_failed()) from None
        except ContainerRuntimeError as exc:
            raise Failure("controller-launch-failed", str(exc), "launch", retryable=True, state=_failed()) from None
        finally:
            handshake.cancel()

    def _check_policy(self, swarm_id: str, plan: SwarmPlan, sig: Signal) -> None:
        """The whole swarm against the policy, before its controller is launched: whoever
        published the signal, nothing it may not run starts."""
        specs = plan_specs(self.settings, swarm_id, plan, self.owner)
        if self.settings.controller_mode == "container":
            specs.append(self._controller_container(swarm_id, plan, sig))
        check_plan(self.runtime.policy, specs, "launch", state=_failed())

    async def _remove_orphan(self, sig: Signal) -> Done | None:
        """Remove a swarm whose controller is gone; a live controller answers for itself."""
        swarm_id = sig.swarm_id or ""
        if await self._controller_running(swarm_id):
            return None
        await self._tear_down(swarm_id)
        return Done(OutcomeState(status=SwarmStatus.REMOVED), {"removedBy": "host-controller"})

    async def _tear_down(self, swarm_id: str) -> None:
        """Everything of a swarm whose controller is not serving it: controller, bees, queues."""
        await self._retire(swarm_id)
        await teardown_swarm(self.bus, self.runtime, self.accounts, self.owner, swarm_id)
        instance = keys.controller_instance(swarm_id)
        await self.bus.delete_queue(keys.component_queue(keys.CONTROLLER_ROLE, instance))
        await self.bus.delete_queue(keys.replies_queue(keys.CONTROLLER_ROLE, instance))

    # --- controller runtimes ---------------------------------------------------------------

    async def _launch(self, swarm_id: str, plan: SwarmPlan | None, sig: Signal | None) -> None:
        """Start the swarm's controller; ``plan`` may be None only for a controller container
        that already exists (it reads its plan from its bees)."""
        if self.settings.controller_mode == "container":
            amqp_url = None
            if self.accounts is not None:
                amqp_url = await broker_user(self.accounts, keys.CONTROLLER_ROLE, keys.controller_instance(swarm_id),
                                             controller_grant(swarm_id), "launch", state=_failed())
            await self.runtime.ensure_running(self._controller_container(swarm_id, plan, sig, amqp_url))
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
        self._ready.pop(swarm_id, None)
        task = self.tasks.get(swarm_id)
        if task is not None and not task.done():
            try:
                async with asyncio.timeout(10):
                    await asyncio.shield(task)
            except Exception:  # TimeoutError included
                task.cancel()
        await self.runtime.remove(keys.container_name(self.owner, swarm_id, keys.CONTROLLER_PART))
        if self.accounts is not None and self.settings.controller_mode == "container":
            await self.accounts.remove(keys.CONTROLLER_ROLE, keys.controller_instance(swarm_id))

    def _controller_container(self, swarm_id: str, plan: SwarmPlan | None, sig: Signal | None,
                              amqp_url: str | None = None) -> ContainerSpec:
        """``amqp_url``: the controller's own broker user; it manages its bees' users with the
        management credentials it is given (it holds the Docker socket, which is more)."""
        socket = self.runtime.policy.docker_socket
        env = {f"CP_{name.upper()}": _env_value(getattr(self.settings, name)) for name in _FORWARDED}
        env.update({
            "CP_AMQP_URL": amqp_url or self.settings.container_amqp_url(),
            "CP_INSTANCE_ID": self.owner,
            "CP_DOCKER_URL": "unix:///var/run/docker.sock",
            **(self.accounts.delegated_env() if self.accounts else {"CP_BROKER_USERS": "false"}),
        })
        if plan is not None:
            env["CP_SWARM_PLAN"] = plan.model_dump_json(by_alias=True)
        if sig is not None:
            env["CP_CREATE_SIGNAL"] = sig.model_dump_json(by_alias=True)
        return ContainerSpec(
            name=keys.container_name(self.owner, swarm_id, keys.CONTROLLER_PART),
            # A scenario may name its own controller image (the gateway checked it is allowed).
            image=str((sig.args if sig else {}).get("controllerImage") or self.settings.project_image),
            labels=managed_labels("swarm-controller", self.owner, swarm_id=swarm_id, role=keys.CONTROLLER_ROLE,
                                  instance=keys.controller_instance(swarm_id)),
            env=env,
            command=["controlplane", "swarm-controller", swarm_id],
            network=self.settings.bee_network,
            mounts=(Mount(socket, "/var/run/docker.sock"),),
        )


def _failed() -> OutcomeState:
    return OutcomeState(status=SwarmStatus.FAILED)


def _env_value(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
