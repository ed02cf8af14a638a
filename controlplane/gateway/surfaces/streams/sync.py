"""How every gateway's streams registry stays the same: events out, events in, heartbeats
shared, expiry swept, history kept in bounds.

What a gateway sees happen (an advertisement, a withdrawal, a session started or stopped, a
type created) it applies to its memory, then announces as ``ev.ready.<event>.<scope>`` on
``ph.control``; every gateway consumes those from its own queue and applies the others'
(``project``). Heartbeats are too many for one event each: each gateway sends the ones it
took, coalesced, once per flush interval (``ev.ready.stream-heartbeats.<gateway>``). Sessions
opened within ``SESSIONS_GATHER_S`` go out together too (``ev.ready.stream-sessions-started.
<gateway>``): one message per session was half a negotiation's cost, in the broker and in
every gateway.

Every gateway sweeps. The store's compare-and-set (``Store.close_streams``) says which one
removed a stream's row or closed a session's, and only that one announces the expiry, so
with several gateways on one store each expiry is announced once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from collections.abc import Awaitable
from typing import Any

from pydantic import ValidationError

from controlplane.bus import Requester
from controlplane.contract import keys
from controlplane.contract.models import new_id, utcnow
from controlplane.contract.streams import RegistryEvent, SessionStatus, epoch
from controlplane.gateway.context import GatewayContext
from controlplane.gateway.surfaces.streams import metrics
from controlplane.gateway.surfaces.streams.registry import Session, Stream, StreamRegistry
from controlplane.logs import get_logger
from controlplane.store.streams import Ending
from controlplane.store.writer import detach

log = get_logger("gateway.streams")

NAME = "streams"
RETENTION_INTERVAL_S = 3600.0
SESSIONS_GATHER_S = 0.02


@dataclass
class StreamsState:
    """The surface's part of the gateway: its registry, its requester for negotiations, and
    ``origin``, which marks the events this process announced (a restarted gateway has
    another, so it applies what its predecessor announced)."""

    registry: StreamRegistry
    requester: Requester | None = None
    origin: str = field(default_factory=new_id)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    started: list[dict[str, Any]] = field(default_factory=list)  # sessions opened, not yet announced
    background: set[asyncio.Future[None]] = field(default_factory=set)  # announcements not waited for


def state_of(ctx: GatewayContext) -> StreamsState:
    return ctx.surfaces[NAME]


# --- events out ------------------------------------------------------------------------------


async def announce(ctx: GatewayContext, event: str, scope: str, **fields: Any) -> None:
    """Publish one registry event (confirmed by the broker before this returns). Not
    persistent: what must outlive a broker restart is in the store, and a gateway that starts
    loads it from there; the broker's disk stays out of every negotiation.

    Sessions opened here and not yet announced go first, so no gateway hears of a session's
    end before its start."""
    if event != keys.SESSIONS_STARTED and state_of(ctx).started:
        await announce_started(ctx)
    body = RegistryEvent(ts=utcnow(), event=event, origin=state_of(ctx).origin, **fields)
    await ctx.bus.publish(keys.registry_event_key(event, scope), body.model_dump_json(exclude_none=True).encode(),
                          persistent=False)


async def announce_quietly(ctx: GatewayContext, event: str, scope: str, **fields: Any) -> None:
    """For events whose change is already done and durable: a broker that cannot take the
    event is logged; the other gateways then learn of it when their sweeper finds the row gone."""
    try:
        await announce(ctx, event, scope, **fields)
    except Exception as exc:
        log.warning("streams event not announced", event=event, scope=scope, error=repr(exc))


async def announce_ended(ctx: GatewayContext, stream: Stream | None, sessions: list[Session],
                         status: SessionStatus) -> None:
    """A stream gone (withdrawn or expired) and the sessions that ended with it or alone."""
    if stream is not None:
        event = keys.STREAM_WITHDRAWN if status == SessionStatus.WITHDRAWN else keys.STREAM_EXPIRED
        await announce_quietly(ctx, event, stream.id, stream_id=stream.id, session_ids=[s.id for s in sessions],
                               status=status)
    for session in sessions:
        await announce_quietly(ctx, keys.SESSION_STOPPED, session.stream_id, stream_id=session.stream_id,
                               session_ids=[session.id], status=status)


def session_started(ctx: GatewayContext, body: dict[str, Any]) -> None:
    """Announce the session opened with ``body`` (``StreamRegistry.open_session``'s) with the
    others opened here within ``SESSIONS_GATHER_S``. Not waited for: the consumer has its
    offer from memory, and the other gateways learn of the session long before its first
    heartbeat is due."""
    state = state_of(ctx)
    if not state.started:
        asyncio.get_running_loop().call_later(SESSIONS_GATHER_S,
                                              lambda: in_background(ctx, announce_started(ctx)))
    state.started.append(body)


async def announce_started(ctx: GatewayContext) -> None:
    """The sessions gathered so far, in one event (nothing when none are)."""
    state = state_of(ctx)
    started, state.started = state.started, []
    if started:
        await announce_quietly(ctx, keys.SESSIONS_STARTED, ctx.settings.gateway_name, started=started)


def ending(session: Session, status: SessionStatus, now: float) -> Ending:
    return Ending(session.id, status.value, datetime.fromtimestamp(now, timezone.utc),
                  round(max(0.0, now - session.started), 3))


def in_background(ctx: GatewayContext, work: Awaitable[None]) -> None:
    """Run ``work`` without waiting for it, held until done (and waited for at stop)."""
    background = state_of(ctx).background
    task = asyncio.ensure_future(work)
    background.add(task)
    task.add_done_callback(background.discard)


# --- events in -------------------------------------------------------------------------------


async def project(ctx: GatewayContext, _key: str, body: dict[str, Any]) -> None:
    """Another gateway's registry event, applied to this one's memory."""
    state = state_of(ctx)
    if body.get("origin") == state.origin:
        return  # announced here: memory has it already
    try:
        event = RegistryEvent.model_validate(body)
    except ValidationError as exc:
        log.warning("streams event ignored: not understood", error=str(exc))
        return
    registry, now = state.registry, time.time()
    if event.event == keys.STREAM_HEARTBEATS:
        registry.refresh(event.streams, event.sessions)
    elif event.event == keys.STREAM_ADVERTISED and event.stream:
        beat = epoch(event.stream["last_heartbeat"]) if event.stream.get("last_heartbeat") else now
        registry.add_stream(event.stream, beat, beat + registry.ttl_s)
    elif event.event in (keys.STREAM_WITHDRAWN, keys.STREAM_EXPIRED) and event.stream_id:
        registry.remove_stream(event.stream_id)
    elif event.event == keys.SESSIONS_STARTED:
        for session in event.started:
            # Its own start time: a sweeper here closes its history row with the true duration.
            started = epoch(session["started_at"]) if session.get("started_at") else now
            registry.add_session(session, started, now + registry.ttl_s)
    elif event.event == keys.SESSION_STOPPED:
        for session_id in event.session_ids:
            registry.remove_session(session_id)
    elif event.event == keys.STREAM_TYPE_CREATED and event.stream_type:
        registry.add_type(event.stream_type)


PATTERNS = tuple(keys.ready_key(event, "*") for event in keys.REGISTRY_EVENTS)


# --- over time -------------------------------------------------------------------------------


async def sweep(ctx: GatewayContext, now: float | None = None) -> None:
    """Expire what is due: gone from memory at once, then the store decides who announces."""
    state = state_of(ctx)
    now = time.time() if now is None else now
    streams, lone = state.registry.expired(now)
    if not streams and not lone:
        return
    endings: list[Ending] = []
    gone: list[tuple[Stream, list[Session]]] = []
    for stream in streams:
        _, sessions = state.registry.remove_stream(stream.id)
        gone.append((stream, sessions))
        endings.extend(ending(s, SessionStatus.STREAM_EXPIRED, now) for s in sessions)
    for session in lone:
        state.registry.remove_session(session.id)
        endings.append(ending(session, SessionStatus.EXPIRED, now))
    dropped, closed = await ctx.store.close_streams([s.id for s in streams], endings)
    won_streams, won_sessions = set(dropped), set(closed)
    metrics.EXPIRED.labels("stream").inc(len(won_streams))
    metrics.EXPIRED.labels("session").inc(len(won_sessions))
    for stream, sessions in gone:
        ours = [s for s in sessions if s.id in won_sessions]
        await announce_ended(ctx, stream if stream.id in won_streams else None, ours, SessionStatus.STREAM_EXPIRED)
    await announce_ended(ctx, None, [s for s in lone if s.id in won_sessions], SessionStatus.EXPIRED)


async def flush_heartbeats(ctx: GatewayContext) -> None:
    streams, sessions = state_of(ctx).registry.take_refreshed()
    if streams or sessions:
        await announce(ctx, keys.STREAM_HEARTBEATS, ctx.settings.gateway_name, streams=streams, sessions=sessions)


async def _every(interval_s: float, what: str, work: Any, at_once: bool = False) -> None:
    while True:
        if not at_once:
            await asyncio.sleep(interval_s)
        at_once = False
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("streams upkeep failed", work=what)


def start_upkeep(ctx: GatewayContext) -> list[asyncio.Task[None]]:
    """The sweeper, the heartbeat flush and the history's retention, as tasks."""
    ttl = ctx.settings.stream_ttl_s

    async def retention() -> None:
        cutoff = utcnow() - timedelta(days=ctx.settings.stream_history_days)
        detach(ctx.store.purge_stream_history(cutoff), "purge stream history")

    # A heartbeat reaches the other gateways within a fifth of the TTL, and an expiry is
    # noticed within a tenth of it.
    return [asyncio.create_task(_every(min(1.0, ttl / 10), "sweep", lambda: sweep(ctx)), name="streams.sweep"),
            asyncio.create_task(_every(min(1.0, ttl / 5), "flush", lambda: flush_heartbeats(ctx)),
                                name="streams.flush"),
            asyncio.create_task(_every(RETENTION_INTERVAL_S, "retention", retention, at_once=True),
                                name="streams.retention")]
