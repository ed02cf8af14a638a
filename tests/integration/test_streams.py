"""The streams surface (/streams) against the real RabbitMQ: discovery, negotiation with a
real AMQP publisher, sessions, expiry, history, and several gateways keeping one registry."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import pytest

from controlplane.client.streams import StreamConsumer, StreamPublisher, StreamsError, accept, reject
from controlplane.config import Settings
from controlplane.contract import keys
from controlplane.contract.streams import NegotiationRequest
from tests.conftest import Stack, fresh_postgres_database, running_stack

pytestmark = pytest.mark.integration

REGISTRY_TOPICS = tuple(keys.ready_key(event, "*") for event in keys.REGISTRY_EVENTS)
BUILTIN = {"ndi", "audio", "video", "texture", "sensor", "osc", "midi", "data", "srt", "spout", "syphon"}


def advert(**overrides: Any) -> dict[str, Any]:
    return {"name": "Main Stage Camera A", "stream_type": "ndi", "publisher_id": f"td-{uuid.uuid4().hex[:6]}",
            "protocol": "ndi", "address": "192.168.1.50", "port": 5960,
            "config": {"resolution": "1920x1080", "fps": 30}, "metadata": {"location": "stage-left"}, **overrides}


def base_url(stack: Stack) -> str:
    return str(stack.client.make_url("")).rstrip("/")


def amqp_url(stack: Stack) -> str:
    return stack.settings.amqp_url.get_secret_value()


@asynccontextmanager
async def gateway(settings_factory: Callable[..., Settings], runtime: Any, **overrides: Any) -> AsyncIterator[Stack]:
    async with running_stack(settings_factory(**overrides), runtime, with_host=False) as stack:
        yield stack


async def until(condition: Callable[[], Any], timeout: float = 20.0, step: float = 0.05) -> Any:
    """Poll an async condition until it returns something true, within ``timeout``."""
    async with asyncio.timeout(timeout):
        while not (value := await condition()):
            await asyncio.sleep(step)
        return value


@asynccontextmanager
async def raw_publisher(stack: Stack, stream_id: str, answer: Callable[[NegotiationRequest], bytes | None]
                        ) -> AsyncIterator[list[NegotiationRequest]]:
    """A publisher written against the documented contract only (aio-pika, no client helper):
    answers each request with the bytes ``answer`` gives (None: no answer at all)."""
    seen: list[NegotiationRequest] = []
    async with stream_requests(stack, stream_id) as (control, queue):

        async def on(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            request = NegotiationRequest.model_validate_json(message.body)
            seen.append(request)
            body = answer(request)
            if body is not None:
                await control.publish(aio_pika.Message(body, correlation_id=message.correlation_id),
                                      routing_key=message.reply_to)

        await queue.consume(on, no_ack=True)
        yield seen


@asynccontextmanager
async def stream_requests(stack: Stack, stream_id: str
                          ) -> AsyncIterator[tuple[aio_pika.abc.AbstractExchange, aio_pika.abc.AbstractQueue]]:
    """A publisher's connection of its own: ``ph.control`` to answer on, and an exclusive queue
    bound to the stream's requests."""
    connection = await aio_pika.connect_robust(amqp_url(stack))
    try:
        channel = await connection.channel()
        control = await channel.get_exchange(keys.CONTROL_EXCHANGE, ensure=False)
        queue = await channel.declare_queue("", exclusive=True)
        await queue.bind(keys.CONTROL_EXCHANGE, routing_key=keys.stream_request_key(stream_id))
        yield control, queue
    finally:
        await connection.close()


async def test_advertise_discover_request_keep_alive_stop_and_history(settings_factory: Any, runtime: Any,
                                                                      watch: Any) -> None:
    async with gateway(settings_factory, runtime) as gw:
        status, types = await gw.get("/streams/types")
        assert status == 200 and BUILTIN <= {t["name"] for t in types}
        assert all({"id", "display_name", "default_config", "created_at", "updated_at"} <= set(t) for t in types)

        asked: list[NegotiationRequest] = []

        def offer(request: NegotiationRequest) -> Any:
            asked.append(request)
            return accept(port=5961, transport_config={"ndi_name": "TD-01 (Camera A)"})

        watcher = await watch(*REGISTRY_TOPICS)
        async with StreamPublisher(base_url(gw), amqp_url(gw), advert(), offer) as publisher:
            stream_id = publisher.stream_id
            await watcher.wait_for(keys.registry_event_key(keys.STREAM_ADVERTISED, stream_id), 20)
            status, listed = await gw.get("/streams")
            assert status == 200 and [s["id"] for s in listed] == [stream_id]
            stream = listed[0]
            assert stream["name"] == "Main Stage Camera A" and stream["port"] == 5960
            assert stream["active_sessions"] == 0 and stream["entity_id"] is None
            assert (await gw.get("/streams?stream_type=ndi"))[1] == listed
            assert (await gw.get("/streams?stream_type=audio"))[1] == []
            assert (await gw.get(f"/streams/{stream_id}"))[1]["metadata"] == {"location": "stage-left"}

            status, beat = await gw.post(f"/streams/{stream_id}/heartbeat", "")
            assert (status, beat) == (200, {"status": "ok", "stream_id": stream_id})

            async with StreamConsumer(base_url(gw), stream_id, "max-workstation-02", "192.168.1.60", 5970,
                                      {"preferred_codec": "h264"}) as consumer:
                o = consumer.offer
                assert o is not None
                assert (o.stream_id, o.stream_name, o.stream_type, o.protocol) == (
                    stream_id, "Main Stage Camera A", "ndi", "ndi")
                assert (o.publisher_address, o.publisher_port) == ("192.168.1.50", 5961)
                assert o.transport_config == {"ndi_name": "TD-01 (Camera A)"}
                # The publisher was asked over RabbitMQ, with the consumer's details and the session id.
                assert [(r.session_id, r.consumer_id, r.consumer_port, r.config) for r in asked] == [
                    (o.session_id, "max-workstation-02", 5970, {"preferred_codec": "h264"})]
                # In the history at once, open, though its row may still be gathered for the store.
                status, history = await gw.get(f"/streams/sessions/history?stream_id={stream_id}")
                assert status == 200 and [(h["session_id"], h["status"], h["ended_at"]) for h in history] == [
                    (o.session_id, "active", None)]
                started = await watcher.wait_for(
                    keys.registry_event_key(keys.SESSIONS_STARTED, gw.settings.gateway_name), 20)
                assert [(x["session_id"], x["stream_id"], x["consumer_id"]) for x in started["started"]] == [
                    (o.session_id, stream_id, "max-workstation-02")]

                status, sessions = await gw.get(f"/streams/sessions?stream_id={stream_id}")
                assert status == 200 and [s["session_id"] for s in sessions] == [o.session_id]
                assert sessions[0]["consumer_address"] == "192.168.1.60" and sessions[0]["status"] == "active"
                assert (await gw.get(f"/streams/{stream_id}"))[1]["active_sessions"] == 1
                status, beat = await gw.post(f"/streams/sessions/{o.session_id}/heartbeat", "")
                assert (status, beat) == (200, {"status": "ok", "session_id": o.session_id})
                status, state = await gw.get("/streams/state")
                assert status == 200 and set(state) == {"streams", "sessions", "stream_types"}
                assert [s["id"] for s in state["streams"]] == [stream_id] and len(state["sessions"]) == 1
            # Leaving the consumer stopped the session.
            stopped = await watcher.wait_for(keys.registry_event_key(keys.SESSION_STOPPED, stream_id), 20)
            assert stopped["session_ids"] == [o.session_id] and stopped["status"] == "stopped"
            assert (await gw.get("/streams/sessions"))[1] == []
            assert (await gw.get(f"/streams/{stream_id}"))[1]["active_sessions"] == 0
            assert (await gw.client.delete(f"/streams/sessions/{o.session_id}")).status == 404

        # Leaving the publisher withdrew the stream.
        await watcher.wait_for(keys.registry_event_key(keys.STREAM_WITHDRAWN, stream_id), 20)
        assert (await gw.get(f"/streams/{stream_id}"))[0] == 404
        assert (await gw.post(f"/streams/{stream_id}/heartbeat", ""))[0] == 404

        status, history = await gw.get(f"/streams/sessions/history?stream_id={stream_id}")
        assert status == 200 and len(history) == 1
        row = history[0]
        assert row["session_id"] == o.session_id and row["status"] == "stopped"
        assert row["ended_at"] is not None and row["duration_seconds"] >= 0
        assert row["consumer_id"] == "max-workstation-02" and row["publisher_port"] == 5961
        assert (await gw.get("/streams/sessions/history?consumer_id=max-workstation-02&limit=1"))[1] == history
        assert (await gw.get("/streams/sessions/history?consumer_id=nobody"))[1] == []


async def test_rejection_timeout_no_publisher_and_malformed_replies_open_no_session(
        settings_factory: Any, runtime: Any) -> None:
    async with gateway(settings_factory, runtime, stream_request_timeout_s=1.0) as gw:
        ask = {"consumer_id": "c-1", "consumer_address": "10.0.0.2"}

        async def advertised() -> str:
            status, stream = await gw.post("/streams/advertise", advert())
            assert status == 201, stream
            return str(stream["id"])

        # Nobody listens: the broker returns the request at once.
        lonely = await advertised()
        status, body = await gw.post(f"/streams/{lonely}/request", ask)
        assert status == 502 and "no publisher is listening" in body["detail"]

        # The publisher says no, with a reason.
        async with StreamPublisher(base_url(gw), amqp_url(gw), advert(), lambda _: reject("busy")) as publisher:
            status, body = await gw.post(f"/streams/{publisher.stream_id}/request", ask)
            assert status == 502 and body["detail"] == "the publisher rejected the request: busy"

        # The publisher hears the request and never answers.
        silent = await advertised()
        async with raw_publisher(gw, silent, lambda _: None) as seen:
            status, body = await gw.post(f"/streams/{silent}/request", ask)
            assert status == 504, body
            assert len(seen) == 1

        # Answers of the wrong shape: each a 502, none a session.
        for bad in (b"not json", b"[1, 2]", b'{"accepted": "yes"}', b'{"reason": "no accepted field"}',
                    b'{"accepted": true, "port": "5960"}', b'{"accepted": true, "protocol": "carrier-pigeon"}'):
            stream_id = await advertised()
            async with raw_publisher(gw, stream_id, lambda _, bad=bad: bad):
                status, body = await gw.post(f"/streams/{stream_id}/request", ask)
                assert status == 502, (bad, body)
                assert body["error"] == "malformed-reply", body
            assert (await gw.get(f"/streams/{stream_id}"))[1]["active_sessions"] == 0

        assert (await gw.get("/streams/sessions"))[1] == []
        assert (await gw.get("/streams/sessions/history"))[1] == []
        # A well-formed answer through the same raw contract opens a session.
        stream_id = await advertised()
        reply = json.dumps({"accepted": True, "address": "10.0.0.9", "protocol": "srt"}).encode()
        async with raw_publisher(gw, stream_id, lambda _: reply):
            status, offer = await gw.post(f"/streams/{stream_id}/request", ask)
        assert status == 201, offer
        assert (offer["publisher_address"], offer["publisher_port"], offer["protocol"]) == ("10.0.0.9", 5960, "srt")
        assert (await gw.get("/streams/{}/request".format(str(uuid.uuid4()))))[0] in (404, 405)
        status, body = await gw.post(f"/streams/{uuid.uuid4()}/request", ask)
        assert status == 404 and "not advertised" in body["detail"]


async def test_streams_and_sessions_expire_with_events_and_closed_history(settings_factory: Any, runtime: Any,
                                                                          watch: Any) -> None:
    async with gateway(settings_factory, runtime, stream_ttl_s=2.0) as gw:
        watcher = await watch(*REGISTRY_TOPICS)
        async with StreamPublisher(base_url(gw), amqp_url(gw), advert(), heartbeat_s=0.5) as publisher:
            stream_id = publisher.stream_id
            # A session whose consumer never beats expires alone; its stream lives on.
            status, offer = await gw.post(f"/streams/{stream_id}/request",
                                          {"consumer_id": "quiet", "consumer_address": "10.0.0.3"})
            assert status == 201, offer
            stopped = await watcher.wait_for(keys.registry_event_key(keys.SESSION_STOPPED, stream_id), 20)
            assert stopped["session_ids"] == [offer["session_id"]] and stopped["status"] == "expired"
            assert (await gw.post(f"/streams/sessions/{offer['session_id']}/heartbeat", ""))[0] == 404
            assert (await gw.get(f"/streams/{stream_id}"))[1]["active_sessions"] == 0
            # A session that beats stays while its stream does.
            async with StreamConsumer(base_url(gw), stream_id, "loud", "10.0.0.4", heartbeat_s=0.5) as consumer:
                await asyncio.sleep(0)  # noqa: ASYNC110 (yield once; the wait below is bounded)
                mark = await gw.post("/streams/advertise", advert(name="marker"))
                await watcher.wait_for(keys.registry_event_key(keys.STREAM_ADVERTISED, mark[1]["id"]), 20)
                await until(lambda: _listed_session(gw, consumer.session_id), 20)
                assert (await gw.get(f"/streams/{stream_id}"))[0] == 200
                # The marker stream gets no heartbeat: it expires, and with nothing attached.
                expired = await watcher.wait_for(keys.registry_event_key(keys.STREAM_EXPIRED, mark[1]["id"]), 20)
                assert expired["session_ids"] == []
                # The publisher's stream outlived the marker by beating, and so did the session.
                assert (await gw.get(f"/streams/{stream_id}"))[0] == 200
                assert await _listed_session(gw, consumer.session_id)
        # The publisher withdrew on exit; its lasting session ended with the stream.
        withdrawn = await watcher.wait_for(keys.registry_event_key(keys.STREAM_WITHDRAWN, stream_id), 20)
        assert withdrawn["session_ids"] in ([consumer.session_id], [])
        status, history = await gw.get(f"/streams/sessions/history?stream_id={stream_id}")
        by_id = {row["session_id"]: row for row in history}
        assert by_id[offer["session_id"]]["status"] == "expired"
        assert by_id[offer["session_id"]]["duration_seconds"] >= 2.0
        assert by_id[consumer.session_id]["status"] in ("stopped", "withdrawn")
        assert all(row["ended_at"] for row in history)
        # A stream that expires takes its sessions along.
        status, stream = await gw.post("/streams/advertise", advert())
        async with raw_publisher(gw, stream["id"], lambda _: b'{"accepted": true}'):
            status, offer = await gw.post(f"/streams/{stream['id']}/request",
                                          {"consumer_id": "c", "consumer_address": "10.0.0.5"})
        assert status == 201
        expired = await watcher.wait_for(keys.registry_event_key(keys.STREAM_EXPIRED, stream["id"]), 20)
        assert expired["session_ids"] == [offer["session_id"]]
        assert (await gw.post(f"/streams/{stream['id']}/heartbeat", ""))[0] == 404
        row = (await gw.get(f"/streams/sessions/history?stream_id={stream['id']}"))[1][0]
        assert row["status"] in ("stream_expired", "expired") and row["ended_at"]


async def _listed_session(gw: Stack, session_id: str) -> bool:
    return any(s["session_id"] == session_id for s in (await gw.get("/streams/sessions"))[1])


async def test_withdraw_closes_the_streams_sessions(settings_factory: Any, runtime: Any, watch: Any) -> None:
    async with gateway(settings_factory, runtime) as gw:
        watcher = await watch("ev.ready.stream-session-stopped.*")
        status, stream = await gw.post("/streams/advertise", advert())
        stream_id = stream["id"]
        async with raw_publisher(gw, stream_id, lambda _: b'{"accepted": true}'):
            offers = [(await gw.post(f"/streams/{stream_id}/request",
                                     {"consumer_id": f"c{i}", "consumer_address": "10.0.0.6"}))[1] for i in range(3)]
        assert (await gw.get(f"/streams/{stream_id}"))[1]["active_sessions"] == 3
        resp = await gw.client.delete(f"/streams/{stream_id}")
        body = await resp.json()
        assert resp.status == 200 and body["status"] == "withdrawn"
        assert sorted(body["closed_sessions"]) == sorted(o["session_id"] for o in offers)
        for o in offers:
            event = await watcher.wait_for(keys.registry_event_key(keys.SESSION_STOPPED, stream_id), 20,
                                           where=lambda b, sid=o["session_id"]: b["session_ids"] == [sid])
            assert event["status"] == "withdrawn"
        assert (await gw.get("/streams/sessions"))[1] == []
        history = (await gw.get(f"/streams/sessions/history?stream_id={stream_id}"))[1]
        assert {row["status"] for row in history} == {"withdrawn"} and len(history) == 3
        assert (await gw.client.delete(f"/streams/{stream_id}")).status == 404


async def test_custom_types_are_created_once_and_can_be_advertised(settings_factory: Any, runtime: Any) -> None:
    async with gateway(settings_factory, runtime) as gw:
        lidar = {"name": "lidar", "display_name": "LiDAR Point Cloud", "description": "3D point clouds",
                 "icon": "scan", "default_config": {"format": "ply", "rate_hz": 10}}
        status, created = await gw.post("/streams/types", lidar)
        assert status == 201, created
        assert created["name"] == "lidar" and created["default_config"] == {"format": "ply", "rate_hz": 10}
        uuid.UUID(created["id"])
        status, again = await gw.post("/streams/types", lidar)
        assert status == 409 and again["fields"][0]["field"] == "name"
        assert (await gw.post("/streams/types", {**lidar, "name": "ndi"}))[0] == 409
        names = [t["name"] for t in (await gw.get("/streams/types"))[1]]
        assert "lidar" in names and names == sorted(names) and len(names) == 12
        status, stream = await gw.post("/streams/advertise", advert(stream_type="lidar", protocol="udp"))
        assert status == 201 and stream["stream_type"] == "lidar"
        assert [s["id"] for s in (await gw.get("/streams?stream_type=lidar"))[1]] == [stream["id"]]
        status, body = await gw.post("/streams/advertise", advert(stream_type="radar"))
        assert status == 422 and body["fields"][0]["field"] == "stream_type"


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/streams/advertise", {k: v for k, v in advert().items() if k != "name"}, "name"),
    ("/streams/advertise", {k: v for k, v in advert().items() if k != "address"}, "address"),
    ("/streams/advertise", {k: v for k, v in advert().items() if k != "publisher_id"}, "publisher_id"),
    ("/streams/advertise", advert(protocol="carrier-pigeon"), "protocol"),
    ("/streams/advertise", advert(port=70000), "port"),
    ("/streams/advertise", advert(port="many"), "port"),
    ("/streams/advertise", advert(name=""), "name"),
    ("/streams/advertise", advert(entity_id="not-a-uuid"), "entity_id"),
    ("/streams/advertise", advert(config=[1]), "config"),
    ("/streams/advertise", advert(metadata={"big": "x" * 20000}), "metadata"),
    ("/streams/advertise", advert(colour="red"), "colour"),
    ("/streams/types", {"name": "Bad Name", "display_name": "x"}, "name"),
    ("/streams/types", {"name": "ok"}, "display_name"),
])
async def test_every_validation_error_is_a_4xx_naming_the_field(settings_factory: Any, runtime: Any, path: str,
                                                                 body: dict[str, Any], field: str) -> None:
    async with gateway(settings_factory, runtime) as gw:
        status, answer = await gw.post(path, body)
        assert status == 422, answer
        assert field in [f["field"] for f in answer["fields"]], answer
        assert answer["detail"]
        assert (await gw.get("/streams"))[1] == []


async def test_bad_ids_queries_and_bodies_are_4xx(settings_factory: Any, runtime: Any) -> None:
    async with gateway(settings_factory, runtime) as gw:
        status, stream = await gw.post("/streams/advertise", advert())
        stream_id = stream["id"]
        for path, field in (("/streams/not-a-uuid", "stream_id"), ("/streams/sessions?stream_id=x", "stream_id"),
                            ("/streams/sessions/history?limit=0", "limit"),
                            ("/streams/sessions/history?limit=501", "limit"),
                            ("/streams/sessions/history?limit=ten", "limit"),
                            ("/streams/sessions/history?stream_id=nope", "stream_id")):
            status, body = await gw.get(path)
            assert status == 422 and body["fields"][0]["field"] == field, (path, body)
        assert len((await gw.get("/streams/sessions/history?limit=500"))[1]) == 0
        for bad in ("", "[]", "{", json.dumps({"consumer_address": "x"}), json.dumps({"consumer_id": "c",
                    "consumer_address": "a", "consumer_port": -1})):
            status, body = await gw.post(f"/streams/{stream_id}/request", bad)
            assert 400 <= status < 500, (bad, body)
        assert (await gw.post("/streams/not-a-uuid/heartbeat", ""))[0] == 422
        assert (await gw.post(f"/streams/sessions/{uuid.uuid4()}/heartbeat", ""))[0] == 404
        assert (await gw.client.delete(f"/streams/sessions/{uuid.uuid4()}")).status == 404
        # Uppercase ids are the same ids.
        assert (await gw.get(f"/streams/{stream_id.upper()}"))[1]["id"] == stream_id
        assert [s["id"] for s in (await gw.get("/streams"))[1]] == [stream_id]


async def test_a_restarted_gateway_keeps_streams_types_and_history(settings_factory: Any, runtime: Any) -> None:
    settings = settings_factory(stream_ttl_s=30.0)
    async with running_stack(settings, runtime, with_host=False) as gw:
        assert (await gw.post("/streams/types", {"name": "thermal", "display_name": "Thermal"}))[0] == 201
        async with StreamPublisher(base_url(gw), amqp_url(gw), advert(stream_type="thermal"),
                                   heartbeat_s=3600) as publisher:
            stream_id = publisher.stream_id
            status, offer = await gw.post(f"/streams/{stream_id}/request", {"consumer_id": "c", "consumer_address": "a"})
            assert status == 201
            # Kept from being withdrawn at exit: the publisher "outlives" the gateway below.
            publisher.stream = None
    async with running_stack(settings, runtime, with_host=False) as gw:
        assert "thermal" in [t["name"] for t in (await gw.get("/streams/types"))[1]]
        status, stream = await gw.get(f"/streams/{stream_id}")
        assert status == 200 and stream["stream_type"] == "thermal" and stream["active_sessions"] == 1
        # The publisher's next heartbeat finds it; so does the consumer's.
        assert (await gw.post(f"/streams/{stream_id}/heartbeat", ""))[0] == 200
        assert (await gw.post(f"/streams/sessions/{offer['session_id']}/heartbeat", ""))[0] == 200
        history = (await gw.get(f"/streams/sessions/history?stream_id={stream_id}"))[1]
        assert [(r["session_id"], r["status"]) for r in history] == [(offer["session_id"], "active")]


async def test_two_gateways_keep_one_registry_and_announce_each_expiry_once(settings_factory: Any, runtime: Any,
                                                                            watch: Any) -> None:
    async with fresh_postgres_database() as url:
        settings = settings_factory(database_url=url, stream_ttl_s=3.0)
        async with running_stack(settings.model_copy(update={"gateway_id": "gw-a"}), runtime, with_host=False) as a, \
                running_stack(settings.model_copy(update={"gateway_id": "gw-b"}), runtime, with_host=False) as b:
            watcher = await watch("ev.ready.stream-expired.*", "ev.ready.stream-session-stopped.*")
            async with StreamPublisher(base_url(a), amqp_url(a), advert(), heartbeat_s=3600) as publisher:
                stream_id = publisher.stream_id
                # Advertised on a, listed on b.
                await until(lambda: _status(b, f"/streams/{stream_id}", 200))
                # A session requested through b; the publisher answers whoever asks.
                status, offer = await b.post(f"/streams/{stream_id}/request", {"consumer_id": "c",
                                                                              "consumer_address": "10.1.1.1"})
                assert status == 201, offer
                await until(lambda: _active_sessions(a, stream_id, 1))
                # Heartbeats taken by b keep the stream alive on a too, past several TTLs.
                for _ in range(4):
                    assert (await b.post(f"/streams/{stream_id}/heartbeat", ""))[0] == 200
                    assert (await a.post(f"/streams/sessions/{offer['session_id']}/heartbeat", ""))[0] == 200
                    await asyncio.sleep(1.0)  # noqa: ASYNC110 (a publisher's pace, not a wait for a condition)
                last_a = (await a.get(f"/streams/{stream_id}"))[1]["last_heartbeat"]
                assert (await a.get(f"/streams/{stream_id}"))[0] == 200 and last_a
                # Stopped on a: gone on b.
                assert (await a.client.delete(f"/streams/sessions/{offer['session_id']}")).status == 200
                await until(lambda: _active_sessions(b, stream_id, 0))
                # Then silence: both gateways sweep, one announces.
                expired = await watcher.wait_for(keys.registry_event_key(keys.STREAM_EXPIRED, stream_id), 20)
                assert expired["stream_id"] == stream_id
                await until(lambda: _status(a, f"/streams/{stream_id}", 404))
                await until(lambda: _status(b, f"/streams/{stream_id}", 404))
                # Later than any second announcement could be: a marker through the same exchange.
                status, marker = await a.post("/streams/advertise", advert(name="marker"))
                marker_expired = keys.registry_event_key(keys.STREAM_EXPIRED, marker["id"])
                await watcher.wait_for(marker_expired, 20)
                expiries = [k for k in watcher.keys_seen()
                            if k == keys.registry_event_key(keys.STREAM_EXPIRED, stream_id)]
                assert len(expiries) == 1
                assert watcher.keys_seen().count(marker_expired) == 1
                publisher.stream = None  # already gone: nothing to withdraw


async def test_sessions_opened_together_are_announced_together_and_before_they_end(
        settings_factory: Any, runtime: Any, watch: Any) -> None:
    async with fresh_postgres_database() as url:
        settings = settings_factory(database_url=url)
        async with running_stack(settings.model_copy(update={"gateway_id": "gw-a"}), runtime, with_host=False) as a, \
                running_stack(settings.model_copy(update={"gateway_id": "gw-b"}), runtime, with_host=False) as b:
            watcher = await watch(keys.ready_key(keys.SESSIONS_STARTED, "*"))
            status, stream = await a.post("/streams/advertise", advert())
            assert status == 201, stream
            stream_id, burst = stream["id"], 12
            async with burst_publisher(a, stream_id, burst):
                asked = {"consumer_id": "c", "consumer_address": "10.1.1.1"}
                answers = await asyncio.gather(*(a.post(f"/streams/{stream_id}/request", asked)
                                                 for _ in range(burst)))
            assert [status for status, _ in answers] == [201] * burst, answers
            opened = {offer["session_id"] for _, offer in answers}
            # Every gateway learns of every session, from fewer events than sessions.
            await until(lambda: _active_sessions(b, stream_id, burst))
            key = keys.registry_event_key(keys.SESSIONS_STARTED, a.settings.gateway_name)
            announced = [x["session_id"] for k, body in watcher.seen if k == key for x in body["started"]]
            assert sorted(announced) == sorted(opened)
            assert len([k for k in watcher.keys_seen() if k == key]) < burst

            # A session stopped as soon as it opened: its start reaches b first, never after its end.
            async with raw_publisher(a, stream_id, lambda _: json.dumps({"accepted": True}).encode()):
                status, offer = await a.post(f"/streams/{stream_id}/request", asked)
            assert status == 201, offer
            assert (await a.client.delete(f"/streams/sessions/{offer['session_id']}")).status == 200
            await watcher.wait_for(key, 20, lambda body: offer["session_id"] in {x["session_id"] for x in body["started"]})
            # Advertised after both were announced: once b lists it, b has applied both.
            status, marker = await a.post("/streams/advertise", advert(name="marker"))
            await until(lambda: _status(b, f"/streams/{marker['id']}", 200))
            assert await _active_sessions(b, stream_id, burst)


@asynccontextmanager
async def burst_publisher(stack: Stack, stream_id: str, burst: int) -> AsyncIterator[None]:
    """A publisher that holds its answers until ``burst`` requests have come, then accepts
    them all at once, so their sessions open within one moment."""
    async with stream_requests(stack, stream_id) as (control, queue):
        held: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def on(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            held.append(message)
            if len(held) == burst:
                await asyncio.gather(*(control.publish(aio_pika.Message(b'{"accepted": true}',
                                                                        correlation_id=m.correlation_id),
                                                       routing_key=m.reply_to or "") for m in held))

        await queue.consume(on, no_ack=True)
        yield


async def _status(gw: Stack, path: str, wanted: int) -> bool:
    return (await gw.get(path))[0] == wanted


async def _active_sessions(gw: Stack, stream_id: str, wanted: int) -> bool:
    status, stream = await gw.get(f"/streams/{stream_id}")
    return status == 200 and stream["active_sessions"] == wanted


async def test_history_retention_removes_only_old_ended_sessions(settings_factory: Any, runtime: Any) -> None:
    from datetime import timedelta

    from controlplane.contract.models import utcnow
    from controlplane.gateway.context import CTX
    from controlplane.store.streams import Ending

    async with gateway(settings_factory, runtime) as gw:
        status, stream = await gw.post("/streams/advertise", advert())
        async with raw_publisher(gw, stream["id"], lambda _: b'{"accepted": true}'):
            offers = [(await gw.post(f"/streams/{stream['id']}/request",
                                     {"consumer_id": f"c{i}", "consumer_address": "a"}))[1] for i in range(3)]
        ctx = gw.client.app[CTX]
        long_ago = utcnow() - timedelta(days=100)
        await ctx.store.close_streams([], [Ending(offers[0]["session_id"], "stopped", long_ago, 1.0)])
        assert (await gw.client.delete(f"/streams/sessions/{offers[1]['session_id']}")).status == 200
        assert await ctx.store.purge_stream_history(utcnow() - timedelta(days=90)) == 1
        left = {r["session_id"]: r["status"] for r in (await gw.get("/streams/sessions/history"))[1]}
        assert left == {offers[1]["session_id"]: "stopped", offers[2]["session_id"]: "active"}


async def test_stream_requests_without_a_listening_publisher_fail_fast_rather_than_time_out(
        settings_factory: Any, runtime: Any) -> None:
    """A publisher that went away took its exclusive queue along: the next request is returned
    by the broker at once, not after the publisher's timeout."""
    async with gateway(settings_factory, runtime, stream_request_timeout_s=30.0) as gw:
        publisher = StreamPublisher(base_url(gw), amqp_url(gw), advert(), heartbeat_s=3600)
        await publisher.__aenter__()
        stream_id = publisher.stream_id
        status, _ = await gw.post(f"/streams/{stream_id}/request", {"consumer_id": "c", "consumer_address": "a"})
        assert status == 201
        publisher.stream = None  # leave without withdrawing, as a crashed publisher would
        await publisher.__aexit__(None, None, None)
        async with asyncio.timeout(10):  # well under the 30 s the publisher would have had
            status, body = await gw.post(f"/streams/{stream_id}/request", {"consumer_id": "c", "consumer_address": "a"})
        assert status == 502 and "no publisher is listening" in body["detail"]
        with pytest.raises(StreamsError) as refused:
            async with StreamConsumer(base_url(gw), stream_id, "c", "a"):
                pass
        assert refused.value.status == 502


async def test_the_readme_example_runs_as_written(settings_factory: Any, runtime: Any, capsys: Any) -> None:
    """The client example of the README, against this gateway and broker."""
    from pathlib import Path

    readme = Path(__file__).resolve().parents[2].joinpath("README.md").read_text()
    section = readme[readme.index("## Streams registry"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]
    async with gateway(settings_factory, runtime) as gw:
        code = code.replace("http://127.0.0.1:8080", base_url(gw)).replace("amqp://guest:guest@127.0.0.1/",
                                                                            amqp_url(gw))
        body = "\n".join("    " + line for line in code.splitlines())
        namespace: dict[str, Any] = {}
        exec(f"async def example():\n{body}\n", namespace)  # noqa: S102 (our own README)
        await namespace["example"]()
        assert "192.168.1.50 {'ndi_name': 'TD-01 (Camera A)'}" in capsys.readouterr().out
        assert (await gw.get("/streams"))[1] == []  # withdrawn on exit
        assert [r["status"] for r in (await gw.get("/streams/sessions/history"))[1]] == ["stopped"]


async def test_negotiation_survives_the_gateways_and_the_publishers_broker_connections_dropping(
        settings_factory: Any, runtime: Any, vhost: str) -> None:
    """Both ends reconnect by themselves: the gateway's reply queue and the publisher's request
    queue are exclusive, so the broker drops them with the connection and each end declares
    its own again."""
    from urllib.parse import quote

    from controlplane.bus import Bus
    from controlplane.contract.topology import load_topology
    from controlplane.gateway.app import open_gateway
    from aiohttp.test_utils import TestClient, TestServer
    from tests.conftest import BROKER, drop_connections

    settings = settings_factory()
    name = f"streams-{uuid.uuid4().hex[:8]}"
    url = f"amqp://guest:guest@{BROKER}/{quote(vhost, safe='')}"
    async with Bus(url, load_topology(settings.topology_file), name) as bus, open_gateway(settings, bus) as app:
        client = TestClient(TestServer(app))
        await client.start_server()
        base = str(client.make_url("")).rstrip("/")
        publisher_id = f"pub-{uuid.uuid4().hex[:8]}"

        async def negotiated(stream_id: str) -> bool:
            resp = await client.post(f"/streams/{stream_id}/request",
                                     json={"consumer_id": "c", "consumer_address": "10.0.0.7"})
            return resp.status == 201

        try:
            async with StreamPublisher(base, url, advert(publisher_id=publisher_id), heartbeat_s=3600) as publisher:
                assert await negotiated(publisher.stream_id)
                assert await drop_connections(name) >= 1
                await until(lambda: negotiated(publisher.stream_id), 60, 0.5)
                assert await drop_connections(f"stream-publisher {publisher_id}") >= 1
                await until(lambda: negotiated(publisher.stream_id), 60, 0.5)
                assert publisher.answered >= 3
        finally:
            await client.close()


async def test_with_an_api_key_writes_need_it_and_reads_do_not(settings_factory: Any, runtime: Any) -> None:
    key = "streams-admin-key-1"
    async with gateway(settings_factory, runtime, api_key=key) as gw:
        assert (await gw.post("/streams/advertise", advert()))[0] == 401
        assert (await gw.post("/streams/types", {"name": "x", "display_name": "X"}))[0] == 401
        auth = {"Authorization": f"Bearer {key}"}
        status, stream = await gw.post("/streams/advertise", advert(), headers=auth)
        assert status == 201
        assert (await gw.post(f"/streams/{stream['id']}/heartbeat", ""))[0] == 401
        assert (await gw.post(f"/streams/{stream['id']}/heartbeat", "", headers={"Authorization": "Bearer wrong-key-00"}
                              ))[0] == 403
        assert (await gw.post(f"/streams/{stream['id']}/heartbeat", "", headers=auth))[0] == 200
        assert (await gw.client.delete(f"/streams/{stream['id']}")).status == 401
        assert [s["id"] for s in (await gw.get("/streams"))[1]] == [stream["id"]]  # reads stay open
        assert (await gw.get("/streams/state"))[0] == 200
        # The client sends the key it is given.
        async with StreamPublisher(base_url(gw), amqp_url(gw), advert(), api_key=key) as publisher:
            async with StreamConsumer(base_url(gw), publisher.stream_id, "c", "10.0.0.8", api_key=key) as consumer:
                assert consumer.offer is not None
