"""Pool policy: what a pool's controller does besides running a swarm.

A pool is a swarm whose plan has a ``PoolSpec``. Its controller keeps the engines in memory
(rebuilt from their labels on start) and serves four signals, each answered with its outcome:

- ``pool-provision`` starts an engine (``kind`` acestream or generic) with ports of its own,
  answered once the container runs; refused with ``pool-full``, ``ports-exhausted``,
  ``vpn-down`` or ``docker-unavailable`` when it cannot be done (all retryable);
- ``pool-remove`` removes one engine, ``pool-gc`` the idle ones above the floor, and
  ``pool-scale`` brings the pool to a demand clamped to its bounds;
- ``pool-inspect`` answers Docker's inspection of engines, so the gateway never talks to Docker.

Beside them, background loops keep the policy: the floor (``minReplicas``, ``minFree``), a
health probe per engine with replacement of an unhealthy one (the new engine first, then the
old one retired, at most one per cooldown), idle cache clean-up, idle collection after the
grace period, the stream statistics collector, and the VPN monitor. The streams come from the
gateways' ``ev.ready.stream-events.<pool>`` batches; the pool remembers them (and each
engine's times) in its state snapshot, so a restarted controller never collects an engine
that is playing.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from pydantic import ValidationError

from controlplane.bus import Bus
from controlplane.config import Settings
from controlplane.contract import keys
from controlplane.contract.models import Outcome, OutcomeState, Scope, Signal, new_id, utcnow
from controlplane.contract.pool import PoolEngine, PoolSpec, StreamState, StreamStats, StreamStatSnapshot, VpnStatus
from controlplane.contract.receiver import Done, Failure
from controlplane.contract.redact import redact
from controlplane.controller.engines import (
    EngineKind,
    Provision,
    engine_from,
    hold_ports,
    parse_request,
    plan_provision,
    release_ports,
    request_of,
)
from controlplane.controller.ports import PortAllocator, PortsExhausted, PortTaken
from controlplane.logs import get_logger
from controlplane.runtime.docker import DockerRuntime
from controlplane.runtime.errors import ContainerRuntimeError, ImageMissing, PolicyViolation, RuntimeUnavailable
from controlplane.runtime.labels import engine_ports, filter_for

log = get_logger("pool")

# How often the floor and the idle engines are looked at; a new engine's first probes.
MAINTAIN_INTERVAL_S = 1.0
FIRST_PROBE_INTERVAL_S = 0.2
NEW_ENGINE_PROBE_S = 0.05
VPN_INTERVAL_S = 5.0
SCALE_CONCURRENCY = 5
COLLECT_CONCURRENCY = 32
# Container events after which the engines are listed again: an engine stopping or going.
DOCKER_ACTIONS = frozenset({"die", "destroy", "stop", "kill", "oom", "pause"})
# Docker's answers when a published port is taken by something outside the pool.
_PORT_IN_USE = ("address already in use", "port is already allocated")


@dataclasses.dataclass
class ActiveStream:
    container_id: str
    stat_url: str
    started_at: datetime


class PoolPolicy:
    def __init__(self, bus: Bus, runtime: DockerRuntime, settings: Settings, pool_id: str, spec: PoolSpec,
                 owner: str, changed: Callable[[bool], None], state: Callable[[], OutcomeState]) -> None:
        self.bus, self.runtime, self.settings = bus, runtime, settings
        self.pool_id, self.spec, self.owner = pool_id, spec, owner
        self.engines: dict[str, PoolEngine] = {}
        self.streams: dict[str, ActiveStream] = {}
        self.ports = PortAllocator(spec)
        self.vpn = VpnStatus.disabled()
        self.provisioning = 0  # provisions under way: they count against maxReplicas
        self._changed, self._state = changed, state
        self._failures: dict[str, int] = {}
        self._started_at: dict[str, float] = {}  # engines not yet seen healthy: when they started
        self._last_replacement = float("-inf")
        self._last_listing = float("-inf")
        self._replacing: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None
        self._scale_lock = asyncio.Lock()
        self._unwatch: Callable[[], None] | None = None
        self._started = asyncio.Event()
        self._listing: asyncio.Task[None] | None = None

    # --- life -----------------------------------------------------------------------------

    def commands(self) -> dict[str, Callable[[Signal], Awaitable[Any]]]:
        handlers = {"pool-provision": self._provision, "pool-remove": self._remove, "pool-gc": self._gc,
                    "pool-scale": self._scale, "pool-inspect": self._inspect}
        return {signal: self._once_started(handler) for signal, handler in handlers.items()}

    def _once_started(self, handler: Callable[[Signal], Awaitable[Any]]) -> Callable[[Signal], Awaitable[Any]]:
        """A signal that arrives while the pool takes its engines back waits for it: a port
        is handed out only once every port the engines hold is known."""
        async def serve(sig: Signal) -> Any:
            await self._started.wait()
            return await handler(sig)

        return serve

    async def start(self, remembered: dict[str, Any] | None) -> None:
        """Take the pool's engines back from Docker and its streams from the snapshot; start
        the loops. Nothing running is removed here."""
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.spec.health.timeout_s))
        remembered = remembered or {}
        times = remembered.get("engines") or {}
        for info in await self.runtime.list(filter_for(kind="engine", swarm_id=self.pool_id, owner=self.owner)):
            hold_ports(self.ports, engine_ports(info.labels))
            engine = engine_from(info, self.spec)
            saved = times.get(info.id) or {}
            self.engines[info.id] = _with_times(engine, saved)
        for stream_id, raw in (remembered.get("streams") or {}).items():
            try:
                self.streams[stream_id] = ActiveStream(raw["container_id"], raw["stat_url"],
                                                       datetime.fromisoformat(raw["started_at"]))
            except (KeyError, TypeError, ValueError):
                continue
        self._refresh_usage()
        # Docker's own events tell at once when an engine dies or goes; the probe loop's listing
        # is the fallback.
        self._unwatch = self.runtime.watch(filter_for(kind="engine", swarm_id=self.pool_id, owner=self.owner),
                                           self._on_docker_event)
        loops = (self._maintain_forever, self._probe_forever, self._collect_forever, self._vpn_forever)
        self._tasks = [asyncio.create_task(loop(), name=f"pool.{self.pool_id}.{loop.__name__}") for loop in loops]
        self._started.set()
        log.info("pool started", pool=self.pool_id, engines=len(self.engines), streams=len(self.streams))

    async def stop(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._http is not None:
            await self._http.close()

    def remembered(self) -> dict[str, Any]:
        """What the state snapshot keeps: the streams playing and each engine's times."""
        return {
            "streams": {sid: {"container_id": s.container_id, "stat_url": s.stat_url,
                              "started_at": s.started_at.isoformat()} for sid, s in self.streams.items()},
            "engines": {cid: e.model_dump(mode="json", include={"first_seen", "last_stream_usage",
                                                                "last_cache_cleanup", "cache_size_bytes"})
                        for cid, e in self.engines.items()},
        }

    def engine_records(self) -> list[dict[str, Any]]:
        return [e.model_dump(mode="json") for e in self.engines.values()]

    def view(self) -> dict[str, Any]:
        """The pool as the controller's status reports it."""
        return {"engines": self.engine_records(),
                "vpn": self.vpn.to_dict(), "provisioning": self.provisioning,
                "bounds": {"min": self.spec.min_replicas, "max": self.spec.max_replicas, "minFree": self.spec.min_free}}

    # --- signals -----------------------------------------------------------------------------

    async def _provision(self, sig: Signal) -> Done:
        kind: EngineKind = "generic" if sig.args.get("kind") == "generic" else "acestream"
        try:
            request = parse_request(kind, sig.args.get("request") or {})
        except ValidationError as exc:
            raise Failure("invalid-request", f"provision request: {exc}", "provision", state=self._state()) from None
        engine = await self.provision(kind, request.model_dump(mode="json"), sig.signal)
        result = {"container_id": engine.container_id, "container_name": engine.container_name}
        if kind == "acestream":
            result.update(host_http_port=engine.port, container_http_port=engine.container_http_port,
                          container_https_port=engine.container_https_port)
        return Done(self._state(), {"kind": kind, "engine": engine.model_dump(mode="json"), "provision": result})

    async def provision(self, kind: EngineKind, raw_request: dict[str, Any], phase: str,
                        replacing: bool = False) -> PoolEngine:
        """Start one engine and wait until its container runs. ``replacing``: the pool may go
        one above its maximum while an unhealthy engine waits for its successor."""
        request = parse_request(kind, raw_request)
        self._check_capacity(phase, replacing)
        self.provisioning += 1
        try:
            for attempt in range(3):
                provision = self._plan(kind, request, phase)
                try:
                    engine = await self._start_engine(provision, phase)
                except _PortInUse:
                    provision.release(self.ports)
                    if attempt == 2 or getattr(request, "host_port", None) or kind == "generic":
                        raise Failure("port-unavailable", "a host port of the engine is used by another program "
                                      "on this machine", phase, retryable=True, state=self._state()) from None
                    continue  # the allocator moves on: the next try gets other ports
                except BaseException:
                    provision.release(self.ports)
                    raise
                self.engines[engine.container_id] = engine
                self._started_at[engine.container_id] = asyncio.get_running_loop().time()
                if engine.kind == "acestream":
                    self._spawn(self._until_first_answer(engine))
                log.info("engine provisioned", pool=self.pool_id, container=engine.container_name, port=engine.port)
                self._changed(True)
                return engine
            raise AssertionError("unreachable")
        finally:
            self.provisioning -= 1

    def _check_capacity(self, phase: str, replacing: bool) -> None:
        limit = self.spec.max_replicas + (1 if replacing else 0)
        if len(self.engines) + self.provisioning >= limit:
            raise Failure("pool-full", f"the pool runs {len(self.engines)} engines and starts {self.provisioning}; "
                          f"its maximum is {self.spec.max_replicas}: retry once an engine is collected or removed",
                          phase, retryable=True, state=self._state(),
                          details={"retryAfterS": max(5, int(min(self.spec.idle_grace_s, 60)))})
        if self.spec.vpn_container and not self.vpn.connected:
            raise Failure("vpn-down", f"the VPN container {self.spec.vpn_container!r} is {self.vpn.health} "
                          "and no engine reports a connection: engines would have no network",
                          phase, retryable=True, state=self._state(), details={"retryAfterS": int(VPN_INTERVAL_S)})

    def _plan(self, kind: EngineKind, request: Any, phase: str) -> Provision:
        try:
            return plan_provision(self.settings, self.pool_id, self.spec, self.owner, self.ports, kind, request)
        except PortsExhausted as exc:
            raise Failure("ports-exhausted", f"{exc}: retry once an engine is removed", phase, retryable=True,
                          state=self._state(), details={"retryAfterS": 30}) from None
        except PortTaken as exc:
            raise Failure("port-taken", str(exc), phase, state=self._state()) from None

    async def _start_engine(self, provision: Provision, phase: str) -> PoolEngine:
        spec = provision.spec
        try:
            info = await self.runtime.start_new(spec)
        except ImageMissing as exc:
            raise Failure("image-missing", str(exc), phase, state=self._state()) from None
        except PolicyViolation as exc:
            raise Failure(exc.code, str(exc), phase, state=self._state()) from None
        except RuntimeUnavailable as exc:
            raise Failure("docker-unavailable", str(exc), phase, retryable=True, state=self._state(),
                          details={"retryAfterS": 10}) from None
        except ContainerRuntimeError as exc:
            await self.runtime.remove(spec.name)
            if any(marker in str(exc).lower() for marker in _PORT_IN_USE):
                raise _PortInUse() from None
            raise Failure("runtime-error", str(exc), phase, retryable=True, state=self._state()) from None
        if info.state != "running":
            running = await self.runtime.wait_state(spec.name, {"running"}, self.spec.startup_timeout_s)
            if running is None:
                logs = await self.runtime.logs_tail(spec.name, 10)
                await self.runtime.remove(spec.name)
                raise Failure("startup-timeout", f"the engine did not run within {self.spec.startup_timeout_s:g}s; "
                              f"last log lines: {redact(logs.strip())}", phase, retryable=True, state=self._state())
            info = running
        if self.spec.probe_address == "container" and info.ip is None:
            info = await self.runtime.get(info.id) or info  # its address on the pool's network
        return engine_from(info, self.spec)

    async def _remove(self, sig: Signal) -> Done:
        engine = self.find(str(sig.args.get("containerId") or ""))
        if engine is None:
            raise Failure("unknown-engine", f"no engine of pool {self.pool_id!r} has container id "
                          f"{sig.args.get('containerId')!r}", "remove", state=self._state())
        await self.retire(engine, "removed")
        return Done(self._state(), {"removed": [engine.container_id]})

    async def _gc(self, sig: Signal) -> Done:
        async with self._scale_lock:
            removed = await self.collect_idle(force_grace=False)
        return Done(self._state(), {"removed": removed, "engines": self.engine_records()})

    async def _scale(self, sig: Signal) -> Done:
        demand = sig.args.get("demand")
        if isinstance(demand, bool) or not isinstance(demand, int) or demand < 0:
            raise Failure("invalid-request", f"demand must be a non-negative integer, not {demand!r}", "scale",
                          state=self._state())
        target = max(self.spec.min_replicas, min(demand, self.spec.max_replicas))
        async with self._scale_lock:
            started, removed, failures = await self._scale_to(target)
        details: dict[str, Any] = {"requested": demand, "applied": target, "started": started, "removed": removed,
                                   "engines": self.engine_records()}
        if failures:
            details["failures"] = failures
        return Done(self._state(), details)

    async def _scale_to(self, target: int) -> tuple[list[str], list[str], list[str]]:
        started: list[str] = []
        failures: list[str] = []
        missing = target - len(self.engines) - self.provisioning
        if missing > 0:
            gate = asyncio.Semaphore(SCALE_CONCURRENCY)

            async def one() -> None:
                async with gate:
                    try:
                        started.append((await self.provision(self.spec.preset, {}, "scale")).container_id)
                    except Failure as failure:
                        failures.append(f"{failure.code}: {failure.message}")

            await asyncio.gather(*(one() for _ in range(missing)))
        removed: list[str] = []
        surplus = len(self.engines) - target
        for engine in self._idle_longest_first()[:max(surplus, 0)]:
            await self.retire(engine, "scaled down")
            removed.append(engine.container_id)
        return started, removed, failures

    async def _inspect(self, sig: Signal) -> Done:
        ids = sig.args.get("containerIds") or []
        found: list[dict[str, Any]] = []
        missing: list[str] = []
        for ref in ids if isinstance(ids, list) else []:
            engine = self.find(str(ref))
            document = await self.runtime.inspect(engine.container_id) if engine else None
            if document is None:
                missing.append(str(ref))
            else:
                found.append(redact_inspection(document))
        return Done(self._state(), {"containers": found, "missing": missing})

    # --- engines -----------------------------------------------------------------------------

    def find(self, ref: str) -> PoolEngine | None:
        """An engine by full id, unique id prefix (12 or more characters) or container name."""
        if not ref:
            return None
        engine = self.engines.get(ref)
        if engine is not None:
            return engine
        matches = [e for e in self.engines.values()
                   if (len(ref) >= 12 and e.container_id.startswith(ref)) or e.container_name == ref]
        return matches[0] if len(matches) == 1 else None

    async def retire(self, engine: PoolEngine, reason: str) -> None:
        """Remove an engine; its ports go back and its streams end."""
        await self.runtime.remove(engine.container_id)
        self._forget(engine, reason)

    def _forget(self, engine: PoolEngine, reason: str) -> None:
        if self.engines.pop(engine.container_id, None) is None:
            return
        release_ports(self.ports, {"hostHttp": engine.port or None, "hostHttps": engine.host_https_port,
                                   "host": engine.host_ports, "http": engine.container_http_port,
                                   "https": engine.container_https_port})
        self._failures.pop(engine.container_id, None)
        self._started_at.pop(engine.container_id, None)
        ended = list(engine.streams)
        for stream_id in ended:
            self._end_stream(stream_id, f"engine {reason}")
        log.info("engine retired", pool=self.pool_id, container=engine.container_name, reason=reason,
                 streams_ended=len(ended))
        self._changed(True)

    def _busy(self, container_id: str) -> bool:
        engine = self.engines.get(container_id)
        return engine is not None and bool(engine.streams)

    def _idle_longest_first(self) -> list[PoolEngine]:
        idle = [e for e in self.engines.values() if not self._busy(e.container_id)]
        return sorted(idle, key=lambda e: e.last_stream_usage or e.first_seen)

    async def collect_idle(self, force_grace: bool) -> list[str]:
        """Remove idle engines past the grace period, keeping the floor: ``minReplicas``
        engines, and ``minFree`` of them without a stream."""
        now = utcnow()
        busy = sum(1 for e in self.engines.values() if self._busy(e.container_id))
        keep = max(self.spec.min_replicas, busy + self.spec.min_free)
        removed: list[str] = []
        for engine in self._idle_longest_first():
            if len(self.engines) <= keep:
                break
            idle_for = (now - (engine.last_stream_usage or engine.first_seen)).total_seconds()
            if not force_grace and idle_for < self.spec.idle_grace_s:
                continue
            await self.retire(engine, "collected when idle")
            removed.append(engine.container_id)
        return removed

    def _refresh_usage(self) -> None:
        """Every engine's list of streams, from the streams (after a restart)."""
        for engine in self.engines.values():
            engine.streams = []
        for stream_id, stream in self.streams.items():
            self._use(stream.container_id, stream_id, True)

    def _use(self, container_id: str, stream_id: str, playing: bool) -> None:
        engine = self.engines.get(container_id)
        if engine is None:
            return
        if playing and stream_id not in engine.streams:
            engine.streams.append(stream_id)
        elif not playing and stream_id in engine.streams:
            engine.streams.remove(stream_id)

    # --- streams ---------------------------------------------------------------------------

    def on_stream_events(self, outcome: Outcome) -> None:
        """Gateways recorded streams starting or ending on the pool's engines."""
        events = outcome.details.get("events")
        for event in events if isinstance(events, list) else ():
            try:
                state = StreamState.model_validate(event["stream"])
            except (KeyError, TypeError, ValidationError):
                continue  # the pool's own ends (``streamId``) were applied when they were sent
            previous = self.streams.pop(state.id, None)
            if previous is not None:
                self._use(previous.container_id, state.id, False)
            if state.status == "started":
                self.streams[state.id] = ActiveStream(state.container_id, state.stat_url, state.started_at)
                self._use(state.container_id, state.id, True)
            engine = self.engines.get(state.container_id)
            if engine is not None:
                engine.last_stream_usage = utcnow()
        self._changed(False)  # streams come in bursts: their announcement may wait a moment

    def _end_stream(self, stream_id: str, reason: str) -> None:
        """A stream the pool knows has ended (its engine is gone or forgot it): said as the
        gateways say it, in an ``ev.ready.stream-events.<pool>`` batch of its own."""
        active = self.streams.pop(stream_id, None)
        if active is None:
            return
        asyncio.ensure_future(self._announce(keys.STREAM_EVENTS, {"events": [
            {"event": "ended", "streamId": stream_id, "reason": reason, "containerId": active.container_id}]}))
        self._use(active.container_id, stream_id, False)

    async def _announce(self, signal: str, details: dict[str, Any]) -> None:
        outcome = Outcome(correlation_id=new_id(), idempotency_key=new_id(), signal=signal,
                          scope=Scope(swarm_id=self.pool_id), result="success", state=self._state(), details=details)
        try:
            await self.bus.publish(outcome.routing_key(), outcome)
        except Exception:
            log.exception("pool event not published", pool=self.pool_id, signal=signal)

    # --- loops -------------------------------------------------------------------------------

    async def _forever(self, what: str, interval_s: Callable[[], float], step: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(f"pool {what} failed", pool=self.pool_id)
            await asyncio.sleep(interval_s())

    async def _maintain_forever(self) -> None:
        await self._forever("maintenance", lambda: MAINTAIN_INTERVAL_S, self._maintain)

    async def _maintain(self) -> None:
        """The floor, then idle collection past the grace period."""
        free = sum(1 for e in self.engines.values() if not self._busy(e.container_id)) + self.provisioning
        missing = max(self.spec.min_replicas - len(self.engines) - self.provisioning, self.spec.min_free - free)
        missing = min(missing, self.spec.max_replicas - len(self.engines) - self.provisioning)
        if missing > 0 and not self._scale_lock.locked():
            async with self._scale_lock:
                await self._scale_to(len(self.engines) + self.provisioning + missing)
        if not self._scale_lock.locked():
            async with self._scale_lock:
                await self.collect_idle(force_grace=False)
        await self._clean_caches()

    async def _probe_forever(self) -> None:
        await self._forever("health probe", lambda: FIRST_PROBE_INTERVAL_S if self._started_at
                            else min(self.spec.health.interval_s, MAINTAIN_INTERVAL_S), self._probe_due)

    async def _probe_due(self) -> None:
        """Docker's view of the engines once per interval; a probe of each engine due (a new
        one at once and often, until it answers); then one replacement if one is unhealthy."""
        loop, now = asyncio.get_running_loop(), utcnow()
        interval = self.spec.health.interval_s
        if loop.time() - self._last_listing >= interval:
            self._last_listing = loop.time()
            await self._refresh_from_docker()
        due = [e for e in self.engines.values() if e.container_id in self._started_at
               or e.last_health_check is None or (now - e.last_health_check).total_seconds() >= interval]
        await asyncio.gather(*(self._probe(e) for e in due))
        await self._replace_unhealthy()

    def _on_docker_event(self, action: str, container_id: str) -> None:
        if action in DOCKER_ACTIONS and container_id in self.engines and (self._listing is None or self._listing.done()):
            self._listing = asyncio.ensure_future(self._refresh_logged())

    async def _refresh_logged(self) -> None:
        try:
            await self._refresh_from_docker()
        except Exception:
            log.exception("pool listing failed", pool=self.pool_id)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _until_first_answer(self, engine: PoolEngine) -> None:
        """A new engine is probed at once and often, so it is listed healthy as soon as it
        answers (the probe loop takes over after its first answer or the start-up timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.startup_timeout_s
        while engine.container_id in self._started_at and loop.time() < deadline:
            if engine.container_id not in self.engines:
                return
            if await self._answers(engine, self.spec.health.path):
                self._mark_healthy(engine)
                return
            await asyncio.sleep(NEW_ENGINE_PROBE_S)

    async def _refresh_from_docker(self) -> None:
        listed = {i.id: i for i in await self.runtime.list(filter_for(kind="engine", swarm_id=self.pool_id,
                                                                      owner=self.owner))}
        for engine in list(self.engines.values()):
            info = listed.get(engine.container_id)
            if info is None:
                self._forget(engine, "gone from Docker")
            elif info.state != engine.container_state:
                engine.container_state = info.state
                self._changed(True)

    async def _probe(self, engine: PoolEngine) -> None:
        healthy = engine.container_state == "running"
        if healthy and engine.kind == "acestream":
            healthy = await self._answers(engine, self.spec.health.path)
        if healthy:
            self._mark_healthy(engine)
            return
        engine.last_health_check = utcnow()
        failures = self._failures[engine.container_id] = self._failures.get(engine.container_id, 0) + 1
        started = self._started_at.get(engine.container_id)
        starting = started is not None and asyncio.get_running_loop().time() - started < self.spec.startup_timeout_s
        if engine.container_state != "running" or (not starting and failures >= self.spec.health.failures):
            self._started_at.pop(engine.container_id, None)
            self._set_health(engine, "unhealthy")

    def _mark_healthy(self, engine: PoolEngine) -> None:
        now = utcnow()
        engine.last_health_check = engine.last_seen = now
        self._failures.pop(engine.container_id, None)
        self._started_at.pop(engine.container_id, None)
        self._set_health(engine, "healthy")

    def _set_health(self, engine: PoolEngine, health: str) -> None:
        if engine.health_status != health:
            engine.health_status = health  # type: ignore[assignment]
            log.info("engine health", pool=self.pool_id, container=engine.container_name, health=health)
            self._changed(True)

    async def _answers(self, engine: PoolEngine, path: str) -> bool:
        assert self._http is not None
        try:
            async with self._http.get(self._engine_url(engine) + path) as response:
                if response.status >= 400:
                    return False
                body = await response.json(content_type=None)
                return not (isinstance(body, dict) and body.get("error"))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return False

    def _engine_url(self, engine: PoolEngine) -> str:
        if self.spec.probe_address == "container" and engine.ip and engine.container_http_port:
            return f"http://{engine.ip}:{engine.container_http_port}"
        return f"http://{engine.host}:{engine.port}"

    async def _replace_unhealthy(self) -> None:
        """One unhealthy engine per cooldown: its successor first, then the engine itself."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_replacement < self.spec.replace_cooldown_s:
            return
        unhealthy = [e for e in self.engines.values()
                     if e.health_status == "unhealthy" and e.container_id not in self._replacing]
        if not unhealthy:
            return
        old = unhealthy[0]
        self._last_replacement = loop.time()
        self._replacing.add(old.container_id)
        try:
            info = await self.runtime.get(old.container_id)
            made_from = request_of(info.labels) if info else None
            kind, request = made_from or (old.kind, {})
            if kind == "acestream":
                request.pop("host_port", None)  # the old engine still holds it
            try:
                new = await self.provision(kind, request, "replace", replacing=True)
            except Failure as failure:
                log.warning("unhealthy engine not replaced", pool=self.pool_id, container=old.container_name,
                            code=failure.code, reason=failure.message)
                return
            await self.retire(old, f"replaced by {new.container_name} (unhealthy)")
        finally:
            self._replacing.discard(old.container_id)

    async def _clean_caches(self) -> None:
        """Each engine idle for ``cache.idleS`` gets its cache emptied once per idle spell."""
        path = self.spec.cache.path
        if not path:
            return
        now = utcnow()
        for engine in list(self.engines.values()):
            idle_since = engine.last_stream_usage or engine.first_seen
            if (self._busy(engine.container_id) or engine.container_state != "running"
                    or (now - idle_since).total_seconds() < self.spec.cache.idle_s
                    or (engine.last_cache_cleanup is not None and engine.last_cache_cleanup >= idle_since)):
                continue
            script = f'du -sb "{path}" 2>/dev/null | cut -f1; find "{path}" -mindepth 1 -delete 2>/dev/null; true'
            try:
                code, output = await self.runtime.exec(engine.container_id, ["sh", "-c", script])
            except ContainerRuntimeError as exc:
                log.warning("cache clean-up failed", pool=self.pool_id, container=engine.container_name, error=str(exc))
                continue
            size = output.strip().splitlines()[0] if output.strip() else ""
            engine.cache_size_bytes = int(size) if size.isdigit() else 0
            engine.last_cache_cleanup = utcnow()
            log.info("engine cache cleaned", pool=self.pool_id, container=engine.container_name,
                     bytes=engine.cache_size_bytes, exit_code=code)
            self._changed(True)

    async def _collect_forever(self) -> None:
        await self._forever("stats collection", lambda: self.spec.stats_interval_s, self._collect)

    async def _collect(self) -> None:
        """One round: every started stream's stat URL, side by side; one event for the round."""
        if not self.streams:
            return
        gate = asyncio.Semaphore(COLLECT_CONCURRENCY)
        stats: list[dict[str, Any]] = []
        errors = 0

        async def one(stream_id: str, stream: ActiveStream) -> None:
            nonlocal errors
            async with gate:
                snapshot, forgotten = await self._stat(stream)
            if forgotten:
                self._end_stream(stream_id, "the engine no longer knows the session")
            elif snapshot is None:
                errors += 1
            else:
                stats.append(StreamStats(stream_id=stream_id, snapshot=snapshot).to_dict())

        await asyncio.gather(*(one(sid, s) for sid, s in list(self.streams.items())))
        if stats or errors:
            await self._announce(keys.STREAM_STATS, {"stats": stats, "errors": errors})

    async def _stat(self, stream: ActiveStream) -> tuple[StreamStatSnapshot | None, bool]:
        """A snapshot; or (None, True) when the engine says it does not know the session."""
        assert self._http is not None
        if not self._may_poll(stream):
            return None, False
        engine = self.engines[stream.container_id]
        parts = urlsplit(stream.stat_url)
        # The caller's URL names the published port; the controller may reach the engine elsewhere.
        url = self._engine_url(engine) + parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            async with self._http.get(url) as response:
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None, False
        if not isinstance(body, dict):
            return None, False
        payload = body.get("response")
        if not isinstance(payload, dict):
            return None, bool(body.get("error"))
        numbers = {k: payload.get(k) if isinstance(payload.get(k), int) else None
                   for k in ("peers", "speed_down", "speed_up", "downloaded", "uploaded")}
        status = payload.get("status")
        return StreamStatSnapshot(ts=utcnow(), status=status if isinstance(status, str) else None, **numbers), False

    def _may_poll(self, stream: ActiveStream) -> bool:
        """Only stat URLs of the pool's own engines are polled: a caller cannot turn the
        collector towards another service."""
        engine = self.engines.get(stream.container_id)
        if engine is None:
            return False
        try:
            parts = urlsplit(stream.stat_url)
            return parts.port == engine.port and parts.hostname in (engine.host, "localhost", "127.0.0.1")
        except ValueError:
            return False

    async def _vpn_forever(self) -> None:
        if self.spec.vpn_container:
            await self._forever("VPN check", lambda: VPN_INTERVAL_S, self._check_vpn)

    async def _check_vpn(self) -> None:
        """Docker's health of the VPN container, its forwarded port; when Docker says it is
        not healthy, the engines' own view of their network decides."""
        name = self.spec.vpn_container or ""
        document = await self.runtime.inspect(name)
        state = (document or {}).get("State") or {}
        health = ((state.get("Health") or {}).get("Status") or "unknown") if document else "unknown"
        status = state.get("Status") or ("missing" if document is None else "unknown")
        if health != "healthy" and status == "running" and await self._engines_connected():
            health = "healthy"
        now = utcnow()
        vpn = VpnStatus(enabled=True, status=status, container_name=name, container=name,
                        health=health if health in ("healthy", "unhealthy", "starting") else "unknown",
                        connected=health == "healthy", forwarded_port=await self._forwarded_port(document),
                        last_check=now, last_check_at=now)
        changed = vpn.model_dump(exclude={"last_check", "last_check_at"}) != \
            self.vpn.model_dump(exclude={"last_check", "last_check_at"})
        self.vpn = vpn
        if changed:
            log.info("vpn status", pool=self.pool_id, health=vpn.health, connected=vpn.connected)
            self._changed(True)

    async def _engines_connected(self) -> bool:
        path = self.spec.network_probe_path
        if not path:
            return False
        engines = [e for e in self.engines.values() if e.kind == "acestream" and e.container_state == "running"]
        assert self._http is not None
        for engine in engines:
            try:
                async with self._http.get(self._engine_url(engine) + path) as response:
                    body = await response.json(content_type=None)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                continue
            result = body.get("result") if isinstance(body, dict) else None
            if isinstance(result, dict) and result.get("connected") is True:
                return True
        return False

    async def _forwarded_port(self, document: dict[str, Any] | None) -> int | None:
        address = _address_of(document)
        if address is None or self._http is None:
            return None
        try:
            url = f"http://{address}:{self.spec.vpn_control_port}/v1/openvpn/portforwarded"
            async with self._http.get(url) as response:
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None
        port = body.get("port") if isinstance(body, dict) else None
        return port if isinstance(port, int) and port > 0 else None


class _PortInUse(Exception):
    """Docker could not publish a port: something outside the pool listens on it."""


def _with_times(engine: PoolEngine, saved: dict[str, Any]) -> PoolEngine:
    fields = {k: v for k, v in saved.items() if v is not None}
    return PoolEngine.model_validate({**engine.model_dump(mode="json"), **fields}) if fields else engine


def _address_of(document: dict[str, Any] | None) -> str | None:
    networks = ((document or {}).get("NetworkSettings") or {}).get("Networks") or {}
    for _, network in sorted(networks.items()):
        if (network or {}).get("IPAddress"):
            return str(network["IPAddress"])
    return None


def redact_inspection(document: dict[str, Any]) -> dict[str, Any]:
    """Docker's inspection of an engine with its environment's values masked."""
    config = dict(document.get("Config") or {})
    if isinstance(config.get("Env"), list):
        config["Env"] = [f"{item.partition('=')[0]}=***" for item in config["Env"]]
    return {**document, "Config": config}
