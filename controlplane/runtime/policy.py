"""What launched containers may do, checked by the runtime for every container whatever path
asked for it (a REST call, a signal published straight to the broker, a re-adoption).

Each container's kind (from its labels) decides which images it may run and what it may
mount: only swarm-controllers get the Docker socket. Host network, privileged mode and
other bind mounts are refused unless the operator allows them. Every container gets the
same hardening: memory, CPU and pids limits, all capabilities dropped, no new privileges,
a non-root user, bounded logs, and a read-only root filesystem for the project's image.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from controlplane.runtime.errors import PolicyViolation
from controlplane.runtime.labels import KINDS, LabelView
from controlplane.runtime.model import ContainerSpec

if TYPE_CHECKING:
    from controlplane.config import Settings
    from controlplane.scenarios import Catalog

# The project image's own system under test; any other SUT command needs the operator's consent.
DEFAULT_SUT_COMMAND = ("python", "-m", "bees.sut")
CONTROLLER_KIND = "swarm-controller"


@dataclass(frozen=True)
class Limits:
    memory_mb: int = 512
    cpus: float = 1.0
    pids: int = 256
    log_max_size: str = "10m"
    log_max_files: int = 3


@dataclass(frozen=True)
class RuntimePolicy:
    # Images each kind may run; a kind not listed runs nothing.
    allowed_images: Mapping[str, frozenset[str]] = field(default_factory=dict)
    allow_host_network: bool = False
    allow_privileged: bool = False
    allowed_mounts: tuple[str, ...] = ()  # host paths; each allows itself and what lies beneath it
    allow_sut_command: bool = False
    docker_socket: str = "/var/run/docker.sock"  # host path; mounted into swarm-controllers only
    limits: Limits = Limits()
    user: str = "10001:10001"  # empty: the image's own user (an operator's weakening)
    read_only_images: frozenset[str] = frozenset()  # images known to run on a read-only root

    @classmethod
    def from_settings(cls, settings: Settings, catalog: Catalog | None = None) -> RuntimePolicy:
        if catalog is None:
            from controlplane.scenarios import load_catalog

            catalog = load_catalog(settings.scenarios_dir)
        templates = list(catalog.templates.values())
        workloads = frozenset(settings.allowed_images) or (
            frozenset(image for t in templates for image in t.workload_images()) | {settings.project_image})
        if settings.ace_pool_id:
            workloads |= {settings.ace_image}  # the operator named it for the engine pool
        controllers = frozenset(t.controller_image for t in templates if t.controller_image) | {settings.project_image}
        return cls(
            allowed_images={"bee": workloads, "sut": workloads, "provisioned": workloads, "engine": workloads,
                            CONTROLLER_KIND: controllers},
            allow_host_network=settings.allow_host_network,
            allow_privileged=settings.allow_privileged,
            allowed_mounts=tuple(settings.allowed_mounts),
            allow_sut_command=settings.allow_sut_command,
            docker_socket=urlparse(settings.docker_url).path or "/var/run/docker.sock",
            limits=Limits(settings.container_memory_mb, settings.container_cpus, settings.container_pids,
                          settings.container_log_max_size, settings.container_log_max_files),
            user=settings.container_user,
            read_only_images=frozenset({settings.project_image}),
        )

    def image_allowed(self, kind: str, image: str) -> bool:
        return image in self.allowed_images.get(kind, frozenset())

    def check(self, spec: ContainerSpec) -> None:
        """Raise ``PolicyViolation`` listing everything refused and the setting that would allow it."""
        self.check_all((spec,))

    def check_all(self, specs: Iterable[ContainerSpec]) -> None:
        """``check`` for a whole plan at once, before any of it runs."""
        images: list[str] = []
        others: list[str] = []
        for spec in specs:
            found_images, found_others = self.problems(spec)
            images += [f"container {spec.name!r}: {p}" for p in found_images]
            others += [f"container {spec.name!r}: {p}" for p in found_others]
        if images or others:
            raise PolicyViolation("; ".join(images + others), code="policy-refused" if others else "image-not-allowed")

    def problems(self, spec: ContainerSpec) -> tuple[list[str], list[str]]:
        """What ``spec`` asks that is refused: (image problems, every other problem)."""
        kind = LabelView.from_labels(spec.labels).kind
        if kind not in KINDS:
            return [], [f"kind {kind!r} is not one the control plane runs"]
        images = [] if self.image_allowed(kind, spec.image) else [
            f"image {spec.image!r} is not allowed for a {kind} (see CP_ALLOWED_IMAGES)"]
        others = self.privilege_problems(spec, kind)
        if kind == "sut" and spec.command is not None and tuple(spec.command) != DEFAULT_SUT_COMMAND \
                and not self.allow_sut_command:
            others.append("a system under test with a command of its own is refused "
                          "(set CP_ALLOW_SUT_COMMAND=true to allow it)")
        return images, others

    def privilege_problems(self, spec: ContainerSpec, kind: str) -> list[str]:
        """What ``spec`` asks of the host that is refused: its network, privileged mode, mounts
        (the Docker socket for swarm-controllers only). Also what a recreated container (a
        service update) is checked against, whoever first ran it."""
        problems: list[str] = []
        if spec.network == "host" and not self.allow_host_network:
            problems.append("host network is refused (set CP_ALLOW_HOST_NETWORK=true to allow it)")
        if spec.privileged and not self.allow_privileged:
            problems.append("privileged mode is refused (set CP_ALLOW_PRIVILEGED=true to allow it)")
        for mount in spec.mounts:
            if self.is_docker_socket(mount.source):
                if kind != CONTROLLER_KIND:
                    problems.append(f"the Docker socket is mounted into swarm-controllers only, not a {kind}")
            elif not self.mount_allowed(mount.source):
                problems.append(f"mount of {mount.source!r} is refused (not listed in CP_ALLOWED_MOUNTS)")
        return problems

    def is_docker_socket(self, source: str) -> bool:
        return posixpath.normpath(source) == posixpath.normpath(self.docker_socket)

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

    def hardening(self, spec: ContainerSpec) -> dict[str, Any]:
        """Arguments of ``create_host_config`` that every container gets."""
        limits = self.limits
        options: dict[str, Any] = {
            "mem_limit": f"{limits.memory_mb}m",
            "memswap_limit": f"{limits.memory_mb}m",  # no swap beyond the memory limit
            "nano_cpus": int(limits.cpus * 1e9),
            "pids_limit": limits.pids,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges:true"],
            "log_config": {"Type": "json-file",
                           "Config": {"max-size": limits.log_max_size, "max-file": str(limits.log_max_files)}},
        }
        if spec.image in self.read_only_images:
            options["read_only"] = True
            options["tmpfs"] = {"/tmp": "rw,nosuid,nodev,size=64m"}
        socket_mounted = any(self.is_docker_socket(m.source) for m in spec.mounts)
        if socket_mounted and self.user:
            group = _group_of(self.docker_socket)
            if group is not None:
                options["group_add"] = [str(group)]  # the non-root user reaches the engine through its group
        return options


def _group_of(path: str) -> int | None:
    try:
        return os.stat(path).st_gid
    except OSError:
        return None
