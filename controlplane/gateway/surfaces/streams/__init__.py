"""Streams surface: the Streams API document under /streams (discovery, advertisement,
negotiation with the publisher over RabbitMQ, sessions and their history).

The registry is each gateway's memory (``registry``), kept the same on every gateway by the
registry's events (``sync``); handlers are in ``routes``. Created types, advertised streams
and the sessions' history are in the store, so a restarted gateway lists the same streams
and its publishers' next heartbeats find them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime, timezone

from controlplane.bus import Requester
from controlplane.config import Settings
from controlplane.contract.streams import (
    RegistryState, SessionRecord, SessionStatus, StreamAdvertise, StreamInfo, StreamOffer, StreamRequest, StreamSession,
    StreamTypeCreate, StreamTypeInfo, epoch, iso,
)
from controlplane.gateway.context import GatewayContext
from controlplane.gateway.openapi import Op
from controlplane.gateway.surface import Handler, Surface
from controlplane.gateway.surfaces.streams import metrics, routes, sync
from controlplane.gateway.surfaces.streams.registry import HISTORY_FIELDS, StreamRegistry
from controlplane.gateway.surfaces.streams.sync import NAME, StreamsState, state_of
from controlplane.store.streams import Ending
from controlplane.store.writer import detach

TAGS = ("streams",)
_STREAM = (200, 404, 422)


def surface(settings: Settings) -> Surface:
    """The surface at ``CP_STREAMS_PREFIX`` + ``/streams`` (the document's paths by default)."""
    base = settings.streams_prefix + "/streams"

    def op(method: str, path: str, summary: str, **kwargs: object) -> Op:
        return Op(method, base + path, summary, tags=TAGS, **kwargs)  # type: ignore[arg-type]

    return Surface(
        name=NAME,
        routes=_routes(op),
        projections=tuple((pattern, sync.project) for pattern in sync.PATTERNS),
        load=_load,
        start=_start,
        stop=_stop,
    )


def _routes(_op: Callable[..., Op]) -> tuple[tuple[Op, Handler], ...]:
    # Static paths first: /streams/{stream_id} would match /streams/state too.
    return (
        (_op("GET", "/types", "Stream types: the eleven built in and those created", response=StreamTypeInfo,
             many=True), routes.list_types),
        (_op("POST", "/types", "Create a stream type (409 when the name is taken)", body=StreamTypeCreate,
             response=StreamTypeInfo, statuses=(201, 400, 409, 422), mutating=True), routes.create_type),
        (_op("GET", "/state", "Every stream, session and stream type in one answer", response=RegistryState),
         routes.registry_state),
        (_op("POST", "/advertise", "Advertise a stream; it lives for the TTL unless its heartbeats refresh it",
             body=StreamAdvertise, response=StreamInfo, statuses=(201, 400, 422, 503), mutating=True), routes.advertise),
        (_op("GET", "/sessions", "Active sessions", response=StreamSession, many=True, statuses=(200, 422),
             query=("stream_id",)), routes.list_sessions),
        (_op("GET", "/sessions/history", "Sessions' history, newest first", response=SessionRecord, many=True,
             statuses=(200, 422), query=("stream_id", "publisher_id", "consumer_id", "limit")), routes.session_history),
        (_op("DELETE", "/sessions/{session_id}", "Stop a session", statuses=_STREAM, mutating=True),
         routes.stop_session),
        (_op("POST", "/sessions/{session_id}/heartbeat", "Refresh a session's TTL", statuses=_STREAM, mutating=True),
         routes.session_heartbeat),
        (_op("GET", "", "Active streams", response=StreamInfo, many=True, query=("stream_type",)), routes.list_streams),
        (_op("GET", "/{stream_id}", "One stream (404 once expired or withdrawn)", response=StreamInfo,
             statuses=_STREAM), routes.get_stream),
        (_op("DELETE", "/{stream_id}", "Withdraw a stream; its sessions end with it", statuses=_STREAM, mutating=True),
         routes.withdraw),
        (_op("POST", "/{stream_id}/heartbeat", "Refresh a stream's TTL (404 once expired)", statuses=_STREAM,
             mutating=True), routes.heartbeat),
        (_op("POST", "/{stream_id}/request", "Ask the stream's publisher for it, over RabbitMQ; 201 with its offer",
             body=StreamRequest, response=StreamOffer, statuses=(201, 400, 404, 422, 502, 503, 504), mutating=True),
         routes.request_stream),
    )


async def _load(ctx: GatewayContext) -> None:
    """The registry as the store left it: every stream and open session gets a full TTL from
    now, so those whose publishers still beat stay, and the others expire as usual."""
    ttl = ctx.settings.stream_ttl_s
    registry = StreamRegistry(ttl)
    saved = await ctx.store.load_streams()
    now = time.time()
    orphans: list[Ending] = []
    for body in saved["types"]:
        registry.add_type(body)
    for listed in saved["streams"]:
        registry.add_stream(listed, epoch(listed.get("last_heartbeat") or listed["advertised_at"]), now + ttl)
    for row in saved["sessions"]:
        started = row["started_at"].timestamp()
        body = {name: row[name] for name in HISTORY_FIELDS}
        if registry.add_session({**body, "started_at": iso(started),
                                 "status": "active"}, started, now + ttl) is None:
            # Its stream is gone: a row a gateway that stopped in between left open.
            orphans.append(Ending(row["session_id"], SessionStatus.STREAM_EXPIRED.value,
                                  datetime.fromtimestamp(now, timezone.utc), round(now - started, 3)))
    if orphans:
        detach(ctx.store.close_streams([], orphans), "close orphaned stream sessions")
    ctx.surfaces[NAME] = StreamsState(registry)
    metrics.STREAMS.set_function(lambda: len(registry.streams))
    metrics.SESSIONS.set_function(lambda: len(registry.sessions))


async def _start(ctx: GatewayContext) -> None:
    state = state_of(ctx)
    state.requester = await Requester(ctx.bus, ctx.settings.gateway_name).start()
    state.tasks = sync.start_upkeep(ctx)


async def _stop(ctx: GatewayContext) -> None:
    state = state_of(ctx)
    await sync.announce_started(ctx)
    await asyncio.gather(*state.background, return_exceptions=True)
    for task in state.tasks:
        task.cancel()
    await asyncio.gather(*state.tasks, return_exceptions=True)
    if state.requester is not None:
        await state.requester.close()

