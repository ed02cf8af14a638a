"""The event hub without a broker: topic matching, resuming from the ring buffer, slow clients."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from controlplane.gateway.events import EventHub, Subscription, TopicPattern, parse_topics, topic_matches


@pytest.mark.parametrize(("pattern", "key", "expected"), [
    ("ev.ready.swarm-create.demo", "ev.ready.swarm-create.demo", True),
    ("ev.ready.swarm-create.demo", "ev.ready.swarm-create.other", False),
    ("ev.*.swarm-create.demo", "ev.error.swarm-create.demo", True),
    ("ev.*.swarm-create.demo", "ev.ready.swarm-start.demo", False),
    ("ev.*", "ev.ready.swarm-create.demo", False),          # '*' is exactly one word
    ("ev.*.*", "ev.ready", False),
    ("ev.#", "ev.ready.swarm-create.demo", True),
    ("ev.#", "ev", True),                                    # '#' may be zero words
    ("ev.#", "sig.swarm-create.demo", False),
    ("#", "anything.at.all", True),
    ("#.demo", "demo", True),
    ("#.demo", "ev.ready.swarm-create.demo", True),
    ("#.demo", "ev.ready.swarm-create.demo2", False),
    ("ev.#.demo", "ev.demo", True),
    ("ev.#.demo", "ev.status-delta.swarm-controller.demo", True),
    ("ev.#.#.demo", "ev.demo", True),
    ("ev.#.*.demo", "ev.demo", False),                       # '*' still needs its word
    ("ev.#.*.demo", "ev.x.demo", True),
    ("*.ready.#", "ev.ready", True),
    ("ev.status-full.*.*", "ev.status-full.generator.g1", True),
    ("ev.status-full.*.*", "ev.status-full.swarm-controller", False),
])
def test_topic_matching_follows_amqp(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected
    assert TopicPattern.parse(pattern).matches(key) is expected


def test_topics_accept_comma_lists_and_repeated_values() -> None:
    parsed = parse_topics(["ev.*.swarm-create.demo, ev.status-full.#", "sig.#"])
    assert [p.text for p in parsed] == ["ev.*.swarm-create.demo", "ev.status-full.#", "sig.#"]


@pytest.mark.parametrize(("values", "reason"), [
    ([], "at least one pattern"),
    ([""], "at least one pattern"),
    (["ev..demo"], "empty word"),
    ([".ev"], "empty word"),
    (["ev.#."], "empty word"),
    (["ev.ready,"], "empty pattern"),
    (["ev.ready*"], r"word 'ready\*'"),
    (["ev.ready.swarm create"], "'swarm create'"),
    (["ev." + "a" * 255], "longer than 255"),
    ([",".join(["ev.#"] * 33)], "at most 32"),
])
def test_bad_topics_say_why(values: list[str], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_topics(values)


def patterns(*texts: str) -> tuple[TopicPattern, ...]:
    return tuple(TopicPattern.parse(t) for t in texts)


def decode(frame: bytes) -> dict[str, Any]:
    """An SSE frame as its fields; ``data`` parsed as JSON."""
    text = frame.decode()
    assert text.endswith("\n\n") and text.count("\n") == len(text.strip("\n").split("\n")) + 1
    fields = dict(line.split(": ", 1) for line in text.strip("\n").split("\n"))
    fields["data"] = json.loads(fields["data"])
    return fields


async def drain(sub: Subscription) -> list[tuple[int, str]]:
    """Everything the subscription holds right now, as (id, routing key)."""
    out = []
    while (event := await sub.next(0.01)) is not None:
        out.append((event.id, event.routing_key))
    return out


async def test_an_event_is_one_frame_with_id_name_and_one_line_of_json() -> None:
    hub = EventHub(start_id=0)
    sub = hub.subscribe(patterns("ev.#"))
    hub.publish("ev.ready.swarm-create.demo", {"message": "two\nlines", "n": 1})
    event = await sub.next(1)
    assert event is not None
    assert decode(event.frame) == {"id": "1", "event": "ev.ready.swarm-create.demo",
                                   "data": {"routingKey": "ev.ready.swarm-create.demo",
                                            "body": {"message": "two\nlines", "n": 1}}}


async def test_subscribers_get_only_what_matches_in_order() -> None:
    hub = EventHub(start_id=0)
    creates, everything = hub.subscribe(patterns("ev.*.swarm-create.*")), hub.subscribe(patterns("#"))
    for key in ("ev.ready.swarm-create.a", "ev.status-delta.generator.g1", "ev.error.swarm-create.b"):
        hub.publish(key, {})
    assert await drain(creates) == [(1, "ev.ready.swarm-create.a"), (3, "ev.error.swarm-create.b")]
    assert [i for i, _ in await drain(everything)] == [1, 2, 3]


async def test_resume_replays_exactly_what_came_after_the_last_id() -> None:
    hub = EventHub(buffer_size=10, start_id=0)
    for n in range(1, 6):
        hub.publish(f"ev.ready.swarm-start.s{n}", {"n": n})
    hub.publish("ev.status-delta.generator.g1", {})
    resumed = hub.subscribe(patterns("ev.ready.#"), last_event_id=3)
    assert resumed.gap is None
    hub.publish("ev.ready.swarm-stop.s1", {})
    assert await drain(resumed) == [(4, "ev.ready.swarm-start.s4"), (5, "ev.ready.swarm-start.s5"),
                                    (7, "ev.ready.swarm-stop.s1")]
    caught_up = hub.subscribe(patterns("#"), last_event_id=hub.last_id)
    assert caught_up.gap is None and await drain(caught_up) == []
    fresh = hub.subscribe(patterns("#"))
    assert fresh.gap is None and await drain(fresh) == [], "without an id, only what comes next"


async def test_resume_older_than_the_buffer_reports_the_gap_then_replays_what_is_held() -> None:
    hub = EventHub(buffer_size=3, start_id=0)
    for n in range(1, 8):
        hub.publish(f"ev.ready.x.s{n}", {})
    sub = hub.subscribe(patterns("#"), last_event_id=2)
    assert sub.gap == 5, "ids 3 and 4 are gone; 5 is the first still held"
    assert [i for i, _ in await drain(sub)] == [5, 6, 7]
    exact = hub.subscribe(patterns("#"), last_event_id=4)
    assert exact.gap is None and [i for i, _ in await drain(exact)] == [5, 6, 7]


async def test_an_id_the_hub_never_issued_counts_as_a_gap() -> None:
    # Another gateway's id, say: what this one holds may all be news to the client.
    hub = EventHub(start_id=0)
    hub.publish("ev.ready.x.a", {})
    hub.publish("ev.ready.x.b", {})
    sub = hub.subscribe(patterns("#"), last_event_id=500)
    assert sub.gap == 1 and [i for i, _ in await drain(sub)] == [1, 2]


async def test_ids_follow_the_clock_so_a_restart_shows_as_a_gap() -> None:
    before = time.time_ns() // 1000
    old = EventHub()
    assert before <= old.last_id <= time.time_ns() // 1000
    for n in range(3):
        old.publish(f"ev.ready.x.s{n}", {})
    # The gateway restarts later: its ids start above every id the old one gave out.
    restarted = EventHub(start_id=old.last_id + 1_000)
    restarted.publish("ev.ready.x.after", {})
    sub = restarted.subscribe(patterns("#"), last_event_id=old.last_id)
    assert sub.gap == old.last_id + 1_001
    assert await drain(sub) == [(old.last_id + 1_001, "ev.ready.x.after")]


async def test_a_subscriber_that_falls_behind_is_dropped_and_others_keep_going() -> None:
    hub = EventHub(queue_size=3, start_id=0)
    cut: list[str] = []
    slow = hub.subscribe(patterns("ev.ready.#"), on_overflow=lambda: cut.append("slow"))
    reader = hub.subscribe(patterns("ev.ready.#"))
    for n in range(3):
        hub.publish(f"ev.ready.x.s{n}", {})
        hub.publish("ev.status-delta.generator.g1", {})  # not matched: never fills the queue
        assert await reader.next(1) is not None
    assert not slow.closed and hub.subscriber_count == 2
    hub.publish("ev.ready.x.s3", {})
    assert slow.closed and slow.overflowed and cut == ["slow"]
    assert await slow.next(1) is None, "its stream ends at once; the client resumes by Last-Event-ID"
    assert hub.subscriber_count == 1 and not reader.closed
    assert await reader.next(1) is not None
    # What the dropped client missed is still in the buffer.
    again = hub.subscribe(patterns("ev.ready.#"), last_event_id=0)
    assert [k for _, k in await drain(again)] == [f"ev.ready.x.s{n}" for n in range(4)]


async def test_a_backlog_larger_than_the_queue_is_not_an_overflow() -> None:
    hub = EventHub(queue_size=2, start_id=0)
    for n in range(10):
        hub.publish(f"ev.ready.x.s{n}", {})
    sub = hub.subscribe(patterns("#"), last_event_id=0)
    hub.publish("ev.ready.x.live", {})
    assert not sub.closed
    assert len(await drain(sub)) == 11


async def test_next_waits_for_a_live_event_and_times_out_quietly() -> None:
    hub = EventHub(start_id=0)
    sub = hub.subscribe(patterns("#"))
    assert await sub.next(0.05) is None and not sub.closed
    waiting = asyncio.create_task(sub.next(5))
    await asyncio.sleep(0)
    hub.publish("ev.ready.x.a", {})
    event = await asyncio.wait_for(waiting, 1)
    assert event is not None and event.id == 1


async def test_close_ends_every_stream_and_later_ones_start_closed() -> None:
    hub = EventHub(start_id=0)
    subs = [hub.subscribe(patterns("#")) for _ in range(3)]
    waiting = [asyncio.create_task(s.next(30)) for s in subs]
    await asyncio.sleep(0)
    hub.close()
    assert await asyncio.wait_for(asyncio.gather(*waiting), 1) == [None, None, None]
    assert all(s.closed and not s.overflowed for s in subs) and hub.subscriber_count == 0
    late = hub.subscribe(patterns("#"))
    assert late.closed and hub.subscriber_count == 0
    hub.publish("ev.ready.x.a", {})
    assert hub.last_id == 0, "a closed hub takes nothing in"


async def test_unsubscribe_removes_the_client() -> None:
    hub = EventHub(start_id=0)
    sub = hub.subscribe(patterns("#"))
    hub.unsubscribe(sub)
    assert hub.subscriber_count == 0 and sub.closed
    hub.publish("ev.ready.x.a", {})
    assert await sub.next(0.01) is None


def test_sizes_must_be_positive() -> None:
    for bad in ({"buffer_size": 0}, {"queue_size": 0}, {"keepalive_s": 0}):
        with pytest.raises(ValueError):
            EventHub(**bad)


async def test_an_event_kept_as_its_message_bytes_streams_the_same_frame() -> None:
    hub = EventHub(start_id=0)
    sub = hub.subscribe(parse_topics(["ev.#"]))
    body = {"status": "Ready", "nested": {"a": [1, 2]}}
    hub.publish("ev.ready.x.y", body, raw=json.dumps(body).encode())
    hub.publish("ev.ready.x.z", body, raw=json.dumps(body, indent=2).encode())  # line breaks: encoded again
    for key in ("ev.ready.x.y", "ev.ready.x.z"):
        event = await sub.next(1)
        assert event is not None
        lines = event.frame.decode().split("\n")
        assert lines[:2] == [f"id: {event.id}", f"event: {key}"] and lines[3:] == ["", ""]
        assert json.loads(lines[2].removeprefix("data: ")) == {"routingKey": key, "body": body}
