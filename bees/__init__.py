"""Bees: the worker processes a swarm runs, and the small SDK they are built on.

A bee is configured by ``CP_*`` environment variables (``bees.env.BeeEnv``), obeys the
``config-update`` and ``status-request`` signals on its control queue and reports status.
The roles: ``generator`` and ``trigger`` produce work, ``moderator`` paces it, ``processor``
calls the system under test over HTTP and ``postprocessor`` measures the results. ``bees.sut``
is not a bee: it is the small HTTP server such swarms load.
"""

from bees.env import BeeEnv
from bees.sdk import Bee, BeeContext, Worker, run_bee

__all__ = ["Bee", "BeeContext", "BeeEnv", "Worker", "run_bee"]
