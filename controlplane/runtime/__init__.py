"""Container runtime: the Docker engine behind an asyncio API, the launch policy, and labels."""

from controlplane.runtime.docker import DockerRuntime
from controlplane.runtime.errors import ContainerRuntimeError, ImageMissing, PolicyViolation, RuntimeUnavailable
from controlplane.runtime.model import ContainerInfo, ContainerSpec, Mount
from controlplane.runtime.policy import RuntimePolicy

__all__ = [
    "ContainerInfo",
    "ContainerRuntimeError",
    "ContainerSpec",
    "DockerRuntime",
    "ImageMissing",
    "Mount",
    "PolicyViolation",
    "RuntimePolicy",
    "RuntimeUnavailable",
]
