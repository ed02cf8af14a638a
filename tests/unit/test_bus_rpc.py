"""Request-reply bookkeeping: one future per correlation id, gone however the wait ends."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from controlplane.bus import Requester, RequesterClosed
from controlplane.contract.topology import default_topology


class FakeExchange:
    """Records what the requester publishes, so a test can answer it."""

    def __init__(self) -> None:
        self.published: list[Any] = []
        self.arrived = asyncio.Event()

    async def publish(self, message: Any, routing_key: str, mandatory: bool = True) -> None:
        self.published.append(message)
        self.arrived.set()


class Reply:
    def __init__(self, correlation_id: str | None, body: bytes) -> None:
        self.correlation_id, self.body = correlation_id, body


def requester() -> tuple[Requester, FakeExchange]:
    exchange = FakeExchange()
    req = Requester(bus=SimpleNamespace(topology=default_topology()))  # type: ignore[arg-type]
    req._exchange = exchange  # type: ignore[assignment]
    return req, exchange


async def published(exchange: FakeExchange) -> Any:
    await asyncio.wait_for(exchange.arrived.wait(), 5)
    return exchange.published[-1]


async def test_a_reply_resolves_its_caller_and_leaves_nothing_behind() -> None:
    req, exchange = requester()
    call = asyncio.create_task(req.request("sig.echo.test", {"n": 1}, timeout=5))
    request = await published(exchange)
    assert req.pending == 1
    await req._on_reply(Reply(request.correlation_id, b'{"ok": true}'))  # type: ignore[arg-type]
    assert await asyncio.wait_for(call, 5) == {"ok": True}
    assert req.pending == 0
    assert json.loads(request.body) == {"n": 1}
    assert request.expiration == 5, "a request nobody took in time expires in the broker"


async def test_an_unknown_or_late_reply_is_dropped() -> None:
    req, exchange = requester()
    call = asyncio.create_task(req.request("sig.echo.test", {}, timeout=5))
    request = await published(exchange)
    await req._on_reply(Reply("someone-else", b"{}"))  # type: ignore[arg-type]
    await req._on_reply(Reply(None, b"{}"))  # type: ignore[arg-type]
    assert req.pending == 1 and not call.done(), "a stranger's reply does not resolve this caller"
    await req._on_reply(Reply(request.correlation_id, b'{"n": 1}'))  # type: ignore[arg-type]
    await req._on_reply(Reply(request.correlation_id, b'{"n": 2}'))  # type: ignore[arg-type]
    assert await call == {"n": 1}


async def test_a_broken_reply_fails_the_caller_instead_of_timing_out() -> None:
    req, exchange = requester()
    call = asyncio.create_task(req.request("sig.echo.test", {}, timeout=30))
    request = await published(exchange)
    await req._on_reply(Reply(request.correlation_id, b"\xff"))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await asyncio.wait_for(call, 5)
    assert req.pending == 0


async def test_a_caller_that_times_out_leaves_nothing_behind() -> None:
    req, exchange = requester()
    with pytest.raises(asyncio.TimeoutError):
        await req.request("sig.nobody.listens", {}, timeout=0.05)
    assert req.pending == 0
    # Its reply, should it still come, finds nobody and is dropped.
    await req._on_reply(Reply(exchange.published[-1].correlation_id, b"{}"))  # type: ignore[arg-type]
    assert req.pending == 0


async def test_a_cancelled_caller_leaves_nothing_behind() -> None:
    req, exchange = requester()
    call = asyncio.create_task(req.request("sig.echo.test", {}, timeout=30))
    await published(exchange)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert req.pending == 0


async def test_close_fails_every_waiting_caller() -> None:
    req, exchange = requester()
    calls = [asyncio.create_task(req.request("sig.echo.test", {"n": n}, timeout=30)) for n in range(3)]
    async with asyncio.timeout(5):
        while len(exchange.published) < 3:
            await exchange.arrived.wait()
            exchange.arrived.clear()
    await req.close()
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
    assert all(isinstance(r, RequesterClosed) for r in results), results
    assert req.pending == 0
    with pytest.raises(RequesterClosed):
        await req.request("sig.echo.test", {}, timeout=1)
