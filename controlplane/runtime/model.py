"""What the runtime is asked to run (``ContainerSpec``) and what it reports back (``ContainerInfo``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_NEVER_STARTED = "0001-01-01T00:00:00Z"


@dataclass(frozen=True)
class Mount:
    """A bind mount of a host path; allowed only for paths listed in CP_ALLOWED_MOUNTS."""

    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class ContainerSpec:
    """A container by name; the name is its identity, which makes ``ensure_running`` idempotent."""

    name: str
    image: str
    labels: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    command: list[str] | None = None
    network: str | None = None  # "host", "bridge", "none" or a network name; None = engine default
    mounts: tuple[Mount, ...] = ()
    privileged: bool = False
    ports: dict[str, int | None] = field(default_factory=dict)  # "8080/tcp" -> host port, None = random
    publish_address: str = "127.0.0.1"  # where published ports listen on the host


@dataclass(frozen=True)
class ContainerInfo:
    """A container as the engine last reported it."""

    id: str
    name: str
    image: str
    state: str  # created | running | paused | restarting | removing | exited | dead
    exit_code: int | None  # only once the container has stopped
    labels: dict[str, str]
    started_at: str | None
    ports: dict[str, int | None]  # "8080/tcp" -> published host port, None = not published
    ip: str | None = None  # address on its first network; None with host networking

    @classmethod
    def from_inspect(cls, attrs: dict[str, Any]) -> ContainerInfo:
        """Build from the engine's inspect document."""
        state = attrs.get("State") or {}
        config = attrs.get("Config") or {}
        status = state.get("Status", "unknown")
        started_at = state.get("StartedAt") or None
        return cls(
            id=attrs["Id"],
            name=attrs.get("Name", "").lstrip("/"),
            image=config.get("Image", ""),
            state=status,
            exit_code=state.get("ExitCode") if status in ("exited", "dead") else None,
            labels=dict(config.get("Labels") or {}),
            started_at=None if started_at == _NEVER_STARTED else started_at,
            ports=_published_ports((attrs.get("NetworkSettings") or {}).get("Ports") or {}),
            ip=_first_ip(attrs.get("NetworkSettings") or {}),
        )


    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> ContainerInfo:
        """Build from one entry of the engine's container list, without another call.

        The list has no start time; the exit code is read from its status text
        ("Exited (1) 3 seconds ago"). ``DockerRuntime.get`` inspects when more is needed.
        """
        status = summary.get("State", "unknown")
        exited = _EXIT_CODE.match(summary.get("Status", "")) if status in ("exited", "dead") else None
        ports: dict[str, int | None] = {}
        for port in summary.get("Ports") or ():
            key = f"{port['PrivatePort']}/{port.get('Type', 'tcp')}"
            ports[key] = ports.get(key) or port.get("PublicPort")
        return cls(
            id=summary["Id"],
            name=(summary.get("Names") or [""])[0].lstrip("/"),
            image=summary.get("Image", ""),
            state=status,
            exit_code=int(exited.group(1)) if exited else None,
            labels=dict(summary.get("Labels") or {}),
            started_at=None,
            ports=ports,
            ip=_first_ip(summary.get("NetworkSettings") or {}),
        )


_EXIT_CODE = re.compile(r"Exited \((-?\d+)\)")


def _published_ports(raw: dict[str, list[dict[str, str]] | None]) -> dict[str, int | None]:
    """Reduce the engine's binding lists to one host port per container port."""
    ports: dict[str, int | None] = {}
    for container_port, bindings in raw.items():
        host_ports = [int(b["HostPort"]) for b in bindings or () if b.get("HostPort")]
        ports[container_port] = host_ports[0] if host_ports else None
    return ports


def _first_ip(network_settings: dict[str, Any]) -> str | None:
    for network in sorted((network_settings.get("Networks") or {}).items()):
        address = (network[1] or {}).get("IPAddress")
        if address:
            return str(address)
    return network_settings.get("IPAddress") or None
