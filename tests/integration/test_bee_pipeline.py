"""The HTTP bees against the real RabbitMQ and a real system under test.

Bees run in-process as asyncio tasks, each group in a swarm of its own (a unique id), as in
``test_bee_sdk.py``; the system under test (``bees.sut``) runs in-process on a free port.
The pipeline tests share one swarm, generator -> moderator (fixed rate) -> processor ->
postprocessor, and run in file order.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractIncomingMessage
from aiohttp import web

from bees.env import BeeEnv
from bees.generator import Generator
from bees.http import CONNECTION, HTTP_4XX, HTTP_5XX, INVALID_REQUEST, TIMEOUT, HttpRequest, call, new_session
from bees.moderator import Moderator
from bees.postprocessor import Postprocessor
from bees.processor import Processor
from bees.sdk import Bee, BeeContext, Worker
from bees.sut import SutEnv, start
from bees.trigger import Trigger
from controlplane.bus import Bus
from controlplane.contract.egress import Egress
from controlplane.contract import keys
from tests.integration.test_bee_sdk import Event
from controlplane.contract.models import Signal, Strict, new_id
from controlplane.contract.topology import default_topology

pytestmark = pytest.mark.integration

AMQP_URL = os.environ.get("CP_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
ROOT = Path(__file__).resolve().parents[2]
SUT_LATENCY_MS = 2.0


# --- helpers ---------------------------------------------------------------------------


@dataclass
class Running:
    role: str
    instance: str
    bee: Bee[Any]
    task: asyncio.Task[None]


@dataclass
class TestSwarm:
    """In-process bees of one swarm, and everything they emit on ph.control."""

    __test__ = False

    bus: Bus
    swarm_id: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:8]}")
    bees: dict[str, Running] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    suffixes: set[str] = field(default_factory=set)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _observer: Any = None

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        self.events.append(Event(message.routing_key or "", message.correlation_id, json.loads(message.body)))
        self._arrived.set()

    async def expect(self, match: Callable[[Event], bool], timeout: float = 10.0) -> Event:
        """The first event, past or future, that matches."""
        async with asyncio.timeout(timeout):
            seen = 0
            while True:
                for event in self.events[seen:]:
                    if match(event):
                        return event
                seen = len(self.events)
                self._arrived.clear()
                await self._arrived.wait()

    async def start(self, name: str, role: str, worker: Worker[Any], config: dict[str, Any], *,
                    work_in: str | None = None, work_out: str | None = None, sut_url: str | None = None,
                    enabled: bool = True, allowed_targets: list[str] | None = None) -> Running:
        instance = keys.bee_instance(self.swarm_id, name)
        if self._observer is None:
            channel = await self.bus.connection.channel()
            self._observer = await channel.declare_queue(exclusive=True, auto_delete=True, robust=False)
            await self._observer.consume(self._on_event, no_ack=True)
        for pattern in keys.component_event_patterns(role, instance):
            await self._observer.bind(keys.CONTROL_EXCHANGE, routing_key=pattern)
        env = BeeEnv(amqp_url=AMQP_URL, swarm_id=self.swarm_id, role=role, instance=instance, work_in=work_in,
                     work_out=work_out, sut_url=sut_url, bee_config=config, enabled=enabled, status_interval_s=1.0,
                     allowed_targets=allowed_targets or [])
        bee = Bee(env, worker)
        running = Running(role, instance, bee, asyncio.create_task(bee.run()))
        self.bees[name] = running
        self.suffixes |= {s for s in (work_in, work_out) if s}
        full = keys.status_key("status-full", role, instance)
        await self.expect(lambda e: e.routing_key == full)
        return running

    async def signal(self, name: str, signal_name: str, args: dict[str, Any] | None = None) -> Event:
        running = self.bees[name]
        sig = Signal(signal=signal_name, correlation_id=new_id(), idempotency_key=new_id(), swarm_id=self.swarm_id,
                     role=running.role, instance=running.instance, command_target="instance", args=args or {})
        await self.bus.publish(sig.routing_key(), sig)
        return await self.expect(lambda e: e.correlation_id == sig.correlation_id)

    async def status(self, name: str) -> dict[str, Any]:
        return (await self.signal(name, "status-request")).body

    async def update(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return (await self.signal(name, "config-update", {"patch": patch})).body

    def queue(self, suffix: str) -> str:
        return keys.hive_queue(self.swarm_id, suffix)

    async def send_work(self, suffix: str, *bodies: dict[str, Any]) -> None:
        hive = (await self.bus.declare_exchange(default_topology().hive_exchange(self.swarm_id))).name
        for body in bodies:
            await self.bus.publish(suffix, body, exchange=hive)

    async def take(self, suffix: str, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """``count`` messages from a work queue (consumed)."""
        channel = await self.bus.connection.channel()
        try:
            queue = await channel.get_queue(self.queue(suffix), ensure=False)
            bodies: list[dict[str, Any]] = []
            async with asyncio.timeout(timeout):
                while len(bodies) < count:
                    message = await queue.get(no_ack=True, fail=False)
                    if message is None:
                        await asyncio.sleep(0.05)
                    else:
                        bodies.append(json.loads(message.body))
            return bodies
        finally:
            await channel.close()

    async def depth(self, suffix: str) -> int:
        channel = await self.bus.connection.channel()
        try:
            queue = await channel.declare_queue(self.queue(suffix), passive=True, robust=False)
            return queue.declaration_result.message_count or 0
        finally:
            await channel.close()

    async def close(self) -> None:
        for running in self.bees.values():
            running.bee.stop()
        results = await asyncio.gather(*(asyncio.wait_for(r.task, 10) for r in self.bees.values()),
                                       return_exceptions=True)
        for running in self.bees.values():
            await self.bus.delete_queue(keys.component_queue(running.role, running.instance))
        for suffix in self.suffixes:
            await self.bus.delete_queue(self.queue(suffix))
        await self.bus.delete_exchange(keys.hive_exchange(self.swarm_id))
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, failures


@dataclass
class Sut:
    url: str
    runner: web.AppRunner

    async def stats(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.get(self.url + "/_sut/stats") as response:
            assert response.status == 200
            return await response.json()

    async def count(self, path: str) -> int:
        return (await self.stats())["byPath"].get(path, 0)

    async def counted_over(self, path: str, seconds: float) -> int:
        before = await self.count(path)
        await asyncio.sleep(seconds)
        return await self.count(path) - before



async def _start_sut(**env: Any) -> Sut:
    runner, port = await start(SutEnv(sut_host="127.0.0.1", sut_port=0, **env))
    return Sut(f"http://127.0.0.1:{port}", runner)


def _closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest_asyncio.fixture(scope="module")
async def bus() -> AsyncIterator[Bus]:
    bus = await Bus(AMQP_URL, default_topology(), name="test-bee-pipeline").connect()
    try:
        yield bus
    finally:
        await bus.close()


@pytest_asyncio.fixture(scope="module")
async def sut() -> AsyncIterator[Sut]:
    server = await _start_sut(sut_latency_ms=SUT_LATENCY_MS)
    try:
        yield server
    finally:
        await server.runner.cleanup()


@pytest_asyncio.fixture
async def swarm(bus: Bus) -> AsyncIterator[TestSwarm]:
    test_swarm = TestSwarm(bus)
    try:
        yield test_swarm
    finally:
        await test_swarm.close()


@pytest_asyncio.fixture(scope="module")
async def pipeline(bus: Bus, sut: Sut) -> AsyncIterator[TestSwarm]:
    """generator (40/s) -> requests -> moderator (20/s) -> paced -> processor -> results -> postprocessor."""
    test_swarm = TestSwarm(bus)
    try:
        await test_swarm.start("post", "postprocessor", Postprocessor(), {}, work_in="results")
        await test_swarm.start("proc", "processor", Processor(), {"timeoutMs": 2000}, work_in="paced",
                               work_out="results", sut_url=sut.url)
        await test_swarm.start("mod", "moderator", Moderator(), {"mode": "fixed-rate", "ratePerSec": 20},
                               work_in="requests", work_out="paced")
        await test_swarm.start("gen", "generator", Generator(),
                               {"ratePerSec": 40, "message": {"request": {"path": "/orders"}}}, work_out="requests")
        yield test_swarm
    finally:
        await test_swarm.close()


# --- the pipeline --------------------------------------------------------------------------


async def test_pipeline_calls_the_sut_and_reports_latency(pipeline: TestSwarm, sut: Sut) -> None:
    async with asyncio.timeout(10):
        while await sut.count("/orders") < 20:
            await asyncio.sleep(0.2)
    stats = await sut.stats()
    assert stats["byMethod"]["GET"] >= 20 and stats["byStatus"]["200"] >= 20 and stats["startedAt"]
    assert "/_sut/stats" not in stats["byPath"]  # the SUT's own endpoints are not counted

    processor = await pipeline.status("proc")
    http = processor["data"]["http"]
    assert http["requests"] >= 20 and http["byStatus"]["200"] == http["requests"] and http["errors"] == {}
    assert processor["totals"]["errors"] == 0 and processor["totals"]["published"] >= 20

    post = await pipeline.status("post")
    data = post["data"]
    latency = data["latency"]
    assert latency["count"] >= 15 and data["ok"] == latency["count"] and data["failed"] == 0
    assert data["errors"] == {}
    assert SUT_LATENCY_MS <= latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"] < 2000
    assert post["totals"]["processed"] == latency["count"]

    instance = pipeline.bees["post"].instance
    delta_key = keys.status_key("status-delta", "postprocessor", instance)
    delta = await pipeline.expect(lambda e: e.routing_key == delta_key and e.body["data"]["latency"]["count"] > 0)
    assert {"latency", "errors", "ok", "failed", "rates"} <= set(delta.body["data"])


async def test_moderator_forwards_at_its_rate_and_a_new_rate_applies_at_once(pipeline: TestSwarm, sut: Sut) -> None:
    fast = await sut.counted_over("/orders", 2.0)
    assert 30 <= fast <= 50, fast  # 20/s

    outcome = await pipeline.update("mod", {"ratePerSec": 5})
    assert outcome["result"] == "success" and outcome["state"]["details"]["config"]["ratePerSec"] == 5
    await asyncio.sleep(0.3)
    slow = await sut.counted_over("/orders", 2.0)
    assert 6 <= slow <= 15, slow  # 5/s

    # The generator produces faster than that: the backlog waits in the moderator's queue.
    moderator = await pipeline.status("mod")
    backlog = moderator["queueStats"][pipeline.queue("requests")]
    assert backlog["messages"] > 20 and backlog["consumers"] == 1
    assert moderator["data"]["moderation"] == {"mode": "fixed-rate", "ratePerSec": 5}

    refused = await pipeline.update("mod", {"ratePerSec": 0})
    assert refused["result"] == "error" and refused["details"]["errors"][0]["field"] == "ratePerSec"


async def test_processor_takes_a_new_connection_limit_and_keeps_calling(pipeline: TestSwarm, sut: Sut) -> None:
    await pipeline.update("mod", {"ratePerSec": 20})
    outcome = await pipeline.update("proc", {"maxConnections": 2, "headers": {"X-Probe": "1"}})
    assert outcome["result"] == "success" and outcome["state"]["details"]["config"]["maxConnections"] == 2
    await asyncio.sleep(0.3)
    assert await sut.counted_over("/orders", 1.0) >= 10
    processor = await pipeline.status("proc")
    assert processor["queueStats"][pipeline.queue("paced")]["consumers"] == 1
    assert processor["data"]["http"]["errors"] == {}


# --- one bee at a time ------------------------------------------------------------------------


async def test_processor_reports_connection_errors_and_acks(swarm: TestSwarm) -> None:
    port = _closed_port()
    closed = f"http://127.0.0.1:{port}"
    await swarm.start("proc", "processor", Processor(), {"baseUrl": closed, "timeoutMs": 2000},
                      work_in="in", work_out="out", allowed_targets=[f"127.0.0.1:{port}"])
    await swarm.send_work("in", *({"seq": i} for i in range(1, 6)))
    results = await swarm.take("out", 5)
    assert sorted(r["seq"] for r in results) == [1, 2, 3, 4, 5]
    assert all(r["ok"] is False and r["status"] is None and r["errorKind"] == CONNECTION for r in results)
    assert all(r["path"] == "/" and r["method"] == "GET" and r["latencyMs"] >= 0 for r in results)

    status = await swarm.status("proc")
    assert status["data"]["http"]["errors"] == {CONNECTION: 5} and status["data"]["http"]["byStatus"] == {}
    assert status["totals"]["errors"] == 5 and status["totals"]["processed"] == 5
    assert status["queueStats"][swarm.queue("in")]["messages"] == 0  # acked, not requeued

    # Without CP_SUT_URL the address cannot be taken away.
    refused = await swarm.update("proc", {"baseUrl": None})
    assert refused["result"] == "error" and refused["code"] == "invalid-config"
    assert refused["details"]["errors"][0]["field"] == "baseUrl" and "CP_SUT_URL" in refused["message"]


async def test_moderator_forwards_every_message_once_across_mode_changes(swarm: TestSwarm) -> None:
    await swarm.start("mod", "moderator", Moderator(), {"mode": "fixed-rate", "ratePerSec": 4},
                      work_in="in", work_out="out")
    await swarm.send_work("in", *({"seq": i} for i in range(1, 21)))
    await asyncio.sleep(1.0)
    assert 3 <= await swarm.depth("out") <= 7
    # The consumer is replaced for the new prefetch; the messages the old one held are
    # forwarded and acked, not handed back and forwarded again.
    assert (await swarm.update("mod", {"mode": "pass-through"}))["result"] == "success"
    results = await swarm.take("out", 20)
    assert sorted(r["seq"] for r in results) == list(range(1, 21))
    await asyncio.sleep(0.3)
    assert await swarm.depth("out") == 0 and await swarm.depth("in") == 0
    status = await swarm.status("mod")
    assert status["totals"]["published"] == 20 and status["totals"]["errors"] == 0


async def test_trigger_calls_the_sut_periodically(swarm: TestSwarm, sut: Sut) -> None:
    path = f"/ping-{swarm.swarm_id}"
    await swarm.start("trig", "trigger", Trigger(), {"intervalS": 0.25, "path": path}, work_out="out",
                      sut_url=sut.url)
    await asyncio.sleep(0.2)
    calls = await sut.counted_over(path, 1.5)
    assert 4 <= calls <= 8, calls
    status = await swarm.status("trig")
    trigger = status["data"]["trigger"]
    assert trigger["lastStatus"] == 200 and trigger["lastErrorKind"] is None and trigger["lastLatencyMs"] > 0
    assert trigger["byKind"]["ok"] == trigger["calls"] >= 5
    results = await swarm.take("out", 3)
    assert [r["seq"] for r in results] == [1, 2, 3] and all(r["ok"] and r["path"] == path for r in results)

    await swarm.update("trig", {"enabled": False})
    await asyncio.sleep(0.1)
    assert await sut.counted_over(path, 0.8) == 0


async def test_a_trigger_calls_nothing_but_its_sut(swarm: TestSwarm, sut: Sut) -> None:
    elsewhere = await _start_sut()  # on loopback like the broker's management API, but not the SUT
    try:
        path = f"/ping-{swarm.swarm_id}"
        await swarm.start("guarded", "trigger", Trigger(), {"intervalS": 0.2, "path": path}, sut_url=sut.url)
        for url in ("http://127.0.0.1:15672/api/whoami", elsewhere.url + "/steal"):
            refused = await swarm.update("guarded", {"url": url})
            assert refused["result"] == "error" and refused["code"] == "invalid-config", refused
            assert [e["field"] for e in refused["details"]["errors"]] == ["url"]
        # Calls go on to the SUT: two more after the refusals, and none ever reached elsewhere.
        seen = await sut.count(path)
        async with asyncio.timeout(10):
            while await sut.count(path) < seen + 2:
                await asyncio.sleep(0.1)
        assert (await elsewhere.stats())["requests"] == 0, "nothing reached it"
    finally:
        await elsewhere.runner.cleanup()


async def test_generator_single_request_sends_one_message_while_disabled(swarm: TestSwarm) -> None:
    await swarm.start("gen", "generator", Generator(), {"ratePerSec": 50}, work_out="out", enabled=False)
    outcome = await swarm.update("gen", {"singleRequest": True})
    assert outcome["result"] == "success" and outcome["state"]["enabled"] is False
    assert outcome["state"]["details"]["config"].get("singleRequest", False) is False
    await asyncio.sleep(0.5)
    assert await swarm.depth("out") == 1
    await swarm.update("gen", {"ratePerSec": 40})  # no second message: the command was not stored
    await asyncio.sleep(0.3)
    assert await swarm.depth("out") == 1
    status = await swarm.status("gen")
    assert status["totals"]["published"] == 1 and status["data"]["config"].get("singleRequest", False) is False


class HookConfig(Strict):
    level: int = 0


class Hooks(Worker[HookConfig]):
    """Records the SDK hooks it is called through; refuses to act on level 13."""

    Config = HookConfig
    prefetch = 3

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def setup(self, ctx: BeeContext[HookConfig]) -> None:
        self.calls.append("setup")

    async def on_config(self, ctx: BeeContext[HookConfig], previous: HookConfig) -> None:
        self.calls.append(f"on_config {previous.level}->{ctx.config.level}")
        if ctx.config.level == 13:
            raise RuntimeError("unlucky level")

    async def teardown(self, ctx: BeeContext[HookConfig]) -> None:
        self.calls.append("teardown")

    async def handle(self, ctx: BeeContext[HookConfig], body: dict[str, Any]) -> None:
        self.calls.append("handle")

    def report(self, ctx: BeeContext[HookConfig]) -> dict[str, Any]:
        return {"level": ctx.config.level}


async def test_worker_hooks(swarm: TestSwarm) -> None:
    worker = Hooks()
    running = await swarm.start("hooks", "hooks", worker, {"level": 1}, work_in="in")
    assert worker.calls == ["setup"]
    assert (await swarm.update("hooks", {"level": 2}))["result"] == "success"
    status = await swarm.status("hooks")
    assert status["data"]["level"] == 2 and status["data"]["config"] == {"level": 2} and "rates" in status["data"]
    delta_key = keys.status_key("status-delta", "hooks", running.instance)
    delta = await swarm.expect(lambda e: e.routing_key == delta_key and e.body["data"].get("level") == 2)
    assert "rates" in delta.body["data"]

    failed = await swarm.update("hooks", {"level": 13})
    assert failed["result"] == "error" and failed["code"] == "apply-failed" and "unlucky" in failed["message"]
    assert failed["state"]["details"]["config"] == {"level": 13}  # applied; the worker failed to act on it

    running.bee.stop()
    await asyncio.wait_for(running.task, 10)
    assert worker.calls == ["setup", "on_config 1->2", "on_config 2->13", "teardown"]


# --- HTTP calls and the system under test ---------------------------------------------------------


async def test_calls_are_classified_against_a_real_server(sut: Sut) -> None:
    failing = await _start_sut(sut_error_rate=1.0)
    slow = await _start_sut(sut_latency_ms=500)
    try:
        async with new_session(4, Egress()) as session:
            async def kind(url: str, path: str = "/", timeout_s: float = 2.0, body: Any = None) -> Any:
                result = await call(session, HttpRequest("POST", url + path, path, body, {}, timeout_s))
                return result.status, result.error_kind

            assert await kind(sut.url, body={"a": 1}) == (200, None)
            assert await kind(sut.url, "/_sut/nothing-here") == (404, HTTP_4XX)
            assert await kind(failing.url) == (500, HTTP_5XX)
            assert await kind(slow.url, timeout_s=0.1) == (None, TIMEOUT)
            assert await kind(f"http://127.0.0.1:{_closed_port()}") == (None, CONNECTION)
            assert await kind(sut.url, body={1, 2}) == (None, INVALID_REQUEST)  # not JSON
            assert await kind("http://127.0.0.1:99999") == (None, INVALID_REQUEST)  # no such port
        stats = await failing.stats()
        assert stats["requests"] == 1 and stats["byStatus"] == {"500": 1} and stats["byMethod"] == {"POST": 1}
    finally:
        await failing.runner.cleanup()
        await slow.runner.cleanup()


async def test_sut_process_serves_and_stops_on_sigterm() -> None:
    port = _closed_port()
    env = os.environ | {"CP_SUT_HOST": "127.0.0.1", "CP_SUT_PORT": str(port)}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bees.sut", cwd=ROOT, env=env,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(15):
                while True:
                    try:
                        async with http.get(url + "/_sut/healthz") as response:
                            assert response.status == 200 and await response.json() == {"ok": True}
                            break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.1)
            async with http.put(url + "/a/b", json={"x": 1}) as response:
                assert response.status == 200 and await response.json() == {"ok": True, "n": 1}
            async with http.get(url + "/_sut/stats") as response:
                stats = await response.json()
            assert stats["requests"] == 1 and stats["byPath"] == {"/a/b": 1} and stats["byMethod"] == {"PUT": 1}
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, stderr.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
