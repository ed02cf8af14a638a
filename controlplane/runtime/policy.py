"""What launched containers may do: host network, privileged mode and bind mounts are
refused unless the operator allows them in the settings."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING

from controlplane.runtime.errors import PolicyViolation
from controlplane.runtime.model import ContainerSpec

if TYPE_CHECKING:
    from controlplane.config import Settings


@dataclass(frozen=True)
class RuntimePolicy:
    allow_host_network: bool = False
    allow_privileged: bool = False
    allowed_mounts: tuple[str, ...] = ()  # host paths; each allows itself and what lies beneath it

    @classmethod
    def from_settings(cls, settings: Settings) -> RuntimePolicy:
        return cls(
            allow_host_network=settings.allow_host_network,
            allow_privileged=settings.allow_privileged,
            allowed_mounts=tuple(settings.allowed_mounts),
        )

    def check(self, spec: ContainerSpec) -> None:
        """Raise ``PolicyViolation`` listing everything refused and the setting that would allow it."""
        problems: list[str] = []
        if spec.network == "host" and not self.allow_host_network:
            problems.append("host network is refused (set CP_ALLOW_HOST_NETWORK=true to allow it)")
        if spec.privileged and not self.allow_privileged:
            problems.append("privileged mode is refused (set CP_ALLOW_PRIVILEGED=true to allow it)")
        for mount in spec.mounts:
            if not self.mount_allowed(mount.source):
                problems.append(f"mount of {mount.source!r} is refused (not listed in CP_ALLOWED_MOUNTS)")
        if problems:
            raise PolicyViolation(f"container {spec.name!r}: " + "; ".join(problems))

    def mount_allowed(self, source: str) -> bool:
        """Only absolute paths count; normalising first keeps ``..`` from escaping an allowed path."""
        if not posixpath.isabs(source):
            return False
        path = posixpath.normpath(source)
        for allowed in self.allowed_mounts:
            root = posixpath.normpath(allowed)
            if path == root or path.startswith(root.rstrip("/") + "/"):
                return True
        return False
