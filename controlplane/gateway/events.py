"""Events for callers that do not speak AMQP: ``GET /api/events`` as Server-Sent Events.

The tracker hands every event it consumes to the ``EventHub``; each connected client gets
those whose routing key matches one of its topic patterns (AMQP topic syntax).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web


class EventHub:
    """Fan-out of consumed events to SSE clients (to be completed)."""

    def publish(self, routing_key: str, body: dict[str, Any]) -> None:
        """Offer one consumed event to every subscriber whose patterns match it."""


async def stream_events(request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotImplemented()
