"""Gateway middlewares: request ids and log context, bearer-key auth, errors as JSON.

Every error leaves the gateway as a JSON body with a code and a message that names the
field at fault; nothing a caller sends can produce a traceback or a bare 500 page.
"""

from __future__ import annotations

import hmac
import json
import time
import os
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from controlplane.contract import ids
from pydantic import ValidationError

from controlplane.gateway import metrics
from controlplane.logs import get_logger

log = get_logger("gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
OPEN_PATHS = {"/healthz", "/readyz", "/metrics", "/openapi.json"}


class ApiError(Exception):
    """An error answered as ``{"error": code, "message": ..., "fields": [...]}``."""

    def __init__(self, status: int, code: str, message: str, fields: list[dict[str, str]] | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.fields, self.extra = status, code, message, fields or [], extra

    def response(self) -> web.Response:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.fields:
            body["fields"] = self.fields
        body.update(self.extra)
        return web.json_response(body, status=self.status)


def validation_error(exc: ValidationError, status: int = 400, code: str = "invalid-request") -> ApiError:
    fields = [{"field": ".".join(str(p) for p in e["loc"]) or "(body)", "reason": e["msg"]} for e in exc.errors()]
    message = "; ".join(f"{f['field']}: {f['reason']}" for f in fields)
    return ApiError(status, code, message, fields)


def require_id(kind: ids.IdKind, field: str, value: str) -> str:
    """An id from a path or query, checked for its kind, or a 400 naming the field and why."""
    problem = ids.problem(kind, value)
    if problem:
        raise ApiError(400, f"invalid-{field}", f"{field} {value!r} {problem}", [{"field": field, "reason": problem}])
    return value


def require_slug(field: str, value: str) -> str:
    """An id that becomes a routing-key segment or a container name."""
    return require_id("slug", field, value)


# Deep enough for any config patch; a deeper body is refused before it reaches a model or a bee.
MAX_BODY_DEPTH = 32
_TOO_DEEP = object()


def _deeper_than(value: Any, limit: int) -> bool:
    """Without recursion, so the check itself cannot overflow."""
    todo: list[tuple[Any, int]] = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        todo.extend((child, depth + 1) for child in children)
    return False


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    raw = await request.read()
    if not raw:
        raise ApiError(400, "invalid-request", "request body must be a JSON object", [{"field": "(body)", "reason": "empty"}])
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "malformed-json", f"request body is not valid JSON: {exc}",
                       [{"field": "(body)", "reason": "not valid JSON"}]) from None
    except RecursionError:
        body = _TOO_DEEP  # deeper than the parser goes: refused below like any body too deep
    # Fewer brackets than the limit cannot nest deeper than it: counting is cheaper than walking.
    shallow = raw.count(b"{") + raw.count(b"[") <= MAX_BODY_DEPTH
    if body is _TOO_DEEP or (not shallow and _deeper_than(body, MAX_BODY_DEPTH)):
        raise ApiError(400, "invalid-request", f"request body is nested deeper than {MAX_BODY_DEPTH} levels",
                       [{"field": "(body)", "reason": "nested too deep"}])
    if not isinstance(body, dict):
        raise ApiError(400, "invalid-request", "request body must be a JSON object",
                       [{"field": "(body)", "reason": f"got {type(body).__name__}"}])
    return body


REQUEST_ID = "request_id"


async def tag_stream(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: a stream sends its headers before the middleware sees it."""
    if REQUEST_ID in request and "X-Request-Id" not in response.headers:
        response.headers["X-Request-Id"] = request[REQUEST_ID]


# (method, route path) -> "protected" or "open", for routes whose access is not the default.
Access = dict[tuple[str, str], str]


# (method, route path) -> the middleware of the surface owning the route (``surface.Middleware``).
Wrapped = dict[tuple[str, str], Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]]


def make_middlewares(admin_key: str | None, read_key: str | None = None,
                     reads_guarded: bool = False, access: Access | None = None,
                     wrapped: Wrapped | None = None) -> list[Callable[..., Any]]:
    """``access`` and ``wrapped``: filled as surfaces are mounted; read when each request comes in."""
    admin = admin_key.encode() if admin_key else None
    special = access if access is not None else {}
    surface_wrappers = wrapped if wrapped is not None else {}
    reader = read_key.encode() if read_key else None

    @web.middleware
    async def context(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = request[REQUEST_ID] = request.headers.get("X-Request-Id") or os.urandom(8).hex()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id, method=request.method, path=request.path)
        started = time.perf_counter()
        response = await handler(request)
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        counted, timed = metrics.http_series(request.method, route, response.status)
        counted.inc()
        if not isinstance(response, web.Response):  # a stream: its lifetime is not a request's latency
            return response
        response.headers["X-Request-Id"] = request_id
        timed.observe(time.perf_counter() - started)
        return response

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except ValidationError as exc:
            return validation_error(exc).response()
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return ApiError(exc.status, exc.reason.lower().replace(" ", "-"), exc.reason).response()
        except Exception:
            log.exception("unhandled error")
            return ApiError(500, "internal", "internal error; see the gateway log for the request id").response()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        writes = request.method in MUTATING
        resource = request.match_info.route.resource
        rule = special.get((request.method, resource.canonical)) if resource is not None else None
        guarded = rule == "protected" or (rule != "open" and (writes or (reads_guarded and request.path not in OPEN_PATHS)))
        if admin is None or not guarded:
            return await handler(request)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "missing bearer key: send 'Authorization: Bearer <key>'")
        given = token.strip().encode()
        # Both compared every time, in constant time: which key matched must not show in the timing.
        is_admin = hmac.compare_digest(given, admin)
        is_reader = hmac.compare_digest(given, reader or admin)
        if is_admin or (is_reader and not writes):
            return await handler(request)
        if is_reader:
            raise ApiError(403, "forbidden", "this key may only read")
        raise ApiError(403, "forbidden", "bearer key is not valid")

    @web.middleware
    async def by_surface(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        wrapper = surface_wrappers.get((request.method, resource.canonical)) if resource is not None else None
        return await handler(request) if wrapper is None else await wrapper(request, handler)

    # Order: context outermost so every answer (even an auth refusal) is counted and tagged; a
    # surface's own middleware outside auth, so it shapes auth refusals as its other answers.
    return [context, errors, by_surface, auth]
