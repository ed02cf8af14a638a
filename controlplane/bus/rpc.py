"""Request-reply over RabbitMQ, with replies on ``ph.control`` under the requester's own key.

Used where a caller needs an answer rather than an event: stream negotiation with a
publisher. Each requester declares an exclusive queue of its own (gone with its connection,
so nothing is left behind when it goes away), bound to ``reply.<owner>.<token>``; that key is
each request's ``reply_to``, and the answerer publishes its reply on ``ph.control`` with it.
Replies through ``ph.control`` rather than RabbitMQ's direct reply-to (the default exchange)
let an answerer's broker user be confined by topic permissions to reply keys: a user that may
write to the default exchange may put a message in any queue.

Each waiting caller owns one future, keyed by its correlation id. The future leaves the
table however it ends (reply, timeout, close), so a long-lived requester does not grow;
a reply nobody waits for any more is logged and dropped.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import suppress
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel
from aiormq import spec
from aiormq.abc import DeliveredMessage

from controlplane.bus.connection import Bus, parse_body
from controlplane.contract import keys
from controlplane.contract.models import new_id
from controlplane.logs import get_logger

log = get_logger("bus.rpc")

Properties = spec.Basic.Properties


class RequesterClosed(ConnectionError):
    """The requester was closed while a caller waited for its reply, or before it asked."""


class Unroutable(LookupError):
    """The broker returned the request: no queue is bound to its routing key, so nobody
    could answer it. Known at once, rather than after the timeout."""


class Requester:
    """Sends requests on a channel of its own (with confirms, so a request nobody can take
    comes back at once) and matches replies by correlation id. ``owner`` names whose replies
    these are (a gateway's name): its queue and key say so in the management UI."""

    def __init__(self, bus: Bus, owner: str = "requester") -> None:
        self._bus = bus
        self.reply_queue = bus.topology.templates.replies_queue.render(
            owner=keys.check_slug(owner, "owner"), token=new_id().replace("-", ""))
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._channel: AbstractRobustChannel | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """How many callers are waiting for a reply."""
        return len(self._pending)

    async def start(self) -> Requester:
        self._channel = await self._bus.connection.channel()
        decl = self.reply_queue
        queue = await self._channel.declare_queue(decl.name, durable=decl.durable, exclusive=decl.exclusive,
                                                  arguments=decl.arguments)
        for binding in decl.bindings:
            await queue.bind(binding.exchange, routing_key=binding.key)
        await self._consume()
        # aio-pika restores the queue after a reconnect; the consumer underneath is ours to restore.
        self._channel.reopen_callbacks.add(self._consume)
        return self

    async def _consume(self, *_: Any) -> None:
        # On the channel underneath: aio-pika's message wrapper and its hand-off cost more than
        # reading the reply does.
        assert self._channel is not None
        channel = await self._channel.get_underlay_channel()
        await channel.basic_consume(self.reply_queue.name, self._on_reply, no_ack=True)

    @property
    def reply_to(self) -> str:
        return self.reply_queue.bindings[0].key

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

    def _on_reply(self, message: DeliveredMessage) -> None:
        correlation_id = message.header.properties.correlation_id
        future = self._pending.get(correlation_id or "")
        if future is None or future.done():
            log.warning("reply dropped: nobody waits for it", correlation_id=correlation_id)
            return
        try:
            future.set_result(parse_body(message.body))
        except ValueError as exc:  # the caller learns the reply was broken instead of timing out
            future.set_exception(exc)

    async def request(self, routing_key: str, body: dict[str, Any] | bytes, timeout: float) -> dict[str, Any]:
        """Publish ``body`` (a JSON object, or one already encoded) and wait for the reply.

        ``asyncio.TimeoutError`` when none comes within ``timeout`` (the request expires in
        the broker too, so it is not served late); ``Unroutable`` when no queue takes the
        request; ``RequesterClosed`` when the requester closes meanwhile; ``ValueError`` when
        the reply is not a JSON object.
        """
        if self._closed:
            raise RequesterClosed("requester is closed")
        if self._channel is None:
            raise RuntimeError("requester not started")
        correlation_id = new_id()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending[correlation_id] = future
        # The deadline fails the future itself: wait_for would add a second future and its callbacks.
        deadline = loop.call_later(timeout, _expire, future)
        try:
            # Straight to the channel underneath: aio-pika's Message costs more than the frames,
            # and its publish holds the channel until the frames are on the socket (wait=False
            # lets the next request in meanwhile). Mandatory, with confirms: an unroutable request
            # comes back as the returned message instead of an ack.
            channel = await self._channel.get_underlay_channel()
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
            confirmed = await channel.basic_publish(
                payload, exchange=keys.CONTROL_EXCHANGE, routing_key=routing_key, mandatory=True,
                properties=Properties(content_type="application/json", correlation_id=correlation_id,
                                      message_id=correlation_id, reply_to=self.reply_to,
                                      expiration=str(round(timeout * 1000))),
                wait=False)
            if isinstance(confirmed, DeliveredMessage):
                raise Unroutable(f"no queue is bound to {routing_key}")
            return await future
        finally:
            deadline.cancel()
            future.cancel()
            if self._pending.get(correlation_id) is future:
                del self._pending[correlation_id]


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


async def reply(bus: Bus, request: AbstractIncomingMessage, body: dict[str, Any]) -> None:
    """Answer a request received by a consumer (no-op if the request asked for no reply)."""
    if request.reply_to:
        await bus.publish(request.reply_to, body, correlation_id=request.correlation_id, persistent=False)
