"""Events for callers that do not speak AMQP: ``GET /api/events`` as Server-Sent Events.

The tracker hands every event it consumes to the ``EventHub``; each connected client gets
those whose routing key matches one of its topic patterns (AMQP topic syntax). Every event
gets a sequence number and stays in a bounded ring buffer, so a client that reconnects with
``Last-Event-ID`` receives what it missed, or learns by an ``event: gap`` that part of it is
gone. ``publish`` runs inside the tracker's consumer and therefore never waits: a client
whose queue is full is disconnected rather than slowing every other reader down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from typing import Any

from aiohttp import web

from controlplane.gateway.middleware import ApiError
from controlplane.logs import get_logger

log = get_logger("gateway.events")

BUFFER_SIZE = 10_000
QUEUE_SIZE = 1_000
KEEPALIVE_S = 15.0
# How often an idle stream checks that its client is still connected.
LIVENESS_CHECK_S = 1.0
MAX_PATTERNS = 32
MAX_PATTERN_LENGTH = 255

_LITERAL_WORD = re.compile(r"[A-Za-z0-9_-]+")
_EVENT_ID = re.compile(r"[0-9]{1,20}")


# --- topic patterns ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TopicPattern:
    """An AMQP topic pattern: ``*`` is exactly one dot-separated word, ``#`` zero or more."""

    text: str
    words: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> TopicPattern:
        """The pattern, or ``ValueError`` with a reason a caller can act on."""
        if not text:
            raise ValueError("empty pattern")
        if len(text) > MAX_PATTERN_LENGTH:
            raise ValueError(f"pattern longer than {MAX_PATTERN_LENGTH} characters")
        words = tuple(text.split("."))
        for word in words:
            if not word:
                raise ValueError(f"{text!r} has an empty word (leading, trailing or doubled dot)")
            # RabbitMQ would take 'ev*' literally; that is never what a caller means.
            if word not in ("*", "#") and not _LITERAL_WORD.fullmatch(word):
                raise ValueError(f"{text!r}: word {word!r} must be '*', '#' or letters, digits, '-', '_'")
        return cls(text, words)

    def matches(self, routing_key: str) -> bool:
        return _compiled(self.words).fullmatch("." + routing_key) is not None


def topic_matches(pattern: str, routing_key: str) -> bool:
    """Whether ``routing_key`` matches ``pattern`` the way a RabbitMQ topic binding does."""
    return _compiled(tuple(pattern.split("."))).fullmatch("." + routing_key) is not None


@lru_cache(maxsize=4096)
def _compiled(words: tuple[str, ...]) -> re.Pattern[str]:
    """The pattern as a regular expression over ``"." + routing key``, where every word comes
    after its dot: ``*`` is one word, ``#`` zero or more, so '#' costs no backtracking of ours
    (every event passes through these on the tracker's path)."""
    parts = []
    for word in words:
        if word == "#":
            parts.append(r"(?:\.[^.]*)*")
        elif word == "*":
            parts.append(r"\.[^.]*")
        else:
            parts.append(r"\." + re.escape(word))
    return re.compile("".join(parts))


def parse_topics(values: Iterable[str]) -> tuple[TopicPattern, ...]:
    """Patterns from ``topics`` query values, each a comma-separated list; ``ValueError`` when
    there is none or one is malformed."""
    texts = [part.strip() for value in values for part in value.split(",")]
    if not any(texts):
        raise ValueError("give at least one pattern, e.g. topics=ev.*.swarm-create.demo")
    if len(texts) > MAX_PATTERNS:
        raise ValueError(f"at most {MAX_PATTERNS} patterns")
    return tuple(TopicPattern.parse(t) for t in texts)


# --- the hub ---------------------------------------------------------------------------------


class Event:
    """One consumed event with its sequence number; its SSE frame is encoded once, when a
    client first needs it (most events are held without anyone reading them). Given the
    message's own JSON, it holds those bytes rather than the parsed body: a ring of ten
    thousand events then weighs what their messages weigh."""

    __slots__ = ("id", "routing_key", "_body", "_raw", "_frame")

    def __init__(self, event_id: int, routing_key: str, body: Any, raw: bytes | None = None) -> None:
        self.id, self.routing_key = event_id, routing_key
        # A line break inside would end the SSE data line: such a body is encoded again.
        usable = raw is not None and b"\n" not in raw and b"\r" not in raw
        self._raw, self._body = (raw, None) if usable else (None, body)
        self._frame: bytes | None = None

    @property
    def frame(self) -> bytes:
        if self._frame is None:
            head = f"id: {self.id}\nevent: {self.routing_key}\ndata: ".encode()
            if self._raw is not None:
                data = b'{"routingKey":%s,"body":%s}' % (json.dumps(self.routing_key).encode(), self._raw.strip())
            else:
                data = json.dumps({"routingKey": self.routing_key, "body": self._body}, separators=(",", ":"),
                                  default=str).encode()
            self._frame = head + data + b"\n\n"
            self._body = self._raw = None
        return self._frame


def gap_frame(first_available: int, last_event_id: int) -> bytes:
    """Tells a resuming client that events after ``last_event_id`` and before
    ``first_available`` are no longer held. No ``id:``, so the client's position stays put."""
    data = json.dumps({"firstAvailableId": first_available, "lastEventId": last_event_id})
    return f"event: gap\ndata: {data}\n\n".encode()


class Subscription:
    """One client: a replayed backlog first, then live events held in a bounded queue."""

    def __init__(self, patterns: Sequence[TopicPattern], backlog: list[Event], gap: int | None, queue_size: int,
                 on_overflow: Callable[[], None] | None) -> None:
        self.patterns = tuple(patterns)
        self.gap = gap
        """First id still held when the client asked for older ones, else None."""
        self.closed = False
        self.overflowed = False
        self._backlog = deque(backlog)
        self._live: deque[Event] = deque()
        self._queue_size = queue_size
        self._on_overflow = on_overflow
        self._wake = asyncio.Event()

    def wants(self, routing_key: str) -> bool:
        return any(p.matches(routing_key) for p in self.patterns)

    def offer(self, event: Event) -> bool:
        """Queue a live event; False when the queue is full."""
        if len(self._live) >= self._queue_size:
            return False
        self._live.append(event)
        self._wake.set()
        return True

    async def next(self, timeout: float) -> Event | None:
        """The next event; None when ``timeout`` passed without one or the subscription closed."""
        if not self.closed and not self._backlog and not self._live:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
        if self.closed:
            return None
        if self._backlog:
            return self._backlog.popleft()
        if self._live:
            return self._live.popleft()
        return None

    def close(self, overflow: bool = False) -> None:
        if self.closed:
            return
        self.closed, self.overflowed = True, overflow
        # What is still queued is dropped: the client resumes from its Last-Event-ID.
        self._backlog.clear()
        self._live.clear()
        self._wake.set()
        if overflow and self._on_overflow is not None:
            try:
                self._on_overflow()
            except Exception:  # runs inside the tracker's publish, which must not fail
                log.exception("cutting a slow events client failed")


class EventHub:
    """Fan-out of consumed events to SSE clients, with a ring buffer for resuming."""

    def __init__(self, buffer_size: int = BUFFER_SIZE, queue_size: int = QUEUE_SIZE,
                 keepalive_s: float = KEEPALIVE_S, start_id: int | None = None) -> None:
        """``buffer_size`` events are kept for resuming; a subscriber may fall ``queue_size``
        events behind before it is dropped. Ids follow ``start_id``, by default the clock in
        microseconds: ids then keep increasing across restarts, so a client resuming with an
        id from before a restart is told of a gap instead of being sent the wrong events."""
        if buffer_size < 1 or queue_size < 1 or keepalive_s <= 0:
            raise ValueError("buffer_size, queue_size and keepalive_s must be positive")
        self.queue_size, self.keepalive_s = queue_size, keepalive_s
        self.closed = False
        self._ring: deque[Event] = deque(maxlen=buffer_size)
        self._last_id = time.time_ns() // 1000 if start_id is None else start_id
        self._subscribers: set[Subscription] = set()

    @property
    def last_id(self) -> int:
        """The id of the latest event published (``start_id`` before the first)."""
        return self._last_id

    @property
    def buffer_size(self) -> int:
        return self._ring.maxlen or 0

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(self, routing_key: str, body: Any, raw: bytes | None = None) -> None:
        """Offer one consumed event to every subscriber whose patterns match it; ``raw``: the
        message's JSON, if the body was parsed from it."""
        if self.closed:
            return
        if "\n" in routing_key or "\r" in routing_key:
            # It would break the SSE framing; no component of ours sends such a key.
            log.warning("event with a line break in its routing key not streamed", routing_key=routing_key)
            return
        self._last_id += 1
        event = Event(self._last_id, routing_key, body, raw)
        self._ring.append(event)
        for sub in [s for s in self._subscribers if s.wants(routing_key)]:
            if not sub.offer(event):
                log.info("events client fell behind; disconnected", queue_size=self.queue_size, last_id=event.id)
                self._subscribers.discard(sub)
                sub.close(overflow=True)

    def subscribe(self, patterns: Sequence[TopicPattern], last_event_id: int | None = None,
                  on_overflow: Callable[[], None] | None = None) -> Subscription:
        """A new subscriber; with ``last_event_id``, first the held events after it that match.

        ``on_overflow`` runs (synchronously, inside ``publish``) when the subscriber is dropped
        for falling behind, so its stream can cut a connection stuck in a write.
        """
        backlog, gap = self._replay(patterns, last_event_id)
        sub = Subscription(patterns, backlog, gap, self.queue_size, on_overflow)
        if self.closed:
            sub.close()
        else:
            self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)
        sub.close()

    def close(self) -> None:
        """End every stream; later subscriptions start closed."""
        self.closed = True
        for sub in list(self._subscribers):
            sub.close()
        self._subscribers.clear()

    def _replay(self, patterns: Sequence[TopicPattern], last_event_id: int | None) -> tuple[list[Event], int | None]:
        if last_event_id is None:
            return [], None
        first = self._ring[0].id if self._ring else self._last_id + 1
        gap: int | None = None
        start = last_event_id + 1
        # An id this hub never issued (another gateway's, or the clock went back): everything
        # held may be news.
        if start < first or last_event_id > self._last_id:
            gap, start = first, first
        held = islice(self._ring, start - first, None)
        return [e for e in held if any(p.matches(e.routing_key) for p in patterns)], gap


# --- the HTTP stream -------------------------------------------------------------------------


def _patterns(request: web.Request) -> tuple[TopicPattern, ...]:
    try:
        return parse_topics(request.query.getall("topics", []))
    except ValueError as exc:
        raise ApiError(400, "invalid-topics", f"topics: {exc}", [{"field": "topics", "reason": str(exc)}]) from None


def _last_event_id(request: web.Request) -> int | None:
    # The header wins: a browser's EventSource sets it on every reconnect, while the URL
    # keeps whatever lastEventId the first connection carried.
    for field, raw in (("Last-Event-ID", request.headers.get("Last-Event-ID")),
                       ("lastEventId", request.query.get("lastEventId"))):
        if raw is None or not raw.strip():
            continue
        if not _EVENT_ID.fullmatch(raw.strip()):
            reason = "must be the id of the last event received: a non-negative integer"
            raise ApiError(400, "invalid-last-event-id", f"{field}: {reason}", [{"field": field, "reason": reason}])
        return int(raw)
    return None


async def stream_events(request: web.Request) -> web.StreamResponse:
    """``GET /api/events?topics=<pattern>[,<pattern>…]``: matching events as Server-Sent Events."""
    from controlplane.gateway.context import CTX  # context imports this module

    patterns = _patterns(request)
    last_event_id = _last_event_id(request)
    hub = request.config_dict[CTX].events  # also found when the route sits in a sub-app
    if hub.closed:
        raise ApiError(503, "shutting-down", "the gateway is shutting down; reconnect with Last-Event-ID")

    writing = False
    transport = request.transport

    def cut_if_stuck() -> None:
        # A client too slow to drain its queue is usually one the socket cannot write to: a
        # write blocked on it would never notice the subscription ended, so cut the connection.
        if writing and transport is not None:
            transport.abort()

    sub = hub.subscribe(patterns, last_event_id, on_overflow=cut_if_stuck)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})

    async def send(data: bytes) -> None:
        nonlocal writing
        writing = True
        try:
            await response.write(data)
        finally:
            writing = False

    loop = asyncio.get_running_loop()
    try:
        await response.prepare(request)
        await send(b": stream open\n\n")  # sends the headers now, so the client knows it is subscribed
        if sub.gap is not None:
            await send(gap_frame(sub.gap, last_event_id or 0))
        quiet_since = loop.time()
        while True:
            event = await sub.next(min(LIVENESS_CHECK_S, hub.keepalive_s))
            if sub.closed or request.transport is None or request.transport.is_closing():
                break
            if event is not None:
                await send(event.frame)
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= hub.keepalive_s:
                await send(b": keep-alive\n\n")  # proxies close connections that stay silent
                quiet_since = loop.time()
    except ConnectionError:
        pass  # the client left, or was cut for falling behind
    finally:
        hub.unsubscribe(sub)
    return response
