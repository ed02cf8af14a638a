"""The host controller's eyes for the services dashboard: what its engine runs, reported.

Every container this owner launched and every container labelled ``controlplane.service=true``
is a service. Docker's event stream says when one changes; the monitor inspects it then (never
on a timer) and publishes what changed, grouped, as ``ev.ready.service-report.<owner>``. A
bounded sampler reads stats of the running ones, a few at a time, once per interval, into the
same reports. Gateways keep their read model from these reports and ask for a full one when
they start (``service-report-request``), so no request of theirs waits on Docker.

Transitions become webhook events here, once, each with its own id: a ``die`` is a crash
(``service:error``) when its exit code is not 0 and nobody asked the container to stop (no
``kill`` just before), else ``service:stop``; ``start`` and ``restart`` are ``service:start``
and ``service:restart``; an OOM kill or a health check turning unhealthy is ``service:error``.

It also answers logs requests (request-reply: the caller's ``reply_to``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from controlplane.aio import wait_set
from controlplane.bus import Bus
from controlplane.bus.rpc import reply
from controlplane.config import Settings
from controlplane.contract import keys
from controlplane.contract.models import new_id, parse_time, utcnow
from controlplane.contract.redact import MASK, is_secret_key
from controlplane.contract.services import (
    LogsRequest, PortMapping, Sample, ServiceReport, ServiceState, Transition, VolumeMapping, parse_log_line,
    stats_figures,
)
from controlplane.logs import get_logger
from controlplane.runtime.docker import ContainerRuntimeError, DockerRuntime
from controlplane.runtime.labels import KIND, SERVICE, SWARM, filter_for, service_fields
from controlplane.runtime.stats import StatsReader

log = get_logger("services")

# Events that change what a service looks like; the rest (exec, attach, top...) do not.
_RELEVANT = frozenset({"create", "start", "restart", "die", "kill", "stop", "pause", "unpause", "destroy", "rename",
                       "oom", "health_status", "update"})
# A die this soon after a kill was asked for.
_KILL_WINDOW_S = 60.0
# Events are grouped this long before one report goes out.
_BATCH_S = 0.2


class ServiceMonitor:
    def __init__(self, bus: Bus, runtime: DockerRuntime, settings: Settings, owner: str) -> None:
        self.bus, self.runtime, self.settings, self.owner = bus, runtime, settings, owner
        self.services: dict[str, ServiceState] = {}
        self._raw_stats: dict[str, dict[str, Any]] = {}  # the previous reading: the next one's CPU delta
        self._dirty: set[str] = set()
        self._transitions: list[Transition] = []
        self._killed: dict[str, float] = {}
        self._seen: deque[tuple[str, str, Any]] = deque(maxlen=256)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._unwatch: list[Any] = []
        self._stats: StatsReader | None = None
        self._fresh: set[str] = set()
        self._started = asyncio.Event()

    async def start(self) -> ServiceMonitor:
        try:
            self._stats = StatsReader(self.runtime.url)
        except ValueError:  # an engine reached otherwise (TLS): through the SDK's worker threads
            self._stats = None
        # Watch first: a change between the listing and the watch would be missed otherwise.
        self._unwatch = [self.runtime.watch_events(labels, self._on_event)
                         for labels in (filter_for(owner=self.owner), {SERVICE: "true"})]
        await self._sync()
        await self.publish_full()
        self._tasks = [asyncio.create_task(self._report_forever(), name="services.reports"),
                       asyncio.create_task(self._sample_forever(), name="services.sampler")]
        return self

    async def stop(self) -> None:
        for unwatch in self._unwatch:
            unwatch()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._stats is not None:
            await self._stats.close()

    # --- what the engine runs ------------------------------------------------------------------

    async def _sync(self) -> None:
        """What the engine lists against what is known: a container new, or in another state
        than known (an event missed while the engine's stream reconnected), is inspected; one
        no longer listed is forgotten. At start that is every container; later, none usually:
        the events keep the rest current, so the periodic full report costs two listings."""
        listed = {info.id: info for labels in (filter_for(owner=self.owner), {SERVICE: "true"})
                  for info in await self.runtime.list(labels)}
        for container_id, info in listed.items():
            known = self.services.get(container_id)
            if known is None or known.state != info.state:
                await self._refresh(container_id)
        for gone in set(self.services) - set(listed):
            self.services.pop(gone, None)

    async def _refresh(self, container_id: str) -> bool:
        """Inspect one container into ``services``; False when it is gone."""
        attrs = await self.runtime.inspect(container_id)
        if attrs is None or attrs.get("State", {}).get("Status") == "removing":
            self.services.pop(container_id, None)
            self._raw_stats.pop(container_id, None)
            return False
        self.services[container_id] = service_state(attrs, self.owner, self.settings.services_show_env)
        return True

    def _on_event(self, event: dict[str, Any]) -> None:
        action = str(event.get("Action", "")).split(":")[0].strip()
        actor = event.get("Actor") or {}
        container_id, attributes = str(actor.get("ID", "")), actor.get("Attributes") or {}
        if action not in _RELEVANT or not container_id:
            return
        # A container both labels match is followed twice: each event counts once.
        seen = (container_id, str(event.get("Action", "")), event.get("timeNano"))
        if seen in self._seen:
            return
        self._seen.append(seen)
        if action == "kill":
            self._killed[container_id] = time.monotonic()
        transition = self._transition(action, container_id, attributes, event)
        if transition is not None:
            self._transitions.append(transition)
        self._dirty.add(container_id)
        self._wake.set()

    def _transition(self, action: str, container_id: str, attributes: dict[str, Any],
                    event: dict[str, Any]) -> Transition | None:
        name = str(attributes.get("name") or container_id[:12])
        at = _event_time(event)

        def made(kind: str, reason: str | None = None, **details: Any) -> Transition:
            return Transition(event=kind, event_id=new_id(), container_id=container_id, name=name, at=at,  # type: ignore[arg-type]
                              reason=reason, details=details)

        if action == "start":
            return made("service:start")
        if action == "restart":
            return made("service:restart")
        if action == "oom":
            self._killed[container_id] = time.monotonic()  # its die follows: this is the error it reports
            return made("service:error", "oom-killed")
        if action == "health_status" and "unhealthy" in str(event.get("Action", "")):
            return made("service:error", "unhealthy")
        if action == "die":
            exit_code = int(attributes.get("exitCode") or 0)
            killed = self._killed.pop(container_id, None)
            if exit_code != 0 and (killed is None or time.monotonic() - killed > _KILL_WINDOW_S):
                return made("service:error", "crashed", exitCode=exit_code)
            return made("service:stop", exitCode=exit_code)
        return None

    # --- reports ---------------------------------------------------------------------------

    async def publish_full(self) -> None:
        await self._publish(ServiceReport(host=self.owner, full=True, services=list(self.services.values()),
                                          samples=self._samples()))

    def _samples(self) -> dict[str, Sample]:
        return {cid: sample for cid, sample in ((cid, _sample_of(raw)) for cid, raw in self._raw_stats.items())
                if sample is not None}

    async def _publish(self, report: ServiceReport) -> None:
        await self.bus.publish(keys.service_report_key(self.owner), report, persistent=False)

    async def _report_forever(self) -> None:
        """Changes, grouped: one report for a burst of events (an update makes a dozen)."""
        full_every = self.settings.services_full_report_s
        last_full = time.monotonic()
        while True:
            await wait_set(self._wake, max(1.0, full_every - (time.monotonic() - last_full)))
            await asyncio.sleep(_BATCH_S)
            self._wake.clear()
            try:
                if time.monotonic() - last_full >= full_every:
                    # Now and then everything, so a gateway that missed a report catches up.
                    await self._sync()
                    await self.publish_full()
                    last_full = time.monotonic()
                    continue
                await self._report_changes()
            except Exception as exc:  # the engine or the broker is away: the next round retries
                log.warning("services report failed", error=str(exc))

    async def _report_changes(self) -> None:
        dirty, self._dirty = self._dirty, set()
        transitions, self._transitions = self._transitions, []
        if not dirty and not transitions:
            return
        changed, removed = [], []
        for container_id in sorted(dirty):
            try:
                present = await self._refresh(container_id)
            except ContainerRuntimeError:
                self._dirty.add(container_id)  # asked again on the next round
                continue
            (changed if present else removed).append(container_id)
            if present and self.services[container_id].state == "running" and container_id not in self._raw_stats:
                self._fresh.add(container_id)  # just started: read now, not at the next round
                self._started.set()
        try:
            await self._publish(ServiceReport(host=self.owner, services=[self.services[c] for c in changed],
                                              removed=removed, transitions=transitions))
        except Exception:
            # Not lost: reported with the next round's changes.
            self._dirty.update(changed + removed)
            self._transitions[:0] = transitions
            raise

    # --- stats -------------------------------------------------------------------------------

    async def _sample_forever(self) -> None:
        """A round over every running service each interval; in between, a service that has just
        started is read at once, so its figures do not wait for the next round."""
        interval = self.settings.services_stats_interval_s
        while True:
            deadline = time.monotonic() + interval
            await self._sample_and_report(None)
            deadline = max(deadline, time.monotonic() + 0.5)  # a round longer than the interval: a breath
            while (left := deadline - time.monotonic()) > 0:
                if not await wait_set(self._started, left):
                    break
                self._started.clear()
                fresh, self._fresh = self._fresh, set()
                await self._sample_and_report(fresh)

    async def _sample_and_report(self, only: set[str] | None) -> None:
        try:
            samples = await self.sample(only)
            if samples:
                await self._publish(ServiceReport(host=self.owner, samples=samples))
        except Exception as exc:
            log.warning("services stats round failed", error=str(exc))

    async def sample(self, only: set[str] | None = None) -> dict[str, Sample]:
        """One reading of every running service, ``services_stats_concurrency`` at a time.
        One-shot: the CPU figure is taken against this container's previous reading, so it shows
        from the second round on. The engine answers each at its collector's next tick (about a
        second), so a round of N takes about N / concurrency seconds (``runtime.stats``)."""
        bound = asyncio.Semaphore(self.settings.services_stats_concurrency)
        running = [cid for cid, state in self.services.items()
                   if state.state == "running" and (only is None or cid in only)]

        async def read(container_id: str) -> None:
            async with bound:
                try:
                    raw = await self._read_stats(container_id)
                except ContainerRuntimeError:
                    return  # stopped meanwhile, or the engine is away: the next round reads again
                if raw is None:
                    return  # gone: its events say so
                raw["_cp_cpu"] = stats_figures(raw, self._raw_stats.get(container_id))[0]
                raw["_cp_at"] = utcnow().isoformat()
                self._raw_stats[container_id] = raw

        await asyncio.gather(*(read(cid) for cid in running))
        for gone in set(self._raw_stats) - set(self.services):
            self._raw_stats.pop(gone, None)
        return {cid: sample for cid in running if (sample := _sample_of(self._raw_stats.get(cid))) is not None}

    async def _read_stats(self, container_id: str) -> dict[str, Any] | None:
        if self._stats is not None:
            return await self._stats.read(container_id)
        return await self.runtime.call("stats", lambda api: api.stats(container_id, stream=False, one_shot=True))

    # --- logs --------------------------------------------------------------------------------

    async def answer_logs(self, _routing_key: str, body: dict[str, Any], message: AbstractIncomingMessage) -> None:
        """A gateway's logs request: the container's last lines, both streams, oldest first."""
        try:
            ask = LogsRequest.model_validate(body)
        except ValidationError as exc:
            await reply(self.bus, message, {"error": "invalid-request", "message": str(exc)})
            return
        if ask.container_id not in self.services:
            await reply(self.bus, message, {"error": "not-found",
                                            "message": f"{ask.container_id} is not a service of {self.owner}"})
            return
        since = ask.since.astimezone(timezone.utc).replace(tzinfo=None) if ask.since else None
        try:
            raw_lines: list[tuple[str, str]] = []
            for stream in ("stdout", "stderr"):  # asked apart, so each line says where it came from
                raw = await self.runtime.call("logs", lambda api, s=stream: api.logs(
                    ask.container_id, stdout=s == "stdout", stderr=s == "stderr", timestamps=True,
                    tail=ask.lines, **({"since": since} if since else {})))
                raw_lines += [(line, stream) for line in raw.decode("utf-8", errors="replace").splitlines() if line]
        except ContainerRuntimeError as exc:
            await reply(self.bus, message, {"error": "runtime-error", "message": str(exc)})
            return
        # Docker's stamps have a fixed nine-digit fraction: as text they sort in time order.
        raw_lines.sort(key=lambda item: item[0].partition(" ")[0])
        lines = [parse_log_line(line, stream).to_dict() for line, stream in raw_lines[-ask.lines:]]
        await reply(self.bus, message, {"logs": lines})


# --- reading Docker's documents ------------------------------------------------------------------


def service_state(attrs: dict[str, Any], owner: str, show_env: bool = False) -> ServiceState:
    """A container's inspect document as a service. Environment values are masked unless the
    operator shows them (``CP_SERVICES_SHOW_ENV``), and those whose names say secret always."""
    config, state = attrs.get("Config") or {}, attrs.get("State") or {}
    labels = config.get("Labels") or {}
    fields = service_fields(labels)
    ports = [PortMapping(internal=int(port.split("/")[0]), protocol=port.partition("/")[2] or "tcp",
                         external=next((int(b["HostPort"]) for b in bindings or () if b.get("HostPort")), None))
             for port, bindings in sorted(((attrs.get("NetworkSettings") or {}).get("Ports") or {}).items())]
    port = _int(fields.get("port")) or next((p.external for p in ports if p.external), None) or \
        next((p.internal for p in ports), None)
    url = fields.get("url") or (f"http://localhost:{port}" if port and any(p.external == port for p in ports) else None)
    name = str(attrs.get("Name", "")).lstrip("/")
    return ServiceState(
        container_id=attrs["Id"], name=name, title=fields.get("title") or name, host=owner,
        state=state.get("Status", "unknown"), health=(state.get("Health") or {}).get("Status") or "none",
        exit_code=state.get("ExitCode") if state.get("Status") in ("exited", "dead") else None,
        oom_killed=bool(state.get("OOMKilled")), image=config.get("Image", ""), image_id=attrs.get("Image", ""),
        version=fields.get("version"), description=fields.get("description"), url=url, port=port,
        created=parse_time(attrs.get("Created")), started_at=parse_time(state.get("StartedAt")),
        restart_count=int(attrs.get("RestartCount") or 0), kind=labels.get(KIND), swarm_id=labels.get(SWARM),
        ports=ports,
        volumes=[VolumeMapping(source=m.get("Source") or m.get("Name") or "", destination=m.get("Destination", ""),
                               mode=m.get("Mode", "")) for m in attrs.get("Mounts") or ()],
        env=[_shown(item, show_env) for item in config.get("Env") or ()],
    )


def _shown(item: str, show_env: bool) -> str:
    key, eq, value = item.partition("=")
    if not eq:
        return item
    return f"{key}={value}" if show_env and not is_secret_key(key) and "@" not in value else f"{key}={MASK}"


def _sample_of(raw: dict[str, Any] | None) -> Sample | None:
    if not raw or not raw.get("memory_stats"):
        return None
    _, usage, limit, percent = stats_figures(raw)
    return Sample(cpu=raw.get("_cp_cpu", 0.0), memory=percent, memory_usage=usage, memory_limit=limit,
                  sampled_at=datetime.fromisoformat(raw["_cp_at"]))


def _event_time(event: dict[str, Any]) -> datetime:
    nanos = event.get("timeNano")
    if isinstance(nanos, int):
        return datetime.fromtimestamp(nanos / 1e9, timezone.utc)
    return utcnow()


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None
