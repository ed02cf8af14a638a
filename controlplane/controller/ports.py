"""Port allocation for a pool's engines: host ports, and the engine's own HTTP and HTTPS ports.

The allocator lives in the pool controller, the only process that provisions the pool, and
takes and gives back ports without awaiting anything: two provisions running side by side
can never be handed the same port. After a restart it is rebuilt from the ports every
engine's labels say it holds (``hold``), before the first provision is served.

The search starts after the last port handed out, so a port given back is not reused at
once (the engine that held it may still be going away).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from controlplane.contract.pool import PoolSpec, PortRange

Kind = Literal["host", "http", "https"]


class PortsExhausted(Exception):
    """Every port of a range is held."""

    def __init__(self, kind: Kind, ports: PortRange) -> None:
        super().__init__(f"every {kind} port of {ports} is in use ({len(ports)} ports)")
        self.kind = kind


class PortTaken(Exception):
    """A port a caller asked for is held by another engine."""


class PortAllocator:
    def __init__(self, spec: PoolSpec) -> None:
        self.ranges: dict[Kind, PortRange] = {"host": spec.host_ports, "http": spec.http_ports,
                                               "https": spec.https_ports}
        self.held: dict[Kind, set[int]] = {"host": set(), "http": set(), "https": set()}
        self._cursor: dict[Kind, int] = {kind: ports.first for kind, ports in self.ranges.items()}

    def hold(self, kind: Kind, port: int) -> None:
        """Record a port an existing engine holds, whatever range it is in."""
        self.held[kind].add(port)

    def take(self, kind: Kind, avoid: Iterable[int] = ()) -> int:
        """A free port of the kind's range, now held; ``PortsExhausted`` when none is left."""
        ports, held, skip = self.ranges[kind], self.held[kind], set(avoid)
        start = self._cursor[kind]
        for offset in range(len(ports)):
            port = ports.first + (start - ports.first + offset) % len(ports)
            if port not in held and port not in skip:
                held.add(port)
                self._cursor[kind] = port + 1 if port < ports.last else ports.first
                return port
        raise PortsExhausted(kind, ports)

    def take_exact(self, kind: Kind, port: int) -> int:
        """Hold the port a caller asked for; ``PortTaken`` when an engine holds it already."""
        if port in self.held[kind]:
            raise PortTaken(f"{kind} port {port} is already held by another engine of the pool")
        self.held[kind].add(port)
        return port

    def release(self, kind: Kind, port: int | None) -> None:
        if port is not None:
            self.held[kind].discard(port)

    def free(self, kind: Kind) -> int:
        """Ports of the range nobody holds."""
        ports = self.ranges[kind]
        return len(ports) - sum(1 for port in self.held[kind] if port in ports)
