"""Surfaces mount as values: routes and OpenAPI from one tuple, signals registered, clashes refused."""

from __future__ import annotations

import pytest
from aiohttp import web

from controlplane.gateway.actions import SIGNAL_TIMEOUTS_MS, register_signals
from controlplane.gateway.openapi import Op
from controlplane.gateway.surface import Projections, Surface, mount
from controlplane.gateway.surfaces import SURFACES


async def _ok(_: web.Request) -> web.Response:
    return web.json_response({})


def test_every_shipped_surface_mounts_once_with_its_signals() -> None:
    app = web.Application()
    ops = mount(app, SURFACES)
    routes = {(op.method, op.path) for op in ops}
    assert len(routes) == len(ops)
    assert ("POST", "/api/swarms/{swarmId}/create") in routes and ("GET", "/api/operations/{correlationId}") in routes
    assert SIGNAL_TIMEOUTS_MS["swarm-create"] == 120_000 and SIGNAL_TIMEOUTS_MS["status-request"] == 10_000


def test_a_route_claimed_twice_fails_at_mount() -> None:
    first = Surface("first", ((Op("GET", "/x", "x"), _ok),))
    second = Surface("second", ((Op("GET", "/x", "x again"), _ok),))
    with pytest.raises(ValueError, match="GET /x of surface 'second' is already claimed by surface 'first'"):
        mount(web.Application(), [first, second])
    with pytest.raises(ValueError, match="claimed by the gateway"):
        mount(web.Application(), [first], claimed=[Op("GET", "/x", "base")])


def test_a_signal_registered_with_another_timeout_is_refused() -> None:
    register_signals({"test-signal": 1000})
    register_signals({"test-signal": 1000})
    with pytest.raises(ValueError, match="already registered"):
        register_signals({"test-signal": 2000})


async def test_projections_run_for_matching_events_only() -> None:
    seen: list[str] = []

    async def project(_ctx: object, routing_key: str, _body: dict) -> None:  # type: ignore[type-arg]
        seen.append(routing_key)

    projections = Projections.of([Surface("s", (), projections=(("ev.*.swarm-start.*", project),))])
    for key in ("ev.ready.swarm-start.a", "ev.error.swarm-stop.a", "ev.error.swarm-start.b"):
        await projections.apply(None, key, {})  # type: ignore[arg-type]
    assert seen == ["ev.ready.swarm-start.a", "ev.error.swarm-start.b"]
