"""Request-reply bookkeeping: one future per correlation id, gone however the wait ends."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from aiormq.abc import DeliveredMessage

from controlplane.bus import Requester, RequesterClosed, Unroutable
from controlplane.contract.topology import default_topology


class FakeChannel:
    """Records what the requester publishes, so a test can answer it (or return it)."""

    def __init__(self) -> None:
        self.published: list[SimpleNamespace] = []
        self.arrived = asyncio.Event()
        self.is_closed = False
        self.unbound: set[str] = set()

    async def close(self) -> None:
        self.is_closed = True

    async def get_underlay_channel(self) -> FakeChannel:
        return self

    async def basic_publish(self, body: bytes, *, exchange: str, routing_key: str, properties: Any,
                            mandatory: bool, wait: bool) -> DeliveredMessage | None:
        self.published.append(SimpleNamespace(body=body, routing_key=routing_key, mandatory=mandatory,
                                              correlation_id=properties.correlation_id,
                                              expiration=properties.expiration))
        self.arrived.set()
        # The broker's answer to a mandatory publish nobody is bound for: the message, returned.
        if routing_key in self.unbound:
            return DeliveredMessage(delivery=None, header=None, body=body, channel=None)  # type: ignore[arg-type]
        return None


class Reply:
    """A delivered reply as aiormq hands it over."""

    def __init__(self, correlation_id: str | None, body: bytes) -> None:
        self.header = SimpleNamespace(properties=SimpleNamespace(correlation_id=correlation_id))
        self.body = body


def requester() -> tuple[Requester, FakeChannel]:
    channel = FakeChannel()
    req = Requester(bus=SimpleNamespace(topology=default_topology()))  # type: ignore[arg-type]
    req._channel = channel  # type: ignore[assignment]
    return req, channel


async def published(channel: FakeChannel) -> Any:
    await asyncio.wait_for(channel.arrived.wait(), 5)
    return channel.published[-1]


async def test_a_reply_resolves_its_caller_and_leaves_nothing_behind() -> None:
    req, channel = requester()
    call = asyncio.create_task(req.request("sig.echo.test", {"n": 1}, timeout=5))
    request = await published(channel)
    assert req.pending == 1
    req._on_reply(Reply(request.correlation_id, b'{"ok": true}'))  # type: ignore[arg-type]
    assert await asyncio.wait_for(call, 5) == {"ok": True}
    assert req.pending == 0
    assert json.loads(request.body) == {"n": 1}
    assert request.expiration == "5000", "a request nobody took in time expires in the broker (ms)"
    assert request.mandatory, "an unroutable request comes back instead of vanishing"


async def test_an_unknown_or_late_reply_is_dropped() -> None:
    req, channel = requester()
    call = asyncio.create_task(req.request("sig.echo.test", {}, timeout=5))
    request = await published(channel)
    req._on_reply(Reply("someone-else", b"{}"))  # type: ignore[arg-type]
    req._on_reply(Reply(None, b"{}"))  # type: ignore[arg-type]
    assert req.pending == 1 and not call.done(), "a stranger's reply does not resolve this caller"
    req._on_reply(Reply(request.correlation_id, b'{"n": 1}'))  # type: ignore[arg-type]
    req._on_reply(Reply(request.correlation_id, b'{"n": 2}'))  # type: ignore[arg-type]
    assert await call == {"n": 1}


async def test_a_broken_reply_fails_the_caller_instead_of_timing_out() -> None:
    req, channel = requester()
    call = asyncio.create_task(req.request("sig.echo.test", {}, timeout=30))
    request = await published(channel)
    req._on_reply(Reply(request.correlation_id, b"\xff"))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await asyncio.wait_for(call, 5)
    assert req.pending == 0


async def test_a_caller_that_times_out_leaves_nothing_behind() -> None:
    req, channel = requester()
    with pytest.raises(asyncio.TimeoutError):
        await req.request("sig.nobody.listens", {}, timeout=0.05)
    assert req.pending == 0
    # Its reply, should it still come, finds nobody and is dropped.
    req._on_reply(Reply(channel.published[-1].correlation_id, b"{}"))  # type: ignore[arg-type]
    assert req.pending == 0


async def test_a_cancelled_caller_leaves_nothing_behind() -> None:
    req, channel = requester()
    call = asyncio.create_task(req.request("sig.echo.test", {}, timeout=30))
    await published(channel)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert req.pending == 0


async def test_close_fails_every_waiting_caller() -> None:
    req, channel = requester()
    calls = [asyncio.create_task(req.request("sig.echo.test", {"n": n}, timeout=30)) for n in range(3)]
    async with asyncio.timeout(5):
        while len(channel.published) < 3:
            await channel.arrived.wait()
            channel.arrived.clear()
    await req.close()
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
    assert all(isinstance(r, RequesterClosed) for r in results), results
    assert req.pending == 0
    with pytest.raises(RequesterClosed):
        await req.request("sig.echo.test", {}, timeout=1)



async def test_a_returned_request_fails_its_caller_at_once() -> None:
    req, channel = requester()
    channel.unbound.add("sig.nobody.listens")
    with pytest.raises(Unroutable, match="sig.nobody.listens"):
        await asyncio.wait_for(req.request("sig.nobody.listens", {}, timeout=30), 5)
    assert req.pending == 0
