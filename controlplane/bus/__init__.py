"""RabbitMQ access: one robust connection per process, confirmed publishing, acking consumers."""

from controlplane.bus.connection import Bus, Consumer
from controlplane.bus.rpc import Requester, reply

__all__ = ["Bus", "Consumer", "Requester", "reply"]
