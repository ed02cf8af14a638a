"""The streams registry on the wire: stream types, advertised streams, negotiation, sessions.

Shared by the gateway's streams surface, the store and the Python client
(``controlplane.client.streams``). Field names are snake_case, as the Streams API document
writes them; times are ISO-8601 UTC. A negotiation is a request-reply over RabbitMQ: the
gateway sends a ``NegotiationRequest`` on ``sig.stream-request.<streamId>`` and the
publisher answers a ``NegotiationReply``.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from controlplane.contract.base import Snake, SnakeStrict

# Free-form objects (config, metadata) are bounded so one advertisement cannot weigh on every
# gateway's memory and every list.
MAX_OBJECT_BYTES = 16 * 1024
TYPE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,99}$"


def _bounded(value: dict[str, Any]) -> dict[str, Any]:
    if len(json.dumps(value)) > MAX_OBJECT_BYTES:
        raise ValueError(f"must be at most {MAX_OBJECT_BYTES} bytes of JSON")
    return value


Obj = Annotated[dict[str, Any], AfterValidator(_bounded)]


class Protocol(StrEnum):
    TCP = "tcp"
    UDP = "udp"
    NDI = "ndi"
    SRT = "srt"
    WEBRTC = "webrtc"
    SPOUT = "spout"
    SYPHON = "syphon"
    SHARED_MEMORY = "shared_memory"


def iso(ts: float) -> str:
    """Epoch seconds as ``2025-01-15T10:30:25.123456Z``."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def epoch(text: str) -> float:
    """The inverse of ``iso``."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# --- stream types ----------------------------------------------------------------------------


class StreamTypeCreate(SnakeStrict):
    """``POST /streams/types``."""

    name: str = Field(pattern=TYPE_NAME_PATTERN, description="lowercase letters, digits, '_' and '-'")
    display_name: str = Field(min_length=1, max_length=255)
    description: str | None = Field(None, max_length=2000)
    icon: str | None = Field(None, max_length=100)
    default_config: Obj = Field(default_factory=dict)
    metadata: Obj = Field(default_factory=dict)


class StreamTypeInfo(Snake):
    id: str
    name: str
    display_name: str
    description: str | None = None
    icon: str | None = None
    default_config: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    updated_at: datetime


_BUILTIN_SINCE = datetime(2025, 1, 1, tzinfo=timezone.utc)
_TYPES_NAMESPACE = uuid.UUID("8f6d2f5e-3b1c-4c1e-9a51-2f0d7c1b6a10")


def _builtin(name: str, display_name: str, description: str, icon: str, **default_config: Any) -> StreamTypeInfo:
    # The same id on every gateway and after every restart.
    return StreamTypeInfo(id=str(uuid.uuid5(_TYPES_NAMESPACE, name)), name=name, display_name=display_name,
                          description=description, icon=icon, default_config=default_config,
                          created_at=_BUILTIN_SINCE, updated_at=_BUILTIN_SINCE)


BUILTIN_TYPES: tuple[StreamTypeInfo, ...] = (
    _builtin("ndi", "NDI Video", "NDI video stream", "cast", codec="h264", resolution="1920x1080", fps=30),
    _builtin("audio", "Audio", "Audio feed", "audio-lines", sample_rate=48000, channels=2, format="f32"),
    _builtin("video", "Video", "Video stream other than NDI", "video", codec="h264", resolution="1920x1080", fps=30),
    _builtin("texture", "GPU Texture", "GPU texture shared between applications", "image",
             width=1920, height=1080, format="rgba8"),
    _builtin("sensor", "Sensor Data", "Sensor readings", "activity", rate_hz=60, format="json"),
    _builtin("osc", "OSC", "Open Sound Control messages", "radio", address_pattern="/*"),
    _builtin("midi", "MIDI", "MIDI messages", "music", channel=1),
    _builtin("data", "Data", "Generic data stream", "database", format="json"),
    _builtin("srt", "SRT Video", "Video over Secure Reliable Transport", "shield", latency_ms=120, codec="h264"),
    _builtin("spout", "Spout", "Spout texture sharing (Windows)", "share-2", width=1920, height=1080),
    _builtin("syphon", "Syphon", "Syphon texture sharing (macOS)", "share", width=1920, height=1080),
)


# --- streams ---------------------------------------------------------------------------------


class StreamAdvertise(SnakeStrict):
    """``POST /streams/advertise``. ``stream_type`` is a built-in or a created type's name
    (checked against the registry, which knows both)."""

    name: str = Field(min_length=1, max_length=255)
    stream_type: str = Field(pattern=TYPE_NAME_PATTERN)
    publisher_id: str = Field(min_length=1, max_length=255)
    protocol: Protocol
    address: str = Field(min_length=1, max_length=255, description="the publisher's address or host name")
    port: int = Field(ge=0, le=65535)
    entity_id: uuid.UUID | None = None
    device_id: uuid.UUID | None = None
    config: Obj = Field(default_factory=dict)
    metadata: Obj = Field(default_factory=dict)


class StreamInfo(Snake):
    """A stream as ``GET /streams`` lists it."""

    id: str
    name: str
    stream_type: str
    publisher_id: str
    protocol: str
    address: str
    port: int
    entity_id: str | None = None
    device_id: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    advertised_at: datetime
    last_heartbeat: datetime
    active_sessions: int = 0


# --- negotiation -----------------------------------------------------------------------------


class StreamRequest(SnakeStrict):
    """``POST /streams/{stream_id}/request``: who asks, and where the data should go."""

    consumer_id: str = Field(min_length=1, max_length=255)
    consumer_address: str = Field(min_length=1, max_length=255)
    consumer_port: int | None = Field(None, ge=0, le=65535, description="preferred port; 0 or none: any")
    config: Obj = Field(default_factory=dict, description="the consumer's preferences")


class NegotiationRequest(Snake):
    """What the publisher receives on ``sig.stream-request.<streamId>``. ``session_id`` is the
    session an acceptance opens."""

    session_id: str
    stream_id: str
    stream_name: str
    consumer_id: str
    consumer_address: str
    consumer_port: int | None = None
    config: dict[str, Any] = Field(default_factory=dict)


class NegotiationReply(SnakeStrict):
    """The publisher's answer. Any field of the offer it leaves out is the advertised one."""

    accepted: bool = Field(strict=True)
    reason: str | None = Field(None, max_length=1000)
    address: str | None = Field(None, min_length=1, max_length=255)
    port: int | None = Field(None, ge=0, le=65535, strict=True)
    protocol: Protocol | None = None
    transport_config: Obj = Field(default_factory=dict)


class StreamOffer(Snake):
    """``201`` answer to a request: where the consumer finds the data."""

    session_id: str
    stream_id: str
    stream_name: str
    stream_type: str
    protocol: str
    publisher_address: str
    publisher_port: int
    transport_config: dict[str, Any] = Field(default_factory=dict)


# --- sessions --------------------------------------------------------------------------------


class SessionStatus(StrEnum):
    ACTIVE = "active"
    STOPPED = "stopped"  # DELETE /streams/sessions/{id}
    EXPIRED = "expired"  # no heartbeat within the TTL
    WITHDRAWN = "withdrawn"  # its stream was withdrawn
    STREAM_EXPIRED = "stream_expired"  # its stream expired


class StreamSession(Snake):
    """An active session as ``GET /streams/sessions`` lists it."""

    session_id: str
    stream_id: str
    stream_name: str
    stream_type: str
    publisher_id: str
    publisher_address: str
    consumer_id: str
    consumer_address: str
    protocol: str
    transport_config: dict[str, Any] = Field(default_factory=dict)
    started_at: datetime
    status: SessionStatus = SessionStatus.ACTIVE


class SessionRecord(Snake):
    """A row of ``GET /streams/sessions/history``: ``time`` is when it started."""

    time: datetime
    session_id: str
    stream_id: str
    stream_name: str
    stream_type: str
    publisher_id: str
    publisher_address: str
    publisher_port: int
    consumer_id: str
    consumer_address: str
    consumer_port: int | None = None
    protocol: str
    status: SessionStatus
    started_at: datetime
    ended_at: datetime | None = None
    duration_seconds: float | None = None


class RegistryState(Snake):
    """``GET /streams/state``: everything a dashboard shows, in one answer."""

    streams: list[StreamInfo]
    sessions: list[StreamSession]
    stream_types: list[StreamTypeInfo]


# --- events ----------------------------------------------------------------------------------


class RegistryEvent(Snake):
    """Body of every streams-registry event on ``ph.control`` (see ``keys.REGISTRY_EVENTS``).

    ``origin`` names the gateway process that saw it happen: the others apply it to their own
    memory, the origin already has. Which fields are set depends on the event."""

    ts: datetime
    event: str
    origin: str
    stream: dict[str, Any] | None = None  # advertised: the stream as listed
    stream_id: str | None = None
    started: list[dict[str, Any]] = Field(default_factory=list)  # sessions-started: each as listed
    session_ids: list[str] = Field(default_factory=list)  # stopped or closed with their stream
    status: SessionStatus | None = None  # why sessions ended
    stream_type: dict[str, Any] | None = None  # type-created
    streams: dict[str, float] = Field(default_factory=dict)  # heartbeats: id -> epoch seconds
    sessions: dict[str, float] = Field(default_factory=dict)
