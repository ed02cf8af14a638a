"""Where a bee's HTTP calls may go (the bees enforce it; the control plane validates the setting): its swarm's own system under test, and the targets an
operator allows (``CP_ALLOWED_TARGETS``). Nothing else, whatever a config patch says.

Checked twice. When a config is applied, an address that is not allowed is refused with
``invalid-config`` naming the field. When a connection is made, a host name is resolved and
each address checked again, so a name that later resolves somewhere else (DNS rebinding)
does not get through: loopback, link-local, private and other non-public addresses are
refused unless the operator listed them (an address or a network), and the broker's ports
are refused always. The rules are here; the resolver that applies them at connect time is
``bees.http.GuardedResolver`` (this module stays free of aiohttp: every bee imports it).

The gateway's webhooks follow the same rules with one difference: any public destination
may be called, so only the addresses are checked (``destination_problem``), against the
operator's own list for them (``CP_WEBHOOK_ALLOWED_TARGETS``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from yarl import URL

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# AMQP, its TLS port, the management UI and API, Erlang distribution: never a load target.
BROKER_PORTS = frozenset({5672, 5671, 15672, 15671, 25672, 4369})


@dataclass(frozen=True)
class Target:
    """One entry of CP_ALLOWED_TARGETS: a host name, an address or a network, with an optional port."""

    host: str | None = None
    network: IpNetwork | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> Target:
        text = text.strip().lower()
        host, port = text, None
        if text.count(":") == 1 and "/" not in text:  # host:port (a bare IPv6 address has several)
            host, _, raw_port = text.partition(":")
            port = int(raw_port)
        host = host.strip("[]")
        try:
            return cls(network=ipaddress.ip_network(host, strict=False), port=port)
        except ValueError:
            if not host:
                raise ValueError(f"allowed target {text!r} names no host") from None
            return cls(host=host, port=port)

    @classmethod
    def check_all(cls, texts: list[str]) -> list[str]:
        """A setting's list of targets, unchanged, once each parses (for validators)."""
        for text in texts:
            cls.parse(text)
        return texts

    def matches(self, host: str, port: int | None, address: IpAddress | None = None) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return address is not None and address in self.network
        return host == self.host


def _address(host: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _not_public(address: IpAddress) -> str | None:
    """Why an address is not one a load target may have, or None."""
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "not a public address"
    return None


@dataclass(frozen=True)
class Egress:
    sut: tuple[str, int] | None = None  # the swarm's own system under test: host and port
    allowed: tuple[Target, ...] = ()

    @classmethod
    def of(cls, sut_url: str | None, allowed_targets: Iterable[str]) -> Egress:
        sut = None
        if sut_url:
            url = URL(sut_url)
            sut = ((url.host or "").lower(), url.port or 80)
        return cls(sut=sut, allowed=tuple(Target.parse(t) for t in allowed_targets))

    def problem(self, url: str) -> str | None:
        """Why a call to ``url`` is refused, or None (config time: no name is resolved here)."""
        parsed = URL(url)
        host, port = (parsed.host or "").lower(), parsed.port
        if (host, port) == self.sut:
            return None
        if port in BROKER_PORTS:
            return f"port {port} is the message broker's"
        address = _address(host)
        if not any(t.matches(host, port, address) for t in self.allowed):
            return (f"{host}:{port} is neither this swarm's system under test nor a target the operator allows "
                    "(CP_ALLOWED_TARGETS)")
        if address is not None:
            return self.address_problem(address, port)
        if host == "localhost" or host.endswith(".localhost"):
            return "localhost is a loopback address"
        return None

    def destination_problem(self, url: str) -> str | None:
        """Why ``url`` is refused where any public destination may be called (a webhook's), or
        None. The same rules without the list of names: an address must be public or listed,
        the broker's ports are refused always. Config time: a name is not resolved here, its
        addresses are checked when it is (``address_problem``)."""
        parsed = URL(url)
        host, port = (parsed.host or "").lower(), parsed.port
        if port in BROKER_PORTS:
            return f"port {port} is the message broker's"
        address = _address(host)
        if address is not None:
            return self.address_problem(address, port)
        name = host.rstrip(".")  # "localhost." is localhost too
        if (name == "localhost" or name.endswith(".localhost")) and \
                self.address_problem(ipaddress.ip_address("127.0.0.1"), port) is not None:
            return "localhost is a loopback address"
        return None

    def address_problem(self, address: IpAddress, port: int | None) -> str | None:
        """Why a connection to ``address`` is refused, or None: a non-public address must be
        the SUT's or listed by the operator as an address or network."""
        if port in BROKER_PORTS:
            return f"port {port} is the message broker's"
        if self.sut is not None and (str(address), port) == self.sut:
            return None
        reason = _not_public(address)
        if reason is None:
            return None
        if any(t.network is not None and t.matches("", port, address) for t in self.allowed):
            return None
        return f"{address} is {reason}"
