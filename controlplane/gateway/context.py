"""What every gateway handler needs, held once on the aiohttp application."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from controlplane.bus import Bus
from controlplane.config import Settings
from controlplane.gateway.events import EventHub
from controlplane.scenarios import Catalog
from controlplane.store import Store


@dataclass
class GatewayContext:
    settings: Settings
    store: Store
    bus: Bus
    catalog: Catalog
    events: EventHub


CTX = web.AppKey("controlplane", GatewayContext)
