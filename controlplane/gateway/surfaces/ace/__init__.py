"""Engine-pool surface (the engine-pool orchestrator API, both document versions), under a
configurable prefix (``CP_ACE_PREFIX``, default ``/ace``) and served for the pool the
settings configure (``CP_ACE_POOL_ID``, made from the ``CP_ACE_TEMPLATE`` scenario).

Routes, request and response fields are the document's; the read model is ``view.PoolView``;
handlers and projections are in ``routes``.
"""

from __future__ import annotations

import asyncio

from controlplane.bus.batch import Batcher
from controlplane.config import Settings
from controlplane.contract import keys
from controlplane.contract.pool import (
    AceProvisionRequest, EngineState, ProvisionRequest, StreamEnded, StreamStarted, StreamState, StreamStatSnapshot,
)
from controlplane.gateway.metrics import metrics_view
from controlplane.gateway.context import GatewayContext
from controlplane.gateway.openapi import Op
from controlplane.gateway.surface import Surface
from controlplane.gateway.surfaces.ace import metrics, routes
from controlplane.gateway.surfaces.ace.view import ENDED_RETENTION, STATS_RETENTION, PoolView
from controlplane.contract.models import utcnow
from controlplane.scenarios import configured_pool
from controlplane.store.writer import detach

PURGE_INTERVAL_S = 3600.0
TAGS = ("engine pool",)


def surface(settings: Settings) -> Surface | None:
    """The surface for these settings; None when no pool is configured."""
    if not settings.ace_pool_id:
        return None
    p = settings.ace_prefix

    def op(method: str, path: str, summary: str, **kwargs: object) -> Op:
        return Op(method, p + path, summary, tags=TAGS, **kwargs)  # type: ignore[arg-type]

    retry = (503, 504)
    handlers = [
        (op("POST", "/provision", "Start a container of the caller's image (the image policy applies)",
            body=ProvisionRequest, statuses=(200, 400, 404, 409, 422, *retry), mutating=True), routes.provision),
        (op("POST", "/provision/acestream", "Start an AceStream engine with ports of its own and a built CONF",
            body=AceProvisionRequest, statuses=(200, 400, 409, 422, *retry), mutating=True),
         routes.provision_acestream),
        (op("POST", "/events/stream_started", "Record a stream started on an engine (idempotent)",
            body=StreamStarted, response=StreamState, statuses=(200, 400), mutating=True), routes.stream_started),
        (op("POST", "/events/stream_ended", "Record a stream ended (idempotent; unknown: updated false)",
            body=StreamEnded, statuses=(200, 400), mutating=True), routes.stream_ended),
        (op("GET", "/engines", "Engines with their health", response=EngineState, many=True),
         routes.list_engines),
        (op("GET", "/engines/{container_id}", "One engine and its started streams", statuses=(200, 404)),
         routes.get_engine),
        (op("GET", "/streams", "Streams", response=StreamState, many=True, statuses=(200, 422),
            query=("status", "container_id")),
         routes.list_streams),
        (op("GET", "/streams/{stream_id}/stats", "A stream's statistics", response=StreamStatSnapshot, many=True,
            statuses=(200, 400, 404), query=("since",)), routes.stream_stats),
        (op("GET", "/containers/{container_id}", "Docker's inspection of an engine", statuses=(200, 404, *retry)),
         routes.get_container),
        (op("GET", "/by-label", "Inspections of the engines carrying a label", statuses=(200, 400, *retry),
            query=("key", "value"), access="protected", many=True), routes.by_label),
        (op("DELETE", "/containers/{container_id}", "Remove an engine", statuses=(200, 404, *retry), mutating=True),
         routes.delete_container),
        (op("POST", "/gc", "Collect idle engines above the minimum after the grace period", statuses=(200, *retry),
            mutating=True), routes.collect),
        (op("POST", "/scale/{demand}", "Bring the pool to a demand, clamped to its bounds",
            statuses=(200, 400, *retry), mutating=True), routes.scale),
        (op("GET", "/vpn/status", "The VPN container's status, double-checked through the engines"),
         routes.vpn_status),
    ]
    if p:  # with no prefix, the gateway's own /metrics is the same document
        handlers.append((op("GET", "/metrics", "Prometheus metrics (orch_* included)", access="open"), metrics_view))
    pool = settings.ace_pool_id
    return Surface(
        name=routes.NAME,
        routes=tuple(handlers),
        signals={"pool-provision": 60_000, "pool-remove": 30_000, "pool-gc": 60_000, "pool-scale": 180_000,
                 "pool-inspect": 15_000},
        projections=(
            *((keys.ready_key(signal, pool), routes.on_pool_outcome) for signal in keys.POOL_SIGNALS
              if signal != "pool-inspect"),
            *((keys.status_key(kind, keys.CONTROLLER_ROLE, pool), routes.on_controller_status)
              for kind in ("status-full", "status-delta")),
            (keys.ready_key(keys.STREAM_EVENTS, pool), routes.on_stream_events),
            (keys.ready_key(keys.STREAM_STATS, pool), routes.on_stream_stats),
        ),
        load=_load,
        start=_start,
        stop=_stop,
    )


async def _load(ctx: GatewayContext) -> None:
    plan = configured_pool(ctx.settings, ctx.catalog)
    assert plan is not None and plan.pool is not None
    view = PoolView(ctx.store, ctx.settings.ace_pool_id, plan.pool.stats_history, bool(plan.pool.vpn_container))
    await view.load()
    ctx.surfaces[routes.NAME] = view
    ctx.surfaces[routes.NAME + ".events"] = Batcher(lambda events: routes.announce(ctx, events))
    metrics.STREAMS_ACTIVE.set_function(view.started_count)


async def _start(ctx: GatewayContext) -> None:
    ctx.surfaces[routes.NAME + ".tasks"] = [asyncio.create_task(routes.keep_pool(ctx), name="ace.keep-pool"),
                                            asyncio.create_task(_purge_forever(ctx), name="ace.purge")]


async def _stop(ctx: GatewayContext) -> None:
    tasks = ctx.surfaces.pop(routes.NAME + ".tasks", [])
    keeping = ctx.surfaces.pop(routes.NAME + ".keeping", None)
    if keeping is not None:
        tasks.append(keeping)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _purge_forever(ctx: GatewayContext) -> None:
    while True:
        now = utcnow()
        detach(ctx.store.purge_pool(now - ENDED_RETENTION, now - STATS_RETENTION), "purge pool")
        await asyncio.sleep(PURGE_INTERVAL_S)
