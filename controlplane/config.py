"""Every setting of the control plane, in one place.

Values come from environment variables with the ``CP_`` prefix and are validated
once at start-up; a bad value stops the process with a message naming the variable.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from collections.abc import Callable
from typing import Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from controlplane.contract.topology import DEFAULT_TOPOLOGY

T = TypeVar("T")

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CP_", extra="ignore")

    # Broker and store
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    database_url: SecretStr = SecretStr(f"sqlite:///{PROJECT_ROOT / 'var' / 'controlplane.db'}")
    topology_file: Path = DEFAULT_TOPOLOGY
    scenarios_dir: Path = PROJECT_ROOT / "scenarios"

    # Gateway
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    api_key: SecretStr | None = None
    protect_reads: bool = False
    idempotency_retention_s: int = Field(24 * 3600, ge=60)
    management_url: str = "http://127.0.0.1:15672/"
    # A request that collides with an operation whose outcome is already on its way waits this
    # long for the read model to catch up before it is answered 409.
    conflict_settle_ms: int = Field(3000, ge=0, le=60_000)
    # Per-signal overrides of the specification's timeoutMs, e.g. {"swarm-start": 60000}.
    operation_timeouts_ms: dict[str, int] = Field(default_factory=dict)

    # Controllers and runtime
    docker_url: str = "unix:///var/run/docker.sock"
    docker_workers: int = Field(8, ge=1, le=64)
    controller_mode: Literal["inprocess", "container"] = "inprocess"
    project_image: str = "controlplane:local"
    # Network the bees' and controllers' containers join. "host" lets them reach a broker
    # bound to loopback; it is an operator's choice (see allow_host_network), never a caller's.
    bee_network: str = "bridge"
    # What launched containers may do. Everything is refused unless an operator allows it.
    allow_host_network: bool = False
    allow_privileged: bool = False
    allowed_mounts: list[str] = Field(default_factory=list)  # host paths, e.g. /var/run/docker.sock
    # Images a swarm plan sent by a caller may run. Empty: the project image and the images
    # the scenario templates name (the operator vetted those by shipping them).
    allowed_images: list[str] = Field(default_factory=list)
    # Broker address as seen from inside bee and controller containers.
    bee_amqp_url: SecretStr | None = None
    bee_ready_timeout_s: float = Field(60.0, gt=0)
    status_interval_s: float = Field(5.0, gt=0)
    instance_id: str = "host"
    # Names this gateway's own event queue (ph.control.gateway.<id>); every gateway sharing a
    # broker needs its own. Empty: the instance id.
    gateway_id: str = Field("", pattern=r"^$|^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")

    log_format: Literal["console", "json"] = "console"
    log_level: str = "INFO"

    @property
    def gateway_name(self) -> str:
        return self.gateway_id or self.instance_id

    def container_amqp_url(self) -> str:
        return (self.bee_amqp_url or self.amqp_url).get_secret_value()


@lru_cache
def get_settings() -> Settings:
    return Settings()


def settings_or_exit(factory: Callable[[], T], what: str = "configuration") -> T:
    """Build settings from the environment; on bad values print one line per variable and exit."""
    try:
        return factory()
    except ValidationError as exc:
        lines = [f"CP_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()]
        raise SystemExit(f"invalid {what}:\n  " + "\n  ".join(lines)) from None
    except SettingsError as exc:  # a JSON-valued variable that is not JSON
        raise SystemExit(f"invalid {what}: {exc}") from None


def load_settings_or_exit() -> Settings:
    return settings_or_exit(get_settings)
