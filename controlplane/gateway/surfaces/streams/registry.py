"""The streams registry as one gateway holds it: stream types, live streams and sessions.

Everything here is memory and nothing here awaits: a heartbeat is a dictionary lookup and
two assignments, a lookup is a join of JSON fragments. Each stream and session keeps its
JSON as last rendered and renders again only after it changed, so listing ten thousand
streams while a thousand heartbeats a second arrive re-renders only those that beat.

Times are epoch seconds: they travel between gateways in heartbeat events. A stream or a
session lives until ``expires_at`` unless a heartbeat moves it; the sweeper (in ``routes``)
asks ``expired`` which ones are due.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from controlplane.contract.streams import BUILTIN_TYPES, SessionStatus, StreamAdvertise, StreamInfo, StreamTypeInfo, iso


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@dataclass(slots=True, eq=False)
class Stream:
    """The fields lookups and sessions need, and the rest as JSON: ``head`` is the listed
    object up to ``advertised_at``, without its closing brace, so a heartbeat re-renders
    two fields rather than the stream (and ten thousand streams hold no dict each)."""

    id: str
    name: str
    stream_type: str
    publisher_id: str
    protocol: str
    address: str
    port: int
    head: bytes
    last_heartbeat: float
    expires_at: float
    sessions: set[str] = field(default_factory=set)
    rendered: bytes | None = None

    def render(self) -> bytes:
        if self.rendered is None:
            self.rendered = b"%s,\"last_heartbeat\":\"%s\",\"active_sessions\":%d}" % (
                self.head, iso(self.last_heartbeat).encode(), len(self.sessions))
        return self.rendered

    def listed(self) -> dict[str, Any]:
        return json.loads(self.render())


# The listed fields before last_heartbeat and active_sessions, in the wire model's order.
_TAIL_FIELDS = ("last_heartbeat", "active_sessions")
_HEAD_FIELDS = tuple(name for name in StreamInfo.model_fields if name not in _TAIL_FIELDS)
assert tuple(StreamInfo.model_fields)[-2:] == _TAIL_FIELDS, "render() appends these two last"


@dataclass(slots=True, eq=False)
class Session:
    """A session never changes once open: it is kept as its listed JSON."""

    id: str
    stream_id: str
    started: float
    publisher_port: int
    consumer_port: int | None
    expires_at: float
    rendered: bytes

    def render(self) -> bytes:
        return self.rendered


# A session's history row holds these of the body it is opened with, besides its status and times.
HISTORY_FIELDS = ("session_id", "stream_id", "stream_name", "stream_type", "publisher_id", "publisher_address",
                   "publisher_port", "consumer_id", "consumer_address", "consumer_port", "protocol",
                   "transport_config")


def history_row(body: dict[str, Any], started: float) -> dict[str, Any]:
    """The store's row for a session while it is open, from the body it was opened with."""
    return {**{name: body[name] for name in HISTORY_FIELDS}, "status": SessionStatus.ACTIVE.value,
            "started_at": datetime.fromtimestamp(started, timezone.utc)}


class StreamRegistry:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.types: dict[str, dict[str, Any]] = {t.name: t.to_dict() for t in BUILTIN_TYPES}
        self.streams: dict[str, Stream] = {}
        self.sessions: dict[str, Session] = {}
        self._types_json: bytes | None = None
        # Heartbeats taken here since the last ``take_refreshed``: what the other gateways learn.
        self._refreshed_streams: dict[str, float] = {}
        self._refreshed_sessions: dict[str, float] = {}

    # --- types -------------------------------------------------------------------------------

    def add_type(self, info: StreamTypeInfo | dict[str, Any]) -> bool:
        body = info.to_dict() if isinstance(info, StreamTypeInfo) else StreamTypeInfo.model_validate(info).to_dict()
        if body["name"] in self.types:
            return False
        self.types[body["name"]] = body
        self._types_json = None
        return True

    def types_json(self) -> bytes:
        if self._types_json is None:
            self._types_json = _dumps([self.types[name] for name in sorted(self.types)])
        return self._types_json

    # --- streams -----------------------------------------------------------------------------

    def advertise(self, stream_id: str, advert: StreamAdvertise, now: float) -> Stream:
        fields = advert.model_dump(mode="json")
        fields["advertised_at"] = iso(now)
        return self.add_stream({"id": stream_id, **fields}, now, now + self.ttl_s)

    def add_stream(self, listed: dict[str, Any], last_heartbeat: float, expires_at: float) -> Stream:
        """A stream as listed (from an event, the store or ``advertise``); one already known is
        kept as it is."""
        stream_id = listed["id"]
        known = self.streams.get(stream_id)
        if known is not None:
            return known
        head = _dumps({name: listed.get(name) for name in _HEAD_FIELDS})[:-1]
        stream = Stream(stream_id, listed["name"], listed["stream_type"], listed["publisher_id"],
                        listed["protocol"], listed["address"], int(listed["port"]), head, last_heartbeat,
                        expires_at)
        self.streams[stream_id] = stream
        return stream

    def heartbeat(self, stream_id: str, now: float) -> Stream | None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.expires_at < now:
            return None  # due for expiry: the sweeper's, not revived by a late heartbeat
        stream.last_heartbeat, stream.expires_at, stream.rendered = now, now + self.ttl_s, None
        self._refreshed_streams[stream_id] = now
        return stream

    def remove_stream(self, stream_id: str) -> tuple[Stream | None, list[Session]]:
        """The stream and its sessions, gone from memory."""
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return None, []
        return stream, [s for s in (self.sessions.pop(sid, None) for sid in stream.sessions) if s is not None]

    def streams_json(self, stream_type: str | None = None) -> bytes:
        streams = self.streams.values()
        if stream_type is not None:
            return b"[" + b",".join(s.render() for s in streams if s.stream_type == stream_type) + b"]"
        return b"[" + b",".join(s.render() for s in streams) + b"]"

    # --- sessions ----------------------------------------------------------------------------

    def open_session(self, session_id: str, stream: Stream, offer: dict[str, Any], consumer: dict[str, Any],
                     now: float) -> tuple[Session, dict[str, Any]]:
        """The session, and its body as the other gateways learn it (listed fields and both ports)."""
        body = {"session_id": session_id, "stream_id": stream.id, "stream_name": stream.name,
                "stream_type": stream.stream_type, "publisher_id": stream.publisher_id,
                "publisher_address": offer["publisher_address"], "consumer_id": consumer["consumer_id"],
                "consumer_address": consumer["consumer_address"], "protocol": offer["protocol"],
                "transport_config": offer["transport_config"], "started_at": iso(now),
                "status": SessionStatus.ACTIVE.value, "publisher_port": offer["publisher_port"],
                "consumer_port": consumer.get("consumer_port")}
        session = self.add_session(body, now, now + self.ttl_s)
        assert session is not None
        return session, body

    def add_session(self, body: dict[str, Any], started: float, expires_at: float) -> Session | None:
        """A session as an event carries it (listed fields and both ports); None when its stream
        is not known here (it ended meanwhile)."""
        stream = self.streams.get(body["stream_id"])
        if stream is None:
            return None
        known = self.sessions.get(body["session_id"])
        if known is not None:
            return known
        listed = _dumps({k: v for k, v in body.items() if k not in ("publisher_port", "consumer_port")})
        session = Session(body["session_id"], stream.id, started, int(body["publisher_port"]),
                          body.get("consumer_port"), expires_at, listed)
        self.sessions[session.id] = session
        stream.sessions.add(session.id)
        stream.rendered = None  # its count changed
        return session

    def session_heartbeat(self, session_id: str, now: float) -> Session | None:
        session = self.sessions.get(session_id)
        if session is None or session.expires_at < now:
            return None
        session.expires_at = now + self.ttl_s
        self._refreshed_sessions[session_id] = now
        return session

    def remove_session(self, session_id: str) -> Session | None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            stream = self.streams.get(session.stream_id)
            if stream is not None:
                stream.sessions.discard(session_id)
                stream.rendered = None
        return session

    def sessions_json(self, stream_id: str | None = None) -> bytes:
        sessions = self.sessions.values()
        if stream_id is not None:
            return b"[" + b",".join(s.render() for s in sessions if s.stream_id == stream_id) + b"]"
        return b"[" + b",".join(s.render() for s in sessions) + b"]"

    # --- between gateways and over time ------------------------------------------------------

    def refresh(self, streams: dict[str, float], sessions: dict[str, float]) -> None:
        """Heartbeats another gateway took (never moves a time back)."""
        for stream_id, ts in streams.items():
            stream = self.streams.get(stream_id)
            if stream is not None and ts > stream.last_heartbeat:
                stream.last_heartbeat, stream.rendered = ts, None
                stream.expires_at = max(stream.expires_at, ts + self.ttl_s)
        for session_id, ts in sessions.items():
            session = self.sessions.get(session_id)
            if session is not None:
                session.expires_at = max(session.expires_at, ts + self.ttl_s)

    def take_refreshed(self) -> tuple[dict[str, float], dict[str, float]]:
        streams, sessions = self._refreshed_streams, self._refreshed_sessions
        self._refreshed_streams, self._refreshed_sessions = {}, {}
        return streams, sessions

    def expired(self, now: float) -> tuple[list[Stream], list[Session]]:
        """Streams past their time, and sessions past theirs whose stream is not among them
        (a stream's sessions end with it)."""
        streams = [s for s in self.streams.values() if s.expires_at < now]
        gone = {s.id for s in streams}
        sessions = [s for s in self.sessions.values() if s.expires_at < now and s.stream_id not in gone]
        return streams, sessions

    def state_json(self) -> bytes:
        return (b'{"streams":' + self.streams_json() + b',"sessions":' + self.sessions_json()
                + b',"stream_types":' + self.types_json() + b"}")
