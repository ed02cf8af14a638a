"""The one RabbitMQ connection of a process, with a confirmed publisher and consumers.

aio-pika's robust connection re-opens channels, re-declares what was declared through it
and restarts consumers after a broker restart, so callers hold on to one ``Bus`` for the
life of the process. It retries restoring only channels that consume, though: a publishing
channel whose restore met a broker still starting up stays closed. So publishing heals its
own channel, retrying for a bounded time. Publishing waits for the broker's confirm;
consumers ack only after the handler returned, so a crash mid-work means redelivery, not loss.
"""

from __future__ import annotations

import json
from contextlib import suppress
from datetime import datetime, timezone
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from controlplane.contract import keys
from controlplane.contract.models import Wire, new_id
from controlplane.contract.topology import ExchangeDecl, QueueDecl, Topology
from controlplane.logs import get_logger

log = get_logger("bus")

# How long a publish or declaration is retried while the broker connection is being restored.
PUBLISH_RETRY_S = 10.0
# Errors that mean "the connection or channel is not usable right now", not "refused".
TRANSIENT: tuple[type[BaseException], ...] = (
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ConnectionClosed,
    aio_pika.exceptions.AMQPConnectionError,
    ConnectionError,
    RuntimeError,  # aio-pika: "Connection was not opened" while reconnecting
)

Handler = Callable[[str, dict[str, Any], AbstractIncomingMessage], Awaitable[None]]


class Bus:
    def __init__(self, url: str, topology: Topology, name: str = "controlplane",
                 publish_retry_s: float = PUBLISH_RETRY_S) -> None:
        self._url = url
        self.topology = topology
        self._name = name
        self._publish_retry_s = publish_retry_s
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}

    async def connect(self, wait_s: float = 30.0) -> Bus:
        """Connect (retrying while the broker comes up) and declare the static exchanges."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((ConnectionError, OSError, aio_pika.exceptions.AMQPConnectionError)),
            stop=stop_after_delay(wait_s), wait=wait_exponential(0.2, max=2), reraise=True,
        ):
            with attempt:
                self._connection = await aio_pika.connect_robust(
                    self._url, client_properties={"connection_name": self._name})
        for decl in self.topology.exchanges:
            await self.declare_exchange(decl)
        return self

    async def _publishing_channel(self) -> AbstractRobustChannel:
        """The confirmed channel for publishing and declaring; a dead one is replaced."""
        if self._publisher is None or self._publisher.is_closed:
            dead, self._publisher = self._publisher, None
            if dead is not None:
                with suppress(Exception):
                    await dead.close()
            self._exchanges.clear()
            self._publisher = await self.connection.channel(publisher_confirms=True)
        return self._publisher

    def _retrying(self) -> AsyncRetrying:
        """Retry an operation while the broker connection is being restored."""
        return AsyncRetrying(retry=retry_if_exception_type(TRANSIENT), stop=stop_after_delay(self._publish_retry_s),
                             wait=wait_exponential(0.1, max=1), reraise=True)

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            await connection.close()
        except Exception as exc:  # closing mid-reconnect: the connection is going away anyway
            log.warning("bus close was not clean", error=repr(exc))

    async def __aenter__(self) -> Bus:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise RuntimeError("bus is not connected")
        return self._connection

    async def channel(self, prefetch: int = 0) -> AbstractRobustChannel:
        ch = await self.connection.channel()
        if prefetch:
            await ch.set_qos(prefetch_count=prefetch)
        return ch

    # --- declarations ---------------------------------------------------------------

    async def declare_exchange(self, decl: ExchangeDecl) -> aio_pika.abc.AbstractExchange:
        async for attempt in self._retrying():
            with attempt:
                channel = await self._publishing_channel()
                exchange = await channel.declare_exchange(decl.name, type=decl.type, durable=decl.durable)
        self._exchanges[decl.name] = exchange
        return exchange

    async def declare_queue(self, decl: QueueDecl, channel: AbstractRobustChannel | None = None) -> aio_pika.abc.AbstractQueue:
        async for attempt in self._retrying():
            with attempt:
                ch = channel or await self._publishing_channel()
                queue = await ch.declare_queue(decl.name, durable=decl.durable, arguments=decl.arguments)
                for binding in decl.bindings:
                    await queue.bind(binding.exchange, routing_key=binding.key)
        return queue

    async def bind(self, queue: str, exchange: str, key: str) -> None:
        async for attempt in self._retrying():
            with attempt:
                q = await (await self._publishing_channel()).get_queue(queue, ensure=True)
                await q.bind(exchange, routing_key=key)

    async def delete_queue(self, name: str) -> None:
        await self._on_short_channel(lambda ch: ch.queue_delete(name))

    async def delete_exchange(self, name: str) -> None:
        await self._on_short_channel(lambda ch: ch.exchange_delete(name))
        self._exchanges.pop(name, None)

    async def _on_short_channel(self, operation: Callable[[AbstractRobustChannel], Awaitable[Any]]) -> None:
        """Run a one-off operation on a channel of its own, which a refusal cannot poison."""
        async for attempt in self._retrying():
            with attempt:
                channel = await self.connection.channel()
                try:
                    await operation(channel)
                finally:
                    with suppress(Exception):
                        await channel.close()

    # --- publishing -----------------------------------------------------------------

    async def publish(self, routing_key: str, body: Wire | dict[str, Any], *, correlation_id: str | None = None,
                      exchange: str = keys.CONTROL_EXCHANGE, reply_to: str | None = None) -> None:
        """Publish JSON persistently and wait for the broker's confirm.

        While the connection is being restored the publish is retried, for a bounded time;
        a receiver may then see a message twice, which idempotency keys make harmless.
        """
        payload = body.to_json() if isinstance(body, Wire) else json.dumps(body).encode()
        message = aio_pika.Message(
            payload,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=correlation_id or getattr(body, "correlation_id", None),
            message_id=new_id(),
            timestamp=datetime.now(timezone.utc),
            reply_to=reply_to,
            app_id=self._name,
        )
        async for attempt in self._retrying():
            with attempt:
                channel = await self._publishing_channel()
                target = channel.default_exchange if exchange == "" else self._exchanges.get(exchange)
                if target is None:
                    target = self._exchanges[exchange] = await channel.get_exchange(exchange, ensure=False)
                await target.publish(message, routing_key=routing_key)

    # --- consuming ------------------------------------------------------------------

    async def consume(self, decl: QueueDecl, handler: Handler, prefetch: int = 16) -> Consumer:
        """Declare ``decl`` and feed its messages to ``handler``, one task per message.

        A body that is not a JSON object is rejected without requeue: the queue's
        dead-letter exchange keeps it for an operator. A handler that raises gets one
        redelivery; a second failure dead-letters the message.
        """
        channel = await self.channel(prefetch)
        queue = await self.declare_queue(decl, channel)

        async def on_message(message: AbstractIncomingMessage) -> None:
            try:
                body = json.loads(message.body)
                if not isinstance(body, dict):
                    raise ValueError("body is not a JSON object")
            except ValueError as exc:
                log.warning("message dead-lettered", queue=decl.name, routing_key=message.routing_key, reason=str(exc))
                await message.reject(requeue=False)
                return
            try:
                await handler(message.routing_key or "", body, message)
            except Exception:
                log.exception("handler failed", queue=decl.name, routing_key=message.routing_key,
                              redelivered=message.redelivered)
                await message.reject(requeue=not message.redelivered)
                return
            await message.ack()

        tag = await queue.consume(on_message)
        return Consumer(channel, queue, tag)


class Consumer:
    """A running consumer; ``cancel`` stops delivery and closes its channel."""

    def __init__(self, channel: AbstractRobustChannel, queue: aio_pika.abc.AbstractQueue, tag: str) -> None:
        self.channel, self.queue, self.tag = channel, queue, tag

    async def cancel(self) -> None:
        if self.channel.is_closed:
            return
        try:
            await self.queue.cancel(self.tag)
            await self.channel.close()
        except Exception as exc:  # the broker is gone; there is nothing left to cancel
            log.warning("consumer cancel was not clean", queue=self.queue.name, error=repr(exc))
