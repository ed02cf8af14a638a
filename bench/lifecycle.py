"""Lifecycle benchmark: the control plane against references measured in the same run.

    .venv/bin/python -m bench.lifecycle [--rt-n 50] [--bare-n 200] [--create-n 5]
                                         [--http-n 500] [--http-c 20] [--rounds 3] [--json FILE]

It runs a real stack in this process (gateway on a real TCP port, host controller,
in-process swarm-controllers), a fresh RabbitMQ vhost and a temporary SQLite database, with
bees as real containers of ``controlplane:local``, and measures:

1. signal round trip: ``POST /api/swarms/{id}/start|stop`` (alternating) until the matching
   ``ev.ready.swarm-*.<id>`` reaches an AMQP watcher on ``ph.control``; reference: a bare
   aio-pika request/reply over a topic exchange with publisher confirms;
2. create to ready: ``POST create`` until ``ev.ready.swarm-create.<id>`` for a one-bee swarm;
   reference: ``docker run`` of the same image with a Python that imports aio_pika and
   pydantic, until the container has exited;
3. gateway throughput of idempotent replays (the same start body and key, again and again)
   against ``GET /healthz``, both at the same concurrency, from a client in its own process.

Everything it creates (swarms, containers, the vhost, the database) is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import docker
from aiohttp import web

from bench.common import (MANAGEMENT, REPO_ROOT, BenchError, environment, header, ms, progress, replay_against_healthz,
                          run_and_print)
from bench.httpload import percentile
from controlplane.bus import Bus
from controlplane.bus.management import Management
from controlplane.config import Settings
from controlplane.contract import keys
from controlplane.contract.topology import load_topology
from controlplane.runtime.docker import DockerRuntime
from controlplane.runtime.labels import filter_for
from controlplane.runtime.policy import RuntimePolicy
from tests.conftest import make_settings

DOCKER_URL = "unix:///var/run/docker.sock"
IMAGE = "controlplane:local"
TEMPLATE = "generator-demo"
BEE_NAME = "generator"  # the one bee of generator-demo
REFERENCE_COMMAND = ["python", "-c", "import aio_pika, pydantic"]
REFERENCE_LABEL = "controlplane.bench"  # not controlplane.managed: the control plane never sees these

RT_WARMUP = 2       # start + stop before the measured round trips
BARE_WARMUP = 20
HTTP_WARMUP = 100



def summary(values: list[float]) -> dict[str, float]:
    """p50 / p95 / mean / min / max of seconds, in milliseconds."""
    return {"n": len(values), "p50": ms(percentile(values, 50)), "p95": ms(percentile(values, 95)),
            "mean": ms(sum(values) / len(values)) if values else float("nan"),
            "min": ms(min(values)) if values else float("nan"), "max": ms(max(values)) if values else float("nan")}


# --- infrastructure ------------------------------------------------------------------------


async def broker_version() -> str:
    try:
        async with Management(MANAGEMENT) as management:
            overview = await management.overview()
        return f"RabbitMQ {overview.get('rabbitmq_version')} (Erlang {overview.get('erlang_version')})"
    except Exception as exc:  # noqa: BLE001 - informative only
        return f"RabbitMQ (version unknown: {exc!r})"


def bench_settings(vhost: str, owner: str, tmp: Path) -> Settings:
    """The test suite's settings for a throwaway control plane on this machine."""
    return make_settings(vhost, owner, tmp, project_image=IMAGE, controller_mode="inprocess")


@asynccontextmanager
async def control_plane(settings: Settings, runtime: DockerRuntime) -> AsyncIterator[str]:
    """Gateway (AppRunner + TCPSite on a free port) and host controller; yields the base URL."""
    from controlplane.controller.host import HostController
    from controlplane.gateway.app import open_gateway

    async with AsyncExitStack() as stack:
        bus = await Bus(settings.amqp_url.get_secret_value(), load_topology(settings.topology_file), "bench").connect()
        stack.push_async_callback(bus.close)
        app = await stack.enter_async_context(open_gateway(settings, bus))
        host = await HostController(bus, runtime, settings).start()
        stack.push_async_callback(host.stop)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}"


class Watcher:
    """Events seen by the watcher process (bench.watch), each with its arrival time there."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        self._arrived = asyncio.Event()

    def add(self, arrived: float, key: str, body: dict[str, Any]) -> None:
        self.events.append((arrived, key, body))
        self._arrived.set()

    def mark(self) -> int:
        return len(self.events)

    async def wait_for(self, match: Callable[[str, dict[str, Any]], bool], timeout: float,
                       since: int = 0) -> tuple[float, str, dict[str, Any]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        index = since
        while True:
            while index < len(self.events):
                arrived, key, body = self.events[index]
                index += 1
                if match(key, body):
                    return arrived, key, body
            self._arrived.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BenchError(f"no matching event within {timeout:g}s")
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                pass

    async def outcome(self, envelope: dict[str, Any], timeout: float, since: int = 0) -> float:
        """Arrival time of the envelope's success event; an error event raises."""
        watch = envelope["watch"]
        ok, err, cid = watch["successTopic"], watch["errorTopic"], envelope["correlationId"]
        arrived, key, body = await self.wait_for(
            lambda k, b: k in (ok, err) and b.get("correlationId") == cid, timeout, since)
        if key == err:
            raise BenchError(f"{key}: {body.get('code')}: {body.get('message')}")
        return arrived


@asynccontextmanager
async def watching(amqp_url: str, *patterns: str) -> AsyncIterator[Watcher]:
    """Run bench.watch in its own process and collect what it sees."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.watch", amqp_url, *patterns, cwd=str(REPO_ROOT),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 20)
    assert proc.stdout is not None and proc.stdin is not None
    watcher = Watcher()
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not first or not json.loads(first).get("ready"):
            raise BenchError(f"watcher did not start: {first!r}")

        async def pump() -> None:
            assert proc.stdout is not None
            while line := await proc.stdout.readline():
                item = json.loads(line)
                watcher.add(item["t"], item["key"], item["body"])

        reader = asyncio.create_task(pump())
        try:
            yield watcher
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    finally:
        if proc.returncode is None:
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


class Refused(BenchError):
    def __init__(self, status: int, answer: dict[str, Any], text: str) -> None:
        super().__init__(text)
        self.status, self.answer = status, answer


@dataclass
class Api:
    http: aiohttp.ClientSession
    base: str

    async def act(self, swarm_id: str, action: str, **body: Any) -> tuple[float, float, dict[str, Any]]:
        """POST an action with a new key; returns (sent, answered, envelope) with perf_counter times."""
        payload = json.dumps({"idempotencyKey": str(uuid.uuid4()), **body})
        sent = time.perf_counter()
        async with self.http.post(f"{self.base}/api/swarms/{swarm_id}/{action}", data=payload,
                                  headers={"Content-Type": "application/json"}) as resp:
            answer = await resp.json()
            answered = time.perf_counter()
        if resp.status != 202:
            raise Refused(resp.status, answer, f"POST {action} {swarm_id}: {resp.status} {answer}")
        return sent, answered, answer


# --- 1. signal round trip --------------------------------------------------------------------


# The hops of a start or stop, as the watcher sees each message go by (it also binds sig.#).
HOPS = ("gateway: POST -> sig.swarm-* published",
        "swarm-controller: sig -> sig.config-update to the bee",
        "bee: config-update -> ev.ready.config-update",
        "swarm-controller: bee's ev.ready -> ev.ready.swarm-*")


@dataclass
class RoundTrips:
    total: list[float] = field(default_factory=list)       # POST sent -> ev.ready.* arrived
    accepted: list[float] = field(default_factory=list)    # POST sent -> 202 read
    by_action: dict[str, list[float]] = field(default_factory=lambda: {"start": [], "stop": []})
    hops: dict[str, list[float]] = field(default_factory=lambda: {h: [] for h in HOPS})
    # Round trips where the outcome event reached the watcher before the 202 reached the caller.
    event_before_202: int = 0
    # POSTs sent right after the previous outcome event that were refused 409 invalid-state.
    conflicts: int = 0
    # Measured operations whose stored outcome (GET /api/operations) is not the swarm's own.
    foreign_outcomes: int = 0


async def wait_status(api: Api, swarm_id: str, wanted: set[str], timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        async with api.http.get(f"{api.base}/api/swarms/{swarm_id}") as resp:
            if resp.status == 200 and (await resp.json())["status"] in wanted:
                return
        await asyncio.sleep(0.005)
    raise BenchError(f"swarm {swarm_id} did not reach {sorted(wanted)} within {timeout:g}s")


async def control_plane_round_trips(api: Api, watcher: Watcher, swarm_id: str, n: int) -> RoundTrips:
    """Alternate start and stop (a created swarm is Ready, so start comes first).

    Each POST goes out as soon as the previous outcome event arrived, as a caller reacting to
    events would send it. A POST refused with 409 invalid-state is counted, the read model is
    awaited (untimed) and the action sent again with a new key; the timed round trip is the
    accepted one.
    """
    result = RoundTrips()
    operations: list[tuple[str, str]] = []
    bee = keys.bee_instance(swarm_id, BEE_NAME)
    for i in range(RT_WARMUP + n):
        action = "start" if i % 2 == 0 else "stop"
        while True:
            since = watcher.mark()
            try:
                sent, answered, envelope = await api.act(swarm_id, action)
                break
            except Refused as exc:
                if exc.status != 409 or exc.answer.get("error") != "invalid-state":
                    raise
                if i >= RT_WARMUP:
                    result.conflicts += 1
                await wait_status(api, swarm_id, {"Ready", "Stopped"} if action == "start" else {"Running"})
        arrived = await watcher.outcome(envelope, 60, since)
        if i < RT_WARMUP:
            continue
        cid = envelope["correlationId"]

        async def seen(key: str, cid: str = cid, since: int = since) -> float:
            found = await watcher.wait_for(lambda k, body: k == key and body.get("correlationId") == cid, 5, since)
            return found[0]

        marks = [sent, await seen(f"sig.swarm-{action}.{swarm_id}"), await seen(f"sig.config-update.generator.{bee}"),
                 await seen(f"ev.ready.config-update.generator.{bee}"), arrived]
        for hop, (start, end) in zip(HOPS, itertools.pairwise(marks), strict=True):
            result.hops[hop].append(end - start)
        result.total.append(arrived - sent)
        result.accepted.append(answered - sent)
        result.by_action[action].append(arrived - sent)
        result.event_before_202 += arrived < answered
        operations.append((envelope["correlationId"], f"swarm-{action}"))
    for cid, signal in operations:  # after the timed loop, so the reads cost it nothing
        async with api.http.get(f"{api.base}/api/operations/{cid}") as resp:
            op = await resp.json()
        result.foreign_outcomes += (op.get("outcome") or {}).get("signal") != signal
    return result


async def bare_round_trips(amqp_url: str, n: int) -> list[float]:
    """Request/reply with aio-pika only, mirroring the bus: durable topic exchange, durable
    queues, persistent JSON messages, publisher confirms on both legs, acks after the work.
    Client and responder have connections of their own."""
    exchange_name = f"bench.rt.{uuid.uuid4().hex[:6]}"
    client = await aio_pika.connect(amqp_url, client_properties={"connection_name": "bench-rt-client"})
    responder = await aio_pika.connect(amqp_url, client_properties={"connection_name": "bench-rt-responder"})
    try:
        c_channel = await client.channel(publisher_confirms=True)
        r_channel = await responder.channel(publisher_confirms=True)
        await r_channel.set_qos(prefetch_count=16)
        await c_channel.set_qos(prefetch_count=16)
        c_exchange = await c_channel.declare_exchange(exchange_name, type="topic", durable=True)
        r_exchange = await r_channel.declare_exchange(exchange_name, type="topic", durable=True)
        requests = await r_channel.declare_queue(f"{exchange_name}.requests", durable=True)
        await requests.bind(r_exchange, routing_key="sig.#")
        replies = await c_channel.declare_queue(f"{exchange_name}.replies", durable=True)
        await replies.bind(c_exchange, routing_key="ev.#")
        pending: dict[str, asyncio.Future[float]] = {}

        async def respond(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            request = json.loads(message.body)
            reply = {"correlationId": request["correlationId"], "result": "success", "state": {"status": "Running"}}
            await r_exchange.publish(
                aio_pika.Message(json.dumps(reply).encode(), content_type="application/json",
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                 correlation_id=message.correlation_id),
                routing_key="ev.ready.bench-rt.bench")
            await message.ack()

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            arrived = time.perf_counter()
            future = pending.pop(message.correlation_id or "", None)
            if future is not None and not future.done():
                future.set_result(arrived)
            await message.ack()

        request_tag = await requests.consume(respond)
        reply_tag = await replies.consume(on_reply)
        loop = asyncio.get_running_loop()
        times: list[float] = []
        for i in range(BARE_WARMUP + n):
            cid = str(uuid.uuid4())
            body = {"signal": "bench-rt", "correlationId": cid, "idempotencyKey": str(uuid.uuid4()),
                    "scope": {"swarmId": "bench"}, "args": {"timeoutMs": 60000}}
            future = loop.create_future()
            pending[cid] = future
            sent = time.perf_counter()
            await c_exchange.publish(
                aio_pika.Message(json.dumps(body).encode(), content_type="application/json",
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT, correlation_id=cid),
                routing_key="sig.bench-rt.bench")
            arrived = await asyncio.wait_for(future, 10)
            if i >= BARE_WARMUP:
                times.append(arrived - sent)
        await requests.cancel(request_tag)
        await replies.cancel(reply_tag)
        await c_channel.queue_delete(requests.name)
        await c_channel.queue_delete(replies.name)
        await c_channel.exchange_delete(exchange_name)
        return times
    finally:
        await client.close()
        await responder.close()


# --- 2. create to ready ------------------------------------------------------------------------


@dataclass
class Creates:
    total: list[float] = field(default_factory=list)       # POST sent -> ev.ready.swarm-create
    accepted: list[float] = field(default_factory=list)    # POST sent -> 202
    signal: list[float] = field(default_factory=list)      # POST sent -> sig.swarm-create published
    bee_up: list[float] = field(default_factory=list)      # sig.swarm-create -> bee's first ev.status-full
    handshake: list[float] = field(default_factory=list)   # bee's status-full -> ev.ready.swarm-controller
    outcome: list[float] = field(default_factory=list)     # ev.ready.swarm-controller -> ev.ready.swarm-create
    removes: list[float] = field(default_factory=list)     # POST remove -> ev.ready.swarm-remove
    reference: list[float] = field(default_factory=list)   # docker run -> container exited


async def create_once(api: Api, watcher: Watcher, swarm_id: str, creates: Creates) -> None:
    bee_instance = keys.bee_instance(swarm_id, BEE_NAME)
    bee_status = keys.status_key("status-full", "generator", bee_instance)
    since = watcher.mark()
    sent, answered, envelope = await api.act(swarm_id, "create", templateId=TEMPLATE)
    ready = await watcher.outcome(envelope, 120, since)
    cid = envelope["correlationId"]
    signal, _, _ = await watcher.wait_for(
        lambda k, b: k == f"sig.swarm-create.{swarm_id}" and b.get("correlationId") == cid, 5, since)
    bee_up, _, _ = await watcher.wait_for(lambda k, _b: k == bee_status, 5, since)
    handshake, _, _ = await watcher.wait_for(
        lambda k, b: k == keys.controller_handshake_key(swarm_id) and b.get("correlationId") == cid, 5, since)
    creates.total.append(ready - sent)
    creates.accepted.append(answered - sent)
    creates.signal.append(signal - sent)
    creates.bee_up.append(bee_up - signal)
    creates.handshake.append(handshake - bee_up)
    creates.outcome.append(ready - handshake)
    since = watcher.mark()
    sent, _, envelope = await api.act(swarm_id, "remove")
    creates.removes.append(await watcher.outcome(envelope, 120, since) - sent)


def reference_run_once(client: docker.DockerClient, run_id: str) -> float:
    """Blocking: start the image, wait for the exit, remove the container (untimed)."""
    started = time.perf_counter()
    container = client.containers.run(IMAGE, REFERENCE_COMMAND, detach=True, network_mode="host",
                                      labels={REFERENCE_LABEL: run_id})
    try:
        status = container.wait(timeout=120)
        elapsed = time.perf_counter() - started
        if status.get("StatusCode") != 0:
            raise BenchError(f"reference container exited with {status}: {container.logs(tail=20)!r}")
        return elapsed
    finally:
        container.remove(force=True)


def remove_reference_containers(client: docker.DockerClient, run_id: str) -> None:
    for container in client.containers.list(all=True, filters={"label": f"{REFERENCE_LABEL}={run_id}"}):
        container.remove(force=True)


# --- 3. gateway throughput -----------------------------------------------------------------------


async def throughput(base: str, swarm_id: str, key: str, n: int, concurrency: int, rounds: int) -> dict[str, Any]:
    replay = {"method": "POST", "url": f"{base}/api/swarms/{swarm_id}/start", "body": {"idempotencyKey": key}}
    return await replay_against_healthz(base, replay, n, concurrency, rounds, HTTP_WARMUP)


def median(values: list[float]) -> float:
    return percentile(values, 50)


# --- the run ---------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:6]
    owner = f"bench-{run_id}"
    tmp = Path(tempfile.mkdtemp(prefix="cp-bench-"))
    policy = RuntimePolicy.from_settings(Settings(instance_id=owner, allow_host_network=True))
    runtime = DockerRuntime(url=DOCKER_URL, workers=8, policy=policy)
    docker_client = docker.DockerClient(base_url=DOCKER_URL)
    loop = asyncio.get_running_loop()
    results: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        await runtime.ping()
        if not await runtime.image_exists(IMAGE):
            raise BenchError(f"image {IMAGE} is missing: run `bash scripts/build-images.sh`")
        results["environment"] = environment(await broker_version(),
                                             docker=f"Docker {docker_client.version().get('Version')}")
        async with Management(MANAGEMENT) as management, management.scratch_vhost("cp-bench") as vhost:
            settings = bench_settings(vhost, owner, tmp)
            amqp_url = settings.amqp_url.get_secret_value()
            async with AsyncExitStack() as stack:
                base = await stack.enter_async_context(control_plane(settings, runtime))
                watcher = await stack.enter_async_context(
                    watching(amqp_url, "ev.ready.#", "ev.error.#", "ev.status-full.#", "sig.#"))
                http = await stack.enter_async_context(aiohttp.ClientSession())
                api = Api(http, base)
                live: set[str] = set()

                async def remove_live() -> None:
                    for swarm_id in sorted(live):
                        try:
                            since = watcher.mark()
                            _, _, envelope = await api.act(swarm_id, "remove")
                            await watcher.outcome(envelope, 60, since)
                        except Exception as exc:  # noqa: BLE001 - containers are removed by label below anyway
                            print(f"warning: remove {swarm_id}: {exc}", file=sys.stderr)
                    live.clear()

                stack.push_async_callback(remove_live)

                # 1. signal round trip, and 3. replays on the same swarm
                swarm_id = f"bench-rt-{run_id}"
                progress("create the round-trip swarm")
                live.add(swarm_id)
                since = watcher.mark()
                _, _, envelope = await api.act(swarm_id, "create", templateId=TEMPLATE)
                await watcher.outcome(envelope, 120, since)
                progress(f"signal round trips: {args.rt_n} x start/stop")
                rt = await control_plane_round_trips(api, watcher, swarm_id, args.rt_n)
                progress(f"bare aio-pika round trips: {args.bare_n}")
                bare = await bare_round_trips(amqp_url, args.bare_n)
                results["round_trip"] = {
                    "control_plane": summary(rt.total), "post_to_202": summary(rt.accepted),
                    "start": summary(rt.by_action["start"]), "stop": summary(rt.by_action["stop"]),
                    "hops": {hop: summary(v) for hop, v in rt.hops.items()},
                    "event_before_202": rt.event_before_202, "conflicts": rt.conflicts,
                    "foreign_outcomes": rt.foreign_outcomes, "bare": summary(bare),
                }
                results["round_trip"]["ratio_p50"] = results["round_trip"]["control_plane"]["p50"] / results["round_trip"]["bare"]["p50"]

                key = str(uuid.uuid4())
                since = watcher.mark()
                async with http.post(f"{base}/api/swarms/{swarm_id}/start", json={"idempotencyKey": key}) as resp:
                    envelope = await resp.json()
                    if resp.status != 202:
                        raise BenchError(f"start for the replay key: {resp.status} {envelope}")
                await watcher.outcome(envelope, 60, since)
                progress(f"gateway throughput: {args.rounds} x ({args.http_n} replays + {args.http_n} healthz), "
                          f"concurrency {args.http_c}")
                tp = await throughput(base, swarm_id, key, args.http_n, args.http_c, args.rounds)
                replay_rps = median([r["rps"] for r in tp["replay"]])
                health_rps = median([r["rps"] for r in tp["healthz"]])
                results["throughput"] = {**tp, "replay_rps": replay_rps, "healthz_rps": health_rps,
                                         "ratio": replay_rps / health_rps}
                await remove_live()

                # 2. create to ready, interleaved with the docker reference
                creates = Creates()
                for i in range(args.create_n):
                    progress(f"create to ready {i + 1}/{args.create_n}, and docker run reference")
                    swarm_id = f"bench-c{i}-{run_id}"
                    live.add(swarm_id)
                    await create_once(api, watcher, swarm_id, creates)
                    live.discard(swarm_id)
                    creates.reference.append(
                        await loop.run_in_executor(None, reference_run_once, docker_client, run_id))
                results["create"] = {
                    "control_plane": summary(creates.total), "post_to_202": summary(creates.accepted),
                    "signal": summary(creates.signal), "bee_up": summary(creates.bee_up),
                    "handshake": summary(creates.handshake), "outcome": summary(creates.outcome),
                    "remove": summary(creates.removes), "reference": summary(creates.reference),
                }
                results["create"]["ratio_median"] = results["create"]["control_plane"]["p50"] / results["create"]["reference"]["p50"]
    finally:
        progress("cleaning up")
        try:
            for info in await runtime.list(filter_for(owner=owner)):
                await runtime.remove(info.id)
            await loop.run_in_executor(None, remove_reference_containers, docker_client, run_id)
        finally:
            await runtime.close()
            docker_client.close()
            shutil.rmtree(tmp, ignore_errors=True)
    results["runtime_s"] = time.perf_counter() - started
    return results





# --- output ----------------------------------------------------------------------------------------


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    env = results["environment"]
    lines = [*header("lifecycle", env, env["docker"]), ""]

    def row(label: str, s: dict[str, float]) -> str:
        return f"  {label:<58} {s['n']:>4} {s['p50']:>9.1f} {s['p95']:>9.1f} {s['mean']:>9.1f} {s['max']:>9.1f}"

    columns = f"  {'':<58} {'n':>4} {'p50 ms':>9} {'p95 ms':>9} {'mean ms':>9} {'max ms':>9}"
    rt = results["round_trip"]
    lines += [
        "1. Signal round trip: POST start|stop -> matching ev.ready.swarm-* on an AMQP watcher",
        columns,
        row("control plane, POST -> ev.ready (start+stop)", rt["control_plane"]),
        row("  start only", rt["start"]),
        row("  stop only", rt["stop"]),
        *(row(f"  {hop}", rt["hops"][hop]) for hop in HOPS),
        row("  POST -> 202 Accepted (in parallel with the hops)", rt["post_to_202"]),
        row("bare aio-pika request/reply (confirms)", rt["bare"]),
        (f"  outcome event seen before the 202 answer: {rt['event_before_202']} of {rt['control_plane']['n']}; "
         f"refused 409 invalid-state right after the previous outcome event: {rt['conflicts']}"),
        (f"  operations whose recorded outcome is not the swarm's own ev.ready.swarm-*: "
         f"{rt['foreign_outcomes']} of {rt['control_plane']['n']}"),
        f"  ratio p50 control plane / bare: {rt['ratio_p50']:.1f}x",
        "",
    ]
    cr = results["create"]
    lines += [
        "2. Create to ready: POST create -> ev.ready.swarm-create (one-bee swarm generator-demo)",
        columns,
        row("control plane, POST -> ev.ready.swarm-create", cr["control_plane"]),
        row("  gateway: POST -> sig.swarm-create published", cr["signal"]),
        row("  container start + bee boot: sig -> bee's first ev.status-full", cr["bee_up"]),
        row("  swarm-controller: bee status -> ev.ready.swarm-controller", cr["handshake"]),
        row("  host controller: handshake -> ev.ready.swarm-create", cr["outcome"]),
        row("  POST -> 202 Accepted", cr["post_to_202"]),
        row("remove (POST -> ev.ready.swarm-remove, untimed)", cr["remove"]),
        row("docker run image, import aio_pika+pydantic, exit", cr["reference"]),
        f"  ratio of medians control plane / docker run: {cr['ratio_median']:.2f}x",
        "",
    ]
    tp = results["throughput"]

    def rps_row(label: str, runs: list[dict[str, Any]]) -> str:
        rps = [r["rps"] for r in runs]
        p50 = median([r["latency_ms"]["p50"] for r in runs])
        p95 = median([r["latency_ms"]["p95"] for r in runs])
        return (f"  {label:<34} {median(rps):>8.0f} {min(rps):>8.0f} {max(rps):>8.0f} {p50:>9.1f} {p95:>9.1f}")

    lines += [
        (f"3. Gateway throughput over TCP: {args.http_n} requests per round, concurrency {args.http_c}, "
         f"{args.rounds} rounds, client in its own process"),
        f"  {'':<34} {'req/s':>8} {'min':>8} {'max':>8} {'p50 ms':>9} {'p95 ms':>9}",
        rps_row("POST start, idempotent replay", tp["replay"]),
        rps_row("GET /healthz", tp["healthz"]),
        f"  ratio replay / healthz (median req/s): {tp['ratio']:.2f}",
        "",
        f"total run time: {results['runtime_s']:.0f} s",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lifecycle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rt-n", type=int, default=50, help="measured start/stop round trips (default 50)")
    parser.add_argument("--bare-n", type=int, default=200, help="bare aio-pika round trips (default 200)")
    parser.add_argument("--create-n", type=int, default=5, help="creates, and docker run references (default 5)")
    parser.add_argument("--http-n", type=int, default=500, help="requests per throughput round (default 500)")
    parser.add_argument("--http-c", type=int, default=20, help="client concurrency (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds, median reported (default 3)")
    parser.add_argument("--json", type=Path, help="also write the raw figures to this file")
    args = parser.parse_args()
    run_and_print(args, run, render)


if __name__ == "__main__":
    main()
