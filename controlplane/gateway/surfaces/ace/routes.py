"""Handlers of the engine-pool surface and the projections that keep its read model current.

Mutations of the pool (provision, remove, gc, scale) and Docker inspections are signals to
the pool's controller, answered synchronously from their outcome: a failure answers with
the status its code calls for (503 with ``retryAfterS`` and ``Retry-After`` when the pool
cannot provision now), a missing outcome with 504 and the operation id. Stream events are
facts a caller reports: recorded here (memory, then the store's next group commit) and
announced in batches, ``ev.ready.stream-events.<pool>``, to every gateway and the controller.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from aiohttp import web
from pydantic import Field, ValidationError

from controlplane.bus.batch import Batcher
from controlplane.contract import keys
from controlplane.contract.models import (
    ActionRequest, CreateSwarmRequest, Outcome, Scope, SwarmStatus, new_id, parse_time, utcnow,
)
from controlplane.contract.pool import AceProvisionRequest, ProvisionRequest, StreamEnded, StreamStarted
from controlplane.gateway.actions import Action, begin, begin_and_wait
from controlplane.gateway.context import GatewayContext, context_of
from controlplane.gateway.middleware import ApiError, read_json, validation_error
from controlplane.gateway.surfaces.ace import metrics
from controlplane.gateway.surfaces.ace.view import PoolView
from controlplane.logs import get_logger
from controlplane.scenarios import configured_pool
from controlplane.store import OperationStatus, SwarmRow
from controlplane.store.writer import detach

log = get_logger("gateway.ace")

NAME = "ace"
# Outcome codes and the status a caller gets for each; anything else failed is a 502.
_RETRY_LATER = {"pool-full", "ports-exhausted", "vpn-down", "docker-unavailable", "port-unavailable",
                "startup-timeout", "runtime-error", "pool-unavailable"}
_STATUS_OF = {"unknown-engine": 404, "port-taken": 409, "name-taken": 409, "image-missing": 422,
              "image-not-allowed": 422, "policy-refused": 422, "invalid-request": 422}


class PoolAction(ActionRequest):
    """An engine-pool request as the gateway files it: the document's bodies carry no
    idempotency key, so it comes from the ``Idempotency-Key`` header or is made here."""

    args: dict[str, Any] = Field(default_factory=dict)


def view_of(ctx: GatewayContext) -> PoolView:
    return ctx.surfaces[NAME]


def _pool_id(ctx: GatewayContext) -> str:
    return ctx.settings.ace_pool_id


# --- the pool itself -------------------------------------------------------------------------


async def ensure_pool(ctx: GatewayContext) -> None:
    """Create the configured pool unless it exists: a ``swarm-create`` like any other, so the
    pool shows among the swarms. A host controller already running it answers at once."""
    pool_id = _pool_id(ctx)
    swarm = await ctx.swarms.find(pool_id)
    if swarm is not None and swarm.status not in (SwarmStatus.REMOVED, SwarmStatus.FAILED):
        return
    plan = configured_pool(ctx.settings, ctx.catalog)
    assert plan is not None
    now = utcnow()
    row = SwarmRow(id=pool_id, template_id=ctx.settings.ace_template, status=SwarmStatus.CREATING,
                   health="unknown", enabled=True, bees=[], created_at=now, updated_at=now)
    request = CreateSwarmRequest(idempotency_key=uuid.uuid4(), template_id=ctx.settings.ace_template)
    action = Action(signal="swarm-create", request=request, swarm_id=pool_id, lifecycle=True, create_swarm=row,
                    args={"templateId": ctx.settings.ace_template, "swarmPlan": plan.model_dump(mode="json", by_alias=True)})
    try:
        await begin(ctx, action)
        log.info("engine pool created", pool=pool_id)
    except ApiError as exc:
        if exc.status != 409:  # 409: created meanwhile (another gateway, a concurrent request)
            raise


async def keep_pool(ctx: GatewayContext) -> None:
    """``ensure_pool`` until it has gone through (the broker may come up after the gateway)."""
    while True:
        try:
            await ensure_pool(ctx)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("engine pool not created yet; retrying", pool=_pool_id(ctx), error=repr(exc))
        await asyncio.sleep(2.0)


def _require_pool(ctx: GatewayContext) -> None:
    swarm = ctx.swarms.get(_pool_id(ctx))
    if swarm is None or swarm.status in (SwarmStatus.REMOVED, SwarmStatus.FAILED, SwarmStatus.CREATING):
        keeping: asyncio.Task[None] | None = ctx.surfaces.get(NAME + ".keeping")
        if (swarm is None or swarm.status in (SwarmStatus.REMOVED, SwarmStatus.FAILED)) and \
                (keeping is None or keeping.done()):  # one attempt at a time, however many callers
            ctx.surfaces[NAME + ".keeping"] = asyncio.ensure_future(keep_pool(ctx))
        state = swarm.status if swarm else "missing"
        raise ApiError(503, "pool-unavailable", f"the engine pool {_pool_id(ctx)!r} is {state}: its controller is "
                       "not serving yet; retry shortly", retryable=True, retryAfterS=5)


async def _pool_action(request: web.Request, signal: str, args: dict[str, Any]) -> dict[str, Any]:
    """Send ``signal`` to the pool's controller and wait for its outcome; its details, or the
    error its code calls for."""
    ctx = context_of(request)
    _require_pool(ctx)
    key = request.headers.get("Idempotency-Key", "").strip().strip('"') or str(uuid.uuid4())
    try:
        body = PoolAction(idempotency_key=key, args=args)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise validation_error(exc) from None
    tracked, closed = await begin_and_wait(ctx, Action(signal=signal, request=body, swarm_id=_pool_id(ctx), args=args))
    if not closed:
        raise _timed_out(tracked.correlation_id, signal)
    op = tracked.op
    outcome = op.outcome or {}
    if op.status == OperationStatus.SUCCEEDED:
        return outcome.get("details") or {}
    if op.status == OperationStatus.TIMED_OUT:
        raise _timed_out(tracked.correlation_id, signal)
    raise _refusal(outcome, tracked.correlation_id)


def _timed_out(correlation_id: str, signal: str) -> ApiError:
    return ApiError(504, "timeout", f"the pool's controller did not answer {signal} in time; the operation may "
                    f"still complete: GET /api/operations/{correlation_id}", operationId=correlation_id)


def _refusal(outcome: dict[str, Any], correlation_id: str) -> ApiError:
    code = outcome.get("code") or "pool-error"
    message = outcome.get("message") or "the pool's controller refused the request"
    if code in _RETRY_LATER or outcome.get("retryable"):
        retry_after = int((outcome.get("details") or {}).get("retryAfterS") or 5)
        return _RetryLater(code, message, retry_after, correlation_id)
    return ApiError(_STATUS_OF.get(code, 502), code, message, operationId=correlation_id)


class _RetryLater(ApiError):
    """503 saying why, whether and when to retry, with ``Retry-After``."""

    def __init__(self, code: str, message: str, retry_after: int, correlation_id: str) -> None:
        super().__init__(503, code, message, retryable=True, retryAfterS=retry_after, operationId=correlation_id)
        self.retry_after = retry_after

    def response(self) -> web.Response:
        response = super().response()
        response.headers["Retry-After"] = str(self.retry_after)
        return response


# --- provisioning and control --------------------------------------------------------------------


def _allowed_image(ctx: GatewayContext, image: str | None) -> None:
    chosen = image or ctx.settings.ace_image
    if not ctx.policy.image_allowed("engine", chosen):
        allowed = ", ".join(sorted(ctx.policy.allowed_images.get("engine", ())))
        raise ApiError(422, "image-not-allowed", f"image: {chosen!r} is not allowed (allowed: {allowed}; see "
                       "CP_ALLOWED_IMAGES and CP_ACE_IMAGE)", [{"field": "image", "reason": "not allowed"}])


async def _body(request: web.Request, empty_ok: bool = False) -> dict[str, Any]:
    if empty_ok and not await request.read():
        return {}
    return await read_json(request)


async def provision(request: web.Request) -> web.Response:
    body = ProvisionRequest.model_validate(await _body(request))
    _allowed_image(context_of(request), body.image)
    details = await _pool_action(request, "pool-provision", {"kind": "generic", "request": body.to_dict()})
    metrics.PROVISIONS.labels("generic").inc()
    return web.json_response({"container_id": details["provision"]["container_id"]})


async def provision_acestream(request: web.Request) -> web.Response:
    body = AceProvisionRequest.model_validate(await _body(request, empty_ok=True))
    _allowed_image(context_of(request), body.image)
    details = await _pool_action(request, "pool-provision", {"kind": "acestream", "request": body.to_dict()})
    metrics.PROVISIONS.labels("acestream").inc()
    result = details["provision"]
    return web.json_response({k: result.get(k) for k in ("container_id", "container_name", "host_http_port",
                                                         "container_http_port", "container_https_port")})


def _engine_or_404(ctx: GatewayContext, ref: str) -> str:
    engine = view_of(ctx).find_engine(ref)
    if engine is None:
        raise ApiError(404, "unknown-engine", f"no engine of the pool has container id or name {ref!r}",
                       [{"field": "container_id", "reason": "unknown"}])
    return engine.container_id


async def delete_container(request: web.Request) -> web.Response:
    container_id = _engine_or_404(context_of(request), request.match_info["container_id"])
    await _pool_action(request, "pool-remove", {"containerId": container_id})
    return web.json_response({"deleted": container_id})


async def collect(request: web.Request) -> web.Response:
    details = await _pool_action(request, "pool-gc", {})
    return web.json_response({"status": "ok", "removed": details.get("removed", []),
                              "engines": len(details.get("engines") or [])})


async def scale(request: web.Request) -> web.Response:
    raw = request.match_info["demand"]
    try:
        demand = int(raw)
        if demand < 0:
            raise ValueError
    except ValueError:
        raise ApiError(400, "invalid-demand", f"demand {raw!r} must be a non-negative integer",
                       [{"field": "demand", "reason": "not a non-negative integer"}]) from None
    details = await _pool_action(request, "pool-scale", {"demand": demand})
    return web.json_response({"scaled_to": details.get("applied"), "requested": details.get("requested"),
                              "applied": details.get("applied"), "engines": len(details.get("engines") or []),
                              "started": details.get("started", []), "removed": details.get("removed", []),
                              **({"failures": details["failures"]} if details.get("failures") else {})})


async def get_container(request: web.Request) -> web.Response:
    container_id = _engine_or_404(context_of(request), request.match_info["container_id"])
    details = await _pool_action(request, "pool-inspect", {"containerIds": [container_id]})
    found = details.get("containers") or []
    if not found:
        raise ApiError(404, "unknown-container", f"container {container_id!r} is gone from Docker")
    return web.json_response(found[0])


async def by_label(request: web.Request) -> web.Response:
    ctx = context_of(request)
    key, value = request.query.get("key"), request.query.get("value")
    if not key or value is None:
        raise ApiError(400, "invalid-query", "key and value are both required, e.g. ?key=stream_id&value=ch-42",
                       [{"field": "key" if not key else "value", "reason": "missing"}])
    matching = [e.container_id for e in view_of(ctx).engines.values() if e.labels.get(key) == value]
    if not matching:
        return web.json_response([])
    details = await _pool_action(request, "pool-inspect", {"containerIds": matching})
    return web.json_response(details.get("containers") or [])


# --- stream events -------------------------------------------------------------------------


async def _record(ctx: GatewayContext, event: str, state: dict[str, Any]) -> None:
    """Announced to every gateway (this one included) and the pool's controller before the
    caller is answered: once the broker confirms, the event is durable in each gateway's own
    queue, so a gateway that stops before its store write is committed still records it when
    it consumes the event again. Events recorded while one batch is on its way go out together
    in the next (``Batcher``); the store write is gathered likewise, and not waited for."""
    batcher: Batcher[dict[str, Any]] = ctx.surfaces[NAME + ".events"]
    await asyncio.shield(batcher.add({"event": event, "stream": state}))
    detach(ctx.store.save_pool_stream(_pool_id(ctx), state), "save stream")


def announcer(ctx: GatewayContext) -> str:
    """Marks the batches this gateway announced since it started: their events are in its
    memory already. A restarted gateway has another mark, so it applies what its predecessor
    announced but may not have written to the store."""
    return ctx.surfaces.setdefault(NAME + ".announcer", new_id())


async def announce(ctx: GatewayContext, events: list[dict[str, Any]]) -> None:
    outcome = Outcome(correlation_id=new_id(), idempotency_key=new_id(), signal=keys.STREAM_EVENTS,
                      scope=Scope(swarm_id=_pool_id(ctx)), result="success",
                      details={"events": events, "announcer": announcer(ctx)})
    await ctx.bus.publish(outcome.routing_key(), outcome)


async def stream_started(request: web.Request) -> web.Response:
    ctx = context_of(request)
    event = StreamStarted.model_validate(await read_json(request))
    state, changed = view_of(ctx).start_stream(event)
    if changed:
        metrics.EVENTS_STARTED.inc()
    # A repeat is announced again: its first announcement may be what failed.
    await _record(ctx, "started", state.to_dict())
    return web.Response(body=state.model_dump_json(), content_type="application/json")


async def stream_ended(request: web.Request) -> web.Response:
    ctx = context_of(request)
    event = StreamEnded.model_validate(await read_json(request))
    if not event.stream_id:
        return web.json_response({"updated": False, "stream": None,
                                  "detail": "stream_id is required: no stream is ended by a guess"})
    state, changed = view_of(ctx).end_stream(event.stream_id)
    if state is None:
        return web.json_response({"updated": False, "stream": None, "detail": "no stream has this id"})
    body = state.to_dict()
    if not changed:
        return web.json_response({"updated": False, "stream": body, "detail": "the stream had already ended"})
    metrics.EVENTS_ENDED.inc()
    await _record(ctx, "ended", body)
    return web.json_response({"updated": True, "stream": body})


# --- reads -------------------------------------------------------------------------------------


async def list_engines(request: web.Request) -> web.Response:
    return web.Response(body=view_of(context_of(request)).engines_json(), content_type="application/json")


async def get_engine(request: web.Request) -> web.Response:
    view = view_of(context_of(request))
    engine = view.find_engine(request.match_info["container_id"])
    if engine is None:
        raise ApiError(404, "unknown-engine", f"no engine has container id or name {request.match_info['container_id']!r}")
    return web.json_response({"engine": view.engine_view(engine),
                              "streams": view.list_streams("started", engine.container_id)})


async def list_streams(request: web.Request) -> web.Response:
    status = request.query.get("status") or None
    if status not in (None, "started", "ended"):
        raise ApiError(422, "invalid-status", f"status {status!r} must be started or ended",
                       [{"field": "status", "reason": "must be started or ended"}])
    container_id = request.query.get("container_id") or None
    return web.json_response(view_of(context_of(request)).list_streams(status, container_id))


async def stream_stats(request: web.Request) -> web.Response:
    view = view_of(context_of(request))
    stream_id = request.match_info["stream_id"]
    if stream_id not in view.streams:
        raise ApiError(404, "unknown-stream", f"no stream has id {stream_id!r}")
    raw = request.query.get("since")
    since = parse_time(raw.strip().replace(" ", "+")) if raw else None  # a "+" decoded from a query is a space
    if raw and since is None:
        raise ApiError(400, "invalid-since", f"since {raw!r} is not an ISO-8601 time, e.g. 2024-05-01T12:00:00Z",
                       [{"field": "since", "reason": "not an ISO-8601 time"}])
    return web.json_response(view.stats_of(stream_id, since))


async def vpn_status(request: web.Request) -> web.Response:
    return web.json_response(view_of(context_of(request)).vpn.to_dict())


# --- projections -----------------------------------------------------------------------------


def _mine(ctx: GatewayContext, body: dict[str, Any]) -> bool:
    return ((body.get("scope") or {}).get("swarmId") or body.get("swarmId")) == _pool_id(ctx)


async def on_pool_outcome(ctx: GatewayContext, _key: str, body: dict[str, Any]) -> None:
    if not _mine(ctx, body) or body.get("result") != "success":
        return
    details, view = body.get("details") or {}, view_of(ctx)
    as_of = parse_time(body.get("ts"))
    if isinstance(details.get("engine"), dict):
        view.add_engine(details["engine"])
    if isinstance(details.get("removed"), list):
        view.remove_engines([str(c) for c in details["removed"]])
    if isinstance(details.get("engines"), list):
        view.replace_engines(details["engines"], as_of)
    view.saw_engines_at(as_of)


async def on_controller_status(ctx: GatewayContext, _key: str, body: dict[str, Any]) -> None:
    if body.get("instance") != _pool_id(ctx):
        return
    pool = (body.get("data") or {}).get("pool")
    if not isinstance(pool, dict):
        return
    view = view_of(ctx)
    if isinstance(pool.get("engines"), list):
        view.replace_engines(pool["engines"], parse_time(body.get("ts")))
    if isinstance(pool.get("vpn"), dict):
        try:
            view.vpn = type(view.vpn).model_validate(pool["vpn"])
        except ValidationError:
            pass


async def on_stream_events(ctx: GatewayContext, _key: str, body: dict[str, Any]) -> None:
    details = body.get("details") or {}
    if not _mine(ctx, body) or details.get("announcer") == announcer(ctx):
        return
    events, view = details.get("events"), view_of(ctx)
    for event in events if isinstance(events, list) else ():
        changed = None
        if not isinstance(event, dict):
            continue
        if isinstance(event.get("stream"), dict):  # recorded by a gateway (maybe this one, before a restart)
            changed = view.observe_stream(event["stream"])
        elif event.get("streamId"):  # ended by the pool (its engine went away, or forgot it)
            state, ended = view.end_stream(str(event["streamId"]))
            changed = state if ended else None
        if changed is not None:
            detach(ctx.store.save_pool_stream(_pool_id(ctx), changed.to_dict()), "save stream")


async def on_stream_stats(ctx: GatewayContext, _key: str, body: dict[str, Any]) -> None:
    if not _mine(ctx, body):
        return
    details = body.get("details") or {}
    errors = details.get("errors")
    if isinstance(errors, int) and errors > 0:
        metrics.COLLECT_ERRORS.inc(errors)
    if isinstance(details.get("stats"), list):
        taken = view_of(ctx).add_stats(details["stats"])
        if taken:
            await ctx.store.add_pool_stats(_pool_id(ctx), taken)
