"""The services read model: every host controller's reports, kept in memory, and the views the
document's endpoints answer with. Nothing here waits on Docker or the store."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from controlplane.contract.models import utcnow
from controlplane.contract.services import Sample, ServiceReport, ServiceState

Filter = Literal["running", "stopped", "all"]
# A reference shorter than this is not taken as an id prefix (it would match too much by chance).
MIN_PREFIX = 4


class Ambiguous(LookupError):
    """A short id that more than one service's id starts with."""


@dataclass
class ServicesView:
    services: dict[str, ServiceState] = field(default_factory=dict)  # by container id
    samples: dict[str, Sample] = field(default_factory=dict)
    by_name: dict[str, str] = field(default_factory=dict)  # container name -> id

    def apply(self, report: ServiceReport) -> None:
        if report.full:
            for gone in [cid for cid, s in self.services.items() if s.host == report.host]:
                self._forget(gone)
        for removed in report.removed:
            self._forget(removed)
        for state in report.services:
            previous = self.by_name.get(state.name)
            if previous is not None and previous != state.container_id:
                self._forget(previous)  # the name now belongs to its new container (an update)
            self.services[state.container_id] = state
            self.by_name[state.name] = state.container_id
        for container_id, sample in report.samples.items():
            if container_id in self.services:
                self.samples[container_id] = sample

    def _forget(self, container_id: str) -> None:
        state = self.services.pop(container_id, None)
        self.samples.pop(container_id, None)
        if state is not None and self.by_name.get(state.name) == container_id:
            del self.by_name[state.name]

    def find(self, ref: str) -> ServiceState | None:
        """A service by full id, name, or unique id prefix; ``Ambiguous`` for a shared prefix."""
        ref = ref.lstrip("/")
        found = self.services.get(ref) or self.services.get(self.by_name.get(ref, ""))
        if found is not None or len(ref) < MIN_PREFIX:
            return found
        matches = [s for cid, s in self.services.items() if cid.startswith(ref)]
        if len(matches) > 1:
            raise Ambiguous(f"{len(matches)} services' ids start with {ref!r}")
        return matches[0] if matches else None

    def count(self, status: str) -> int:
        return sum(1 for s in self.services.values() if s.status == status)

    def listed(self, which: Filter) -> list[ServiceState]:
        states = sorted(self.services.values(), key=lambda s: s.name)
        if which == "all":
            return states
        return [s for s in states if (s.status == "running") == (which == "running")]

    # --- views ------------------------------------------------------------------------------

    def summary(self, state: ServiceState, now: datetime | None = None) -> dict[str, Any]:
        """A service as the document's list shows it, with the fields this control plane adds."""
        sample = self.samples.get(state.container_id) if state.status == "running" else None
        return {
            "id": state.name,
            "name": state.title,
            "containerId": state.container_id,
            "shortId": state.container_id[:12],
            "status": state.status,
            "state": state.state,
            "health": state.health,
            "version": state.version,
            "description": state.description,
            "url": state.url,
            "port": state.port,
            "stats": {"cpu": sample.cpu if sample else 0.0, "memory": sample.memory if sample else 0.0,
                      "uptime": uptime(state, now), "restartCount": state.restart_count},
            "kind": state.kind,
            "swarmId": state.swarm_id,
            "host": state.host,
        }

    def detail(self, state: ServiceState) -> dict[str, Any]:
        view = self.summary(state)
        view["details"] = {
            "image": state.image,
            "imageId": state.image_id,
            "created": state.created.isoformat() if state.created else None,
            "startedAt": state.started_at.isoformat() if state.started_at else None,
            "exitCode": state.exit_code,
            "oomKilled": state.oom_killed,
            "ports": [p.to_dict() for p in state.ports],
            "volumes": [v.to_dict() for v in state.volumes],
            "env": list(state.env),
        }
        return view

    def stats(self, state: ServiceState) -> dict[str, Any]:
        sample = self.samples.get(state.container_id) if state.status == "running" else None
        return {
            "cpu": sample.cpu if sample else 0.0,
            "memory": sample.memory if sample else 0.0,
            "memoryUsage": sample.memory_usage if sample else 0,
            "memoryLimit": sample.memory_limit if sample else 0,
            "uptime": uptime(state),
            "restartCount": state.restart_count,
            "timestamp": (sample.sampled_at if sample else utcnow()).isoformat().replace("+00:00", "Z"),
            "sampled": sample is not None,
        }

    def system(self) -> dict[str, Any]:
        """Counts, averages over the running services' newest samples, and health: an error is
        a service unhealthy or stopped by a crash; a warning one starting, restarting or paused."""
        states = list(self.services.values())
        running = [s for s in states if s.status == "running"]
        samples = [self.samples[s.container_id] for s in running if s.container_id in self.samples]
        errors = sum(1 for s in states if s.health == "unhealthy" or s.oom_killed
                     or (s.status == "stopped" and (s.exit_code or 0) != 0))
        warnings = sum(1 for s in states if s.health == "starting" or s.status in ("restarting", "paused"))
        return {
            "services": {"total": len(states), "running": len(running), "stopped": len(states) - len(running)},
            "resources": {
                "avgCpu": round(sum(s.cpu for s in samples) / len(samples), 2) if samples else 0.0,
                "avgMemory": round(sum(s.memory for s in samples) / len(samples), 2) if samples else 0.0,
                "totalMemoryUsage": sum(s.memory_usage for s in samples),
            },
            "health": {"status": "unhealthy" if errors else "degraded" if warnings else "healthy",
                       "warnings": warnings, "errors": errors},
        }


def uptime(state: ServiceState, now: datetime | None = None) -> int:
    if state.status != "running" or state.started_at is None:
        return 0
    return max(0, int(((now or utcnow()) - state.started_at).total_seconds()))
