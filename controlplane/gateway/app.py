"""The gateway's aiohttp application: routes of every surface, health and metrics.

``open_gateway`` loads the gateway's memory from the store (idempotency records, open
operations, swarms, the registry), starts the tracker and builds the application around
them, so tests and ``controlplane up`` share one path.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from collections.abc import AsyncIterator

import sqlalchemy as sa
from aiohttp import web

from controlplane.bus import Bus
from controlplane.config import Settings
from controlplane.contract.models import utcnow
from controlplane.gateway.actions import register_signals
from controlplane.gateway.context import CTX, GatewayContext, context_of
from controlplane.gateway.events import EventHub, stream_events
from controlplane.gateway.metrics import metrics_view
from controlplane.gateway.ledger import Ledger
from controlplane.gateway.dispatch import settle_dispatches
from controlplane.gateway.middleware import OPEN_PATHS, Access, Wrapped, make_middlewares, tag_stream
from controlplane.gateway.openapi import Op, document
from controlplane.gateway.readmodels import Swarms
from controlplane.gateway.registry import Registry
from controlplane.gateway.surface import Projections, Surface, mount
from controlplane.gateway.surfaces import surfaces_for
from controlplane.gateway.tracker import Tracker
from controlplane.runtime.policy import RuntimePolicy
from controlplane.scenarios import load_catalog
from controlplane.store import Store, open_store

READY_PROBE_S = 2.0


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when a confirmed publish goes through and the store answers a query."""
    ctx = context_of(request)
    checks: dict[str, str] = {}
    try:
        await ctx.bus.probe(READY_PROBE_S)
        checks["broker"] = "ok"
    except Exception as exc:  # the probe reports, it does not fail
        checks["broker"] = f"down: {type(exc).__name__}"
    try:
        await ctx.store.database.read(lambda conn: conn.execute(sa.text("SELECT 1")).scalar())
        checks["store"] = "ok"
    except Exception as exc:
        checks["store"] = f"down: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return web.json_response({"status": "ready" if ready else "not-ready", "checks": checks}, status=200 if ready else 503)


BASE_OPERATIONS = [
    Op("GET", "/healthz", "Liveness", tags=("health",)),
    Op("GET", "/readyz", "Readiness: a confirmed publish to the broker, a store query", statuses=(200, 503),
       tags=("health",)),
    Op("GET", "/api/events", "Events as Server-Sent Events, filtered by AMQP topic patterns", statuses=(200, 400),
       tags=("events",), query=("topics", "lastEventId")),
]


def build_app(ctx: GatewayContext, surfaces: tuple[Surface, ...] | None = None) -> web.Application:
    settings = ctx.settings
    surfaces = surfaces_for(settings) if surfaces is None else surfaces
    api_keys = [k.get_secret_value() if k else None for k in (settings.api_key, settings.read_api_key)]
    access: Access = {}
    wrapped: Wrapped = {}
    app = web.Application(middlewares=make_middlewares(*api_keys, reads_guarded=settings.reads_guarded,
                                                       access=access, wrapped=wrapped),
                          client_max_size=1 << 20)
    app[CTX] = ctx
    app.on_response_prepare.append(tag_stream)
    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics_view),
                    web.get("/api/events", stream_events)])
    spec = document(BASE_OPERATIONS + mount(app, surfaces, claimed=BASE_OPERATIONS, access=access, wrapped=wrapped),
                    open_paths=frozenset(OPEN_PATHS) if settings.reads_guarded else None)

    async def openapi(_: web.Request) -> web.Response:
        return web.json_response(spec)

    app.router.add_get("/openapi.json", openapi)
    return app


async def load_context(settings: Settings, bus: Bus, store: Store) -> GatewayContext:
    """The gateway's memory, loaded from what the store committed."""
    ledger = Ledger()
    ledger.load(await store.live_records(utcnow()), await store.open_operations(), await store.open_targets())
    swarm_views = Swarms(store)
    await swarm_views.load()
    registry = Registry(store, swarm_views)
    await registry.load()
    catalog = load_catalog(settings.scenarios_dir)
    return GatewayContext(settings=settings, store=store, bus=bus, catalog=catalog,
                          events=EventHub(), ledger=ledger, swarms=swarm_views, registry=registry,
                          policy=RuntimePolicy.from_settings(settings, catalog))


@asynccontextmanager
async def open_gateway(settings: Settings, bus: Bus) -> AsyncIterator[web.Application]:
    """Store open, memory loaded, tracker running, application built; everything closed on exit."""
    store = await open_store(settings.database_url.get_secret_value())
    surfaces = surfaces_for(settings)
    ctx: GatewayContext | None = None
    tracker: Tracker | None = None
    started: list[Surface] = []
    try:
        ctx = await load_context(settings, bus, store)
        ctx.registry.start()
        for surface in surfaces:
            register_signals(dict(surface.signals))  # a surface's start may send its signals at once
            if surface.load is not None:
                await surface.load(ctx)
        tracker = await Tracker(ctx, Projections.of(surfaces)).start()
        for surface in surfaces:
            if surface.start is not None:
                await surface.start(ctx)
            started.append(surface)
        yield build_app(ctx, surfaces)
    finally:
        if ctx is not None:
            await settle_dispatches(ctx)
        if tracker is not None:
            await tracker.stop()
        for surface in reversed(started):
            if surface.stop is not None and ctx is not None:
                await surface.stop(ctx)
        if ctx is not None:
            ctx.events.close()  # open streams end, so shutdown is not held by a watching client
            await ctx.registry.stop()
        await store.close()
