"""The one RabbitMQ connection of a process, with a confirmed publisher and consumers.

aio-pika's robust connection re-opens channels, re-declares what was declared through it
and restarts consumers after a broker restart, so callers hold on to one ``Bus`` for the
life of the process. It retries restoring only channels that consume, though: a publishing
channel whose restore met a broker still starting up stays closed. So publishing heals its
own channel, retrying for a bounded time. Publishing waits for the broker's confirm;
consumers ack only after the handler returned, so a crash mid-work means redelivery, not loss.

A consumer must never wedge: a message left unacked holds a prefetch slot for good, and
enough of them silence the queue. So every delivery ends acked or dead-lettered. What can
never succeed (a body that is not a JSON object, a handler that says the message is poison)
is dead-lettered at once; anything else is taken as transient and retried in-process with
backoff, for a bounded time, before it is dead-lettered too.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import suppress
from datetime import datetime, timezone
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection
from pydantic import ValidationError
from tenacity import (AsyncRetrying, RetryCallState, retry_if_exception, retry_if_exception_type,
                      stop_after_delay, stop_before_delay, wait_exponential)

from controlplane.bus.metrics import DEAD_LETTERED, DeadLetterReason
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

# How long a consumer retries a handler that keeps failing before it dead-letters the message.
HANDLER_RETRY_S = 30.0

Handler = Callable[[str, dict[str, Any], AbstractIncomingMessage], Awaitable[None]]


class Poison(Exception):
    """Raised by a handler for a message that can never be handled: it is dead-lettered at once."""


class BrokerUnavailable(ConnectionError):
    """The broker connection is down, or the broker did not confirm a probe in time."""


# Handler errors no retry can cure: the same message would fail the same way again.
POISON: tuple[type[BaseException], ...] = (Poison, ValidationError, keys.InvalidKey, RecursionError)


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

    async def connect(self, wait_s: float = 30.0, declare_exchanges: bool = True) -> Bus:
        """Connect (retrying while the broker comes up) and declare the static exchanges.

        Components that run with a broker user of their own leave the exchanges to the gateway
        and the host controller (``declare_exchanges=False``): declaring one needs the right
        to configure it, which is also the right to delete it."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((ConnectionError, OSError, aio_pika.exceptions.AMQPConnectionError)),
            stop=stop_after_delay(wait_s), wait=wait_exponential(0.2, max=2), reraise=True,
        ):
            with attempt:
                self._connection = await aio_pika.connect_robust(
                    self._url, client_properties={"connection_name": self._name})
        if declare_exchanges:
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

    @property
    def name(self) -> str:
        """The connection name the broker and its management UI show for this process."""
        return self._name

    @property
    def ready(self) -> bool:
        """True only while the broker connection is really open.

        ``connection.is_closed`` turns True only on a deliberate close: while aio-pika is
        reconnecting it stays False. The ``connected`` event is cleared the moment the
        transport is lost and set again once a new one is open, and the transport's own
        AMQP connection tells whether it is still reading and writing.
        """
        connection = self._connection
        if connection is None or connection.is_closed or not connection.connected.is_set():
            return False
        transport = connection.transport
        return transport is not None and transport.connection.is_opened

    async def probe(self, timeout: float = 2.0) -> None:
        """Prove the broker answers: publish a confirmed, transient message it will drop.

        Nothing binds ``probe.*`` on ``ph.control``, so the message goes nowhere, but the
        broker confirms it only when the connection, the channel and the broker all work.
        Raises ``BrokerUnavailable`` when the bus is not ready or no confirm came in time.
        """
        if not self.ready:
            raise BrokerUnavailable(f"broker connection {self._name!r} is down or reconnecting")
        message = aio_pika.Message(b"{}", content_type="application/json",
                                   delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
                                   message_id=new_id(), app_id=self._name)
        try:
            async with asyncio.timeout(timeout):
                await self._publish_once(message, f"probe.{self._name}", keys.CONTROL_EXCHANGE)
        except TimeoutError as exc:
            raise BrokerUnavailable(f"broker did not confirm a probe within {timeout:g}s") from exc
        except Exception as exc:
            raise BrokerUnavailable(f"broker probe failed: {exc!r}") from exc

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

    async def publish(self, routing_key: str, body: Wire | dict[str, Any] | bytes, *, correlation_id: str | None = None,
                      exchange: str = keys.CONTROL_EXCHANGE, reply_to: str | None = None,
                      expiration: float | None = None, persistent: bool = True) -> None:
        """Publish JSON (persistently unless told otherwise) and wait for the broker's confirm;
        ``body`` as bytes is JSON already encoded.

        While the connection is being restored the publish is retried, for a bounded time;
        a receiver may then see a message twice, which idempotency keys make harmless.
        ``expiration`` (seconds) lets the broker drop a command nobody took in time, so one
        whose caller was already told "timeout" is not run late. ``persistent=False`` spares
        the broker's disk for what the store keeps anyway.
        """
        if expiration is not None and expiration < 0:
            raise ValueError(f"expiration must not be negative, got {expiration}")
        if isinstance(body, bytes):
            payload = body
        else:
            payload = body.to_json() if isinstance(body, Wire) else json.dumps(body).encode()
        message = aio_pika.Message(
            payload,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT,
            correlation_id=correlation_id or getattr(body, "correlation_id", None),
            message_id=new_id(),
            timestamp=datetime.now(timezone.utc),
            reply_to=reply_to,
            app_id=self._name,
            expiration=expiration,
        )
        try:
            await self._publish_once(message, routing_key, exchange)
        except TRANSIENT:  # the connection is being restored: retry (the retrier is built only now)
            async for attempt in self._retrying():
                with attempt:
                    await self._publish_once(message, routing_key, exchange)

    async def _publish_once(self, message: aio_pika.Message, routing_key: str, exchange: str) -> None:
        channel = await self._publishing_channel()
        target = channel.default_exchange if exchange == "" else self._exchanges.get(exchange)
        if target is None:
            target = self._exchanges[exchange] = await channel.get_exchange(exchange, ensure=False)
        await target.publish(message, routing_key=routing_key)

    # --- consuming ------------------------------------------------------------------

    async def consume(self, decl: QueueDecl, handler: Handler, prefetch: int = 16,
                      retry_s: float = HANDLER_RETRY_S, acks: bool = True) -> Consumer:
        """Declare ``decl`` and feed its messages to ``handler``, one task per message.

        ``acks=False`` for messages whose loss costs nothing (a status the next interval
        replaces): the broker forgets each once delivered, which spares an ack per message;
        what cannot be handled is counted and logged instead of dead-lettered.

        The message is acked once the handler returns. A body that is not a JSON object,
        or a handler raising ``Poison``, a pydantic ``ValidationError`` or ``InvalidKey``, is
        dead-lettered at once (the queue's dead-letter exchange keeps it for an operator).
        Any other handler error is retried with backoff for ``retry_s`` seconds, then the
        message is dead-lettered. A redelivered message is handled like any other.
        """
        channel = await self.channel(prefetch)
        queue = await self.declare_queue(decl, channel)
        tag = await queue.consume(deliverer(decl.name, handler, retry_s, acks), no_ack=not acks)
        return Consumer(channel, queue, tag)


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object a message carries; ``ValueError`` for anything else."""
    try:
        body = json.loads(raw)
    except RecursionError as exc:  # json's C scanner recurses once per nesting level
        raise ValueError("body is nested too deeply") from exc
    if not isinstance(body, dict):
        raise ValueError("body is not a JSON object")
    return body


def deliverer(queue: str, handler: Handler, retry_s: float = HANDLER_RETRY_S,
              acks: bool = True) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
    """The consume callback for ``queue``: each delivery ends acked or dead-lettered (without
    ``acks``: handled, or counted as dropped)."""

    async def on_message(message: AbstractIncomingMessage) -> None:
        with structlog.contextvars.bound_contextvars(queue=queue, routing_key=message.routing_key,
                                                     message_id=message.message_id,
                                                     correlation_id=message.correlation_id):
            try:
                await _deliver(handler, retry_s, message, acks)
            except Exception as exc:
                # A fault of the delivery itself must still not leave the message unacked.
                log.exception("message delivery failed")
                await _dead_letter(message, "handler-failed", repr(exc), acks)

    return on_message


async def _deliver(handler: Handler, retry_s: float, message: AbstractIncomingMessage, acks: bool = True) -> None:
    try:
        body = parse_body(message.body)
    except ValueError as exc:  # also UnicodeDecodeError: not text at all
        await _dead_letter(message, "unparseable", str(exc), acks)
        return
    routing_key = message.routing_key or ""
    try:
        try:
            await handler(routing_key, body, message)
        except POISON:
            raise
        except Exception as first:  # transient, perhaps: retry with backoff (rare, so built only now)
            log.warning("handler failed, retrying", attempt=1, error=repr(first))
            async for attempt in _handler_retrying(retry_s):
                with attempt:
                    await handler(routing_key, body, message)
    except POISON as exc:
        await _dead_letter(message, "invalid", f"{type(exc).__name__}: {exc}", acks)
        return
    except Exception as exc:
        log.error("handler kept failing", retry_s=retry_s, exc_info=exc)
        await _dead_letter(message, "handler-failed", f"{type(exc).__name__}: {exc}", acks)
        return
    if acks:
        await message.ack()


def _handler_retrying(retry_s: float) -> AsyncRetrying:
    """Retry a transient handler failure (store busy, broker blip) with backoff, for ``retry_s``.

    Cancellation is never retried: it means the channel is closing, and the broker will
    deliver the message again.
    """
    return AsyncRetrying(
        retry=retry_if_exception(lambda exc: isinstance(exc, Exception) and not isinstance(exc, POISON)),
        stop=stop_before_delay(retry_s), wait=wait_exponential(multiplier=0.1, min=0.1, max=5), reraise=True,
        before_sleep=_log_retry,
    )


def _log_retry(state: RetryCallState) -> None:
    outcome = state.outcome
    error = repr(outcome.exception()) if outcome is not None else None
    log.warning("handler failed, retrying", attempt=state.attempt_number, error=error,
                next_in_s=round(state.upcoming_sleep, 2))


async def _dead_letter(message: AbstractIncomingMessage, reason: DeadLetterReason, detail: str,
                       acks: bool = True) -> None:
    """Reject without requeue, so the queue's dead-letter exchange takes the message (a
    message consumed without acks is gone already: it is counted and logged)."""
    if not acks:
        DEAD_LETTERED.labels(reason).inc()
        log.warning("message dropped", reason=reason, detail=detail[:500])
        return
    if message.processed:
        return
    try:
        await message.reject(requeue=False)
    except Exception as exc:  # the channel is gone: the broker redelivers the message instead
        log.warning("could not dead-letter message", reason=reason, error=repr(exc))
        return
    DEAD_LETTERED.labels(reason).inc()
    log.warning("message dead-lettered", reason=reason, detail=detail[:500], redelivered=message.redelivered)


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
