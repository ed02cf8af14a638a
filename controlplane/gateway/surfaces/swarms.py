"""Swarm orchestrator surface (``/api``): swarm lifecycle, templates, the swarms read model.

A thin translation layer: it validates requests, checks that the swarm's state allows the
action, and hands the rest to ``actions.submit``. Timeouts, topics and envelopes follow the
swarm orchestrator specification.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from controlplane.contract import keys
from controlplane.contract.redact import redact
from controlplane.contract.models import (
    ActionRequest, CreateSwarmRequest, Envelope, Outcome, SwarmPlan, SwarmStatus, TemplateRequest, utcnow,
)
from controlplane.gateway.actions import Action, operation_view, read_action, submit
from controlplane.gateway.context import GatewayContext, context_of
from controlplane.gateway.middleware import ApiError, require_id, validation_error
from controlplane.gateway.openapi import Op
from controlplane.gateway.surface import Surface
from controlplane.gateway.registry import component_view, health, worst
from controlplane.store import ComponentRow, OperationRow, SwarmRow
from controlplane.store.models import swarm_resource

S = SwarmStatus
# Which swarm states each action may start from.
ALLOWED_FROM: dict[str, set[str]] = {
    "swarm-start": {S.READY, S.STOPPED},
    "swarm-stop": {S.RUNNING},
    "swarm-remove": {S.READY, S.RUNNING, S.STOPPED, S.FAILED},
    "swarm-template": {S.READY, S.STOPPED},
}


def _swarm_id(request: web.Request) -> str:
    return require_id("swarm", "swarmId", request.match_info["swarmId"])


async def create_swarm(request: web.Request) -> web.Response:
    ctx = context_of(request)
    swarm_id = _swarm_id(request)
    body = CreateSwarmRequest.model_validate(await read_action(request))
    template = ctx.catalog.get(body.template_id)

    async def precondition() -> None:
        if template is None:
            raise ApiError(422, "unknown-template", f"templateId {body.template_id!r} names no known template; "
                           f"known: {', '.join(sorted(ctx.catalog.templates)) or 'none'}",
                           [{"field": "templateId", "reason": "unknown template"}])
        existing = await ctx.swarms.find(swarm_id)
        if existing is not None and existing.status not in (S.REMOVED, S.FAILED):
            raise ApiError(409, "swarm-exists", f"swarm {swarm_id!r} already exists (status {existing.status})",
                           currentState=existing.status)

    now = utcnow()
    row = SwarmRow(id=swarm_id, template_id=body.template_id, status=S.CREATING, controller_instance=None,
                   health="unknown", enabled=False, bees=[], last_heartbeat=None, last_error=None,
                   created_at=now, updated_at=now)
    plan = template.plan().model_dump(mode="json", by_alias=True) if template else {}
    action = Action(signal="swarm-create", request=body, swarm_id=swarm_id, lifecycle=True, create_swarm=row,
                    args={"templateId": body.template_id, "swarmPlan": plan,
                          **({"controllerImage": template.controller_image} if template and template.controller_image else {})})
    return await submit(request, action, precondition)


def _lifecycle(signal: str, model: type[ActionRequest]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        ctx = context_of(request)
        swarm_id = _swarm_id(request)
        body = _validated(model, await read_action(request))
        args: dict[str, Any] = {}
        if isinstance(body, TemplateRequest):
            _check_plan(ctx, body.swarm_plan)
            args = {"swarmPlan": body.swarm_plan.model_dump(mode="json", by_alias=True)}

        async def precondition() -> None:
            swarm = await ctx.swarms.find(swarm_id)
            if swarm is None:
                raise ApiError(404, "unknown-swarm", f"swarm {swarm_id!r} does not exist")
            if swarm.status not in ALLOWED_FROM[signal]:
                raise ApiError(409, "invalid-state", f"swarm {swarm_id!r} is {swarm.status}; {signal} is allowed "
                               f"from {', '.join(sorted(ALLOWED_FROM[signal]))}", currentState=swarm.status)

        action = Action(signal=signal, request=body, swarm_id=swarm_id, lifecycle=True, args=args)
        return await submit(request, action, precondition)

    return handler


# Errors of a plan that is well formed but refused by the plan's own rules (too many bees, a
# reserved or repeated name, a cycle): the request was understood, so 422, not 400.
_PLAN_RULES = {"value_error", "too_long"}


def _validated(model: type[ActionRequest], body: dict[str, Any]) -> ActionRequest:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors()
        if all(e["type"] in _PLAN_RULES and e["loc"][:1] == ("swarmPlan",) for e in errors):
            raise validation_error(exc, 422, "invalid-plan") from None
        raise


def _check_plan(ctx: GatewayContext, plan: SwarmPlan) -> None:
    """A caller's plan runs only what the runtime's policy allows, told here field by field."""
    policy = ctx.policy
    refused = [{"field": f"swarmPlan.bees.{i}.image", "reason": f"image {bee.image!r} is not allowed"}
               for i, bee in enumerate(plan.bees) if not policy.image_allowed("bee", bee.image)]
    if plan.sut is not None and not policy.image_allowed("sut", plan.sut.image):
        refused.append({"field": "swarmPlan.sut.image", "reason": f"image {plan.sut.image!r} is not allowed"})
    if refused:
        allowed = ", ".join(sorted(policy.allowed_images.get("bee", ())))
        raise ApiError(422, "image-not-allowed", "; ".join(f"{r['field']}: {r['reason']}" for r in refused)
                       + f" (allowed: {allowed}; see CP_ALLOWED_IMAGES)", refused)
    if plan.sut is not None and plan.sut.command is not None and not policy.allow_sut_command:
        raise ApiError(422, "sut-command-not-allowed", "swarmPlan.sut.command: a system under test with a command "
                       "of its own is refused unless the operator sets CP_ALLOW_SUT_COMMAND=true",
                       [{"field": "swarmPlan.sut.command", "reason": "not allowed by the operator"}])


def swarm_view(ctx: GatewayContext, swarm: SwarmRow, active: OperationRow | None,
               components: list[ComponentRow]) -> dict[str, Any]:
    """A swarm with its health: the worst of its controller's heartbeat and its bees' health."""
    interval, now = ctx.settings.status_interval_s, utcnow()
    registered = {(c.role, c.instance): component_view(c, interval, now) for c in components}
    bees = []
    for bee in swarm.bees:
        view = {k: bee.get(k) for k in ("role", "image", "instance", "state", "enabled")}
        entry = registered.get((bee.get("role"), bee.get("instance")))
        view["health"] = health(None, interval, bee.get("state"), now) if entry is None else entry["health"]
        view["lastSeen"] = entry["lastSeen"] if entry else None
        bees.append(view)
    controller_health = health(swarm.last_heartbeat, interval, now=now)
    controller = registered.get((keys.CONTROLLER_ROLE, swarm.controller_instance))
    return {
        "swarmId": swarm.id,
        "status": swarm.status,
        "health": worst(controller_health, *(b["health"] for b in bees)) if swarm.last_heartbeat else "unknown",
        "templateId": swarm.template_id,
        "controller": ({"role": keys.CONTROLLER_ROLE, "instance": swarm.controller_instance, "health": controller_health}
                       if swarm.controller_instance else None),
        "enabled": swarm.enabled,
        "sut": controller["data"].get("sut") if controller else None,
        "bees": bees,
        "lastHeartbeat": swarm.last_heartbeat.isoformat() if swarm.last_heartbeat else None,
        "activeOperation": operation_view(active) if active else None,
        "lastError": swarm.last_error,
        "createdAt": swarm.created_at.isoformat(),
        "updatedAt": swarm.updated_at.isoformat(),
    }


async def project_outcome(ctx: GatewayContext, _routing_key: str, body: dict[str, Any]) -> None:
    """A swarm signal's outcome moves the swarm read model; it follows what really happened,
    even when the outcome came after a timeout."""
    outcome = Outcome.model_validate(body)
    swarms, swarm_id = ctx.swarms, outcome.scope.swarm_id
    if not swarm_id:
        return
    if outcome.signal == "swarm-remove" and outcome.result == "success":
        swarms.delete(swarm_id)
        ctx.registry.forget_swarm(swarm_id)
        return
    if await swarms.find(swarm_id) is None:
        return
    fields: dict[str, Any] = {}
    if outcome.state.status:
        fields["status"] = outcome.state.status
    if outcome.result == "success":
        fields["last_error"] = None
        if outcome.signal == "swarm-create":
            fields["controller_instance"] = outcome.state.details.get("controller", keys.controller_instance(swarm_id))
            if isinstance(outcome.details.get("bees"), list):
                fields["bees"] = outcome.details["bees"]
    else:
        fields["last_error"] = {"signal": outcome.signal, "code": outcome.code, "message": outcome.message,
                                "correlationId": outcome.correlation_id, "ts": outcome.ts.isoformat()}
    swarms.update(swarm_id, **fields)


def _active(ctx: GatewayContext, swarm_id: str) -> OperationRow | None:
    holder = ctx.ledger.holder(swarm_resource(swarm_id))
    return holder.op if holder is not None else None


async def list_swarms(request: web.Request) -> web.Response:
    ctx = context_of(request)
    return web.json_response([swarm_view(ctx, s, _active(ctx, s.id), ctx.registry.list(swarm_id=s.id))
                              for s in ctx.swarms.all()])


async def get_swarm(request: web.Request) -> web.Response:
    ctx = context_of(request)
    swarm_id = _swarm_id(request)
    swarm = await ctx.swarms.find(swarm_id)
    if swarm is None:
        raise ApiError(404, "unknown-swarm", f"swarm {swarm_id!r} does not exist")
    return web.json_response(swarm_view(ctx, swarm, _active(ctx, swarm_id), ctx.registry.list(swarm_id=swarm_id)))


async def list_templates(request: web.Request) -> web.Response:
    ctx = context_of(request)
    return web.json_response(redact({
        "templates": [
            {"id": t.id, "name": t.name, "description": t.description, "controllerImage": t.controller_image,
             "sut": t.sut.model_dump(mode="json", by_alias=True) if t.sut else None,
             "bees": [{"name": b.name, "role": b.role, "image": b.image, "env": b.env,
                       "work": b.work.model_dump(mode="json", by_alias=True, exclude_none=True),
                       "enabled": b.enabled, "config": redact(b.config, b.secrets), "secrets": b.secrets}
                      for b in t.bees]}
            for t in ctx.catalog.templates.values()
        ],
        "invalid": [{"file": name, "problem": why} for name, why in sorted(ctx.catalog.problems.items())],
    }))


ACTION_STATUSES = (200, 202, 400, 401, 403, 404, 409, 422, 503)


def _action(path: str, summary: str, body: type[ActionRequest]) -> Op:
    return Op("POST", path, summary, body, ACTION_STATUSES, Envelope, True, ("swarms",))


SURFACE = Surface(
    name="swarms",
    routes=(
        (_action("/api/swarms/{swarmId}/create", "Create a swarm from a template", CreateSwarmRequest), create_swarm),
        (_action("/api/swarms/{swarmId}/start", "Start a swarm (sig.swarm-start)", ActionRequest),
         _lifecycle("swarm-start", ActionRequest)),
        (_action("/api/swarms/{swarmId}/stop", "Stop a swarm, keeping its containers (sig.swarm-stop)", ActionRequest),
         _lifecycle("swarm-stop", ActionRequest)),
        (_action("/api/swarms/{swarmId}/remove", "Remove a swarm (sig.swarm-remove)", ActionRequest),
         _lifecycle("swarm-remove", ActionRequest)),
        (_action("/api/swarms/{swarmId}/template", "Apply a swarm plan (sig.swarm-template)", TemplateRequest),
         _lifecycle("swarm-template", TemplateRequest)),
        (Op("GET", "/api/swarms", "List swarms", tags=("swarms",), many=True), list_swarms),
        (Op("GET", "/api/swarms/{swarmId}", "One swarm: status, health, bees", statuses=(200, 400, 404),
            tags=("swarms",)), get_swarm),
        (Op("GET", "/api/templates", "Scenario templates and invalid scenario files", tags=("swarms",)),
         list_templates),
    ),
    signals={"swarm-create": 120_000, "swarm-start": 180_000, "swarm-stop": 90_000, "swarm-remove": 180_000,
             "swarm-template": 180_000},
    projections=tuple((f"ev.*.{signal}.*", project_outcome) for signal in keys.SWARM_SIGNALS),
)
