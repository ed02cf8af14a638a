"""A Python client of the streams registry (the Streams API under /streams).

``StreamPublisher`` advertises a stream, keeps it alive with heartbeats, answers the
requests for it over RabbitMQ through a callback of yours, and withdraws it on exit.
``StreamConsumer`` requests a stream, keeps its session alive, and stops it on exit::

    async def offer(request: NegotiationRequest) -> NegotiationReply:
        return accept(transport_config={"ndi_name": "Camera A"})

    advert = {"name": "Camera A", "stream_type": "ndi", "publisher_id": "td-01", "protocol": "ndi",
              "address": "192.168.1.50", "port": 5960}
    async with StreamPublisher(GATEWAY, AMQP_URL, advert, offer) as publisher:
        async with StreamConsumer(GATEWAY, publisher.stream_id, "max-02", "192.168.1.60") as consumer:
            print(consumer.offer.publisher_address, consumer.offer.transport_config)

A publisher whose stream expired (the gateway was away longer than the TTL, say) advertises
it again at its next heartbeat, under a new id, and answers for that one.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

import aio_pika
import aiohttp
from aio_pika.abc import (
    AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection,
)
from pydantic import ValidationError

from controlplane.contract.keys import CONTROL_EXCHANGE
from controlplane.contract.streams import (
    NegotiationReply, NegotiationRequest, Protocol, StreamAdvertise, StreamInfo, StreamOffer,
)
from controlplane.contract.topology import default_topology
from controlplane.logs import get_logger

log = get_logger("client.streams")

HEARTBEAT_S = 10.0  # a third of the registry's default TTL
Answer = NegotiationReply | dict[str, Any]
OnRequest = Callable[[NegotiationRequest], Answer | Awaitable[Answer]]


class StreamsError(RuntimeError):
    """The gateway refused: its status and what it said (``detail``)."""

    def __init__(self, status: int, body: Any) -> None:
        detail = body.get("detail") or body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{status}: {detail}")
        self.status, self.body, self.detail = status, body, detail


def accept(address: str | None = None, port: int | None = None, protocol: Protocol | str | None = None,
           transport_config: dict[str, Any] | None = None) -> NegotiationReply:
    """An acceptance; what it leaves out is the advertised address, port and protocol."""
    return NegotiationReply(accepted=True, address=address, port=port,
                            protocol=Protocol(protocol) if protocol else None,
                            transport_config=transport_config or {})


def reject(reason: str) -> NegotiationReply:
    return NegotiationReply(accepted=False, reason=reason)


class _Gateway:
    """The registry's HTTP API, with the caller's key if it has one."""

    def __init__(self, base: str, api_key: str | None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = aiohttp.ClientSession(base.rstrip("/"), headers=headers,
                                          timeout=aiohttp.ClientTimeout(total=30))

    async def call(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200, 201)) -> Any:
        async with self.http.request(method, path, json=body) as resp:
            answer = await resp.json(content_type=None)
            if resp.status not in ok:
                raise StreamsError(resp.status, answer)
            return answer

    async def close(self) -> None:
        await self.http.close()


async def _beat(interval_s: float, beat: Callable[[], Awaitable[bool]], what: str) -> None:
    """Call ``beat`` every ``interval_s`` until it says to stop; a failure is retried next time."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            if not await beat():
                return
        except (aiohttp.ClientError, TimeoutError, StreamsError) as exc:
            log.warning("heartbeat failed; retrying at the next", what=what, error=repr(exc))


class StreamPublisher:
    def __init__(self, gateway: str, amqp_url: str, advert: StreamAdvertise | dict[str, Any],
                 on_request: OnRequest | None = None, *, api_key: str | None = None,
                 heartbeat_s: float = HEARTBEAT_S) -> None:
        self.advert = advert if isinstance(advert, StreamAdvertise) else StreamAdvertise.model_validate(advert)
        self.on_request = on_request or (lambda _: accept())
        self._gateway_url, self._amqp_url, self._api_key = gateway, amqp_url, api_key
        self._heartbeat_s = heartbeat_s
        self._gateway: _Gateway | None = None
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._control: AbstractExchange | None = None
        self._queue: AbstractQueue | None = None
        self._beating: asyncio.Task[None] | None = None
        self.stream: StreamInfo | None = None
        self.answered = 0

    @property
    def stream_id(self) -> str:
        assert self.stream is not None, "not advertised yet"
        return self.stream.id

    async def __aenter__(self) -> StreamPublisher:
        self._gateway = _Gateway(self._gateway_url, self._api_key)
        try:
            # Named, so an operator tells publishers apart in the management UI.
            self._connection = await aio_pika.connect_robust(
                self._amqp_url, client_properties={"connection_name": f"stream-publisher {self.advert.publisher_id}"})
            self._channel = await self._connection.channel()
            self._control = await self._channel.get_exchange(CONTROL_EXCHANGE, ensure=False)
            await self._advertise()
        except BaseException:
            await self._close()
            raise
        self._beating = asyncio.create_task(_beat(self._heartbeat_s, self._heartbeat, "stream"))
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._beating is not None:
            self._beating.cancel()
            await asyncio.gather(self._beating, return_exceptions=True)
        if self.stream is not None and self._gateway is not None:
            with suppress(aiohttp.ClientError, TimeoutError, StreamsError):
                await self._gateway.call("DELETE", f"/streams/{self.stream_id}", ok=(200, 404))
        await self._close()

    async def _close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
        if self._gateway is not None:
            await self._gateway.close()

    async def _advertise(self) -> None:
        """Advertise, then listen for the stream's requests (before anyone can discover it
        would be better still, but the id comes with the advertisement)."""
        assert self._gateway is not None and self._channel is not None
        self.stream = StreamInfo.model_validate(
            await self._gateway.call("POST", "/streams/advertise", self.advert.model_dump(mode="json")))
        channel = self._channel
        decl = default_topology().templates.stream_publisher_queue.render(stream_id=self.stream_id)
        old, self._queue = self._queue, await channel.declare_queue(decl.name, durable=decl.durable,
                                                                    exclusive=decl.exclusive)
        for binding in decl.bindings:
            await self._queue.bind(binding.exchange, routing_key=binding.key)
        await self._queue.consume(self._on_request, no_ack=True)
        if old is not None:
            with suppress(Exception):
                await old.delete(if_unused=False, if_empty=False)

    async def _heartbeat(self) -> bool:
        assert self._gateway is not None
        try:
            await self._gateway.call("POST", f"/streams/{self.stream_id}/heartbeat")
        except StreamsError as exc:
            if exc.status != 404:
                raise
            log.warning("stream expired in the registry; advertising it again", stream_id=self.stream_id)
            await self._advertise()
        return True

    async def _on_request(self, message: AbstractIncomingMessage) -> None:
        try:
            request = NegotiationRequest.model_validate(json.loads(message.body))
            answer = self.on_request(request)
            if inspect.isawaitable(answer):
                answer = await answer
            reply = answer if isinstance(answer, NegotiationReply) else NegotiationReply.model_validate(answer)
        except (ValueError, ValidationError) as exc:
            reply = reject(f"the publisher could not answer: {exc}")
        except Exception as exc:  # the callback's own failure is the consumer's answer, not a silence
            log.exception("stream request callback failed")
            reply = reject(f"the publisher failed: {exc!r}")
        if message.reply_to and self._control is not None:
            # On ph.control, the request's reply_to as the routing key (see topology.yaml).
            body = reply.model_dump_json(exclude_none=True).encode()
            await self._control.publish(
                aio_pika.Message(body, content_type="application/json", correlation_id=message.correlation_id),
                routing_key=message.reply_to, mandatory=False)
            self.answered += 1


class StreamConsumer:
    def __init__(self, gateway: str, stream_id: str, consumer_id: str, consumer_address: str,
                 consumer_port: int | None = None, config: dict[str, Any] | None = None, *,
                 api_key: str | None = None, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.stream_id = stream_id
        self.request = {"consumer_id": consumer_id, "consumer_address": consumer_address,
                        "consumer_port": consumer_port, "config": config or {}}
        self._gateway = _Gateway(gateway, api_key)
        self._heartbeat_s = heartbeat_s
        self._beating: asyncio.Task[None] | None = None
        self.offer: StreamOffer | None = None
        self.lost = asyncio.Event()  # set when the registry no longer knows the session

    @property
    def session_id(self) -> str:
        assert self.offer is not None, "no session yet"
        return self.offer.session_id

    async def __aenter__(self) -> StreamConsumer:
        try:
            self.offer = StreamOffer.model_validate(
                await self._gateway.call("POST", f"/streams/{self.stream_id}/request", self.request, ok=(201,)))
        except BaseException:
            await self._gateway.close()
            raise
        self._beating = asyncio.create_task(_beat(self._heartbeat_s, self._heartbeat, "session"))
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._beating is not None:
            self._beating.cancel()
            await asyncio.gather(self._beating, return_exceptions=True)
        if self.offer is not None and not self.lost.is_set():
            with suppress(aiohttp.ClientError, TimeoutError, StreamsError):
                await self._gateway.call("DELETE", f"/streams/sessions/{self.session_id}", ok=(200, 404))
        await self._gateway.close()

    async def _heartbeat(self) -> bool:
        try:
            await self._gateway.call("POST", f"/streams/sessions/{self.session_id}/heartbeat")
        except StreamsError as exc:
            if exc.status != 404:
                raise
            log.warning("stream session ended in the registry", session_id=self.session_id)
            self.lost.set()
            return False
        return True
