"""Handlers of the streams surface (the Streams API document, under /streams).

Reads and heartbeats touch memory only. A change is applied to memory, written through the
store's writer and announced to the other gateways (``sync``). A stream request is a
negotiation with the stream's publisher over RabbitMQ: ``sig.stream-request.<streamId>``,
published mandatory, answered on ``ph.control`` under the request's reply-to. Its outcomes:

- nobody bound to the key (the broker returned it): 502, no publisher is listening;
- no answer within ``CP_STREAM_REQUEST_TIMEOUT_S``: 504;
- an answer that is not a ``NegotiationReply``: 502, and no session;
- ``accepted: false``: 502 with the publisher's reason;
- accepted: a session, 201 with the offer.

Errors carry the gateway's ``{"error", "message", "fields"}`` and, for clients written for
the document's FastAPI origin, ``detail``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from aiohttp import web
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from controlplane.bus import RequesterClosed, Unroutable
from controlplane.contract import keys
from controlplane.contract.models import new_id, utcnow
from controlplane.contract.streams import (
    NegotiationReply, NegotiationRequest, SessionRecord, SessionStatus, StreamAdvertise, StreamRequest,
    StreamTypeCreate, StreamTypeInfo,
)
from controlplane.gateway.context import GatewayContext, context_of
from controlplane.gateway.middleware import ApiError, read_json, validation_error
from controlplane.gateway.surfaces.streams import metrics, sync
from controlplane.gateway.surfaces.streams.registry import history_row
from controlplane.gateway.surfaces.streams.sync import state_of
from controlplane.logs import get_logger
from controlplane.store.writer import detach

log = get_logger("gateway.streams")

STREAM_HEARTBEATS = metrics.HEARTBEATS.labels("stream")
SESSION_HEARTBEATS = metrics.HEARTBEATS.labels("session")
NEGOTIATED = metrics.NEGOTIATIONS.labels("accepted")
HISTORY_LIMIT_MAX = 500


def _problem(status: int, code: str, message: str, field: str | None = None, reason: str | None = None,
             **extra: Any) -> ApiError:
    fields = [{"field": field, "reason": reason or message}] if field else None
    return ApiError(status, code, message, fields, detail=message, **extra)


def _invalid(exc: ValidationError) -> ApiError:
    error = validation_error(exc, 422)
    error.extra["detail"] = error.message
    return error


def _uuid(value: str, field: str) -> str:
    """An id of the path or query as the registry writes it (lowercase), or a 422 naming it."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise _problem(422, f"invalid-{field.replace('_', '-')}", f"{field} {value!r} must be a UUID, e.g. "
                       "550e8400-e29b-41d4-a716-446655440000", field, "must be a UUID") from None


async def _model(request: web.Request, model: type[Any]) -> Any:
    try:
        return model.model_validate(await read_json(request))
    except ValidationError as exc:
        raise _invalid(exc) from None


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


def _stream_or_404(ctx: GatewayContext, stream_id: str) -> Any:
    stream = state_of(ctx).registry.streams.get(stream_id)
    if stream is None:
        raise _problem(404, "unknown-stream", f"stream {stream_id} is not advertised (it expired or was withdrawn)")
    return stream


# --- stream types ----------------------------------------------------------------------------


async def list_types(request: web.Request) -> web.Response:
    return _json(state_of(context_of(request)).registry.types_json())


async def create_type(request: web.Request) -> web.Response:
    ctx = context_of(request)
    body: StreamTypeCreate = await _model(request, StreamTypeCreate)
    registry = state_of(ctx).registry
    taken = _problem(409, "stream-type-exists", f"stream type {body.name!r} already exists", "name", "already exists")
    if body.name in registry.types:
        raise taken
    now = utcnow()
    info = StreamTypeInfo(id=new_id(), created_at=now, updated_at=now, **body.model_dump())
    try:
        await asyncio.shield(ctx.store.add_stream_type(info.name, info.to_dict(), now))
    except IntegrityError:
        raise taken from None  # created through another gateway a moment ago
    registry.add_type(info)
    await sync.announce_quietly(ctx, keys.STREAM_TYPE_CREATED, info.name, stream_type=info.to_dict())
    return _json(json.dumps(info.to_dict()).encode(), 201)


# --- streams ---------------------------------------------------------------------------------


async def list_streams(request: web.Request) -> web.Response:
    stream_type = request.query.get("stream_type") or None
    return _json(state_of(context_of(request)).registry.streams_json(stream_type))


async def get_stream(request: web.Request) -> web.Response:
    ctx = context_of(request)
    return _json(_stream_or_404(ctx, _uuid(request.match_info["stream_id"], "stream_id")).render())


async def advertise(request: web.Request) -> web.Response:
    ctx = context_of(request)
    advert: StreamAdvertise = await _model(request, StreamAdvertise)
    registry = state_of(ctx).registry
    if advert.stream_type not in registry.types:
        raise _problem(422, "unknown-stream-type", f"stream_type {advert.stream_type!r} is not a stream type; "
                       "GET /streams/types lists them, POST /streams/types creates one", "stream_type",
                       "unknown stream type")
    stream = registry.advertise(new_id(), advert, time.time())
    listed = stream.listed()
    try:
        await sync.announce(ctx, keys.STREAM_ADVERTISED, stream.id, stream=listed)
    except Exception as exc:
        registry.remove_stream(stream.id)  # the other gateways could not learn of it: not advertised
        log.warning("stream not advertised: the broker did not take its event", error=repr(exc))
        raise _problem(503, "broker-unavailable", "the broker did not take the advertisement; retry shortly",
                       retryable=True) from None
    detach(ctx.store.save_advertised_stream(stream.id, listed, utcnow()), "save advertised stream")
    return _json(stream.render(), 201)


async def withdraw(request: web.Request) -> web.Response:
    ctx = context_of(request)
    stream_id = _uuid(request.match_info["stream_id"], "stream_id")
    _stream_or_404(ctx, stream_id)
    stream, sessions = state_of(ctx).registry.remove_stream(stream_id)
    now = time.time()
    await asyncio.shield(ctx.store.close_streams(
        [stream_id], [sync.ending(s, SessionStatus.WITHDRAWN, now) for s in sessions]))
    await sync.announce_ended(ctx, stream, sessions, SessionStatus.WITHDRAWN)
    return web.json_response({"status": "withdrawn", "stream_id": stream_id,
                              "closed_sessions": [s.id for s in sessions]})


async def heartbeat(request: web.Request) -> web.Response:
    return _refreshed(request, "stream_id", state_of(context_of(request)).registry.heartbeat, STREAM_HEARTBEATS,
                      "unknown-stream", "is not advertised (it expired or was withdrawn): advertise it again")


def _refreshed(request: web.Request, field: str, refresh: Any, counted: Any, code: str, gone: str) -> web.Response:
    """A heartbeat: the id of ``field`` refreshed in memory, or a 404 saying what to do now."""
    ident = _uuid(request.match_info[field], field)
    if refresh(ident, time.time()) is None:
        raise _problem(404, code, f"{field.removesuffix('_id')} {ident} {gone}")
    counted.inc()
    return web.json_response({"status": "ok", field: ident})


# --- negotiation -----------------------------------------------------------------------------


async def request_stream(request: web.Request) -> web.Response:
    ctx = context_of(request)
    state = state_of(ctx)
    stream_id = _uuid(request.match_info["stream_id"], "stream_id")
    stream = _stream_or_404(ctx, stream_id)
    asked = (await _model(request, StreamRequest)).model_dump()
    session_id = new_id()
    question = NegotiationRequest(session_id=session_id, stream_id=stream_id, stream_name=stream.name, **asked)
    reply = await _negotiate(ctx, stream_id, question.model_dump_json().encode())
    stream = state.registry.streams.get(stream_id)
    if stream is None:  # withdrawn or expired while its publisher answered
        metrics.NEGOTIATIONS.labels("gone").inc()
        raise _problem(404, "unknown-stream", f"stream {stream_id} ended while its publisher answered")
    offer = {"session_id": session_id, "stream_id": stream_id, "stream_name": stream.name,
             "stream_type": stream.stream_type, "protocol": str(reply.protocol or stream.protocol),
             "publisher_address": reply.address or stream.address,
             "publisher_port": stream.port if reply.port is None else reply.port,
             "transport_config": reply.transport_config}
    now = time.time()
    _, body = state.registry.open_session(session_id, stream, offer, asked, now)
    detach(ctx.store.open_stream_session(history_row(body, now)), "open stream session")
    sync.session_started(ctx, body)
    NEGOTIATED.inc()
    return web.json_response(offer, status=201)


async def _negotiate(ctx: GatewayContext, stream_id: str, question: bytes) -> NegotiationReply:
    requester = state_of(ctx).requester
    timeout = ctx.settings.stream_request_timeout_s
    started = time.perf_counter()
    try:
        if requester is None:
            raise RequesterClosed("not started")
        answer = await requester.request(keys.stream_request_key(stream_id), question, timeout)
    except Unroutable:
        metrics.NEGOTIATIONS.labels("no-publisher").inc()
        raise _problem(502, "no-publisher", f"no publisher is listening for stream {stream_id}") from None
    except TimeoutError:
        metrics.NEGOTIATIONS.labels("timeout").inc()
        raise _problem(504, "publisher-timeout", f"the publisher of stream {stream_id} did not answer within "
                       f"{timeout:g} s") from None
    except ValueError as exc:  # not a JSON object
        metrics.NEGOTIATIONS.labels("malformed").inc()
        raise _problem(502, "malformed-reply", f"the publisher's answer is not a JSON object: {exc}") from None
    except (RequesterClosed, ConnectionError) as exc:
        raise _problem(503, "broker-unavailable", f"the broker cannot carry the request now: {exc}",
                       retryable=True) from None
    finally:
        metrics.NEGOTIATION_SECONDS.observe(time.perf_counter() - started)
    try:
        reply = NegotiationReply.model_validate(answer)
    except ValidationError as exc:
        metrics.NEGOTIATIONS.labels("malformed").inc()
        raise _problem(502, "malformed-reply", f"the publisher's answer is not a valid reply "
                       f"({validation_error(exc).message}); no session was opened") from None
    if not reply.accepted:
        metrics.NEGOTIATIONS.labels("rejected").inc()
        reason = reply.reason or "no reason given"
        raise _problem(502, "rejected", f"the publisher rejected the request: {reason}", reason=reason)
    return reply


# --- sessions --------------------------------------------------------------------------------


async def list_sessions(request: web.Request) -> web.Response:
    raw = request.query.get("stream_id")
    stream_id = _uuid(raw, "stream_id") if raw else None
    return _json(state_of(context_of(request)).registry.sessions_json(stream_id))


async def session_history(request: web.Request) -> web.Response:
    ctx = context_of(request)
    query = request.query
    raw_limit = query.get("limit", "50")
    try:
        limit = int(raw_limit)
        if not 1 <= limit <= HISTORY_LIMIT_MAX:
            raise ValueError
    except ValueError:
        raise _problem(422, "invalid-limit", f"limit {raw_limit!r} must be an integer from 1 to {HISTORY_LIMIT_MAX}",
                       "limit", f"must be an integer from 1 to {HISTORY_LIMIT_MAX}") from None
    stream_id = _uuid(query["stream_id"], "stream_id") if query.get("stream_id") else None
    rows = await ctx.store.stream_session_history(stream_id, query.get("publisher_id") or None,
                                                  query.get("consumer_id") or None, limit)
    return _json(json.dumps([SessionRecord.model_validate(row).to_dict() for row in rows]).encode())


async def stop_session(request: web.Request) -> web.Response:
    ctx = context_of(request)
    session_id = _uuid(request.match_info["session_id"], "session_id")
    session = state_of(ctx).registry.remove_session(session_id)
    if session is None:
        raise _problem(404, "unknown-session", f"session {session_id} is not active (it expired or was stopped)")
    await asyncio.shield(ctx.store.close_streams([], [sync.ending(session, SessionStatus.STOPPED, time.time())]))
    await sync.announce_ended(ctx, None, [session], SessionStatus.STOPPED)
    return web.json_response({"status": "stopped", "session_id": session_id})


async def session_heartbeat(request: web.Request) -> web.Response:
    return _refreshed(request, "session_id", state_of(context_of(request)).registry.session_heartbeat,
                      SESSION_HEARTBEATS, "unknown-session",
                      "is not active (it expired or was stopped): request the stream again")


# --- the whole registry ----------------------------------------------------------------------


async def registry_state(request: web.Request) -> web.Response:
    return _json(state_of(context_of(request)).registry.state_json())

