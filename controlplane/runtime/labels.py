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

Kind = Literal["swarm-controller", "bee", "sut", "provisioned"]
KINDS: tuple[str, ...] = ("swarm-controller", "bee", "sut", "provisioned")


def managed_labels(
    kind: Kind,
    owner: str,
    swarm_id: str | None = None,
    role: str | None = None,
    instance: str | None = None,
    spec_json: str | None = None,
) -> dict[str, str]:
    """Labels for a new container; optional parts are left out rather than set empty,
    so that a label filter on them never matches by accident."""
    if kind not in KINDS:
        raise ValueError(f"unknown container kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not owner:
        raise ValueError("owner must not be empty")
    if spec_json is not None:
        json.loads(spec_json)  # refuse a spec that could not be read back when re-adopting
    labels = {MANAGED: "true", KIND: kind, OWNER: owner}
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
