"""The gateway's aiohttp application: routes of every surface, health and metrics.

``open_gateway`` wires store, bus, catalogue and tracker together; ``build_app`` only
builds the application around them, so tests and ``controlplane up`` share one path.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controlplane.bus import Bus
from controlplane.config import Settings
from controlplane.gateway.context import CTX, GatewayContext
from controlplane.gateway.events import stream_events
from controlplane.gateway.middleware import make_middlewares
from controlplane.gateway.openapi import Op, document
from controlplane.gateway.surfaces import components, swarms
from controlplane.gateway.tracker import Tracker
from controlplane.scenarios import load_catalog
from controlplane.store import open_store


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    checks: dict[str, str] = {}
    checks["broker"] = "ok" if not ctx.bus.connection.is_closed else "down"
    try:
        await ctx.store.get_swarm("readyz-probe")
        checks["store"] = "ok"
    except Exception as exc:  # the probe reports, it does not fail
        checks["store"] = f"down: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return web.json_response({"status": "ready" if ready else "not-ready", "checks": checks}, status=200 if ready else 503)


async def metrics_view(_: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


BASE_OPERATIONS = [
    Op("GET", "/healthz", "Liveness", tags=("health",)),
    Op("GET", "/readyz", "Readiness: broker and store", statuses=(200, 503), tags=("health",)),
]


def build_app(ctx: GatewayContext) -> web.Application:
    api_key = ctx.settings.api_key.get_secret_value() if ctx.settings.api_key else None
    app = web.Application(middlewares=make_middlewares(api_key, ctx.settings.protect_reads), client_max_size=1 << 20)
    app[CTX] = ctx
    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics_view),
                    web.get("/api/events", stream_events)])
    app.add_routes(swarms.routes())
    app.add_routes(components.routes())
    spec = document(BASE_OPERATIONS + swarms.OPERATIONS + components.OPERATIONS)

    async def openapi(_: web.Request) -> web.Response:
        return web.json_response(spec)

    app.router.add_get("/openapi.json", openapi)
    return app


@asynccontextmanager
async def open_gateway(settings: Settings, bus: Bus) -> AsyncIterator[web.Application]:
    """Store open, tracker running, application built; everything closed on exit."""
    store = await open_store(settings.database_url.get_secret_value())
    tracker = Tracker(store, bus, settings.idempotency_retention_s, settings.gateway_name)
    try:
        await tracker.start()
        yield build_app(GatewayContext(settings=settings, store=store, bus=bus, catalog=load_catalog(settings.scenarios_dir),
                                         events=tracker.events))
    finally:
        await tracker.stop()
        await store.close()
