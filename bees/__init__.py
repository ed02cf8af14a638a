"""Bees: the worker processes a swarm runs, and the small SDK they are built on.

A bee is configured by ``CP_*`` environment variables (``bees.env.BeeEnv``), obeys the
``config-update`` and ``status-request`` signals on its control queue and reports status.
"""

from bees.env import BeeEnv
from bees.sdk import Bee, BeeContext, Worker, run_bee

__all__ = ["Bee", "BeeContext", "BeeEnv", "Worker", "run_bee"]
