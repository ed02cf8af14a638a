"""Wire models of the services dashboard: what a host controller reports of the containers its
engine runs (``ServiceReport`` on ``ev.ready.service-report.<owner>``), the logs request it
answers, and the figures both sides compute the same way (Docker CLI formulas, log levels).

A service is a container the control plane runs, or one labelled ``controlplane.service=true``
(``runtime.labels``). Its identity is its container; ``name`` survives an update, the id does not.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from controlplane.contract.base import Strict, Wire
from controlplane.contract.models import ActionRequest

ServiceEvent = Literal["service:start", "service:stop", "service:restart", "service:update", "service:error"]


class PortMapping(Wire):
    internal: int
    external: int | None = None
    protocol: str = "tcp"


class VolumeMapping(Wire):
    source: str
    destination: str
    mode: str = ""


class Sample(Wire):
    """One stats reading of a running container (Docker CLI's formulas, ``stats_figures``)."""

    cpu: float  # percent of one CPU times the CPUs it may use, as ``docker stats`` shows it
    memory: float  # percent of its memory limit
    memory_usage: int  # bytes, page cache excluded
    memory_limit: int
    sampled_at: datetime


class ServiceState(Wire):
    """One container as its host controller last saw it."""

    container_id: str
    name: str  # the container's name
    title: str  # ``controlplane.service.name`` or OCI title, else the container's name
    host: str  # owner id of the host controller that reports it
    state: str  # Docker's: created, running, paused, restarting, removing, exited, dead
    health: str  # healthy, unhealthy, starting, none
    exit_code: int | None = None
    oom_killed: bool = False
    image: str
    image_id: str
    version: str | None = None
    description: str | None = None
    url: str | None = None
    port: int | None = None
    created: datetime | None = None
    started_at: datetime | None = None
    restart_count: int = 0
    kind: str | None = None  # the control plane's kind label; None for an opted-in container
    swarm_id: str | None = None
    ports: list[PortMapping] = Field(default_factory=list)
    volumes: list[VolumeMapping] = Field(default_factory=list)
    env: list[str] = Field(default_factory=list)  # "KEY=VALUE", values masked unless allowed

    @property
    def status(self) -> str:
        return "running" if self.state == "running" else self.state if self.state in ("paused", "restarting") \
            else "stopped"


class Transition(Wire):
    """Something that happened to a service, as a webhook event: ``event_id`` is the same on
    every gateway that hears of it, so each webhook gets it once."""

    event: ServiceEvent
    event_id: str
    container_id: str
    name: str
    at: datetime
    reason: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class ServiceReport(Wire):
    """What a host controller saw since its last report. ``full``: ``services`` is everything
    it reports, and a service absent from it is gone."""

    host: str
    full: bool = False
    services: list[ServiceState] = Field(default_factory=list)
    removed: list[str] = Field(default_factory=list)  # container ids
    samples: dict[str, Sample] = Field(default_factory=dict)  # container id -> its newest reading
    transitions: list[Transition] = Field(default_factory=list)


class LogsRequest(Strict):
    container_id: str
    lines: int = Field(100, ge=1, le=10_000)
    since: datetime | None = None


class LogLine(Wire):
    timestamp: str | None
    message: str
    level: str
    stream: str = "stdout"


# --- figures --------------------------------------------------------------------------------


def stats_figures(stats: dict[str, Any], previous: dict[str, Any] | None = None) -> tuple[float, int, int, float]:
    """CPU percent, memory usage, memory limit and memory percent of one ``docker stats``
    reading, as the Docker CLI computes them. ``previous``: an earlier reading to take the
    CPU delta from, for a one-shot reading whose ``precpu_stats`` is empty."""
    cpu_stats = stats.get("cpu_stats") or {}
    pre = (previous or {}).get("cpu_stats") if previous else stats.get("precpu_stats")
    pre = pre or {}
    cpu_delta = (cpu_stats.get("cpu_usage") or {}).get("total_usage", 0) - \
        (pre.get("cpu_usage") or {}).get("total_usage", 0)
    system_delta = (cpu_stats.get("system_cpu_usage") or 0) - (pre.get("system_cpu_usage") or 0)
    cpus = cpu_stats.get("online_cpus") or len((cpu_stats.get("cpu_usage") or {}).get("percpu_usage") or ()) or 1
    cpu = cpu_delta / system_delta * cpus * 100.0 if cpu_delta > 0 and system_delta > 0 and pre else 0.0
    memory = stats.get("memory_stats") or {}
    usage, limit = int(memory.get("usage") or 0), int(memory.get("limit") or 0)
    detail = memory.get("stats") or {}
    # Page cache the kernel may drop is not the container's: cgroup v1 names it
    # total_inactive_file, v2 inactive_file.
    for cache_key in ("total_inactive_file", "inactive_file"):
        if cache_key in detail and detail[cache_key] < usage:
            usage -= int(detail[cache_key])
            break
    percent = usage / limit * 100.0 if limit else 0.0
    return round(cpu, 2), usage, limit, round(percent, 2)


_LEVEL_WORD = re.compile(r"\b(trace|debug|info|notice|warn(?:ing)?|error|err|critical|crit|fatal|panic)\b",
                         re.IGNORECASE)
_LEVELS = {"warn": "warning", "err": "error", "crit": "critical", "notice": "info", "panic": "fatal"}


def log_level(message: str) -> str:
    """The level a log line states: a JSON line's ``level``/``levelname``/``severity``, else the
    first level word near its start; ``info`` when it says none."""
    text = message.lstrip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            for key in ("level", "levelname", "severity", "lvl"):
                if isinstance(parsed.get(key), str):
                    return _normal_level(parsed[key])
    found = _LEVEL_WORD.search(text[:64])
    return _normal_level(found.group(1)) if found else "info"


def _normal_level(word: str) -> str:
    word = word.lower()
    return _LEVELS.get(word, word)


def parse_log_line(raw: str, stream: str = "stdout") -> LogLine:
    """A line of ``docker logs --timestamps``: its RFC 3339 timestamp, message and level."""
    stamp, space, message = raw.partition(" ")
    if not space or not stamp[:4].isdigit() or "T" not in stamp:
        stamp, message = "", raw
    return LogLine(timestamp=_short_stamp(stamp) if stamp else None, message=message, level=log_level(message),
                   stream=stream)


def _short_stamp(stamp: str) -> str:
    """Docker's nanosecond stamps cut to microseconds: ``2025-05-05T10:00:00.123456Z``."""
    head, dot, rest = stamp.partition(".")
    if not dot:
        return stamp
    digits = rest.rstrip("Z")
    return f"{head}.{digits[:6]}Z" if rest.endswith("Z") else stamp


class ServiceAction(ActionRequest):
    """A lifecycle action as the gateway files it: the service (its container's name, which an
    update keeps) is part of the request, so a key reused for another service is refused rather
    than replayed, and a retried update is answered again though its container is new."""

    service: str
