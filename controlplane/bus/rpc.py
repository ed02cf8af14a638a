"""Request-reply over RabbitMQ's direct reply-to.

Used where a caller needs an answer rather than an event: Docker reads served by the host
controller, stream negotiation with a publisher. Direct reply-to needs no reply queue per
caller, so nothing is left behind in the broker when a caller goes away.

Each waiting caller owns one future, keyed by its correlation id. The future leaves the
table however it ends (reply, timeout, close), so a long-lived requester does not grow;
a reply nobody waits for any more is logged and dropped.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import suppress
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage
from aiormq.abc import DeliveredMessage

from controlplane.bus.connection import Bus, parse_body
from controlplane.contract import keys
from controlplane.contract.models import new_id
from controlplane.logs import get_logger

log = get_logger("bus.rpc")

REPLY_TO = "amq.rabbitmq.reply-to"


class RequesterClosed(ConnectionError):
    """The requester was closed while a caller waited for its reply, or before it asked."""


class Unroutable(LookupError):
    """The broker returned the request: no queue is bound to its routing key, so nobody
    could answer it. Known at once, rather than after the timeout."""


class Requester:
    """Sends requests on its own channel and matches replies by correlation id.

    Direct reply-to needs the request to be published on the channel that consumes the
    replies, which is why the requester does not publish through the bus's channel.
    """

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """How many callers are waiting for a reply."""
        return len(self._pending)

    async def start(self) -> Requester:
        self._channel = await self._bus.connection.channel()
        reply_queue = await self._channel.get_queue(REPLY_TO, ensure=False)
        await reply_queue.consume(self._on_reply, no_ack=True)
        self._exchange = await self._channel.get_exchange(keys.CONTROL_EXCHANGE, ensure=False)
        return self

    async def close(self) -> None:
        """Stop; every caller still waiting fails with ``RequesterClosed`` at once."""
        self._closed = True
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(RequesterClosed("requester closed before the reply came"))
        self._pending.clear()
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with suppress(Exception):  # the broker is gone; the channel is closed anyway
                await channel.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        correlation_id = message.correlation_id or ""
        future = self._pending.get(correlation_id)
        if future is None or future.done():
            log.warning("reply dropped: nobody waits for it", correlation_id=correlation_id)
            return
        try:
            future.set_result(parse_body(message.body))
        except ValueError as exc:  # the caller learns the reply was broken instead of timing out
            future.set_exception(exc)

    async def request(self, routing_key: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Publish ``body`` and wait for the reply.

        ``asyncio.TimeoutError`` when none comes within ``timeout`` (the request expires in
        the broker too, so it is not served late); ``Unroutable`` when no queue takes the
        request; ``RequesterClosed`` when the requester
        closes meanwhile; ``ValueError`` when the reply is not a JSON object.
        """
        if self._closed:
            raise RequesterClosed("requester is closed")
        if self._exchange is None:
            raise RuntimeError("requester not started")
        correlation_id = new_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        # However the future ends, it leaves the table; the pop in ``finally`` only makes that
        # immediate, since done-callbacks run on the next turn of the loop.
        future.add_done_callback(lambda _: self._forget(correlation_id, future))
        try:
            # Mandatory, on a channel with confirms: an unroutable request comes back as the
            # returned message instead of an ack (matched by its message id).
            confirmed = await self._exchange.publish(
                aio_pika.Message(json.dumps(body).encode(), content_type="application/json",
                                 correlation_id=correlation_id, message_id=correlation_id, reply_to=REPLY_TO,
                                 expiration=timeout),
                routing_key=routing_key, mandatory=True,
            )
            if isinstance(confirmed, DeliveredMessage):
                raise Unroutable(f"no queue is bound to {routing_key}")
            return await asyncio.wait_for(future, timeout)
        finally:
            future.cancel()
            self._forget(correlation_id, future)

    def _forget(self, correlation_id: str, future: asyncio.Future[dict[str, Any]]) -> None:
        if self._pending.get(correlation_id) is future:
            del self._pending[correlation_id]


async def reply(bus: Bus, request: AbstractIncomingMessage, body: dict[str, Any]) -> None:
    """Answer a request received by a consumer (no-op if the request asked for no reply)."""
    if request.reply_to:
        await bus.publish(request.reply_to, body, correlation_id=request.correlation_id, exchange="")
