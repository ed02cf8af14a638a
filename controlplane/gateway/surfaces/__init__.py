"""The API surfaces the gateway serves: each a module with one ``Surface`` value.

Adding a surface is a module here and a line below; the core never names one.
"""

from controlplane.gateway.surface import Surface
from controlplane.gateway.surfaces import components, operations, swarms

SURFACES: tuple[Surface, ...] = (swarms.SURFACE, components.SURFACE, operations.SURFACE)
