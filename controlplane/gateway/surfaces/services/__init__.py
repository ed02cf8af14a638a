"""Services surface: the services dashboard document under ``/api`` (services, their logs and
stats, system stats, webhooks), answered in its own envelope (``envelope``).

Every container the control plane runs, and every container labelled
``controlplane.service=true``, is a service. The host controller watches Docker's events and
samples stats within a bound, and publishes what it sees; each gateway keeps the services read
model from those events (``view``), so a list never asks Docker. Lifecycle actions are
signals to the container's owner answered from their outcome (``routes``); logs and fresh
inspections are asked of the host controller over RabbitMQ. Webhooks (``webhooks``) and rate
limits (``ratelimit``) are this surface's own.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from pydantic import ValidationError

from controlplane.config import Settings
from controlplane.gateway.context import GatewayContext
from controlplane.gateway.middleware import ApiError, validation_error
from controlplane.gateway.openapi import Op
from controlplane.gateway.surface import Handler, Surface
from controlplane.gateway.surfaces.services import ratelimit, routes, webhooks
from controlplane.gateway.surfaces.services.envelope import failure

NAME = "services"
TAGS = ("services",)


def surface(settings: Settings) -> Surface:
    def op(method: str, path: str, summary: str, statuses: tuple[int, ...] = (200,), **kwargs: object) -> Op:
        # Every answer of the surface may be its caller's 429.
        return Op(method, "/api" + path, summary, tags=TAGS, statuses=(*statuses, 429), **kwargs)  # type: ignore[arg-type]

    limits = ratelimit.RateLimits.from_settings(settings)

    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every answer in the envelope, with the caller's rate-limit headers."""
        quota = await limits.hit(request)
        try:
            if not quota.allowed:
                response: web.StreamResponse = failure(ApiError(
                    429, "rate-limited", f"rate limit of {quota.limit} requests per {quota.window} exceeded; "
                    f"retry in {quota.retry_after}s", retryAfterS=quota.retry_after))
                response.headers["Retry-After"] = str(quota.retry_after)
            else:
                response = await handler(request)
        except ApiError as exc:
            response = failure(exc)
        except ValidationError as exc:
            response = failure(validation_error(exc))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = failure(ApiError(exc.status, exc.reason.lower().replace(" ", "-"), exc.reason))
        response.headers.update(quota.headers())
        return response

    async def stop(ctx: GatewayContext) -> None:
        await routes.stop(ctx)
        await limits.close()

    return Surface(
        name=NAME,
        routes=_routes(op) + webhooks.routes(op),
        signals=routes.SIGNALS,
        projections=routes.PROJECTIONS,
        load=routes.load,
        start=routes.start,
        stop=stop,
        middleware=middleware,
    )


def _routes(op: Callable[..., Op]) -> tuple[tuple[Op, Handler], ...]:
    one = (200, 400, 404)
    act = (200, 400, 404, 409, 422, 502, 503, 504)
    return (
        (op("GET", "/services", "Every service: live status, health and resource use", statuses=(200, 400),
            query=("filter", "limit", "page")), routes.list_services),
        (op("GET", "/services/{containerId}", "One service with its details (id, short id or name)",
            statuses=one), routes.get_service),
        (op("POST", "/services/{containerId}/start", "Start a service", statuses=act, mutating=True),
         routes.action("start")),
        (op("POST", "/services/{containerId}/stop", "Stop a service", statuses=act, mutating=True),
         routes.action("stop")),
        (op("POST", "/services/{containerId}/restart", "Restart a service", statuses=act, mutating=True),
         routes.action("restart")),
        (op("POST", "/services/{containerId}/update", "Recreate a service on its image's newest version; "
            "rolled back when the new container fails", statuses=act, mutating=True), routes.action("update")),
        (op("GET", "/services/{containerId}/logs", "A service's logs, parsed", statuses=(*one, 502, 503, 504),
            query=("lines", "since")), routes.service_logs),
        (op("GET", "/services/{containerId}/stats", "A service's resource use", statuses=(*one, 502, 503, 504)),
         routes.service_stats),
        (op("GET", "/system/stats", "Every service counted, resource use averaged, health summed"),
         routes.system_stats),
    )
