"""Every setting of the control plane, in one place.

Values come from environment variables with the ``CP_`` prefix and are validated
once at start-up; a bad value stops the process with a message naming the variable.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal, TypeVar
from urllib.parse import urlparse

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from controlplane.contract.egress import Target
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
    # The admin key may do everything; the read key only reads. Reads need a key once a read
    # key is set (or protect_reads). Without an admin key the gateway listens on loopback
    # only, unless allow_unauthenticated says the operator means it.
    api_key: SecretStr | None = None
    read_api_key: SecretStr | None = None
    protect_reads: bool = False
    allow_unauthenticated: bool = False
    # Rate limits (the services surface): requests each caller (a configured API key, else the
    # client's address) may make per window, in the notation of the `limits` library, e.g.
    # "1000/hour" or "100 per minute". Counted in the gateway's memory, or in a Redis that
    # gateways share (async+redis://host:6379/0) so that the limit holds across them. The
    # address comes from X-Forwarded-For only when a proxy in front of the gateway sets it.
    rate_limit: str = "1000/hour"
    rate_limit_storage: SecretStr = SecretStr("memory://")
    rate_limit_trust_forwarded: bool = False
    idempotency_retention_s: int = Field(24 * 3600, ge=60)
    management_url: str = "http://127.0.0.1:15672/"
    # Every container the control plane launches gets a broker user of its own, limited to its
    # own queues and routing keys, made through the management API with these credentials
    # (default: those of CP_AMQP_URL). Passwords are derived from the secret (default: from
    # the management password and the owner id), so re-created containers get the same ones.
    broker_users: bool = True
    # Messages the dead-letter queue keeps (the oldest go first); each was counted when dead-lettered.
    dead_letter_max_messages: int = Field(10_000, ge=1)
    management_user: str | None = None
    management_password: SecretStr | None = None
    broker_user_secret: SecretStr | None = None
    # A request that collides with an operation whose outcome is already on its way waits this
    # long for the read model to catch up before it is answered 409.
    conflict_settle_ms: int = Field(3000, ge=0, le=60_000)
    # How much one control plane and one request may start.
    max_swarms: int = Field(100, ge=1)
    max_fanout_targets: int = Field(5000, ge=1)
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
    # Images a bee or a system under test may run, whoever asks. Empty: the project image and
    # the images the scenario templates name (the operator vetted those by shipping them).
    # Swarm-controllers, which get the Docker socket, run the project image or a template's
    # controllerImage only.
    allowed_images: list[str] = Field(default_factory=list)
    # What bees' HTTP calls may reach besides their swarm's own system under test: host names,
    # addresses or networks, each with an optional :port, e.g. ["api.example.com:443", "10.1.0.0/16"].
    allowed_targets: list[str] = Field(default_factory=list)
    # A system under test with a command of its own runs whatever a caller wrote.
    allow_sut_command: bool = False
    # Every container the control plane starts gets these limits and this user.
    container_memory_mb: int = Field(512, ge=16)
    container_cpus: float = Field(1.0, gt=0, le=64)
    container_pids: int = Field(256, ge=16)
    container_log_max_size: str = Field("10m", pattern=r"^[1-9][0-9]*[kmg]$")
    container_log_max_files: int = Field(3, ge=1, le=100)
    container_user: str = Field("10001:10001", pattern=r"^$|^[0-9]+(:[0-9]+)?$")
    # Broker address as seen from inside bee and controller containers.
    bee_amqp_url: SecretStr | None = None
    bee_ready_timeout_s: float = Field(60.0, gt=0)
    status_interval_s: float = Field(5.0, gt=0)
    # Owner id: labels every container this control plane starts and names it, so control
    # planes sharing a Docker engine never adopt or remove each other's containers.
    instance_id: str = Field("host", pattern=r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")
    # Names this gateway's own event queue (ph.control.gateway.<id>); every gateway sharing a
    # broker needs its own. Empty: the instance id.
    gateway_id: str = Field("", pattern=r"^$|^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")

    # Engine-pool surface (the engine-pool orchestrator API) and the pool it drives: a swarm
    # made from the ace_template scenario, each of its fields overridable through ace_pool
    # (JSON, the scenario's names). An empty ace_pool_id serves no engine-pool surface.
    ace_prefix: str = Field("/ace", pattern=r"^$|^(/[A-Za-z0-9._~-]+)+$")
    ace_pool_id: str = Field("ace", pattern=r"^$|^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")
    ace_template: str = "acestream"
    ace_image: str = Field("acestream/engine:latest", pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")
    ace_pool: dict[str, Any] = Field(default_factory=dict)
    # A Gluetun-like VPN container the pool's engines depend on (GET /vpn/status): its name.
    vpn_container: str | None = Field(None, pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")

    # Services dashboard (the services surface under /api): the host controller samples the
    # running services' stats this often, this many at a time (each reading waits about a
    # second for the engine's stats collector, mostly idle), reports everything now and then
    # besides the changes, and gives an updated service this long to run and be healthy
    # before rolling it back. Environment values show in a service's details only when allowed.
    services_stats_interval_s: float = Field(10.0, ge=1.0, le=3600.0)
    services_stats_concurrency: int = Field(64, ge=1, le=512)
    services_full_report_s: float = Field(60.0, ge=5.0, le=3600.0)
    services_update_timeout_s: float = Field(60.0, ge=1.0, le=3600.0)
    services_show_env: bool = False
    # How long a gateway waits for a host controller's answer to a logs request.
    services_logs_timeout_s: float = Field(90.0, ge=1.0, le=3600.0)

    # Streams registry (the Streams API, at <streams_prefix>/streams): how long a stream or a session lives
    # without a heartbeat, how long a publisher has to answer a request, and how long the
    # sessions' history is kept.
    streams_prefix: str = Field("", pattern=r"^$|^(/[A-Za-z0-9._~-]+)+$")
    stream_ttl_s: float = Field(30.0, ge=1.0, le=3600.0)
    stream_request_timeout_s: float = Field(5.0, gt=0, le=60.0)
    stream_history_days: int = Field(90, ge=1)

    # Webhooks (the services surface). A destination on a loopback, link-local, private or
    # otherwise non-public address is refused unless listed here (addresses or networks with an
    # optional :port, as CP_ALLOWED_TARGETS); the broker's ports never. A delivery not answered
    # 2xx within the timeout is tried again after retry_base_s, doubling up to retry_max_s,
    # until max_attempts; at most `concurrency` are in flight at once. Finished deliveries are
    # kept retention_days.
    webhook_allowed_targets: list[str] = Field(default_factory=list)
    webhook_timeout_s: float = Field(10.0, gt=0, le=120.0)
    webhook_max_attempts: int = Field(12, ge=1, le=30)
    webhook_retry_base_s: float = Field(5.0, ge=0.01, le=3600.0)
    webhook_retry_max_s: float = Field(3600.0, ge=0.01, le=86400.0)
    webhook_concurrency: int = Field(16, ge=1, le=256)
    webhook_retention_days: int = Field(30, ge=1)

    log_format: Literal["console", "json"] = "console"
    log_level: str = "INFO"

    @field_validator("ace_pool_id")
    @classmethod
    def _pool_id(cls, value: str) -> str:
        if "--" in value:
            raise ValueError("must not contain '--', which joins a swarm and its bee in an instance id")
        return value

    @field_validator("allowed_targets", "webhook_allowed_targets")
    @classmethod
    def _targets(cls, value: list[str]) -> list[str]:
        return Target.check_all(value)

    @field_validator("api_key", "read_api_key")
    @classmethod
    def _key(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty key would silently switch auth off: it is a mistake, not a choice.
        if value is not None:
            key = value.get_secret_value()
            if not key.strip():
                raise ValueError("must not be empty; leave the variable unset to run without a key (loopback only)")
            if key != key.strip() or len(key) < 8:
                raise ValueError("must be at least 8 characters, without leading or trailing spaces")
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        return _one_rate_limit(value)

    @field_validator("rate_limit_storage")
    @classmethod
    def _rate_limit_storage(cls, value: SecretStr) -> SecretStr:
        return SecretStr(_async_rate_limit_storage(value.get_secret_value()))

    @model_validator(mode="after")
    def _one_streams_path(self) -> Settings:
        if self.ace_pool_id and self.ace_prefix == self.streams_prefix:
            raise ValueError(f"CP_ACE_PREFIX and CP_STREAMS_PREFIX are both {self.ace_prefix!r}: the engine-pool API "
                             "and the streams registry both have /streams there; give one of them a prefix")
        return self

    @model_validator(mode="after")
    def _read_key_needs_admin(self) -> Settings:
        if self.read_api_key is not None and self.api_key is None:
            raise ValueError("CP_READ_API_KEY needs CP_API_KEY: without it every caller could write")
        return self

    def exposure_problem(self) -> str | None:
        """Why the gateway must not listen as configured, or None."""
        if self.api_key is None and not self.allow_unauthenticated and not _is_loopback(self.host):
            return (f"CP_HOST={self.host} listens beyond this machine without CP_API_KEY: set a key, or set "
                    "CP_ALLOW_UNAUTHENTICATED=true if every caller that can reach it may run containers")
        return None

    @property
    def reads_guarded(self) -> bool:
        """Whether reads (beyond health, metrics and the OpenAPI document) need a key."""
        return self.api_key is not None and (self.protect_reads or self.read_api_key is not None)

    @property
    def gateway_name(self) -> str:
        return self.gateway_id or self.instance_id

    def container_amqp_url(self) -> str:
        return (self.bee_amqp_url or self.amqp_url).get_secret_value()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _one_rate_limit(value: str) -> str:
    """A single limit of at least one request, as ``limits.parse`` reads it."""
    from limits import parse_many  # here, not above: only a process that validates settings loads it

    try:
        items = parse_many(value)
    except ValueError:
        items = []
    if len(items) != 1:
        raise ValueError(f"{value!r} is not one rate limit: write '<requests>/<period>', e.g. '1000/hour', "
                         "'100/minute' or '5000 per 2 hours'")
    if items[0].amount < 1:
        raise ValueError("must allow at least 1 request per window")
    return value


def _async_rate_limit_storage(url: str) -> str:
    """A ``limits`` storage URL in its asyncio form (``memory://`` becomes ``async+memory://``),
    checked by building the storage (no connection is made), so that an unknown scheme or a
    missing client library stops start-up. The URL's password never shows in a message."""
    from limits.storage import SCHEMES, storage_from_string

    scheme, found, _ = url.partition("://")
    if found and not scheme.startswith("async+") and f"async+{scheme}" in SCHEMES:
        url, scheme = f"async+{url}", f"async+{scheme}"
    if not found or scheme not in SCHEMES:
        known = ", ".join(sorted(s.removeprefix("async+") for s in SCHEMES if s.startswith("async+")))
        raise ValueError(f"unknown rate-limit storage {scheme + '://' if found else '(not a URL)'}: use memory:// "
                         f"or async+redis://host:6379/0 (schemes: {known})")
    try:
        storage_from_string(url)
    except Exception as exc:  # a missing client library, a malformed address
        password = urlparse(url).password
        reason = str(exc).replace(password, "***") if password else str(exc)
        raise ValueError(f"cannot use this {scheme}:// storage: {type(exc).__name__}: {reason}") from None
    return url


@lru_cache
def get_settings() -> Settings:
    return Settings()


def settings_or_exit(factory: Callable[[], T], what: str = "configuration") -> T:
    """Build settings from the environment; on bad values print one line per variable and exit."""
    try:
        return factory()
    except ValidationError as exc:
        lines = [f"CP_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" if err["loc"] else err["msg"]
                 for err in exc.errors()]
        raise SystemExit(f"invalid {what}:\n  " + "\n  ".join(lines)) from None
    except SettingsError as exc:  # a JSON-valued variable that is not JSON
        raise SystemExit(f"invalid {what}: {exc}") from None


def load_settings_or_exit() -> Settings:
    return settings_or_exit(get_settings)
