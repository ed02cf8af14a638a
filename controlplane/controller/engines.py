"""A pool's engines in Docker: the container spec a provision becomes, and the engine read
back from a container's labels after a restart.

An engine's labels say everything a restarted pool controller needs: its preset, the ports
it holds, and the request it was provisioned from (``controlplane.spec``), which is also what
a replacement is provisioned from.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from controlplane.config import Settings
from controlplane.contract import keys
from controlplane.contract.models import utcnow
from controlplane.contract.pool import AceProvisionRequest, PoolEngine, PoolSpec, ProvisionRequest, acestream_env
from controlplane.controller.ports import PortAllocator
from controlplane.runtime.labels import (
    ENGINE_KIND,
    PREFIX,
    SPEC,
    engine_labels,
    engine_ports,
    managed_labels,
)
from controlplane.runtime.model import ContainerInfo, ContainerSpec

EngineKind = Literal["acestream", "generic"]


@dataclass
class Provision:
    """One engine about to be started: its spec and the ports it holds until it is gone."""

    kind: EngineKind
    spec: ContainerSpec
    ports: dict[str, Any] = field(default_factory=dict)  # "hostHttp", "http", "https", "hostHttps", "host"

    def release(self, allocator: PortAllocator) -> None:
        release_ports(allocator, self.ports)


def parse_request(kind: EngineKind, raw: dict[str, Any]) -> AceProvisionRequest | ProvisionRequest:
    model = AceProvisionRequest if kind == "acestream" else ProvisionRequest
    return model.model_validate(raw)


def plan_provision(settings: Settings, pool_id: str, pool: PoolSpec, owner: str, allocator: PortAllocator,
                   kind: EngineKind, request: AceProvisionRequest | ProvisionRequest) -> Provision:
    """Take the engine's ports and build its container; the caller releases the ports when the
    engine does not come up. Raises the allocator's ``PortsExhausted`` / ``PortTaken``."""
    ports: dict[str, Any] = {}
    try:
        if isinstance(request, AceProvisionRequest):
            ports["hostHttp"] = (allocator.take_exact("host", request.host_port) if request.host_port
                                 else allocator.take("host"))
            ports["http"] = allocator.take("http")
            ports["https"] = allocator.take("https", avoid=(ports["http"],))
            published: dict[str, int | None] = {f"{ports['http']}/tcp": ports["hostHttp"]}
            if pool.map_https:
                ports["hostHttps"] = allocator.take("host")
                published[f"{ports['https']}/tcp"] = ports["hostHttps"]
            env = acestream_env({**pool.env, **request.env}, ports["http"], ports["https"])
        else:
            published = {}
            ports["host"] = []  # filled as they are taken, so a failure half-way gives them back
            for port, host_port in request.ports.items():
                taken = allocator.take_exact("host", host_port) if host_port else allocator.take("host")
                ports["host"].append(taken)
                published[port if "/" in port else f"{port}/tcp"] = taken
            ports["host"].sort()
            first = next(iter(published.values()), None)
            if first is not None:
                ports["hostHttp"] = first
            env = {**pool.env, **request.env}
    except Exception:
        release_ports(allocator, ports)
        raise
    part = f"{kind}-{uuid.uuid4().hex[:10]}"  # never a name race between concurrent provisions
    labels = {**managed_labels("engine", owner, swarm_id=pool_id, role="engine", instance=part, extra=request.labels,
                               spec_json=json.dumps({"kind": kind, "request": request.model_dump(mode="json")},
                                                    sort_keys=True)),
              **engine_labels(kind, ports)}
    spec = ContainerSpec(
        name=keys.container_name(owner, pool_id, part),
        image=request.image or pool.image or settings.ace_image,
        labels=labels,
        env=env,
        network=pool.network,
        ports=published,
        publish_address=pool.publish_address,
    )
    return Provision(kind, spec, ports)


def release_ports(allocator: PortAllocator, ports: dict[str, Any]) -> None:
    allocator.release("host", ports.get("hostHttp"))
    allocator.release("host", ports.get("hostHttps"))
    for port in ports.get("host") or ():
        allocator.release("host", port)
    allocator.release("http", ports.get("http"))
    allocator.release("https", ports.get("https"))


def hold_ports(allocator: PortAllocator, ports: dict[str, Any]) -> None:
    for key in ("hostHttp", "hostHttps"):
        if isinstance(ports.get(key), int):
            allocator.hold("host", ports[key])
    for port in ports.get("host") or ():
        if isinstance(port, int):
            allocator.hold("host", port)
    for key in ("http", "https"):
        if isinstance(ports.get(key), int):
            allocator.hold(key, ports[key])  # type: ignore[arg-type]


def engine_from(info: ContainerInfo, pool: PoolSpec, first_seen: datetime | None = None) -> PoolEngine:
    """The engine a container is, from its labels and its state as Docker reports it."""
    ports = engine_ports(info.labels)
    now = utcnow()
    kind: EngineKind = "generic" if info.labels.get(ENGINE_KIND) == "generic" else "acestream"
    host = pool.publish_address if pool.publish_address not in ("0.0.0.0", "::") else "127.0.0.1"
    return PoolEngine(
        container_id=info.id, container_name=info.name, host=host, port=int(ports.get("hostHttp") or 0),
        labels={k: v for k, v in info.labels.items() if not k.startswith(PREFIX)},
        first_seen=first_seen or now, last_seen=now, kind=kind, container_state=info.state,
        health_status="unknown" if info.state == "running" else "unhealthy",
        container_http_port=ports.get("http"), container_https_port=ports.get("https"),
        host_https_port=ports.get("hostHttps"), host_ports=_host_ports(ports), ip=info.ip)


def request_of(info_labels: dict[str, str]) -> tuple[EngineKind, dict[str, Any]] | None:
    """The provision request an engine was made from (for its replacement)."""
    try:
        spec = json.loads(info_labels.get(SPEC, ""))
        return spec["kind"], dict(spec["request"])
    except (ValueError, KeyError, TypeError):
        return None


def _host_ports(ports: dict[str, Any]) -> list[int]:
    found = {p for p in (ports.get("hostHttp"), ports.get("hostHttps")) if isinstance(p, int)}
    found |= {p for p in ports.get("host") or () if isinstance(p, int)}
    return sorted(found)
