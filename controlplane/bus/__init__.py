"""RabbitMQ access: one robust connection per process, confirmed publishing, acking consumers."""

from controlplane.bus.connection import POISON, BrokerUnavailable, Bus, Consumer, Handler, Poison
from controlplane.bus.rpc import Requester, RequesterClosed, Unroutable, reply

__all__ = ["POISON", "BrokerUnavailable", "Bus", "Consumer", "Handler", "Poison", "Requester", "RequesterClosed",
           "Unroutable", "reply"]
