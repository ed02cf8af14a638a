"""A consumer callback settles every message: acked, or dead-lettered for a bounded reason."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import REGISTRY
from pydantic import BaseModel

from controlplane.bus import Poison
from controlplane.bus.connection import deliverer, parse_body
from controlplane.contract.keys import InvalidKey


class FakeMessage:
    """Just enough of an incoming message to see how the callback settles it."""

    def __init__(self, body: bytes, routing_key: str = "sig.swarm-start.s1", redelivered: bool = False,
                 fail_ack: bool = False) -> None:
        self.body, self.routing_key, self.redelivered = body, routing_key, redelivered
        self.message_id, self.correlation_id = "m-1", "c-1"
        self.settled: list[str] = []
        self._fail_ack = fail_ack

    @property
    def processed(self) -> bool:
        return bool(self.settled)

    async def ack(self) -> None:
        if self._fail_ack:
            raise RuntimeError("channel went away")
        self.settled.append("ack")

    async def reject(self, requeue: bool = False) -> None:
        self.settled.append("requeue" if requeue else "dead-letter")


class Calls:
    """A handler that fails with the given errors, in order, then succeeds."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.at: list[float] = []

    async def __call__(self, key: str, body: dict[str, Any], _message: Any) -> None:
        self.seen.append((key, body))
        self.at.append(asyncio.get_running_loop().time())
        if self.errors:
            raise self.errors.pop(0)


def dead_lettered(reason: str) -> float:
    return REGISTRY.get_sample_value("cp_messages_dead_lettered_total", {"reason": reason}) or 0.0


async def deliver(message: FakeMessage, handler: Calls, retry_s: float = 5.0) -> None:
    # The callback must finish by itself: a bound turns a wedge into a failure, not a hang.
    await asyncio.wait_for(deliverer("q", handler, retry_s)(message), 10)  # type: ignore[arg-type]


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_parse_body_accepts_only_json_objects() -> None:
    assert parse_body(b'{"a": [1]}') == {"a": [1]}
    for raw in (b"not json", b"\xff\xfe", b"[1, 2]", b'"text"', b"3", b"null", nested(100_000)):
        with pytest.raises(ValueError):
            parse_body(raw)


async def test_a_handled_message_is_acked() -> None:
    handler = Calls()
    message = FakeMessage(b'{"signal": "swarm-start"}')
    await deliver(message, handler)
    assert handler.seen == [("sig.swarm-start.s1", {"signal": "swarm-start"})]
    assert message.settled == ["ack"]


@pytest.mark.parametrize("raw", [b"\xff not json", b"[1, 2]", b'"a string"', nested(100_000)],
                         ids=["invalid-json", "array", "string", "deeply-nested"])
async def test_unparseable_bodies_are_dead_lettered_at_once(raw: bytes) -> None:
    before = dead_lettered("unparseable")
    handler = Calls()
    message = FakeMessage(raw)
    await deliver(message, handler)
    assert message.settled == ["dead-letter"]
    assert handler.seen == [], "the handler never sees a body that is not a JSON object"
    assert dead_lettered("unparseable") == before + 1


class Model(BaseModel):
    n: int


def validation_error() -> Exception:
    try:
        Model.model_validate({"n": "not a number"})
    except Exception as exc:
        return exc
    raise AssertionError("the model accepted a bad value")


@pytest.mark.parametrize("error", [Poison("unknown signal"), validation_error(), InvalidKey("bad.key")],
                         ids=["poison", "validation-error", "invalid-key"])
async def test_poison_errors_are_dead_lettered_without_retry(error: Exception) -> None:
    before = dead_lettered("invalid")
    handler = Calls(error)
    message = FakeMessage(b"{}")
    await deliver(message, handler)
    assert message.settled == ["dead-letter"]
    assert len(handler.seen) == 1, "poison is not retried"
    assert dead_lettered("invalid") == before + 1


async def test_transient_errors_are_retried_until_the_handler_succeeds() -> None:
    handler = Calls(OSError("store busy"), ConnectionError("broker blip"))
    message = FakeMessage(b"{}")
    await deliver(message, handler)
    assert len(handler.seen) == 3
    assert message.settled == ["ack"]


async def test_a_handler_that_keeps_failing_is_dead_lettered_after_retry_s() -> None:
    before = dead_lettered("handler-failed")
    handler = Calls(*[OSError("store down")] * 1000)
    message = FakeMessage(b"{}")
    await deliver(message, handler, retry_s=1.0)
    assert message.settled == ["dead-letter"]
    assert len(handler.at) >= 3, "the handler was retried with backoff first"
    # Backoff 0.1, 0.2, 0.4 s fits in retry_s, the next 0.8 s would not: the first try and at
    # most four retries. Counted, not timed: a stalled event loop can only make it fewer.
    assert len(handler.at) <= 5, "no retry starts after retry_s"
    assert dead_lettered("handler-failed") == before + 1


async def test_a_redelivered_message_is_handled_like_any_other() -> None:
    handler = Calls(OSError("store busy"))
    message = FakeMessage(b"{}", redelivered=True)
    await deliver(message, handler)
    assert len(handler.seen) == 2
    assert message.settled == ["ack"], "redelivery alone is no reason to dead-letter"


async def test_a_fault_after_the_handler_still_settles_the_message() -> None:
    before = dead_lettered("handler-failed")
    message = FakeMessage(b"{}", fail_ack=True)
    await deliver(message, Calls())  # returns: nothing escapes the callback
    assert message.settled == ["dead-letter"]
    assert dead_lettered("handler-failed") == before + 1


async def test_cancellation_is_not_retried() -> None:
    # A closing channel cancels its callbacks; the broker redelivers the unsettled message.
    handler = Calls(asyncio.CancelledError())
    message = FakeMessage(b"{}")
    with pytest.raises(asyncio.CancelledError):
        await deliver(message, handler)
    assert len(handler.seen) == 1
    assert message.settled == []


def test_the_counter_has_only_bounded_reasons() -> None:
    reasons = {s.labels["reason"] for m in REGISTRY.collect() if m.name == "cp_messages_dead_lettered"
               for s in m.samples if s.name == "cp_messages_dead_lettered_total"}
    assert reasons == {"unparseable", "invalid", "handler-failed"}


async def test_without_acks_nothing_is_settled_and_what_fails_is_counted() -> None:
    handled, broken = FakeMessage(b'{"kind": "status-delta"}'), FakeMessage(b"not json")
    calls = Calls()
    before = dead_lettered("unparseable")
    for message in (handled, broken):
        await asyncio.wait_for(deliverer("q", calls, 5.0, acks=False)(message), 5)  # type: ignore[arg-type]
    assert calls.seen == [("sig.swarm-start.s1", {"kind": "status-delta"})]
    assert handled.settled == [] and broken.settled == []  # the broker forgot them on delivery
    assert dead_lettered("unparseable") == before + 1
