"""``GET /api/events`` and ``controlplane watch --url`` against a real gateway and RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from controlplane.contract.models import Outcome, Scope
from controlplane.gateway.context import CTX
from controlplane.gateway.events import EventHub
from tests.conftest import Stack, new_key, new_swarm_id, running_stack

pytestmark = pytest.mark.integration

TEMPLATE = "generator-demo"


@dataclass
class Frame:
    event: str
    data: dict[str, Any]
    id: int | None = None
    comments: list[str] = field(default_factory=list)


class Stream:
    """An open event stream, read frame by frame by a parser of its own (not the CLI's)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def next(self, timeout: float = 20, comments: bool = False) -> Frame:
        """The next event (or, with ``comments``, the next comment-only block as event ":")."""
        async with asyncio.timeout(timeout):
            while True:
                lines: list[str] = []
                while (line := (await self.response.content.readline()).decode().rstrip("\n")) or not lines:
                    if not line and self.response.content.at_eof():
                        raise EOFError("the stream ended")
                    if line:
                        lines.append(line)
                fields = [line.split(": ", 1) if not line.startswith(":") else [":", line[1:].strip()] for line in lines]
                notes = [value for name, value in fields if name == ":"]
                values = {name: value for name, value in fields if name != ":"}
                if "event" in values:
                    return Frame(values["event"], json.loads(values["data"]),
                                 int(values["id"]) if "id" in values else None, notes)
                if comments:
                    return Frame(":", {}, None, notes)


@asynccontextmanager
async def events(stack: Stack, topics: str, headers: dict[str, str] | None = None,
                 **params: str) -> AsyncIterator[Stream]:
    response = await stack.client.get("/api/events", params={"topics": topics, **params}, headers=headers or {})
    assert response.status == 200, await response.text()
    try:
        yield Stream(response)
    finally:
        response.close()


def hub_of(stack: Stack) -> EventHub:
    return stack.client.app[CTX].events


def outcome(signal: str, swarm_id: str, result: str = "success") -> Outcome:
    """A well-formed outcome for a swarm nobody knows: the tracker consumes it and moves nothing."""
    return Outcome(correlation_id=new_key(), idempotency_key=new_key(), signal=signal,
                   scope=Scope(swarm_id=swarm_id), result=result)


async def publish(stack: Stack, *outcomes: Outcome) -> None:
    for o in outcomes:
        await stack.bus.publish(o.routing_key(), o)


async def until(probe: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not probe():
            await asyncio.sleep(0.05)


async def test_a_client_bound_before_a_post_sees_its_outcome(stack: Stack) -> None:
    swarm_id = new_swarm_id()
    async with events(stack, f"ev.*.swarm-create.{swarm_id},ev.*.swarm-remove.{swarm_id}") as stream:
        assert stream.response.headers["Content-Type"] == "text/event-stream"
        assert stream.response.headers["Cache-Control"] == "no-cache"
        assert stream.response.headers["X-Accel-Buffering"] == "no"
        status, envelope = await stack.post(f"/api/swarms/{swarm_id}/create",
                                            {"templateId": TEMPLATE, "idempotencyKey": new_key()})
        assert status == 202, envelope
        frame = await stream.next(timeout=120)
        # Either outcome proves the path; which one depends on the images this machine has built.
        assert frame.event in (envelope["watch"]["successTopic"], envelope["watch"]["errorTopic"])
        assert frame.data["routingKey"] == frame.event
        assert frame.data["body"]["correlationId"] == envelope["correlationId"]
        if frame.event == envelope["watch"]["successTopic"]:
            status, removal = await stack.post(f"/api/swarms/{swarm_id}/remove", {"idempotencyKey": new_key()})
            assert status == 202, removal
            removed = await stream.next(timeout=60)
            assert removed.event == f"ev.ready.swarm-remove.{swarm_id}"
            assert removed.data["body"]["correlationId"] == removal["correlationId"]


async def test_only_matching_events_are_streamed(stack: Stack) -> None:
    swarm_id = new_swarm_id()
    async with events(stack, f"ev.ready.swarm-start.{swarm_id},ev.error.#") as stream:
        started, stopped, failed = (outcome("swarm-start", swarm_id), outcome("swarm-stop", swarm_id),
                                    outcome("swarm-stop", swarm_id, "error"))
        await publish(stack, stopped, started, failed)
        first, second = await stream.next(), await stream.next()
    assert (first.event, first.data["body"]["correlationId"]) == (started.routing_key(), started.correlation_id)
    assert (second.event, second.data["body"]["correlationId"]) == (failed.routing_key(), failed.correlation_id)
    assert first.id is not None and second.id is not None and second.id > first.id


async def test_reconnecting_with_last_event_id_gets_exactly_what_was_missed(stack: Stack) -> None:
    swarm_id = new_swarm_id()
    topics = f"ev.*.swarm-start.{swarm_id}"
    before, missed = outcome("swarm-start", swarm_id), [outcome("swarm-start", swarm_id) for _ in range(3)]
    unrelated, after = outcome("swarm-stop", swarm_id), outcome("swarm-start", swarm_id, "error")
    async with events(stack, topics) as stream:
        await publish(stack, before)
        last_seen = await stream.next()
    assert last_seen.id is not None
    # Another client shows when the gateway has taken in everything published while away.
    async with events(stack, f"ev.*.*.{swarm_id}") as witness:
        await publish(stack, *missed, unrelated)
        while (await witness.next()).data["body"]["correlationId"] != unrelated.correlation_id:
            pass
    for how in ({"headers": {"Last-Event-ID": str(last_seen.id)}}, {"lastEventId": str(last_seen.id)}):
        async with events(stack, topics, **how) as resumed:
            replayed = [await resumed.next() for _ in missed]
            await publish(stack, after)
            live = await resumed.next()
        assert [f.data["body"]["correlationId"] for f in replayed] == [o.correlation_id for o in missed]
        assert live.data["body"]["correlationId"] == after.correlation_id, "nothing else came in between"
        # The next resume from the same id also gets the event that was live this time.
        missed, after = [*missed, after], outcome("swarm-start", swarm_id, "error")


async def test_resuming_older_than_the_buffer_announces_the_gap(stack: Stack) -> None:
    swarm_id = new_swarm_id()
    topics = f"ev.*.swarm-start.{swarm_id}"
    async with events(stack, topics) as stream:
        await publish(stack, outcome("swarm-start", swarm_id))
        last_seen = await stream.next()
    assert last_seen.id is not None
    # A burst larger than the buffer while the client was away; ten thousand messages through
    # the broker would only make the test slow, so the burst goes into the hub directly.
    hub = hub_of(stack)
    for n in range(hub.buffer_size + 1):
        hub.publish(f"ev.status-delta.generator.burst-{n % 7}", {"n": n})
    latest = outcome("swarm-start", swarm_id)
    await publish(stack, latest)
    async with events(stack, topics, headers={"Last-Event-ID": str(last_seen.id)}) as resumed:
        gap = await resumed.next()
        assert gap.event == "gap" and gap.id is None
        assert gap.data["lastEventId"] == last_seen.id
        assert gap.data["firstAvailableId"] > last_seen.id + 1
        held = await resumed.next()
        assert held.data["body"]["correlationId"] == latest.correlation_id


@pytest.mark.parametrize(("query", "reason"), [
    ({}, "at least one pattern"),
    ({"topics": ""}, "at least one pattern"),
    ({"topics": "ev..ready"}, "empty word"),
    ({"topics": "ev.ready*"}, "must be '*', '#'"),
    ({"topics": "ev.#,sig..x"}, "empty word"),
])
async def test_bad_topics_are_a_400_naming_the_field(stack: Stack, query: dict[str, str], reason: str) -> None:
    status, body = await stack.get("/api/events", params=query)
    assert status == 400 and body["error"] == "invalid-topics"
    assert body["fields"][0]["field"] == "topics" and reason in body["fields"][0]["reason"]


@pytest.mark.parametrize("last_id", ["abc", "-1", "9" * 5000, "\u00b2"])
async def test_a_bad_last_event_id_is_a_400(stack: Stack, last_id: str) -> None:
    status, body = await stack.get("/api/events", params={"topics": "ev.#"}, headers={"Last-Event-ID": last_id})
    assert status == 400 and body["fields"][0]["field"] == "Last-Event-ID"
    status, body = await stack.get("/api/events", params={"topics": "ev.#", "lastEventId": last_id})
    assert status == 400 and body["fields"][0]["field"] == "lastEventId"


async def test_idle_streams_get_keep_alives_and_leaving_clients_are_removed(stack: Stack) -> None:
    ctx = stack.client.app[CTX]
    shared, ctx.events = ctx.events, EventHub(keepalive_s=0.2)
    try:
        # A pattern no event matches: other tests' swarms must not speak before the keep-alive.
        async with events(stack, "ev.ready.no-such-signal.#") as stream:
            await until(lambda: ctx.events.subscriber_count == 1)
            assert (await stream.next(timeout=5, comments=True)).comments == ["stream open"]
            assert (await stream.next(timeout=5, comments=True)).comments == ["keep-alive"]
        await until(lambda: ctx.events.subscriber_count == 0)
    finally:
        ctx.events = shared


async def test_closing_the_hub_ends_every_stream(stack: Stack) -> None:
    ctx = stack.client.app[CTX]
    shared, ctx.events = ctx.events, EventHub()
    try:
        async with events(stack, "ev.#") as one, events(stack, "#") as two:
            await until(lambda: ctx.events.subscriber_count == 2)
            ctx.events.close()
            for stream in (one, two):
                # An event already on its way (the gateway's queue outlives a stack) may come first;
                # the end of the stream must follow it.
                with pytest.raises(EOFError):
                    for _ in range(100):
                        await stream.next(timeout=5)
        status, body = await stack.get("/api/events", params={"topics": "ev.#"})
        assert status == 503, body
    finally:
        ctx.events = shared


async def test_watch_url_prints_matching_events(settings_factory: Any, runtime: Any) -> None:
    settings = settings_factory(api_key="watch-key", protect_reads=True)
    async with running_stack(settings, runtime, with_host=False) as stack:
        swarm_id = new_swarm_id()
        url = str(stack.client.make_url("/"))
        command = [sys.executable, "-m", "controlplane.cli", "watch", f"ev.*.swarm-start.{swarm_id}",
                   "--url", url, "--count", "1"]
        refused = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = await asyncio.wait_for(refused.communicate(), 30)
        assert refused.returncode != 0 and b"401" in err, "reads are protected and no key was given"

        proc = await asyncio.create_subprocess_exec(*command, "--api-key", "watch-key",
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        await asyncio.wait_for(proc.stderr.readline(), 30)  # "watching …": subscribed
        skipped, started = outcome("swarm-stop", swarm_id), outcome("swarm-start", swarm_id)
        await publish(stack, skipped, started)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        lines = [json.loads(line) for line in out.decode().splitlines()]
        assert lines == [{"routingKey": started.routing_key(), "body": json.loads(started.to_json())}]
        assert proc.returncode == 0
