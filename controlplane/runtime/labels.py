"""Container labels: the only module that builds or reads them.

Labels are how the control plane recognises its own containers after a restart:
every container it creates carries ``controlplane.managed=true`` and a kind, plus the
swarm, role, instance and owning host controller, and optionally the JSON spec a
controller needs to re-adopt the container.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Mapping

PREFIX = "controlplane."
MANAGED = PREFIX + "managed"
KIND = PREFIX + "kind"
SWARM = PREFIX + "swarm"
ROLE = PREFIX + "role"
INSTANCE = PREFIX + "instance"
OWNER = PREFIX + "owner"
SPEC = PREFIX + "spec"
# A pool's engines: which preset made them and the ports they hold (JSON), so a restarted
# pool controller knows every port in use before it hands out another.
ENGINE_KIND = PREFIX + "engine-kind"
ENGINE_PORTS = PREFIX + "engine-ports"
# What AceStream proxies look for on an engine (by-label queries, container inspection).
ACESTREAM_HTTP_PORT = "acestream.http_port"
ACESTREAM_HTTPS_PORT = "acestream.https_port"
HOST_HTTP_PORT = "host.http_port"
HOST_HTTPS_PORT = "host.https_port"

# The services dashboard: a container the control plane did not start is a service when it
# carries ``controlplane.service=true``. What a service says of itself comes from these labels,
# each falling back on the OCI image annotation of the same meaning where one exists.
SERVICE = PREFIX + "service"
SERVICE_NAME = PREFIX + "service.name"
SERVICE_VERSION = PREFIX + "service.version"
SERVICE_DESCRIPTION = PREFIX + "service.description"
SERVICE_URL = PREFIX + "service.url"
SERVICE_PORT = PREFIX + "service.port"
_SERVICE_FIELDS = {
    "title": (SERVICE_NAME, "org.opencontainers.image.title"),
    "version": (SERVICE_VERSION, "org.opencontainers.image.version"),
    "description": (SERVICE_DESCRIPTION, "org.opencontainers.image.description"),
    "url": (SERVICE_URL, "org.opencontainers.image.url"),
    "port": (SERVICE_PORT,),
}

Kind = Literal["swarm-controller", "bee", "sut", "provisioned", "engine"]
KINDS: tuple[str, ...] = ("swarm-controller", "bee", "sut", "provisioned", "engine")


def managed_labels(
    kind: Kind,
    owner: str,
    swarm_id: str | None = None,
    role: str | None = None,
    instance: str | None = None,
    spec_json: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Labels for a new container; optional parts are left out rather than set empty,
    so that a label filter on them never matches by accident. ``extra`` (a caller's own
    labels) never overrides the control plane's."""
    if kind not in KINDS:
        raise ValueError(f"unknown container kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not owner:
        raise ValueError("owner must not be empty")
    if spec_json is not None:
        json.loads(spec_json)  # refuse a spec that could not be read back when re-adopting
    labels = {key: value for key, value in (extra or {}).items() if not key.startswith(PREFIX)}
    labels.update({MANAGED: "true", KIND: kind, OWNER: owner})
    optional = {SWARM: swarm_id, ROLE: role, INSTANCE: instance, SPEC: spec_json}
    labels.update({key: value for key, value in optional.items() if value is not None})
    return labels


def filter_for(
    kind: Kind | None = None,
    swarm_id: str | None = None,
    owner: str | None = None,
) -> dict[str, str]:
    """Label filter for listing managed containers; always restricted to managed ones
    so that foreign containers on the same engine are never touched."""
    labels = {MANAGED: "true"}
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"unknown container kind {kind!r}; expected one of {', '.join(KINDS)}")
        labels[KIND] = kind
    if swarm_id is not None:
        labels[SWARM] = swarm_id
    if owner is not None:
        labels[OWNER] = owner
    return labels


@dataclass(frozen=True)
class LabelView:
    """Typed reading of a container's labels; absent labels read as None."""

    managed: bool
    kind: str | None
    swarm_id: str | None
    role: str | None
    instance: str | None
    owner: str | None
    spec_json: str | None

    @classmethod
    def from_labels(cls, labels: Mapping[str, str] | None) -> LabelView:
        labels = labels or {}
        return cls(
            managed=labels.get(MANAGED) == "true",
            kind=labels.get(KIND),
            swarm_id=labels.get(SWARM),
            role=labels.get(ROLE),
            instance=labels.get(INSTANCE),
            owner=labels.get(OWNER),
            spec_json=labels.get(SPEC),
        )

    def spec(self) -> Any | None:
        """The decoded spec, or None when absent or unreadable (a foreign or damaged label
        must not stop a controller from listing its other containers)."""
        if self.spec_json is None:
            return None
        try:
            return json.loads(self.spec_json)
        except ValueError:
            return None


def engine_labels(kind: str, ports: Mapping[str, Any]) -> dict[str, str]:
    """A pool engine's own labels: its preset and its ports, also in the AceStream names."""
    labels = {ENGINE_KIND: kind, ENGINE_PORTS: json.dumps(dict(ports), sort_keys=True)}
    if kind == "acestream":
        names = {"http": ACESTREAM_HTTP_PORT, "https": ACESTREAM_HTTPS_PORT, "hostHttp": HOST_HTTP_PORT,
                 "hostHttps": HOST_HTTPS_PORT}
        labels.update({name: str(ports[key]) for key, name in names.items() if ports.get(key) is not None})
    return labels


def engine_ports(labels: Mapping[str, str] | None) -> dict[str, Any]:
    """The ports an engine holds, from its labels; empty when absent or unreadable."""
    try:
        ports = json.loads((labels or {}).get(ENGINE_PORTS, "{}"))
    except ValueError:
        return {}
    return ports if isinstance(ports, dict) else {}


def service_fields(labels: Mapping[str, str] | None) -> dict[str, str]:
    """title, version, description, url and port as the container's labels give them."""
    labels = labels or {}
    found: dict[str, str] = {}
    for field_name, names in _SERVICE_FIELDS.items():
        value = next((labels[name] for name in names if labels.get(name)), None)
        if value is not None:
            found[field_name] = value
    return found
