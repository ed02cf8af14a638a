"""What an API surface is: one value per module, which the application mounts.

A surface declares everything it adds to the gateway in one place: its routes, each an
``Op`` (method, path, models, statuses: the OpenAPI description) with its handler; the
signals it sends with their timeouts; and its projections, the events it keeps its read
models current from. The app mounts every surface the same way and refuses, at start-up, a
(method, path) two surfaces both claim; the core (actions, tracker, app) never names one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from controlplane.gateway.actions import register_signals
from controlplane.gateway.context import GatewayContext
from controlplane.gateway.events import TopicPattern
from controlplane.gateway.middleware import Access, Wrapped
from controlplane.gateway.openapi import Op

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Runs for every event whose routing key matches its pattern, before operations close, so an
# operation read as closed already shows its effect on the read model.
Projection = Callable[[GatewayContext, str, dict[str, Any]], Awaitable[None]]
# A surface's own life beside the gateway's: ``load`` its read model before events are
# consumed, ``start`` what it runs (which may send signals) once they are, ``stop`` at the end.
Hook = Callable[[GatewayContext], Awaitable[None]]
# Wraps every request to one of the surface's routes, outside the auth check: a surface with an
# answer shape of its own (its errors, its headers) shapes the auth refusals too.
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Surface:
    name: str
    routes: tuple[tuple[Op, Handler], ...]
    signals: Mapping[str, int] = field(default_factory=dict)  # signal → timeoutMs
    projections: tuple[tuple[str, Projection], ...] = ()  # (AMQP topic pattern, projection)
    load: Hook | None = None
    start: Hook | None = None
    stop: Hook | None = None
    middleware: Middleware | None = None


def mount(app: web.Application, surfaces: Iterable[Surface], claimed: Iterable[Op] = (),
          access: Access | None = None, wrapped: Wrapped | None = None) -> list[Op]:
    """Add every surface's routes and signals to ``app``; its operations, for the OpenAPI
    description. A (method, path) claimed twice is a wiring mistake: it fails here.
    ``access`` receives the routes whose access is not the default, for the auth middleware;
    ``wrapped`` the routes of surfaces with a middleware of their own."""
    owners = {(op.method, op.path): "the gateway" for op in claimed}
    ops: list[Op] = []
    for surface in surfaces:
        register_signals(dict(surface.signals))
        for op, handler in surface.routes:
            key = (op.method, op.path)
            if key in owners:
                raise ValueError(f"{op.method} {op.path} of surface {surface.name!r} is already "
                                 f"claimed by {owners[key]}")
            owners[key] = f"surface {surface.name!r}"
            app.router.add_route(op.method, op.path, handler)
            if op.access != "default" and access is not None:
                access[key] = op.access
            if surface.middleware is not None and wrapped is not None:
                wrapped[key] = surface.middleware
            ops.append(op)
    return ops


@dataclass(frozen=True)
class Projections:
    """Every surface's projections, matched against each consumed event's routing key."""

    entries: tuple[tuple[TopicPattern, Projection], ...]

    @classmethod
    def of(cls, surfaces: Iterable[Surface]) -> Projections:
        return cls(tuple((TopicPattern.parse(pattern), projection)
                         for surface in surfaces for pattern, projection in surface.projections))

    async def apply(self, ctx: GatewayContext, routing_key: str, body: dict[str, Any]) -> None:
        for pattern, projection in self.entries:
            if pattern.matches(routing_key):
                await projection(ctx, routing_key, body)
