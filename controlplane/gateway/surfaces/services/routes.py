"""Handlers and projections of the services surface.

Reads answer from the read model (``view``). A lifecycle action is a signal to the container's
owner, filed like every action (idempotency key from the ``Idempotency-Key`` header, or a new
one), and answered once its outcome closes the operation. Logs are asked of the host
controller that reports the service (request-reply over RabbitMQ).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from controlplane.bus import Requester
from controlplane.bus.rpc import RequesterClosed, Unroutable
from controlplane.contract import keys
from controlplane.contract.models import CommandTarget, Signal, SwarmStatus, new_id, parse_time
from controlplane.contract.services import LogsRequest, ServiceAction, ServiceReport, ServiceState, Transition
from controlplane.gateway.actions import Action, begin_and_wait
from controlplane.gateway.context import GatewayContext, context_of
from controlplane.gateway.middleware import ApiError, validation_error
from controlplane.gateway.surfaces.services import metrics, webhooks
from controlplane.gateway.surfaces.services.envelope import ok
from controlplane.gateway.surfaces.services.view import Ambiguous, ServicesView
from controlplane.logs import get_logger
from controlplane.store.models import OperationStatus

log = get_logger("gateway.services")

NAME = "services"
SIGNALS = {"service-start": 60_000, "service-stop": 60_000, "service-restart": 60_000, "service-update": 300_000}
# What an owner's refusal means to the caller.
_STATUS_OF = {"not-found": 404, "not-a-service": 409, "policy-refused": 403, "image-missing": 422,
              "unknown-signal": 502, "update-failed": 502, "start-failed": 502, "stop-failed": 502,
              "restart-failed": 502}
_LIVE_SWARM = {SwarmStatus.READY, SwarmStatus.RUNNING, SwarmStatus.STOPPED, SwarmStatus.STARTING, SwarmStatus.STOPPING}


@dataclass
class ServicesState:
    view: ServicesView = field(default_factory=ServicesView)
    requester: Requester | None = None


def state_of(ctx: GatewayContext) -> ServicesState:
    state: ServicesState = ctx.surfaces[NAME]
    return state


# --- life --------------------------------------------------------------------------------------


async def load(ctx: GatewayContext) -> None:
    state = ctx.surfaces[NAME] = ServicesState()
    for status in ("running", "stopped", "paused", "restarting"):
        metrics.SERVICES.labels(status).set_function(lambda s=status: state.view.count(s))
    metrics.UNHEALTHY.set_function(lambda: sum(1 for svc in state.view.services.values() if svc.health == "unhealthy"))
    await webhooks.load(ctx)


async def start(ctx: GatewayContext) -> None:
    state = state_of(ctx)
    state.requester = await Requester(ctx.bus, ctx.settings.gateway_name).start()
    await webhooks.start(ctx)
    await ask_full_report(ctx)


async def stop(ctx: GatewayContext) -> None:
    await webhooks.stop(ctx)
    state = ctx.surfaces.get(NAME)
    if state is not None and state.requester is not None:
        await state.requester.close()


async def ask_full_report(ctx: GatewayContext) -> None:
    """Every host controller reports everything it sees: a new gateway's read model starts full."""
    scope = keys.host_controller_scope("all")
    sig = Signal(signal=keys.SERVICE_REPORT_REQUEST, correlation_id=new_id(), idempotency_key=new_id(),
                 role=keys.HOST_CONTROLLER_ROLE, instance="all", command_target=CommandTarget.INSTANCE,
                 args={"timeoutMs": 30_000})
    try:
        await ctx.bus.publish(keys.signal_key(keys.SERVICE_REPORT_REQUEST, scope), sig, persistent=False)
    except Exception as exc:  # the host controller's own start-up report fills the view then
        log.warning("full services report not asked for", error=str(exc))


# --- projections -------------------------------------------------------------------------------


async def on_report(ctx: GatewayContext, _key: str, body: dict[str, Any]) -> None:
    report = ServiceReport.model_validate(body)
    view = state_of(ctx).view
    view.apply(report)
    metrics.REPORTS.labels("full" if report.full else "changes" if report.services or report.removed
                           or report.transitions else "samples").inc()
    for t in report.transitions:
        metrics.TRANSITIONS.labels(t.event).inc()

    def data(t: Transition) -> dict[str, Any]:
        service = view.services.get(t.container_id)
        return {"containerId": t.container_id, "name": t.name, "reason": t.reason, **t.details,
                "service": view.summary(service) if service else None}

    # Side by side: the store's writer commits them in one batch.
    await asyncio.gather(*(webhooks.emit(ctx, t.event, data(t), t.event_id, t.at) for t in report.transitions))


async def on_outcome(ctx: GatewayContext, key: str, body: dict[str, Any]) -> None:
    """An update's success is ``service:update``; any failed action is ``service:error``. The
    correlation id is the event's id: every gateway hears the outcome, each webhook gets it once."""
    parsed = keys.parse_key(key)
    details = body.get("details") or {}
    at = parse_time(body.get("ts")) or datetime.now(timezone.utc)
    data = {"containerId": details.get("containerId"), "name": details.get("name"), "signal": parsed.signal,
            "correlationId": body.get("correlationId")}
    if parsed.kind == "ready" and parsed.signal == "service-update" and details.get("updated"):
        await webhooks.emit(ctx, "service:update", {**data, "version": details.get("version"),
                                                    "versionBefore": details.get("versionBefore"),
                                                    "previousContainerId": details.get("previousContainerId")},
                            body.get("correlationId") or new_id(), at)
    elif parsed.kind == "error" and body.get("code") != "timeout":
        await webhooks.emit(ctx, "service:error", {**data, "reason": "action-failed", "code": body.get("code"),
                                                   "message": body.get("message"),
                                                   "rolledBack": bool(details.get("rolledBack"))},
                            body.get("correlationId") or new_id(), at)


PROJECTIONS = (
    (keys.ready_key(keys.SERVICE_REPORT, "*"), on_report),
    *((keys.ready_key(signal, "#"), on_outcome) for signal in keys.SERVICE_ACTIONS),
    *((keys.error_key(signal, "#"), on_outcome) for signal in keys.SERVICE_ACTIONS),
)


# --- reads ---------------------------------------------------------------------------------------


def _service(request: web.Request) -> ServiceState:
    ref = request.match_info["containerId"]
    try:
        found = state_of(context_of(request)).view.find(ref)
    except Ambiguous as exc:
        raise ApiError(400, "ambiguous-id", f"containerId {ref!r}: {exc}; give more of it or the name",
                       [{"field": "containerId", "reason": "ambiguous"}]) from None
    if found is None:
        raise ApiError(404, "not-found", f"no service {ref!r} (a container id, short id or name)",
                       [{"field": "containerId", "reason": "unknown"}])
    return found


def _int_query(request: web.Request, name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"invalid-{name}", f"{name} must be an integer, got {raw!r}",
                       [{"field": name, "reason": "not an integer"}]) from None
    if not low <= value <= high:
        raise ApiError(400, f"invalid-{name}", f"{name} must be between {low} and {high}, got {value}",
                       [{"field": name, "reason": f"out of range {low}..{high}"}])
    return value


async def list_services(request: web.Request) -> web.Response:
    which = request.query.get("filter", "all") or "all"
    if which not in ("running", "stopped", "all"):
        raise ApiError(400, "invalid-filter", f"filter must be running, stopped or all, got {which!r}",
                       [{"field": "filter", "reason": "not one of running, stopped, all"}])
    limit = _int_query(request, "limit", None, 1, 10_000)
    page = _int_query(request, "page", 1, 1, 1_000_000) or 1
    view = state_of(context_of(request)).view
    states = view.listed(which)  # type: ignore[arg-type]
    size = limit or (50 if "page" in request.query else len(states) or 1)
    chosen = states[(page - 1) * size: page * size]
    return ok([view.summary(s) for s in chosen], headers={"X-Total-Count": str(len(states))})


async def get_service(request: web.Request) -> web.Response:
    return ok(state_of(context_of(request)).view.detail(_service(request)))


async def service_stats(request: web.Request) -> web.Response:
    return ok(state_of(context_of(request)).view.stats(_service(request)))


async def system_stats(request: web.Request) -> web.Response:
    return ok(state_of(context_of(request)).view.system())


async def service_logs(request: web.Request) -> web.Response:
    ctx = context_of(request)
    service = _service(request)
    lines = _int_query(request, "lines", 100, 1, 10_000)
    since = _since(request.query.get("since"))
    requester = state_of(ctx).requester
    if requester is None:
        raise ApiError(503, "not-ready", "the gateway is starting; retry shortly", retryable=True)
    ask = LogsRequest(container_id=service.container_id, lines=lines or 100, since=since)
    key = keys.signal_key(keys.SERVICE_LOGS, keys.host_controller_scope(service.host))
    try:
        answer = await requester.request(key, ask.to_dict(), ctx.settings.services_logs_timeout_s)
    except Unroutable:
        raise ApiError(503, "host-controller-unavailable", f"no host controller of {service.host!r} is listening",
                       retryable=True) from None
    except asyncio.TimeoutError:
        raise ApiError(504, "timeout", f"the host controller did not send the logs within "
                       f"{ctx.settings.services_logs_timeout_s:g}s", retryable=True) from None
    except (RequesterClosed, ValueError) as exc:
        raise ApiError(502, "bad-answer", f"the host controller's answer was unusable: {exc}") from None
    if "error" in answer:
        status = 404 if answer["error"] == "not-found" else 502
        raise ApiError(status, str(answer["error"]), str(answer.get("message") or "logs unavailable"))
    return ok({"logs": answer.get("logs") or []})


def _since(raw: str | None) -> datetime | None:
    """An RFC 3339 timestamp or UTC epoch seconds; a 400 naming ``since`` otherwise."""
    if not raw:
        return None
    try:
        return datetime.fromtimestamp(float(raw), timezone.utc)
    except ValueError:
        pass
    parsed = parse_time(raw)
    if parsed is None:
        raise ApiError(400, "invalid-since", f"since must be an RFC 3339 timestamp or epoch seconds, got {raw!r}",
                       [{"field": "since", "reason": "not a timestamp"}])
    return parsed


# --- actions --------------------------------------------------------------------------------------


def action(verb: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    signal = f"service-{verb}"

    async def handler(request: web.Request) -> web.Response:
        ctx = context_of(request)
        service = _service(request)
        details = await run_action(ctx, request, signal, service)
        data = {"message": details.get("message") or f"Service {verb} done", "status": details.get("status")}
        if verb == "update":
            data.update({k: details.get(k) for k in ("version", "versionBefore", "updated", "containerId",
                                                       "previousContainerId", "pulled")})
        return ok(data)

    return handler


def _owner_scope(ctx: GatewayContext, service: ServiceState) -> dict[str, Any]:
    """The container's owner: its swarm's controller while the swarm is served, else the host
    controller that reports it."""
    swarm = ctx.swarms.get(service.swarm_id) if service.swarm_id else None
    if swarm is not None and swarm.status in _LIVE_SWARM and service.kind != keys.CONTROLLER_ROLE:
        return {"swarm_id": service.swarm_id}
    return {"role": keys.HOST_CONTROLLER_ROLE, "instance": service.host}


async def run_action(ctx: GatewayContext, request: web.Request, signal: str, service: ServiceState) -> dict[str, Any]:
    """Send ``signal`` to the service's owner and wait for its outcome: its details, or the error."""
    key = request.headers.get("Idempotency-Key", "").strip().strip('"') or str(uuid.uuid4())
    try:
        body = ServiceAction(idempotency_key=key, service=service.name)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise validation_error(exc) from None
    tracked, closed = await begin_and_wait(ctx, Action(
        signal=signal, request=body, args={"containerId": service.container_id}, holds=f"service:{service.name}",
        **_owner_scope(ctx, service)))
    op = tracked.op
    metrics.ACTIONS.labels(signal, op.status if closed else "waiting").inc()
    if not closed:
        raise _timed_out(tracked.correlation_id, signal)
    outcome = op.outcome or {}
    if op.status == OperationStatus.SUCCEEDED:
        return dict(outcome.get("details") or {})
    if op.status == OperationStatus.TIMED_OUT:
        raise _timed_out(tracked.correlation_id, signal)
    code = outcome.get("code") or "action-failed"
    extra = {k: v for k, v in (outcome.get("details") or {}).items() if k in ("rolledBack", "version", "versionBefore")}
    raise ApiError(_STATUS_OF.get(code, 502), code, outcome.get("message") or f"{signal} failed",
                   operationId=tracked.correlation_id, **extra)


def _timed_out(correlation_id: str, signal: str) -> ApiError:
    return ApiError(504, "timeout", f"the service's owner did not answer {signal} in time; the action may still "
                    f"complete: GET /api/operations/{correlation_id}", operationId=correlation_id)
