"""Request-reply over RabbitMQ's direct reply-to.

Used where a caller needs an answer rather than an event: Docker reads served by the host
controller, stream negotiation with a publisher. Direct reply-to needs no reply queue per
caller, so nothing is left behind in the broker when a caller goes away.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from controlplane.bus.connection import Bus
from controlplane.contract import keys
from controlplane.contract.models import new_id

REPLY_TO = "amq.rabbitmq.reply-to"


class Requester:
    """Sends requests on its own channel and matches replies by correlation id."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None

    async def start(self) -> Requester:
        self._channel = await self._bus.connection.channel()
        reply_queue = await self._channel.get_queue(REPLY_TO, ensure=False)
        await reply_queue.consume(self._on_reply, no_ack=True)
        self._exchange = await self._channel.get_exchange(keys.CONTROL_EXCHANGE, ensure=False)
        return self

    async def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            try:
                future.set_result(json.loads(message.body))
            except ValueError as exc:
                future.set_exception(exc)

    async def request(self, routing_key: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Publish ``body`` and wait for the reply; ``asyncio.TimeoutError`` when none comes."""
        assert self._exchange is not None, "requester not started"
        correlation_id = new_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        try:
            await self._exchange.publish(
                aio_pika.Message(json.dumps(body).encode(), content_type="application/json",
                                 correlation_id=correlation_id, reply_to=REPLY_TO, expiration=timeout),
                routing_key=routing_key,
            )
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(correlation_id, None)


async def reply(bus: Bus, request: AbstractIncomingMessage, body: dict[str, Any]) -> None:
    """Answer a request received by a consumer (no-op if the request asked for no reply)."""
    if request.reply_to:
        await bus.publish(request.reply_to, body, correlation_id=request.correlation_id, exchange="")
