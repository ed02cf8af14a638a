"""Prometheus metrics of the gateway, served at ``/metrics``."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

HTTP_REQUESTS = Counter("cp_http_requests_total", "HTTP requests answered", ["method", "route", "status"])
HTTP_LATENCY = Histogram("cp_http_request_seconds", "HTTP request latency", ["method", "route"])
SIGNALS_PUBLISHED = Counter("cp_signals_published_total", "Signals published to ph.control", ["signal"])
IDEMPOTENT_REPLAYS = Counter("cp_idempotent_replays_total", "Requests answered from an idempotency record", ["action"])
OPERATIONS_FINISHED = Counter("cp_operations_finished_total", "Operations that reached a final state",
                              ["signal", "status"])
OPERATION_SECONDS = Histogram("cp_operation_seconds", "Time from acceptance to outcome", ["signal"],
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
STATUS_EVENTS = Counter("cp_status_events_total", "Status events taken into the registry", ["role", "kind"])
REGISTRY_FLUSH_SECONDS = Histogram("cp_registry_flush_seconds", "Time to save one batch of the registry",
                                   buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))


# Label values come from a closed set: a caller's method or a message's role must not mint series.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_ROLES = frozenset({"swarm-controller", "generator", "moderator", "processor", "postprocessor", "trigger"})


_SERIES: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def http_series(method: str, route: str, status: int) -> tuple[Any, Any]:
    """The request counter and the latency histogram of one (method, route, status), looked up
    once: ``labels()`` costs more than the increment on a hot path. Routes and statuses are the
    app's own, so the table stays small."""
    key = (method_label(method), route, status)
    series = _SERIES.get(key)
    if series is None:
        series = _SERIES[key] = (HTTP_REQUESTS.labels(key[0], route, str(status)), HTTP_LATENCY.labels(key[0], route))
    return series


def method_label(method: str) -> str:
    return method if method in _METHODS else "other"


def role_label(role: str) -> str:
    return role if role in _ROLES else "other"


async def metrics_view(_: web.Request) -> web.Response:
    """``GET /metrics``: every metric of the process, in Prometheus' text format."""
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})
