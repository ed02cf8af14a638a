"""Load ``topology.yaml`` and turn it into declarations or a management-UI definitions file.

The file is data on purpose: an operator reads the topology in one place, and the names
shown in the RabbitMQ management UI are the names written there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field


class Binding(BaseModel):
    exchange: str
    key: str = ""


class ExchangeDecl(BaseModel):
    name: str
    type: Literal["topic", "fanout", "direct", "headers"] = "topic"
    durable: bool = True


class QueueDecl(BaseModel):
    name: str
    durable: bool = True
    exclusive: bool = False  # the declaring connection's alone, gone with it
    arguments: dict[str, Any] = Field(default_factory=dict)
    bindings: list[Binding] = Field(default_factory=list)

    def render(self, **names: str) -> QueueDecl:
        """Fill the {placeholders} of a queue template."""
        return QueueDecl(
            name=self.name.format(**names),
            durable=self.durable,
            exclusive=self.exclusive,
            arguments=self.arguments,
            bindings=[Binding(exchange=b.exchange.format(**names), key=b.key.format(**names)) for b in self.bindings],
        )


class PolicyDecl(BaseModel):
    """A RabbitMQ policy: bounds kept by the broker, which an operator sees (and may change) in
    the management UI, and which never make a re-declaration fail the way queue arguments do."""

    name: str
    pattern: str
    priority: int = 0
    definition: dict[str, Any]
    apply_to: Literal["queues", "exchanges", "all"] = Field("queues", alias="apply-to")


class Templates(BaseModel):
    gateway_queue: QueueDecl
    gateway_status_queue: QueueDecl
    swarm_controller_queue: QueueDecl
    swarm_controller_replies_queue: QueueDecl
    bee_queue: QueueDecl
    state_queue: QueueDecl
    hive_exchange: ExchangeDecl
    work_queue: QueueDecl
    stream_publisher_queue: QueueDecl
    replies_queue: QueueDecl


class Topology(BaseModel):
    exchanges: list[ExchangeDecl]
    queues: list[QueueDecl]
    templates: Templates
    policies: list[PolicyDecl] = Field(default_factory=list)

    def queue(self, name: str) -> QueueDecl:
        for q in self.queues:
            if q.name == name:
                return q
        raise KeyError(f"topology has no queue {name!r}")

    def hive_exchange(self, swarm_id: str) -> ExchangeDecl:
        t = self.templates.hive_exchange
        return ExchangeDecl(name=t.name.format(swarm_id=swarm_id), type=t.type, durable=t.durable)


# Shipped inside the package so that a bee or controller image, which has only the
# installed packages and not the source tree, still finds it.
DEFAULT_TOPOLOGY = Path(__file__).with_name("topology.yaml")


def load_topology(path: Path) -> Topology:
    with open(path, encoding="utf-8") as fh:
        return Topology.model_validate(yaml.safe_load(fh))


def default_topology() -> Topology:
    """The topology shipped with the package."""
    return load_topology(DEFAULT_TOPOLOGY)


def definitions(topology: Topology, vhost: str = "/") -> dict[str, Any]:
    """RabbitMQ definitions (importable in the management UI) for the static part."""
    return {
        "exchanges": [
            {"name": e.name, "vhost": vhost, "type": e.type, "durable": e.durable,
             "auto_delete": False, "internal": False, "arguments": {}}
            for e in topology.exchanges
        ],
        "queues": [
            {"name": q.name, "vhost": vhost, "durable": q.durable, "auto_delete": False, "arguments": q.arguments}
            for q in topology.queues
        ],
        "bindings": [
            {"source": b.exchange, "vhost": vhost, "destination": q.name, "destination_type": "queue",
             "routing_key": b.key, "arguments": {}}
            for q in topology.queues
            for b in q.bindings
        ],
        "policies": [
            {"name": p.name, "vhost": vhost, "pattern": p.pattern, "apply-to": p.apply_to, "priority": p.priority,
             "definition": p.definition}
            for p in topology.policies
        ],
    }
