"""The API surfaces the gateway serves: each a module with one ``Surface`` value.

Adding a surface is a module here and a line below; the core never names one.
"""

from controlplane.config import Settings
from controlplane.gateway.surface import Surface
from controlplane.gateway.surfaces import ace, components, operations, services, streams, swarms

SURFACES: tuple[Surface, ...] = (swarms.SURFACE, components.SURFACE, operations.SURFACE)


def surfaces_for(settings: Settings) -> tuple[Surface, ...]:
    """The surfaces a gateway with these settings serves: those that need none, and those
    built from settings (a prefix, a pool)."""
    pool = ace.surface(settings)
    return SURFACES + (streams.surface(settings), services.surface(settings)) + ((pool,) if pool is not None else ())
