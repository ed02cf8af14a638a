"""Asynchronous access to the Docker engine for the controllers.

The docker SDK is blocking, so every call runs in a bounded thread pool (CP_DOCKER_WORKERS)
and the event loop never waits on the engine. Each operation is idempotent, which lets a
whole operation be retried when the engine hiccups (connection errors, 5xx).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential

from controlplane.logs import get_logger
from controlplane.runtime.errors import ContainerRuntimeError, ImageMissing, PolicyViolation, RuntimeUnavailable
from controlplane.runtime.labels import LabelView
from controlplane.runtime.model import ContainerInfo, ContainerSpec, Mount
from controlplane.runtime.policy import RuntimePolicy

if TYPE_CHECKING:
    from controlplane.config import Settings

__all__ = [
    "ContainerInfo",
    "ContainerRuntimeError",
    "ContainerSpec",
    "DockerRuntime",
    "ImageMissing",
    "Mount",
    "PolicyViolation",
    "RuntimePolicy",
    "RuntimeUnavailable",
]

log = get_logger("runtime")

T = TypeVar("T")

# 5xx answers that are a definite outcome, not a hiccup: retrying would not change them.
_PERMANENT_MARKERS = (
    "no such image",
    "no such container",
    "conflict",
    "already in use",
    "already in progress",
    "already allocated",
    "address already in use",
    "not found",
    "oci runtime",
)


class _TryAgain(Exception):
    """The container is between states (being removed, or vanished mid-operation)."""


def _is_connection_error(exc: BaseException | None) -> bool:
    """The SDK sometimes wraps a connection failure (e.g. while negotiating the API version)."""
    while exc is not None:
        if isinstance(exc, requests.exceptions.ConnectionError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, _TryAgain) or _is_connection_error(exc):
        return True
    if isinstance(exc, APIError) and exc.is_server_error():
        text = str(exc.explanation or exc).lower()
        return not any(marker in text for marker in _PERMANENT_MARKERS)
    return False


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning("docker.retry", attempt=state.attempt_number, error=str(exc))


class DockerRuntime:
    """The control plane's only door to the Docker engine."""

    def __init__(
        self,
        url: str,
        workers: int,
        policy: RuntimePolicy,
        *,
        timeout: float = 60.0,
        attempts: int = 3,
    ) -> None:
        self.url = url
        self.policy = policy
        self._workers = workers
        self._timeout = timeout
        self._attempts = attempts
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="docker")
        self._api: docker.APIClient | None = None
        self._api_lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> DockerRuntime:
        return cls(settings.docker_url, settings.docker_workers, RuntimePolicy.from_settings(settings))

    # -- public operations -------------------------------------------------------------

    async def ping(self) -> None:
        """Raise ``RuntimeUnavailable`` unless the engine answers."""
        try:
            await self._run("ping", lambda: self._client().ping())
        except RuntimeUnavailable:
            raise
        except ContainerRuntimeError as exc:
            raise RuntimeUnavailable(f"Docker engine at {self.url} does not answer: {exc}") from exc

    async def image_exists(self, image: str) -> bool:
        return await self._run("image_exists", lambda: self._image_exists(image))

    async def ensure_running(self, spec: ContainerSpec) -> ContainerInfo:
        """Make the named container exist and run; safe to repeat and to race with itself."""
        self.policy.check(spec)
        return await self._run("ensure_running", lambda: self._ensure_running(spec))

    async def start_new(self, spec: ContainerSpec) -> ContainerInfo:
        """Create and start a container whose name is new (a pool's engine): two calls fewer than
        ``ensure_running``, which first looks for one to adopt. A name already taken is adopted
        only when its labels say it is this container (``name-taken`` otherwise)."""
        self.policy.check(spec)
        return await self._run("start_new", lambda: self._start_new(spec))

    async def stop(self, name_or_id: str, timeout: float = 5) -> None:
        """Stop gracefully, killing after ``timeout`` seconds; a missing container is not an error."""
        await self._run("stop", lambda: self._stop(name_or_id, timeout))

    async def remove(self, name_or_id: str) -> None:
        """Force-remove with its anonymous volumes; a missing container is not an error."""
        await self._run("remove", lambda: self._remove(name_or_id))

    async def get(self, name_or_id: str) -> ContainerInfo | None:
        return await self._run("get", lambda: self._inspect(name_or_id))

    async def list(self, labels: dict[str, str], all: bool = True) -> list[ContainerInfo]:
        """Containers carrying every given label (see ``labels.filter_for``); stopped ones too unless ``all=False``.

        Built from the list alone: ``started_at`` is None here; ``get`` has the full inspect."""
        return await self._run("list", lambda: self._list(labels, all))

    async def inspect(self, name_or_id: str) -> dict[str, Any] | None:
        """The engine's whole inspect document; None for a missing container."""
        return await self._run("inspect", lambda: self._inspect_raw(name_or_id))

    async def exec(self, name_or_id: str, command: list[str], timeout: float = 30.0) -> tuple[int, str]:
        """Run ``command`` in the running container; its exit code and output (stdout and
        stderr). Not retried: a command is not known to be idempotent."""
        loop = asyncio.get_running_loop()
        if self._closed:
            raise ContainerRuntimeError("exec: the runtime is closed")
        try:
            async with asyncio.timeout(timeout):
                return await loop.run_in_executor(self._executor, lambda: self._exec(name_or_id, command))
        except TimeoutError:
            raise ContainerRuntimeError(f"exec: {command[0]!r} did not finish within {timeout:g}s") from None
        except NotFound:
            raise ContainerRuntimeError(f"exec: container {name_or_id!r} does not exist") from None
        except (requests.exceptions.RequestException, DockerException) as exc:
            if _is_connection_error(exc):
                raise RuntimeUnavailable(f"exec: Docker engine at {self.url} unreachable: {exc}") from exc
            raise ContainerRuntimeError(f"exec: {exc}") from exc

    async def call(self, op: str, fn: Callable[[docker.APIClient], T], *, idempotent: bool = True) -> T:
        """An engine call the methods above do not cover (the services dashboard's), run like
        theirs: on a worker thread, errors mapped to ours; retried only when ``idempotent``."""
        return await self._run(op, lambda: fn(self._client()), attempts=None if idempotent else 1)

    def watch(self, labels: dict[str, str], on_event: Callable[[str, str], None]) -> Callable[[], None]:
        """Follow the engine's container events (start, die, destroy...) for containers with
        ``labels``, on a thread of its own; ``on_event(action, container_id)`` runs on the
        calling loop. Reconnects when the engine goes away. Returns the function that stops it."""
        return self.watch_events(labels, lambda event: on_event(
            str(event.get("Action", "")).split(":")[0], str((event.get("Actor") or {}).get("ID", ""))))

    def watch_events(self, labels: dict[str, str], on_event: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """``watch`` with the engine's whole event (its ``Actor.Attributes`` carry the exit
        code of a ``die``, the labels and the name)."""
        loop = asyncio.get_running_loop()
        stopped = threading.Event()
        current: list[Any] = []

        def follow() -> None:
            filters = {"type": ["container"], "label": [f"{key}={value}" for key, value in labels.items()]}
            while not stopped.is_set():
                try:
                    stream = self._client().events(decode=True, filters=filters)
                    current[:] = [stream]
                    for event in stream:
                        if stopped.is_set():
                            break
                        if not loop.is_closed():
                            loop.call_soon_threadsafe(on_event, event)
                except Exception as exc:  # the engine went away: follow again once it is back
                    if not stopped.is_set():
                        log.warning("docker.events interrupted", error=str(exc))
                        stopped.wait(1.0)

        def stop() -> None:
            stopped.set()
            for stream in current:
                try:
                    stream.close()
                except Exception:  # already closed with its connection
                    pass

        threading.Thread(target=follow, name="docker-events", daemon=True).start()
        return stop

    async def logs_tail(self, name_or_id: str, lines: int = 50) -> str:
        """Last lines of stdout and stderr; empty for a missing container."""
        return await self._run("logs_tail", lambda: self._logs_tail(name_or_id, lines))

    async def wait_state(
        self,
        name_or_id: str,
        states: set[str],
        timeout: float,
        interval: float = 0.2,
    ) -> ContainerInfo | None:
        """Poll until the container is in one of ``states``; None on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            info = await self.get(name_or_id)
            if info is not None and info.state in states:
                return info
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            await asyncio.sleep(min(interval, remaining))

    async def close(self) -> None:
        """Release the connection pool and the threads; later calls fail."""
        if self._closed:
            return
        self._closed = True
        api = self._api
        if api is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, api.close)
        self._executor.shutdown(wait=False)

    # -- plumbing ----------------------------------------------------------------------

    async def _run(self, op: str, fn: Callable[[], T], attempts: int | None = None) -> T:
        """Run ``fn`` on a worker thread, retrying transient failures, mapping SDK errors to ours."""
        if self._closed:
            raise ContainerRuntimeError(f"{op}: the runtime is closed")
        loop = asyncio.get_running_loop()
        retrying = AsyncRetrying(
            retry=retry_if_exception(_is_transient),
            stop=stop_after_attempt(attempts or self._attempts),
            wait=wait_exponential(multiplier=0.2, max=2),
            before_sleep=_log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await loop.run_in_executor(self._executor, fn)
        except ContainerRuntimeError:
            raise
        except _TryAgain as exc:
            raise ContainerRuntimeError(f"{op}: {exc}") from exc
        except (requests.exceptions.RequestException, DockerException) as exc:
            if _is_connection_error(exc):
                raise RuntimeUnavailable(f"{op}: Docker engine at {self.url} unreachable: {exc}") from exc
            raise ContainerRuntimeError(f"{op}: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _client(self) -> docker.APIClient:
        """Created on first use, on a worker thread: negotiating the API version talks to the engine."""
        with self._api_lock:
            if self._api is None:
                self._api = docker.APIClient(
                    base_url=self.url,
                    version="auto",
                    timeout=self._timeout,
                    max_pool_size=self._workers,
                )
            return self._api

    # -- blocking bodies (worker threads only) -----------------------------------------

    def _inspect(self, name_or_id: str) -> ContainerInfo | None:
        try:
            return ContainerInfo.from_inspect(self._client().inspect_container(name_or_id))
        except NotFound:
            return None

    def _inspect_raw(self, name_or_id: str) -> dict[str, Any] | None:
        try:
            return dict(self._client().inspect_container(name_or_id))
        except NotFound:
            return None

    def _exec(self, name_or_id: str, command: list[str]) -> tuple[int, str]:
        api = self._client()
        created = api.exec_create(name_or_id, command, stdout=True, stderr=True)
        output = api.exec_start(created["Id"])
        code = api.exec_inspect(created["Id"]).get("ExitCode")
        return int(code if code is not None else -1), output.decode("utf-8", errors="replace")

    def _image_exists(self, image: str) -> bool:
        try:
            self._client().inspect_image(image)
            return True
        except NotFound:
            return False

    def _ensure_running(self, spec: ContainerSpec) -> ContainerInfo:
        info = self._inspect(spec.name)
        if info is None:
            info = self._create(spec)
        _check_ours(spec, info)
        if info.state == "running":
            return info
        if info.state == "removing":
            raise _TryAgain(f"container {spec.name!r} is being removed")
        api = self._client()
        if info.state == "paused":
            api.unpause(info.id)
        elif info.state == "dead":
            # A dead container cannot be started; replace it under the same name.
            api.remove_container(info.id, force=True, v=True)
            info = self._create(spec)
            api.start(info.id)
        elif info.state != "restarting":
            api.start(info.id)
        started = self._inspect(info.id)
        if started is None:
            raise _TryAgain(f"container {spec.name!r} vanished while starting")
        return started

    def _start_new(self, spec: ContainerSpec) -> ContainerInfo:
        api = self._client()
        try:
            created = api.create_container(**self._create_args(spec))
        except ImageNotFound as exc:
            raise ImageMissing(spec.image) from exc
        except APIError as exc:
            if exc.status_code != 409:
                raise
            # Taken: by this very container when a retried attempt's create had gone through
            # (then it is ours, and started like any other), else refused.
            return self._ensure_running(spec)
        try:
            api.start(created["Id"])
        except APIError:
            api.remove_container(created["Id"], force=True, v=True)  # nothing half-made is left behind
            raise
        # Started: what an inspection would say is known, without asking (the Docker event
        # stream and listings report what happens to it next).
        return ContainerInfo(id=created["Id"], name=spec.name, image=spec.image, state="running", exit_code=None,
                             labels=dict(spec.labels), started_at=None, ports=dict(spec.ports))

    def _create_args(self, spec: ContainerSpec) -> dict[str, Any]:
        api = self._client()
        host_config = api.create_host_config(
            **self.policy.hardening(spec),
            network_mode=spec.network,
            privileged=spec.privileged,
            mounts=[
                docker.types.Mount(target=m.target, source=m.source, type="bind", read_only=m.read_only)
                for m in spec.mounts
            ],
            port_bindings={port: (spec.publish_address, host_port) for port, host_port in spec.ports.items()},
        )
        return {"image": spec.image, "name": spec.name, "command": spec.command, "environment": dict(spec.env),
                "labels": dict(spec.labels), "user": self.policy.user or None,
                "ports": [_exposed(port) for port in spec.ports], "host_config": host_config}

    def _create(self, spec: ContainerSpec) -> ContainerInfo:
        """Create without starting; a name conflict means another caller won the race."""
        api = self._client()
        if not self._image_exists(spec.image):
            raise ImageMissing(spec.image)
        try:
            created = api.create_container(**self._create_args(spec))
            log.info("docker.created", name=spec.name, image=spec.image, id=created["Id"][:12])
        except ImageNotFound as exc:
            raise ImageMissing(spec.image) from exc
        except APIError as exc:
            if exc.status_code != 409:
                raise
        info = self._inspect(spec.name)
        if info is None:
            raise _TryAgain(f"container {spec.name!r} vanished right after creation")
        return info

    def _stop(self, name_or_id: str, timeout: float) -> None:
        try:
            self._client().stop(name_or_id, timeout=max(0, math.ceil(timeout)))
        except NotFound:
            pass

    def _remove(self, name_or_id: str) -> None:
        try:
            self._client().remove_container(name_or_id, force=True, v=True)
        except NotFound:
            pass
        except APIError as exc:
            if exc.status_code != 409 or "in progress" not in str(exc.explanation or "").lower():
                raise
            # Another caller is already removing it: the outcome is the one we asked for.

    def _list(self, labels: dict[str, str], all: bool) -> list[ContainerInfo]:
        api = self._client()
        filters: dict[str, Any] = {"label": [f"{key}={value}" for key, value in labels.items()]}
        # One engine call: controllers list their bees on every heartbeat.
        return [ContainerInfo.from_summary(summary) for summary in api.containers(all=all, filters=filters)]

    def _logs_tail(self, name_or_id: str, lines: int) -> str:
        try:
            raw = self._client().logs(name_or_id, stdout=True, stderr=True, tail=lines)
        except NotFound:
            return ""
        return raw.decode("utf-8", errors="replace")


def _check_ours(spec: ContainerSpec, info: ContainerInfo) -> None:
    """A container found under the spec's name is used only when its labels say it is the
    same component of the same owner: a name alone proves nothing."""
    wanted, found = LabelView.from_labels(spec.labels), LabelView.from_labels(info.labels)
    if (found.managed, found.owner, found.kind, found.swarm_id, found.role, found.instance) != \
            (wanted.managed, wanted.owner, wanted.kind, wanted.swarm_id, wanted.role, wanted.instance):
        raise PolicyViolation(f"container name {spec.name!r} is taken by a container this control plane "
                              f"did not start for it (owner {found.owner!r}, kind {found.kind!r})", code="name-taken")


def _exposed(port: str) -> tuple[int, str] | int:
    """``"8080/tcp"`` -> ``(8080, "tcp")``, the form the SDK expects for exposed ports."""
    number, _, proto = port.partition("/")
    return (int(number), proto) if proto else int(number)
