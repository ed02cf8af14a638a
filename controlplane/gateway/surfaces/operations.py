"""Operations (``/api/operations``): every action's progress and outcome, whatever surface
sent it; ``?wait=`` long-polls until it closes."""

from __future__ import annotations

from aiohttp import web

from controlplane.gateway.actions import MAX_WAIT_S, operation_view, tracked_view
from controlplane.gateway.context import context_of
from controlplane.gateway.ledger import wait_closed
from controlplane.gateway.middleware import ApiError
from controlplane.gateway.openapi import Op
from controlplane.gateway.surface import Surface


async def get_operation(request: web.Request) -> web.Response:
    """One operation; ``?wait=<seconds>`` long-polls until it closes or the wait ends."""
    ctx = context_of(request)
    correlation_id = request.match_info["correlationId"]
    wait = request.rel_url.query.get("wait")
    try:
        wait_s = min(float(wait), MAX_WAIT_S) if wait is not None else 0.0
        if wait_s < 0 or wait_s != wait_s:
            raise ValueError
    except ValueError:
        raise ApiError(400, "invalid-wait", f"wait must be a number of seconds from 0 to {MAX_WAIT_S:g}",
                       [{"field": "wait", "reason": "not a non-negative number"}]) from None
    tracked = ctx.ledger.get(correlation_id)
    if tracked is not None:
        if wait_s:
            await wait_closed(tracked, wait_s)
        return web.json_response(tracked_view(tracked))
    op = await ctx.store.get_operation(correlation_id)
    if op is None:
        raise ApiError(404, "unknown-operation", f"no operation with correlationId {correlation_id!r}")
    return web.json_response(operation_view(op, await ctx.store.operation_targets(op.correlation_id)))


SURFACE = Surface(
    name="operations",
    routes=(
        (Op("GET", "/api/operations/{correlationId}", "One operation and its outcome; ?wait=<s> long-polls",
            statuses=(200, 400, 404), tags=("operations",), query=("wait",)), get_operation),
    ),
)
