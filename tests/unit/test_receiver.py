"""The signal server every receiver shares: dedupe scope, deadlines, errors into outcomes."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from controlplane.contract.models import OutcomeState, Signal, utcnow
from controlplane.contract.receiver import Done, Failure, SignalServer, deadline, expired, remaining_s
from controlplane.controller.replies import Replies


class Recorder:
    """Stands in for the bus: keeps what would have been published."""

    def __init__(self) -> None:
        self.published: list[tuple[str, Any]] = []

    async def publish(self, routing_key: str, body: Any, **_: Any) -> None:
        self.published.append((routing_key, body))

    def keys(self) -> list[str]:
        return [k for k, _ in self.published]


def signal(name: str, key: str = "k-1", swarm_id: str = "alpha", **fields: Any) -> dict[str, Any]:
    sig = Signal(signal=name, correlation_id=f"c-{name}-{key}", idempotency_key=key, swarm_id=swarm_id, **fields)
    return sig.to_dict()


def server(bus: Recorder, calls: list[str], **handlers: Any) -> SignalServer:
    async def start(sig: Signal) -> OutcomeState:
        calls.append(f"start:{sig.idempotency_key}")
        return OutcomeState(status="Running")

    async def stop(sig: Signal) -> OutcomeState:
        calls.append(f"stop:{sig.idempotency_key}")
        return OutcomeState(status="Stopped")

    commands = {"swarm-start": start, "swarm-stop": stop, **handlers}
    return SignalServer(bus, "test", commands=commands, state=lambda: OutcomeState(status="Ready"))


async def test_a_key_reused_for_another_signal_is_a_new_action() -> None:
    bus, calls = Recorder(), []
    srv = server(bus, calls)
    await srv.on_message("sig.swarm-start.alpha", signal("swarm-start", "same"))
    await srv.on_message("sig.swarm-stop.alpha", signal("swarm-stop", "same"))
    assert calls == ["start:same", "stop:same"]
    assert bus.keys() == ["ev.ready.swarm-start.alpha", "ev.ready.swarm-stop.alpha"]
    assert bus.published[1][1].state.status == "Stopped"


async def test_a_key_reused_for_another_scope_is_a_new_action() -> None:
    bus, calls = Recorder(), []
    srv = server(bus, calls)
    await srv.on_message("sig.swarm-start.alpha", signal("swarm-start", "same", swarm_id="alpha"))
    await srv.on_message("sig.swarm-start.beta", signal("swarm-start", "same", swarm_id="beta"))
    assert calls == ["start:same", "start:same"]
    assert bus.keys() == ["ev.ready.swarm-start.alpha", "ev.ready.swarm-start.beta"]


async def test_a_repeat_republishes_the_outcome_and_runs_nothing() -> None:
    bus, calls = Recorder(), []
    srv = server(bus, calls)
    body = signal("swarm-start")
    await srv.on_message("sig.swarm-start.alpha", body)
    await srv.on_message("sig.swarm-start.alpha", body)
    assert calls == ["start:k-1"]
    assert bus.published[0] == bus.published[1]


async def test_a_repeat_arriving_mid_action_waits_for_it() -> None:
    bus, calls, release = Recorder(), [], asyncio.Event()

    async def slow(sig: Signal) -> OutcomeState:
        calls.append("slow")
        await release.wait()
        return OutcomeState(status="Running")

    srv = server(bus, calls, **{"swarm-start": slow})
    body = signal("swarm-start")
    first = asyncio.create_task(srv.on_message("sig.swarm-start.alpha", body))
    second = asyncio.create_task(srv.on_message("sig.swarm-start.alpha", body))
    await asyncio.sleep(0.01)
    assert calls == ["slow"] and bus.published == []
    release.set()
    await asyncio.gather(first, second)
    assert calls == ["slow"] and len(bus.published) == 2


async def test_a_signal_past_its_deadline_is_not_run() -> None:
    bus, calls = Recorder(), []
    srv = server(bus, calls)
    late = signal("swarm-start", ts=utcnow() - timedelta(seconds=3), args={"timeoutMs": 2000})
    await srv.on_message("sig.swarm-start.alpha", late)
    assert calls == [] and bus.published == [], "the gateway already answered timeout"
    on_time = signal("swarm-start", "k-2", ts=utcnow() - timedelta(seconds=1), args={"timeoutMs": 2000})
    await srv.on_message("sig.swarm-start.alpha", on_time)
    assert calls == ["start:k-2"]


def test_deadline_is_ts_plus_timeout_and_absent_without_one() -> None:
    sig = Signal.model_validate(signal("swarm-start", args={"timeoutMs": 1500}))
    assert deadline(sig) == sig.ts + timedelta(milliseconds=1500)
    assert not expired(sig, now=sig.ts + timedelta(milliseconds=1499))
    assert expired(sig, now=sig.ts + timedelta(milliseconds=1501))
    assert remaining_s(sig, 99, now=sig.ts) == 1.5
    without = Signal.model_validate(signal("swarm-start"))
    assert deadline(without) is None and not expired(without) and remaining_s(without, 99) == 99
    odd = Signal.model_validate(signal("swarm-start", args={"timeoutMs": "soon"}))
    assert deadline(odd) is None


async def test_an_unknown_signal_gets_an_error_outcome() -> None:
    bus, calls = Recorder(), []
    srv = server(bus, calls)
    await srv.on_message("sig.swarm-dance.alpha", signal("swarm-dance"))
    [(key, outcome)] = bus.published
    assert key == "ev.error.swarm-dance.alpha"
    assert outcome.code == "unknown-signal" and outcome.result == "error" and "swarm-start" in outcome.message


async def test_a_body_that_disagrees_with_its_key_is_dropped() -> None:
    bus, calls = Recorder(), []
    srv = server(bus, calls)
    await srv.on_message("sig.swarm-stop.alpha", signal("swarm-start"))  # another signal
    await srv.on_message("sig.swarm-start.beta", signal("swarm-start"))  # another scope
    await srv.on_message("ev.ready.swarm-start.alpha", signal("swarm-start"))  # not a signal
    await srv.on_message("sig.config-update.generator.alpha-gen", signal("config-update"))  # no role/instance
    assert calls == [] and bus.published == []


async def test_a_body_that_is_not_a_signal_raises_for_the_bus_to_dead_letter() -> None:
    srv = server(Recorder(), [])
    with pytest.raises(ValidationError):
        await srv.on_message("sig.swarm-start.alpha", {"signal": "swarm-start"})


async def test_failures_and_bugs_become_error_outcomes() -> None:
    async def refuse(sig: Signal) -> OutcomeState:
        raise Failure("bee-timeout", "no answer", "swarm-start", retryable=True, details={"bee": "gen"})

    async def crash(sig: Signal) -> OutcomeState:
        raise KeyError("oops")

    async def detailed(sig: Signal) -> Done:
        return Done(OutcomeState(status="Ready"), {"bees": []})

    bus = Recorder()
    srv = server(bus, [], **{"swarm-start": refuse, "swarm-stop": crash, "swarm-template": detailed})
    await srv.on_message("sig.swarm-start.alpha", signal("swarm-start"))
    await srv.on_message("sig.swarm-stop.alpha", signal("swarm-stop"))
    await srv.on_message("sig.swarm-template.alpha", signal("swarm-template"))
    (k1, refused), (k2, crashed), (k3, done) = bus.published
    assert k1 == "ev.error.swarm-start.alpha" and refused.code == "bee-timeout" and refused.retryable is True
    assert refused.details == {"bee": "gen"} and refused.state.status == "Ready"
    assert k2 == "ev.error.swarm-stop.alpha" and crashed.code == "internal-error" and "KeyError" in crashed.message
    assert k3 == "ev.ready.swarm-template.alpha" and done.details == {"bees": []}


async def test_a_command_answered_elsewhere_publishes_nothing() -> None:
    async def not_mine(sig: Signal) -> None:
        return None

    bus = Recorder()
    srv = SignalServer(bus, "test", commands={"swarm-remove": not_mine}, state=OutcomeState,
                       answered_elsewhere=("swarm-create",))
    await srv.on_message("sig.swarm-remove.alpha", signal("swarm-remove"))
    await srv.on_message("sig.swarm-create.alpha", signal("swarm-create"))
    assert bus.published == []


async def test_replies_are_removed_when_answered_or_timed_out_and_failed_on_stop() -> None:
    replies: Replies[str, int] = Replies("test")
    answered = replies.expect("a")
    assert replies.resolve("a", 1) and await answered == 1
    await asyncio.sleep(0)
    assert len(replies) == 0
    with pytest.raises(asyncio.TimeoutError):
        await replies.wait("b", 0.01)
    assert len(replies) == 0 and not replies.resolve("b", 2), "a late reply finds nobody"
    pending = replies.expect("c")
    replies.fail_all()
    assert pending.cancelled() and len(replies) == 0
