"""Lifecycle actions on services, served by a container's owner: the swarm-controller for its
swarm's containers, the host controller for the rest (``commands``).

``service-update`` recreates the container on its image's newest version: pulled when a
registry answers, else the local image of the same name. The old container is stopped and
kept aside under another name until the new one runs (and is healthy, when it has a health
check); a new container that fails is removed and the old one comes back under its name, as
it was. Nothing the old container was given is lost (``runtime.recreate``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from controlplane.config import Settings
from controlplane.contract.models import OutcomeState, Signal
from controlplane.contract.receiver import Command, Done, Failure
from controlplane.logs import get_logger
from controlplane.runtime.docker import ContainerRuntimeError, DockerRuntime, RuntimeUnavailable
from controlplane.runtime.labels import LabelView, service_fields
from controlplane.runtime.recreate import create_args, launch_view, other_networks

log = get_logger("service-actions")

STOP_TIMEOUT_S = 10
# A registry that does not answer does not hold an update longer than this: the local image serves.
PULL_TIMEOUT_S = 30.0

# Whether this receiver may act on a container, from its labels.
Owns = Callable[[Mapping[str, str]], bool]


def commands(runtime: DockerRuntime, settings: Settings, owns: Owns) -> dict[str, Command]:
    actions = ServiceActions(runtime, settings, owns)
    return {"service-start": actions.start, "service-stop": actions.stop, "service-restart": actions.restart,
            "service-update": actions.update}


def _state(status: str) -> OutcomeState:
    return OutcomeState(status=status)


class ServiceActions:
    def __init__(self, runtime: DockerRuntime, settings: Settings, owns: Owns) -> None:
        self.runtime, self.settings, self.owns = runtime, settings, owns

    async def _target(self, sig: Signal) -> dict[str, Any]:
        ref = str(sig.args.get("containerId") or "")
        attrs = await self.runtime.inspect(ref) if ref else None
        if attrs is None:
            raise Failure("not-found", f"no container {ref!r}", "lookup", state=_state("unknown"))
        if not self.owns((attrs.get("Config") or {}).get("Labels") or {}):
            raise Failure("not-a-service", f"container {ref!r} is not a service this receiver serves", "lookup",
                          state=_state(_status(attrs)))
        return attrs

    def _done(self, attrs: dict[str, Any], status: str, message: str, **more: Any) -> Done:
        return Done(_state(status), {"containerId": attrs["Id"], "name": str(attrs.get("Name", "")).lstrip("/"),
                                     "status": status, "message": message, **more})

    async def start(self, sig: Signal) -> Done:
        attrs = await self._target(sig)
        if _status(attrs) == "running":
            return self._done(attrs, "running", "Service already running")
        async with _failing_as("start", attrs):
            await self.runtime.call("start", lambda api: api.start(attrs["Id"]))
            await self._expect_running(attrs["Id"], "start")
        return self._done(attrs, "running", "Service started successfully")

    async def stop(self, sig: Signal) -> Done:
        attrs = await self._target(sig)
        if _status(attrs) != "running":
            return self._done(attrs, "stopped", "Service already stopped")
        async with _failing_as("stop", attrs, "running"):
            await self.runtime.stop(attrs["Id"], timeout=STOP_TIMEOUT_S)
        return self._done(attrs, "stopped", "Service stopped successfully")

    async def restart(self, sig: Signal) -> Done:
        attrs = await self._target(sig)
        async with _failing_as("restart", attrs):
            await self.runtime.call("restart", lambda api: api.restart(attrs["Id"], timeout=STOP_TIMEOUT_S))
            await self._expect_running(attrs["Id"], "restart")
        return self._done(attrs, "running", "Service restarted successfully")

    async def _expect_running(self, container_id: str, phase: str) -> None:
        info = await self.runtime.wait_state(container_id, {"running", "exited", "dead"}, timeout=STOP_TIMEOUT_S)
        if info is None or info.state != "running":
            state = info.state if info else "unknown"
            raise Failure(f"{phase}-failed", f"the container is {state} after {phase}"
                          + (f" (exit code {info.exit_code})" if info and info.exit_code is not None else ""),
                          phase, state=_state("stopped"))

    # --- update ----------------------------------------------------------------------------

    async def update(self, sig: Signal) -> Done:
        attrs = await self._target(sig)
        async with _failing_as("update", attrs, _status(attrs)):
            return await self._update(attrs)

    async def _update(self, attrs: dict[str, Any]) -> Done:
        self._check_policy(attrs)
        ref = (attrs.get("Config") or {}).get("Image", "")
        name = str(attrs.get("Name", "")).lstrip("/")
        before = service_fields((attrs.get("Config") or {}).get("Labels")).get("version")
        pulled = await self._pull(ref)
        try:
            image = await self.runtime.call("inspect_image", lambda api: api.inspect_image(ref))
        except ContainerRuntimeError:
            raise Failure("image-missing", f"image {ref!r} is neither in a registry that answers nor local",
                          "update", state=_state(_status(attrs))) from None
        if image["Id"] == attrs.get("Image"):
            return self._done(attrs, _status(attrs), "Service is already up to date", version=before,
                              versionBefore=before, updated=False, pulled=pulled)
        old_image = await self.runtime.call("inspect_image", lambda api: api.inspect_image(attrs["Image"]))
        new_id = await self._replace(attrs, old_image, ref, name, before)
        after = service_fields((image.get("Config") or {}).get("Labels"))
        labels = create_args(attrs, old_image, ref, name)["labels"]
        version = service_fields(labels).get("version") or after.get("version")
        status = "running" if _status(attrs) == "running" else "stopped"
        log.info("service updated", name=name, version_before=before, version=version)
        return Done(_state(status), {"containerId": new_id, "previousContainerId": attrs["Id"], "name": name,
                                     "status": status, "message": "Service updated successfully", "version": version,
                                     "versionBefore": before, "image": ref, "imageId": image["Id"],
                                     "previousImageId": attrs.get("Image"), "updated": True, "pulled": pulled})

    def _check_policy(self, attrs: dict[str, Any]) -> None:
        """A recreated container is a launch: it gets what the policy allows, whoever first ran it."""
        spec = launch_view(attrs)
        problems = self.runtime.policy.privilege_problems(spec, LabelView.from_labels(spec.labels).kind or "service")
        if problems:
            raise Failure("policy-refused", "the control plane may not recreate this container: " + "; ".join(problems),
                          "update", state=_state(_status(attrs)))

    async def _pull(self, ref: str) -> bool:
        """Whether a registry gave the newest image; False when none answers (the local one serves)."""
        if not ref or ref.startswith("sha256:"):
            return False
        repository, tag = _split_ref(ref)
        try:
            async with asyncio.timeout(PULL_TIMEOUT_S):
                await self.runtime.call("pull", lambda api: api.pull(repository, tag=tag), idempotent=False)
            return True
        except (ContainerRuntimeError, TimeoutError) as exc:
            log.info("image not pulled; using the local one", image=ref, reason=str(exc)[:200])
            return False

    async def _replace(self, attrs: dict[str, Any], old_image: dict[str, Any], ref: str, name: str,
                       before: str | None) -> str:
        """The new container's id once it runs; the old one back in place when it does not."""
        old_id, was_running = attrs["Id"], _status(attrs) == "running"
        aside = f"{name}-previous-{old_id[:12]}"
        args = create_args(attrs, old_image, ref, name)
        await self.runtime.stop(old_id, timeout=STOP_TIMEOUT_S)
        await self.runtime.call("rename", lambda api: api.rename(old_id, aside))
        new_id: str | None = None
        try:
            created = await self.runtime.call("create", lambda api: api.create_container(**args), idempotent=False)
            new_id = created["Id"]
            for network, endpoint in other_networks(attrs).items():
                await self.runtime.call("connect", lambda api, n=network, e=endpoint: api.connect_container_to_network(
                    new_id, n, aliases=e.get("Aliases")))
            if was_running:
                await self.runtime.call("start", lambda api: api.start(new_id))
                await self._healthy(new_id)
        except (ContainerRuntimeError, Failure) as exc:
            reason = exc.message if isinstance(exc, Failure) else str(exc)
            await self._roll_back(old_id, new_id, name, was_running)
            raise Failure("update-failed", f"the updated container failed ({reason}); the previous one is back",
                          "update", state=_state("running" if was_running else "stopped"),
                          details={"rolledBack": True, "version": before, "versionBefore": before,
                                   "containerId": old_id}) from None
        # The old one goes without its anonymous volumes' data: the new one mounts them.
        await self.runtime.call("remove", lambda api: api.remove_container(old_id, v=False, force=True))
        return new_id

    async def _healthy(self, container_id: str) -> None:
        """Running for the update timeout's first checks, and healthy when it has a health check."""
        deadline = asyncio.get_running_loop().time() + self.settings.services_update_timeout_s
        while True:
            attrs = await self.runtime.inspect(container_id)
            state = (attrs or {}).get("State") or {}
            health = (state.get("Health") or {}).get("Status")
            if state.get("Status") in ("exited", "dead") or attrs is None:
                raise Failure("start-failed", f"it exited with code {state.get('ExitCode')}", "update")
            if health == "unhealthy":
                raise Failure("unhealthy", "its health check failed", "update")
            if state.get("Status") == "running" and health in (None, "healthy"):
                if health == "healthy" or await self._stays_up(container_id):
                    return
            if asyncio.get_running_loop().time() > deadline:
                raise Failure("not-healthy", f"not healthy within {self.settings.services_update_timeout_s:g}s", "update")
            await asyncio.sleep(0.5)

    async def _stays_up(self, container_id: str) -> bool:
        """Without a health check, running a moment after its start is the best sign there is."""
        await asyncio.sleep(1.0)
        attrs = await self.runtime.inspect(container_id)
        state = (attrs or {}).get("State") or {}
        if state.get("Status") != "running":
            raise Failure("start-failed", f"it exited with code {state.get('ExitCode')}", "update")
        return True

    async def _roll_back(self, old_id: str, new_id: str | None, name: str, was_running: bool) -> None:
        if new_id is not None:
            await self.runtime.call("remove", lambda api: api.remove_container(new_id, v=False, force=True))
        await self.runtime.call("rename", lambda api: api.rename(old_id, name))
        if was_running:
            await self.runtime.call("start", lambda api: api.start(old_id))
        log.warning("service update rolled back", name=name)


@asynccontextmanager
async def _failing_as(phase: str, attrs: dict[str, Any], status: str = "stopped") -> AsyncIterator[None]:
    """The engine's refusal (a command that does not exist, say) as the action's own failure;
    every failure names the container, for the callers and the webhooks that hear of it."""
    about = {"containerId": attrs["Id"], "name": str(attrs.get("Name", "")).lstrip("/")}
    try:
        yield
    except Failure as failure:
        failure.details = {**about, **failure.details}
        raise
    except RuntimeUnavailable:
        raise
    except ContainerRuntimeError as exc:
        raise Failure(f"{phase}-failed", str(exc), phase, state=_state(status), details=about) from None


def _status(attrs: dict[str, Any]) -> str:
    return "running" if (attrs.get("State") or {}).get("Status") == "running" else "stopped"


def _split_ref(ref: str) -> tuple[str, str | None]:
    """``registry:5000/app:1.2`` -> (``registry:5000/app``, ``1.2``); a digest stays whole."""
    if "@" in ref:
        return ref, None
    head, colon, tag = ref.rpartition(":")
    if colon and "/" not in tag:
        return head, tag
    return ref, "latest"
