"""What every gateway handler needs, held once on the aiohttp application."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from controlplane.bus import Bus
from controlplane.config import Settings
from controlplane.gateway.events import EventHub
from controlplane.gateway.ledger import Ledger
from controlplane.gateway.readmodels import Swarms
from controlplane.gateway.registry import Registry
from controlplane.runtime.policy import RuntimePolicy
from controlplane.scenarios import Catalog
from controlplane.store import Store


@dataclass
class GatewayContext:
    settings: Settings
    store: Store
    bus: Bus
    catalog: Catalog
    events: EventHub
    ledger: Ledger
    swarms: Swarms
    registry: Registry
    policy: RuntimePolicy  # the runtime's own, so a plan is refused here as it would be there
    surfaces: dict[str, Any] = field(default_factory=dict)  # each surface's own state, by its name


CTX = web.AppKey("controlplane", GatewayContext)


def context_of(request: web.Request) -> GatewayContext:
    """The shared context, from the app or any parent of a mounted sub-app."""
    return request.config_dict[CTX]
