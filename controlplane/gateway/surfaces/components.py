"""Swarm orchestrator surface, components part (``/api/components``, ``/api/controllers``).

Config patches and status requests go to one registered component; ``commandTarget`` and
the bulk controller toggle fan a signal out to many under one correlation id. Who exists
is the registry's word (``gateway/registry.py``): an unknown component is a 404.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from aiohttp import web

from controlplane.contract import keys
from controlplane.contract.models import (
    ActionRequest,
    CommandTarget,
    ComponentConfigRequest,
    ControllersConfigRequest,
    Envelope,
)
from controlplane.gateway.actions import Action, Target, read_action, refuse_unless_known, replay_if_known, submit
from controlplane.gateway.context import GatewayContext, context_of
from controlplane.gateway.middleware import ApiError, require_slug
from controlplane.gateway.openapi import Op
from controlplane.gateway.surface import Surface
from controlplane.gateway.registry import HEALTH_RANK, component_view
from controlplane.store import ComponentRow

# Where a bulk toggle's idempotency keys and operations are filed.
CONTROLLERS_SCOPE = "controllers"
B = TypeVar("B", bound=ActionRequest)


def _component_path(request: web.Request) -> tuple[str, str]:
    return require_slug("role", request.match_info["role"]), require_slug("instance", request.match_info["instance"])


def _registered(ctx: GatewayContext, role: str, instance: str) -> ComponentRow:
    row = ctx.registry.get(role, instance)
    if row is None:
        raise ApiError(404, "unknown-component", f"no component {role}.{instance} is registered; the registry knows "
                       "the controllers and bees that have reported status (GET /api/components)")
    return row


def _target(row: ComponentRow) -> Target:
    return Target(row.role, row.instance, row.swarm_id)


def _fan_out(ctx: GatewayContext, addressed: ComponentRow, command_target: CommandTarget) -> tuple[Target, ...]:
    registry = ctx.registry
    if command_target == CommandTarget.SWARM:
        rows = registry.list(swarm_id=addressed.swarm_id)
    elif command_target == CommandTarget.ROLE:
        rows = registry.list(role=addressed.role)
    else:
        rows = registry.list()
    return tuple(_target(r) for r in rows)


async def _to_component(request: web.Request, signal: str, model: type[B],
                        build: Callable[[GatewayContext, B, ComponentRow], Action]) -> web.Response:
    """An action on one registered component: a retry is answered from its key first, and a
    component the registry does not know is a 404 unless the key was used before it left."""
    ctx = context_of(request)
    role, instance = _component_path(request)
    body = model.model_validate(await read_action(request))
    scope = keys.component_scope(role, instance)
    replayed = await replay_if_known(request, signal, scope, body)
    if replayed is not None:
        return replayed
    try:
        addressed = _registered(ctx, role, instance)
    except ApiError as exc:
        return await refuse_unless_known(request, signal, scope, body, exc)
    return await submit(request, build(ctx, body, addressed))


async def update_config(request: web.Request) -> web.Response:
    def build(ctx: GatewayContext, body: ComponentConfigRequest, addressed: ComponentRow) -> Action:
        fan_out = None if body.command_target == CommandTarget.INSTANCE else _fan_out(ctx, addressed,
                                                                                      body.command_target)
        return Action(signal="config-update", request=body, swarm_id=addressed.swarm_id, role=addressed.role,
                      instance=addressed.instance, args={"patch": body.patch}, fan_out=fan_out,
                      command_target=body.command_target)

    return await _to_component(request, "config-update", ComponentConfigRequest, build)


async def request_status(request: web.Request) -> web.Response:
    def build(_ctx: GatewayContext, body: ActionRequest, addressed: ComponentRow) -> Action:
        return Action(signal="status-request", request=body, swarm_id=addressed.swarm_id, role=addressed.role,
                      instance=addressed.instance, info_only=True)

    return await _to_component(request, "status-request", ActionRequest, build)


async def toggle_controllers(request: web.Request) -> web.Response:
    """``sig.config-update.swarm-controller.<instance>`` with ``{"enabled": ...}`` to each target."""
    ctx = context_of(request)
    body = ControllersConfigRequest.model_validate(await read_action(request))
    replayed = await replay_if_known(request, "config-update", CONTROLLERS_SCOPE, body)
    if replayed is not None:
        return replayed
    registered = {r.instance: r for r in ctx.registry.list(role=keys.CONTROLLER_ROLE)}
    if body.targets:
        wanted = [t.partition(".")[2] for t in body.targets]
        unknown = [i for i in wanted if i not in registered]
        if unknown:
            refusal = ApiError(404, "unknown-component", "targets name controllers the registry does not know: "
                               + ", ".join(f"{keys.CONTROLLER_ROLE}.{i}" for i in unknown),
                               [{"field": "targets", "reason": f"{keys.CONTROLLER_ROLE}.{i} is not registered"}
                                for i in unknown])
            return await refuse_unless_known(request, "config-update", CONTROLLERS_SCOPE, body, refusal)
        rows = [registered[i] for i in wanted]
    else:
        rows = list(registered.values())
    action = Action(signal="config-update", request=body, args={"patch": {"enabled": body.enabled}},
                    fan_out=tuple(_target(r) for r in rows), command_target=CommandTarget.INSTANCE,
                    key_scope=CONTROLLERS_SCOPE)
    return await submit(request, action)


async def list_components(request: web.Request) -> web.Response:
    ctx = context_of(request)
    query = request.rel_url.query
    for field in ("swarmId", "role"):
        if field in query:
            require_slug(field, query[field])
    wanted_health = query.get("health")
    if wanted_health is not None and wanted_health not in HEALTH_RANK:
        raise ApiError(400, "invalid-health", f"health must be one of {', '.join(HEALTH_RANK)}",
                       [{"field": "health", "reason": "unknown health"}])
    rows = ctx.registry.list(swarm_id=query.get("swarmId"), role=query.get("role"))
    views = [component_view(r, ctx.settings.status_interval_s) for r in rows]
    if wanted_health is not None:
        views = [v for v in views if v["health"] == wanted_health]
    return web.json_response({"components": views})


async def get_component(request: web.Request) -> web.Response:
    ctx = context_of(request)
    role, instance = _component_path(request)
    row = _registered(ctx, role, instance)
    return web.json_response(component_view(row, ctx.settings.status_interval_s))


ACTION_STATUSES = (200, 202, 400, 401, 403, 404, 422, 503)

SURFACE = Surface(
    name="components",
    routes=(
        (Op("POST", "/api/components/{role}/{instance}/config", "Patch a component's config (sig.config-update)",
            ComponentConfigRequest, ACTION_STATUSES, Envelope, True, ("components",)), update_config),
        (Op("POST", "/api/components/{role}/{instance}/status-request", "Ask a component for its full status",
            ActionRequest, ACTION_STATUSES, Envelope, True, ("components",)), request_status),
        (Op("POST", "/api/controllers/config", "Switch swarm-controllers' workloads on or off (bulk)",
            ControllersConfigRequest, ACTION_STATUSES, Envelope, True, ("components",)), toggle_controllers),
        (Op("GET", "/api/components", "The registry: controllers and bees with their health", statuses=(200, 400),
            tags=("components",), query=("swarmId", "role", "health")), list_components),
        (Op("GET", "/api/components/{role}/{instance}", "One registered component", statuses=(200, 400, 404),
            tags=("components",)), get_component),
    ),
    signals={"config-update": 60_000, "status-request": 10_000},
)
