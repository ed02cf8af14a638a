"""Engine pools on the wire: the pool's policy, its engines, and the streams they play.

A pool is a swarm whose controller also runs pool policy (``controller/pool.py``): its
plan carries a ``PoolSpec`` instead of bees. The models here are shared by the gateway's
engine-pool surface, the pool controller and the store. Their field names are snake_case,
as the engine-pool API documents them (``EngineState``, ``StreamState``,
``StreamStatSnapshot``), and their times are ISO-8601 UTC.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from controlplane.contract.base import Snake, SnakeStrict, Strict

IMAGE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$"
# Labels the control plane sets itself: a caller's labels may not forge them.
RESERVED_LABEL_PREFIX = "controlplane."


class PortRange(Strict):
    """Inclusive range of ports; written ``"19000-19999"`` in YAML and settings."""

    first: int = Field(ge=1, le=65535)
    last: int = Field(ge=1, le=65535)

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            found = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value)
            if not found:
                raise ValueError(f"port range {value!r} must read FIRST-LAST, e.g. 19000-19999")
            return {"first": int(found.group(1)), "last": int(found.group(2))}
        return value

    @model_validator(mode="after")
    def _ordered(self) -> PortRange:
        if self.first > self.last:
            raise ValueError(f"port range {self.first}-{self.last} ends before it starts")
        return self

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


class ProbeSpec(Strict):
    """How an engine's health is asked: an HTTP GET on its published HTTP port."""

    path: str = Field("/", pattern=r"^/\S*$")
    interval_s: float = Field(10.0, gt=0, le=3600)
    timeout_s: float = Field(3.0, gt=0, le=60)
    failures: int = Field(3, ge=1, le=100)  # consecutive failures that make an engine unhealthy


class CacheSpec(Strict):
    """Idle clean-up of an engine's cache: a command run inside the container."""

    path: str | None = Field(None, pattern=r"^/[A-Za-z0-9._/ -]*$")  # None: no clean-up
    idle_s: float = Field(300.0, ge=0)  # an engine idle this long is cleaned, once per idle spell


class PoolSpec(Strict):
    preset: Literal["generic", "acestream"] = "generic"
    image: str | None = Field(None, min_length=1, max_length=200, pattern=IMAGE_PATTERN)
    env: dict[str, str] = Field(default_factory=dict)
    min_replicas: int = Field(0, ge=0, le=1000)
    max_replicas: int = Field(20, ge=1, le=1000)
    min_free: int = Field(0, ge=0, le=1000)  # engines kept without a stream, within max_replicas
    host_ports: PortRange = PortRange(first=19000, last=19999)
    http_ports: PortRange = PortRange(first=40000, last=44999)  # container side, AceStream HTTP
    https_ports: PortRange = PortRange(first=45000, last=49999)  # container side, AceStream HTTPS
    map_https: bool = False  # also publish each engine's HTTPS port on a host port
    # Engines are not bees: they never talk to the broker. They run on this network with
    # their ports published on this address, so stat URLs and probes work from the host.
    network: str = Field("bridge", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    publish_address: str = "127.0.0.1"
    # How the pool's controller reaches its engines (probes, statistics): at their published
    # port, or at their own address on ``network`` (a controller in a container on that network).
    probe_address: Literal["published", "container"] = "published"
    startup_timeout_s: float = Field(25.0, gt=0, le=600)
    health: ProbeSpec = Field(default_factory=ProbeSpec)
    network_probe_path: str | None = Field(None, pattern=r"^/\S*$")
    replace_cooldown_s: float = Field(60.0, ge=0)  # between two replacements of unhealthy engines
    cache: CacheSpec = Field(default_factory=CacheSpec)
    idle_grace_s: float = Field(600.0, ge=0)  # idle engines above the minimum are collected after it
    stats_interval_s: float = Field(2.0, gt=0, le=3600)
    stats_history: int = Field(720, ge=1, le=100_000)  # snapshots kept per stream
    vpn_container: str | None = Field(None, pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
    vpn_control_port: int = Field(8000, ge=1, le=65535)

    @model_validator(mode="after")
    def _bounds(self) -> PoolSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas ({self.min_replicas}) is above maxReplicas ({self.max_replicas})")
        if self.min_free > self.max_replicas:
            raise ValueError(f"minFree ({self.min_free}) is above maxReplicas ({self.max_replicas})")
        return self


def acestream_env(env: dict[str, str], http_port: int, https_port: int) -> dict[str, str]:
    """An AceStream engine's environment: ``CONF`` built for its ports unless the caller gave
    one (then it is passed through verbatim, even empty), and the port variables."""
    conf = env["CONF"] if "CONF" in env else "\n".join(
        (f"--http-port={http_port}", f"--https-port={https_port}", "--bind-all"))
    return {**env, "CONF": conf, "HTTP_PORT": str(http_port), "HTTPS_PORT": str(https_port), "BIND_ALL": "true"}


# --- the API's own models (snake_case, as the engine-pool document writes them) -------------


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc) if value is not None else None


def _caller_labels(labels: dict[str, str]) -> dict[str, str]:
    forged = sorted(k for k in labels if k.startswith(RESERVED_LABEL_PREFIX))
    if forged:
        raise ValueError(f"label keys starting with {RESERVED_LABEL_PREFIX!r} are the control plane's own: "
                         f"{', '.join(forged)}")
    return labels


class ProvisionRequest(SnakeStrict):
    """``POST /provision``: a container of the caller's image (the image policy applies)."""

    image: str | None = Field(None, min_length=1, max_length=200, pattern=IMAGE_PATTERN)
    env: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    ports: dict[str, int | None] = Field(default_factory=dict)  # "40001/tcp" -> host port (None: any)
    name_prefix: str | None = Field(None, max_length=40)  # accepted for compatibility; names are the pool's

    _labels = field_validator("labels")(_caller_labels)

    @field_validator("ports")
    @classmethod
    def _ports(cls, value: dict[str, int | None]) -> dict[str, int | None]:
        for port, host_port in value.items():
            if not re.fullmatch(r"\d{1,5}(/(tcp|udp))?", port) or not 1 <= int(port.split("/")[0]) <= 65535:
                raise ValueError(f"port {port!r} must read PORT/tcp or PORT/udp")
            if host_port is not None and not 1 <= host_port <= 65535:
                raise ValueError(f"host port {host_port} of {port!r} is not a port number")
        return value


class AceProvisionRequest(SnakeStrict):
    """``POST /provision/acestream``: an engine with ports of its own and a built ``CONF``."""

    image: str | None = Field(None, min_length=1, max_length=200, pattern=IMAGE_PATTERN)
    labels: dict[str, str] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    host_port: int | None = Field(None, ge=1, le=65535)

    _labels = field_validator("labels")(_caller_labels)


class EngineState(Snake):
    container_id: str
    container_name: str | None = None
    host: str
    port: int
    labels: dict[str, str] = Field(default_factory=dict)
    first_seen: datetime
    last_seen: datetime
    streams: list[str] = Field(default_factory=list)
    health_status: Literal["healthy", "unhealthy", "unknown"] = "unknown"
    last_health_check: datetime | None = None
    last_stream_usage: datetime | None = None
    last_cache_cleanup: datetime | None = None
    cache_size_bytes: int | None = None


ENGINE_STATE_FIELDS = frozenset(EngineState.model_fields)


class PoolEngine(EngineState):
    """An engine as the pool controller reports it: the API's fields and what the pool keeps."""

    kind: Literal["acestream", "generic"] = "acestream"
    container_state: str = "running"
    container_http_port: int | None = None
    container_https_port: int | None = None
    host_https_port: int | None = None
    host_ports: list[int] = Field(default_factory=list)  # every host port it holds
    ip: str | None = None  # its address on the pool's network

    def api_view(self) -> dict[str, Any]:
        return self.model_dump(mode="json", include=ENGINE_STATE_FIELDS)


KeyType = Literal["content_id", "infohash", "url", "magnet", "torrent_url", "direct_url", "raw_data"]


class EngineAddress(Snake):
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(ge=1, le=65535)


class StreamKey(Snake):
    key_type: KeyType
    key: str = Field(min_length=1, max_length=4096)


class SessionInfo(Snake):
    playback_session_id: str = Field(min_length=1, max_length=200)
    stat_url: str = Field(min_length=1, max_length=2048, pattern=r"^https?://")
    command_url: str = Field(min_length=1, max_length=2048, pattern=r"^https?://")
    is_live: int


class StreamStarted(Snake):
    """``POST /events/stream_started``."""

    container_id: str | None = Field(None, max_length=128)
    engine: EngineAddress
    stream: StreamKey
    session: SessionInfo
    labels: dict[str, str] = Field(default_factory=dict)

    def stream_id(self) -> str:
        """The caller's ``stream_id`` label, else the key and the playback session."""
        return self.labels.get("stream_id") or f"{self.stream.key}|{self.session.playback_session_id}"


class StreamEnded(Snake):
    """``POST /events/stream_ended``."""

    container_id: str | None = Field(None, max_length=128)
    stream_id: str | None = Field(None, max_length=4400)
    reason: str | None = Field(None, max_length=500)


class StreamState(Snake):
    id: str
    key_type: KeyType
    key: str
    container_id: str
    playback_session_id: str
    stat_url: str
    command_url: str
    is_live: bool
    started_at: datetime
    ended_at: datetime | None = None
    status: Literal["started", "ended"] = "started"

    _times = field_validator("started_at", "ended_at")(classmethod(lambda cls, v: _utc(v)))


class StreamStatSnapshot(Snake):
    ts: datetime
    peers: int | None = None
    speed_down: int | None = None
    speed_up: int | None = None
    downloaded: int | None = None
    uploaded: int | None = None
    status: str | None = None

    _ts = field_validator("ts")(classmethod(lambda cls, v: _utc(v)))


class StreamStats(Snake):
    """One collection round's snapshots, as the pool controller publishes them."""

    stream_id: str
    snapshot: StreamStatSnapshot


class VpnStatus(Snake):
    """``GET /vpn/status`` (second document)."""

    enabled: bool
    status: str
    container_name: str | None = None
    container: str | None = None
    health: Literal["healthy", "unhealthy", "starting", "unknown"] = "unknown"
    connected: bool = False
    forwarded_port: int | None = None
    last_check: datetime | None = None
    last_check_at: datetime | None = None

    @classmethod
    def disabled(cls) -> VpnStatus:
        return cls(enabled=False, status="disabled")
