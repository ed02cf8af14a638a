"""Config-update benchmark: REST config patches and the bulk controller toggle, each against a
bare aio-pika reference measured in the same run, on the same broker.

    .venv/bin/python -m bench.config_update [--quick] [--n 300] [--warmup 20] [--levels 1,8,32]
                                             [--bees 8] [--fanout 100,1000] [--rounds 3]
                                             [--store-timing] [--json FILE]

It runs the gateway in this process (aiohttp ``AppRunner`` + ``TCPSite`` on a free port of
127.0.0.1, with its tracker and registry) on a temporary SQLite database and a RabbitMQ vhost
of its own. No host controller and no containers: the targets are in-process generator bees
and simulated swarm-controllers. It measures:

1. config-update round trip: ``POST /api/components/generator/<instance>/config`` with a new
   idempotency key and a ``{"ratePerSec": n}`` patch, until the matching
   ``ev.ready.config-update.generator.<instance>`` (same correlationId) reaches a watcher bound
   before the first POST. Closed loop at concurrency 1, 8 and 32, spread over 8 in-process
   bees (``bees.generator.Generator``, ratePerSec 0, disabled: they only answer control
   signals). Reference: the same Signal and Outcome bodies as a bare aio-pika request/reply
   to 8 responders of the bees' shape (one durable queue each, prefetch 1), same concurrency.
2. bulk toggle fan-out: ``POST /api/controllers/config {"enabled": false}`` without targets,
   to 100 and 1,000 simulated swarm-controllers (a swarm row each and one
   ``ev.status-full.swarm-controller.<instance>``), answered by one aio-pika consumer; time
   to the 202, to the last ``ev.ready.config-update.swarm-controller.*`` of the correlationId,
   to the tracker committing the operation's close, and to ``GET /api/operations/{cid}``
   reading ``succeeded``. Reference: the same responder answering the same N signals sent by a
   bare aio-pika publisher.

The callers and the watcher run in a process of their own (this module with ``--client``),
the fan-out responder in another (``--responder``), so the gateway's event loop cannot delay
their clocks; all stamp with ``time.perf_counter()``, which processes on Linux share. The
vhost, the bees and the database are removed at the end, also after a failure.
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
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import aiohttp

from bench.common import BROKER, MANAGEMENT, REPO_ROOT, BenchError, environment, ms, progress, run_and_print
from bench.httpload import percentile
from controlplane.contract import keys
from controlplane.contract.models import CommandTarget, Outcome, OutcomeState, Signal, new_id


ROLE = "generator"
SIGNAL = "config-update"
TIMEOUT_MS = 60_000                 # the config-update timeoutMs the gateway puts on its signals
BEE_STATUS_INTERVAL_S = 1.0
RESPONDER_PREFETCH = 64             # the fan-out responder: one consumer, this many unacked at once
POLL_S = 0.1                        # GET /api/operations/{cid} every this often until it reads succeeded
JSON_HEADERS = {"Content-Type": "application/json"}




def outcome_patterns(role: str) -> list[str]:
    """``ev.ready|error.config-update.<role>.*``: every outcome of a config-update to ``role``."""
    return [f"{keys.ready_key(SIGNAL, keys.check_slug(role, 'role'))}.*",
            f"{keys.error_key(SIGNAL, keys.check_slug(role, 'role'))}.*"]


def signal_pattern(role: str) -> str:
    """``sig.config-update.<role>.*``."""
    return f"{keys.signal_key(SIGNAL, keys.check_slug(role, 'role'))}.*"


def persistent(body: bytes, correlation_id: str) -> aio_pika.Message:
    """As the bus publishes: JSON, persistent, with the correlation id."""
    return aio_pika.Message(body, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            correlation_id=correlation_id)


def answerer(exchange: aio_pika.abc.AbstractExchange, answered: Counter[str] | None = None
             ) -> Callable[[aio_pika.abc.AbstractIncomingMessage], Awaitable[None]]:
    """A responder's handler: the signal's success outcome on ``outcome.routing_key()``,
    confirmed by the broker, then the ack."""

    async def answer(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        sig = Signal.model_validate_json(message.body)
        patch = sig.args.get("patch") or {}
        outcome = Outcome.for_signal(sig, result="success",
                                     state=OutcomeState(status="idle", enabled=bool(patch.get("enabled", False))))
        await exchange.publish(persistent(outcome.to_json(), sig.correlation_id), routing_key=outcome.routing_key())
        await message.ack()
        if answered is not None:
            answered[sig.correlation_id] += 1

    return answer


# =====================================================================================
# The client process (watcher, HTTP and bare callers) and the fan-out responder's process.
# =====================================================================================


class Seen:
    """Outcome events by correlationId: the first arrival of each routing key, stamped with
    ``time.perf_counter()`` when aio-pika hands the message over."""

    def __init__(self) -> None:
        self.ready: dict[str, dict[str, float]] = {}
        self.errors: dict[str, list[tuple[str, Any]]] = {}
        self.duplicates = 0
        self._waiters: dict[str, tuple[int, asyncio.Future[float]]] = {}

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        arrived = time.perf_counter()
        key = message.routing_key or ""
        try:
            body = json.loads(message.body)
        except ValueError:
            body = {}
        cid = (body.get("correlationId") if isinstance(body, dict) else None) or message.correlation_id or ""
        waiter = self._waiters.get(cid)
        if key.startswith("ev.error."):
            self.errors.setdefault(cid, []).append((key, body))
            if waiter is not None and not waiter[1].done():
                waiter[1].set_exception(BenchError(f"{key}: {body.get('code')}: {body.get('message')}"))
            return
        by_key = self.ready.setdefault(cid, {})
        if key in by_key:
            self.duplicates += 1
            return
        by_key[key] = arrived
        if waiter is not None and len(by_key) >= waiter[0] and not waiter[1].done():
            waiter[1].set_result(arrived)

    async def wait(self, cid: str, count: int = 1, timeout: float = 60) -> float:
        """Arrival time of the ``count``-th distinct outcome key of ``cid``."""
        if self.errors.get(cid):
            key, body = self.errors[cid][0]
            raise BenchError(f"{key}: {body.get('code')}: {body.get('message')}")
        by_key = self.ready.get(cid, {})
        if len(by_key) >= count:
            return sorted(by_key.values())[count - 1]
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiters[cid] = (count, future)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise BenchError(f"{len(self.ready.get(cid, {}))} of {count} outcomes of {cid} within {timeout:g}s") from None
        finally:
            self._waiters.pop(cid, None)

    def first(self, cid: str) -> float:
        return min(self.ready[cid].values())


async def watch_queue(connection: aio_pika.abc.AbstractConnection, seen: Seen,
                      bindings: list[tuple[str, str]]) -> None:
    """An exclusive queue bound to ``(exchange, pattern)`` pairs, feeding ``seen``."""
    channel = await connection.channel()
    queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
    for exchange_name, pattern in bindings:
        exchange = await channel.declare_exchange(exchange_name, type="topic", durable=True)
        await queue.bind(exchange, routing_key=pattern)
    await queue.consume(seen.on_message, no_ack=True)


async def closed_loop(n: int, concurrency: int, one: Callable[[int], Awaitable[dict[str, float]]]) -> list[dict[str, float]]:
    """``n`` calls of ``one(i)`` by ``concurrency`` callers, each starting its next call when
    the previous one has finished."""
    counter = itertools.count()
    out: list[dict[str, float]] = []

    async def caller() -> None:
        while (i := next(counter)) < n:
            out.append(await one(i))

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return out


def level_figures(calls: list[dict[str, float]]) -> dict[str, Any]:
    total = [c["done"] - c["sent"] for c in calls]
    span = max(c["done"] for c in calls) - min(c["sent"] for c in calls)
    figures: dict[str, Any] = {
        "n": len(calls), "p50": ms(percentile(total, 50)), "p99": ms(percentile(total, 99)),
        "mean": ms(sum(total) / len(total)), "max": ms(max(total)), "per_s": len(calls) / span,
        "window": [min(c["sent"] for c in calls), max(c["done"] for c in calls)],
    }
    if "answered" in calls[0]:
        accepted = [c["answered"] - c["sent"] for c in calls]
        figures["accepted_p50"] = ms(percentile(accepted, 50))
        figures["accepted_p99"] = ms(percentile(accepted, 99))
        figures["event_before_202"] = sum(c["done"] < c["answered"] for c in calls)
    return figures


async def client_levels(job: dict[str, Any]) -> dict[str, Any]:
    """Part 1, client side: gateway and bare round trips at each concurrency."""
    base, instances, swarm_id = job["base"], job["instances"], job["swarm_id"]
    seen = Seen()
    connection = await aio_pika.connect(job["amqp_url"], client_properties={"connection_name": "bench-cu-client"})
    async with connection:
        await watch_queue(connection, seen, [(x, p) for x in (keys.CONTROL_EXCHANGE, job["bare_exchange"])
                                             for p in outcome_patterns(ROLE)])
        publishing = await connection.channel(publisher_confirms=True)
        bare = await publishing.declare_exchange(job["bare_exchange"], type="topic", durable=True)
        limit = max(job["levels"])
        connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def via_gateway(i: int) -> dict[str, float]:
                instance = instances[i % len(instances)]
                payload = json.dumps({"idempotencyKey": str(uuid.uuid4()), "patch": {"ratePerSec": i % 100 + 1}})
                sent = time.perf_counter()
                async with http.post(f"{base}/api/components/{ROLE}/{instance}/config", data=payload,
                                     headers=JSON_HEADERS) as resp:
                    answer = await resp.json()
                    answered = time.perf_counter()
                if resp.status != 202:
                    raise BenchError(f"POST config {instance}: {resp.status} {answer}")
                expected = keys.ready_key(SIGNAL, keys.component_scope(ROLE, instance))
                if (answer.get("watch") or {}).get("successTopic") != expected:
                    raise BenchError(f"POST config {instance}: envelope watches {answer.get('watch')}, not {expected}")
                done = await seen.wait(answer["correlationId"], 1, TIMEOUT_MS / 1000)
                return {"sent": sent, "answered": answered, "done": done}

            async def bare_request(i: int) -> dict[str, float]:
                instance = instances[i % len(instances)]
                sig = Signal(signal=SIGNAL, correlation_id=new_id(), idempotency_key=new_id(), swarm_id=swarm_id,
                             role=ROLE, instance=instance, command_target=CommandTarget.INSTANCE,
                             args={"patch": {"ratePerSec": i % 100 + 1}, "timeoutMs": TIMEOUT_MS})
                sent = time.perf_counter()
                await bare.publish(persistent(sig.to_json(), sig.correlation_id), routing_key=sig.routing_key())
                done = await seen.wait(sig.correlation_id, 1, TIMEOUT_MS / 1000)
                return {"sent": sent, "done": done}

            results: list[dict[str, Any]] = []
            for index, level in enumerate(job["levels"]):
                row: dict[str, Any] = {"concurrency": level}
                runs = [("gateway", via_gateway), ("bare", bare_request)]
                for name, one in runs if index % 2 == 0 else runs[::-1]:  # alternate which goes first
                    warmup = max(job["warmup"], 2 * level)
                    progress(f"concurrency {level}: {name}, {warmup} warm-up + {job['n']} measured")
                    await closed_loop(warmup, level, one)
                    row[name] = level_figures(await closed_loop(job["n"], level, one))
                row["ratio_p50"] = row["gateway"]["p50"] / row["bare"]["p50"]
                row["ratio_per_s"] = row["gateway"]["per_s"] / row["bare"]["per_s"]
                results.append(row)
    return {"levels": results, "duplicates": seen.duplicates}


async def client_fanout(job: dict[str, Any]) -> dict[str, Any]:
    """Part 2, client side: the bulk toggle through the gateway and the bare reference, in
    alternating order. The responder (``--responder``) answers both from a process of its own."""
    base, instances, n = job["base"], job["instances"], len(job["instances"])
    seen = Seen()
    connection = await aio_pika.connect(job["amqp_url"], client_properties={"connection_name": "bench-cu-watcher"})
    async with connection:
        await watch_queue(connection, seen, [(x, p) for x in (keys.CONTROL_EXCHANGE, job["bare_exchange"])
                                             for p in outcome_patterns(keys.CONTROLLER_ROLE)])
        publishing = await connection.channel(publisher_confirms=True)
        bare = await publishing.declare_exchange(job["bare_exchange"], type="topic", durable=True)
        timeout = max(60.0, n * 0.1)
        expected = {keys.ready_key(SIGNAL, keys.component_scope(keys.CONTROLLER_ROLE, i)) for i in instances}

        async with aiohttp.ClientSession() as http:

            async def via_gateway() -> dict[str, Any]:
                payload = json.dumps({"idempotencyKey": str(uuid.uuid4()), "enabled": False})
                sent = time.perf_counter()
                async with http.post(f"{base}/api/controllers/config", data=payload, headers=JSON_HEADERS) as resp:
                    envelope = await resp.json()
                    accepted = time.perf_counter()
                if resp.status != 202:
                    raise BenchError(f"POST /api/controllers/config: {resp.status} {envelope}")
                targets = envelope.get("targets") or []
                if len(targets) != n:
                    raise BenchError(f"the 202 envelope lists {len(targets)} targets, not {n}")
                if {t["successTopic"] for t in targets} != expected:
                    raise BenchError("the 202 envelope's targets are not the registered controllers")
                cid = envelope["correlationId"]
                polling = asyncio.create_task(poll_operation(http, base, cid, timeout))
                try:
                    last = await seen.wait(cid, n, timeout)
                    succeeded, op, polls = await polling
                finally:
                    polling.cancel()
                if set(seen.ready[cid]) != expected:
                    raise BenchError(f"the ev.ready keys of {cid} are not the registered controllers'")
                done_targets = Counter(t["status"] for t in op.get("targets") or [])
                if done_targets != Counter({"succeeded": n}):
                    raise BenchError(f"operation {cid} succeeded with targets {dict(done_targets)}")
                return {"accepted": accepted - sent, "first": seen.first(cid) - sent, "all": last - sent,
                        "succeeded": succeeded - sent, "polls": polls, "window": [sent, succeeded],
                        "cid": cid, "sent": sent}

            async def bare_fanout() -> dict[str, Any]:
                cid, key = new_id(), new_id()
                sent = time.perf_counter()
                signals = [Signal(signal=SIGNAL, correlation_id=cid, idempotency_key=key, swarm_id=swarm_id,
                                  role=keys.CONTROLLER_ROLE, instance=instance, command_target=CommandTarget.INSTANCE,
                                  args={"patch": {"enabled": False}, "timeoutMs": TIMEOUT_MS})
                           for instance, swarm_id in zip(instances, job["swarm_ids"], strict=True)]
                await asyncio.gather(*(bare.publish(persistent(s.to_json(), cid), routing_key=s.routing_key())
                                       for s in signals))
                published = time.perf_counter()
                last = await seen.wait(cid, n, timeout)
                return {"published": published - sent, "first": seen.first(cid) - sent, "all": last - sent}

            progress(f"fan-out to {n}: warm-up")
            await via_gateway()
            await bare_fanout()
            rounds: list[dict[str, Any]] = []
            for r in range(job["rounds"]):
                progress(f"fan-out to {n}: round {r + 1}/{job['rounds']}")
                pair: dict[str, Any] = {}
                order = [("gateway", via_gateway), ("bare", bare_fanout)]
                for name, run in order if r % 2 == 0 else order[::-1]:
                    await asyncio.sleep(0.5)  # let the previous run's tail settle
                    pair[name] = await run()
                rounds.append(pair)
    return {"targets": n, "rounds": rounds, "duplicates": seen.duplicates}


async def responder_main(amqp_url: str, exchange_names: list[str]) -> None:
    """The fan-out responder (``--responder``): one channel with one consumer per exchange, on a
    queue bound to ``sig.config-update.swarm-controller.*``; prints ``{"ready": true}`` once
    consuming and, when stdin closes, how many signals it answered."""
    answered: Counter[str] = Counter()
    connection = await aio_pika.connect(amqp_url, client_properties={"connection_name": "bench-cu-responder"})
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=RESPONDER_PREFETCH)
        for exchange_name in exchange_names:
            exchange = await channel.declare_exchange(exchange_name, type="topic", durable=True)
            queue = await channel.declare_queue(f"bench.cu-responder.{exchange_name}", durable=True)
            await queue.bind(exchange, routing_key=signal_pattern(keys.CONTROLLER_ROLE))
            await queue.consume(answerer(exchange, answered))
        print(json.dumps({"ready": True}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    print(json.dumps({"answered": sum(answered.values()), "signals": len(answered)}), flush=True)


@asynccontextmanager
async def responder_process(amqp_url: str, exchange_names: list[str]) -> AsyncIterator[dict[str, Any]]:
    """Run ``--responder``; the dict it yields gets the responder's final counts on exit."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.config_update", "--responder", amqp_url, *exchange_names, cwd=str(REPO_ROOT),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    counts: dict[str, Any] = {}
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not first or not json.loads(first).get("ready"):
            raise BenchError(f"the responder did not start: {first!r}")
        yield counts
        proc.stdin.close()
        last = await asyncio.wait_for(proc.stdout.readline(), 30)
        counts.update(json.loads(last) if last else {})
    finally:
        if proc.returncode is None:
            if not proc.stdin.is_closing():
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def poll_operation(http: aiohttp.ClientSession, base: str, cid: str,
                         timeout: float) -> tuple[float, dict[str, Any], int]:
    """Poll ``GET /api/operations/{cid}`` until it reads succeeded: (when the answer that said
    so arrived, the operation, how many GETs it took)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    polls = 0
    last: dict[str, Any] = {}
    while loop.time() < deadline:
        async with http.get(f"{base}/api/operations/{cid}") as resp:
            last = await resp.json()
            seen_at = time.perf_counter()
        polls += 1
        if resp.status != 200:
            raise BenchError(f"GET /api/operations/{cid}: {resp.status} {last}")
        if last["status"] == "succeeded":
            return seen_at, last, polls
        if last["status"] in ("failed", "timed_out"):
            raise BenchError(f"operation {cid} ended {last['status']}: {last.get('outcome')}")
        await asyncio.sleep(POLL_S)
    open_targets = Counter(t["status"] for t in last.get("targets") or [])
    raise BenchError(f"operation {cid} still {last.get('status')} after {timeout:g}s (targets: {dict(open_targets)})")


def client_main() -> None:
    """``--client``: read one job (JSON) from stdin, print its figures (JSON) to stdout."""
    job = json.loads(sys.stdin.read())
    run = {"levels": client_levels, "fanout": client_fanout}[job["mode"]]
    print(json.dumps(asyncio.run(run(job))), flush=True)


# =====================================================================================
# The benchmark process: gateway, bees, bare responders, simulated controllers.
# =====================================================================================


async def run_client(job: dict[str, Any]) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.config_update", "--client", cwd=str(REPO_ROOT),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate(json.dumps(job).encode())
    if proc.returncode != 0:
        raise BenchError(f"the client process failed ({proc.returncode}); its error is above")
    return json.loads(out)


def bench_settings(vhost: str, owner: str, tmp: Path) -> Any:
    from controlplane.config import Settings

    return Settings(amqp_url=f"amqp://guest:guest@{BROKER}/{quote(vhost, safe='')}",
                    database_url=f"sqlite+aiosqlite:///{tmp / 'controlplane.db'}", instance_id=owner,
                    status_interval_s=BEE_STATUS_INTERVAL_S, log_level="WARNING")


@asynccontextmanager
async def gateway(settings: Any) -> AsyncIterator[tuple[str, Any, Any]]:
    """The gateway on a free port of 127.0.0.1; yields (base URL, its store, a bus of its own)."""
    from aiohttp import web

    from controlplane.bus import Bus
    from controlplane.contract.topology import load_topology
    from controlplane.gateway.app import open_gateway
    from controlplane.gateway.context import CTX

    async with AsyncExitStack() as stack:
        topology = load_topology(settings.topology_file)
        bus = await Bus(settings.amqp_url.get_secret_value(), topology, "bench-gateway").connect()
        stack.push_async_callback(bus.close)
        app = await stack.enter_async_context(open_gateway(settings, bus))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        # The statuses of simulated controllers go out on a connection of their own.
        publisher = await Bus(settings.amqp_url.get_secret_value(), topology, "bench-publisher").connect()
        stack.push_async_callback(publisher.close)
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", app[CTX].store, publisher


@asynccontextmanager
async def running_bees(amqp_url: str, swarm_id: str, count: int) -> AsyncIterator[tuple[list[str], list[asyncio.Task[None]]]]:
    """``count`` generator bees in this process, disabled, ratePerSec 0; stopped on exit."""
    from bees.env import BeeEnv
    from bees.generator import Generator
    from bees.sdk import Bee

    bees: list[Any] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for i in range(count):
            env = BeeEnv(amqp_url=amqp_url, swarm_id=swarm_id, role=ROLE, instance=keys.bee_instance(swarm_id, f"g{i}"),
                         bee_config={"ratePerSec": 0}, enabled=False, status_interval_s=BEE_STATUS_INTERVAL_S,
                         log_level="WARNING")
            bee = Bee(env, Generator())
            bees.append(bee)
            tasks.append(asyncio.create_task(bee.run(), name=f"bee-{env.instance}"))
        yield [b.env.instance for b in bees], tasks
    finally:
        for bee in bees:
            bee.stop()
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=15)
            for task in pending:
                task.cancel()
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    print(f"warning: bee {task.get_name()} failed: {task.exception()!r}", file=sys.stderr)


@asynccontextmanager
async def bare_responders(amqp_url: str, exchange_name: str, instances: list[str]) -> AsyncIterator[None]:
    """The reference's responders, one per bee, shaped like a bee's control queue: durable,
    prefetch 1, answered with a confirmed publish before the ack."""
    connection = await aio_pika.connect(amqp_url, client_properties={"connection_name": "bench-cu-bare-responders"})
    try:
        for instance in instances:
            channel = await connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=1)
            exchange = await channel.declare_exchange(exchange_name, type="topic", durable=True)
            queue = await channel.declare_queue(f"{exchange_name}.{instance}", durable=True)
            await queue.bind(exchange, routing_key=keys.signal_key(SIGNAL, keys.component_scope(ROLE, instance)))
            await queue.consume(answerer(exchange))
        yield
    finally:
        await connection.close()


async def registered(http: aiohttp.ClientSession, base: str, role: str, swarm_id: str | None = None) -> list[dict[str, Any]]:
    params = {"role": role, **({"swarmId": swarm_id} if swarm_id else {})}
    async with http.get(f"{base}/api/components", params=params) as resp:
        body = await resp.json()
        if resp.status != 200:
            raise BenchError(f"GET /api/components: {resp.status} {body}")
    return body["components"]


async def wait_registered(http: aiohttp.ClientSession, base: str, role: str, count: int, swarm_id: str | None = None,
                          timeout: float = 60, tasks: list[asyncio.Task[None]] | None = None) -> float:
    """Until GET /api/components?role= lists exactly ``count``; returns the seconds it took."""
    started = time.perf_counter()
    listed: list[dict[str, Any]] = []
    while time.perf_counter() - started < timeout:
        listed = await registered(http, base, role, swarm_id)
        if len(listed) == count:
            return time.perf_counter() - started
        for task in tasks or ():
            if task.done():
                raise BenchError(f"{task.get_name()} ended early: {task.exception() if not task.cancelled() else 'cancelled'}")
        await asyncio.sleep(0.05)
    raise BenchError(f"GET /api/components?role={role} lists {len(listed)}, not {count}, after {timeout:g}s")


class ClosedAt:
    """When the tracker closed each operation: wraps ``record_outcome`` on the gateway store's
    instance and stamps ``time.perf_counter()`` when a call returns the operation it closed
    (its transaction has committed then). Polling GET /api/operations cannot tell this
    closely while the tracker is busy."""

    def __init__(self, store: Any) -> None:
        self.at: dict[str, float] = {}
        record_outcome = store.record_outcome

        async def stamped(correlation_id: str, *args: Any, **kwargs: Any) -> Any:
            recorded = await record_outcome(correlation_id, *args, **kwargs)
            if recorded.closed is not None:
                self.at[correlation_id] = time.perf_counter()
            return recorded

        store.record_outcome = stamped


class StoreTimer:
    """``--store-timing``: wraps the gateway store's methods on the instance and times each
    call with ``time.perf_counter()``, so calls can be attributed to the client's time windows."""

    METHODS = ("find_action", "begin_action", "set_operation_status", "record_outcome", "get_component",
               "list_components", "get_operation", "operation_targets", "save_registry", "due_operations")

    def __init__(self, store: Any) -> None:
        self.calls: list[tuple[float, str, float]] = []  # (started, method, seconds)
        for name in self.METHODS:
            setattr(store, name, self._wrap(name, getattr(store, name)))

    def _wrap(self, name: str, method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await method(*args, **kwargs)
            finally:
                self.calls.append((started, name, time.perf_counter() - started))

        return timed

    def within(self, windows: list[list[float]]) -> dict[str, dict[str, float]]:
        """Calls that started inside any of ``windows``, by method: n, p50 and p99 in ms."""
        by_name: dict[str, list[float]] = {}
        for started, name, seconds in self.calls:
            if any(lo <= started <= hi for lo, hi in windows):
                by_name.setdefault(name, []).append(seconds)
        return {name: {"n": len(v), "p50": ms(percentile(v, 50)), "p99": ms(percentile(v, 99))}
                for name, v in sorted(by_name.items())}


async def register_controllers(store: Any, publisher: Any, http: aiohttp.ClientSession, base: str, run_id: str,
                               n: int) -> tuple[list[str], list[str], dict[str, float]]:
    """N simulated swarm-controllers: a swarm row each, then one status-full each."""
    from controlplane.contract.models import Status, SwarmStatus
    from controlplane.store import SwarmRow

    swarm_ids = [f"bfc-{run_id}-{i}" for i in range(n)]
    instances = [keys.controller_instance(s) for s in swarm_ids]
    started = time.perf_counter()
    for swarm_id, instance in zip(swarm_ids, instances, strict=True):
        await store.upsert_swarm(SwarmRow(id=swarm_id, template_id="bench", status=SwarmStatus.RUNNING.value,
                                          controller_instance=instance))
    rows = time.perf_counter() - started
    statuses = [Status(kind="status-full", role=keys.CONTROLLER_ROLE, instance=instance, swarm_id=swarm_id,
                       enabled=True, state=SwarmStatus.RUNNING.value, data={"bees": []})
                for swarm_id, instance in zip(swarm_ids, instances, strict=True)]
    started = time.perf_counter()
    await asyncio.gather(*(publisher.publish(s.routing_key(), s) for s in statuses))
    await wait_registered(http, base, keys.CONTROLLER_ROLE, n, timeout=max(60.0, n * 0.1))
    return swarm_ids, instances, {"swarm_rows_s": rows, "status_to_listed_s": time.perf_counter() - started}


async def unregister_controllers(store: Any, http: aiohttp.ClientSession, base: str, swarm_ids: list[str]) -> None:
    for swarm_id in swarm_ids:
        await store.delete_swarm(swarm_id)
    await wait_registered(http, base, keys.CONTROLLER_ROLE, 0)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from controlplane.bus.management import Management
    from controlplane.contract.models import SwarmStatus
    from controlplane.store import SwarmRow

    run_id = uuid.uuid4().hex[:6]
    tmp = Path(tempfile.mkdtemp(prefix="cp-bench-cu-"))
    results: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        async with Management(MANAGEMENT) as management:
            overview = await management.overview()
            results["environment"] = environment(
                f"RabbitMQ {overview.get('rabbitmq_version')} (Erlang {overview.get('erlang_version')})")
            async with management.scratch_vhost("cp-bench") as vhost, AsyncExitStack() as stack:
                settings = bench_settings(vhost, f"bench-{run_id}", tmp)
                amqp_url = settings.amqp_url.get_secret_value()
                base, store, publisher = await stack.enter_async_context(gateway(settings))
                closed_at = ClosedAt(store)
                timer = StoreTimer(store) if args.store_timing else None
                http = await stack.enter_async_context(aiohttp.ClientSession())

                # 1. config-update round trips to in-process bees
                swarm_id = f"bcu-{run_id}"
                await store.upsert_swarm(SwarmRow(id=swarm_id, template_id="bench", status=SwarmStatus.RUNNING.value))
                progress(f"start {args.bees} generator bees and wait for the registry to list them")
                async with running_bees(amqp_url, swarm_id, args.bees) as (instances, tasks):
                    await wait_registered(http, base, ROLE, args.bees, swarm_id, tasks=tasks)
                    bare_exchange = f"bench.cu-{run_id}"
                    async with bare_responders(amqp_url, bare_exchange, instances):
                        results["config_update"] = await run_client({
                            "mode": "levels", "amqp_url": amqp_url, "base": base, "swarm_id": swarm_id,
                            "instances": instances, "bare_exchange": bare_exchange, "levels": args.levels,
                            "n": args.n, "warmup": args.warmup})
                    progress("stop the bees")
                await store.delete_swarm(swarm_id)

                # 2. bulk toggle fan-out to simulated swarm-controllers
                results["fanout"] = []
                for n in args.fanout:
                    progress(f"register {n} simulated swarm-controllers")
                    swarm_ids, controllers, registration = await register_controllers(
                        store, publisher, http, base, run_id, n)
                    bare_exchange = f"bench.fan-{run_id}-{n}"
                    async with responder_process(amqp_url, [keys.CONTROL_EXCHANGE, bare_exchange]) as answered:
                        figures = await run_client({
                            "mode": "fanout", "amqp_url": amqp_url, "base": base, "instances": controllers,
                            "swarm_ids": swarm_ids, "bare_exchange": bare_exchange, "rounds": args.rounds})
                    for pair in figures["rounds"]:
                        g = pair["gateway"]
                        g["closed"] = closed_at.at[g["cid"]] - g["sent"]
                    runs = 2 * (args.rounds + 1)  # gateway and bare, warm-up included
                    if answered.get("answered") != runs * n or answered.get("signals") != runs:
                        raise BenchError(f"the responder answered {answered}, not {runs} x {n} signals")
                    results["fanout"].append({**figures, "registration": registration, "responder": answered})
                    await unregister_controllers(store, http, base, swarm_ids)
                if timer:
                    results["store_timing"] = {
                        **{f"config-update c={row['concurrency']}": timer.within([row["gateway"]["window"]])
                           for row in results["config_update"]["levels"]},
                        **{f"fan-out N={fan['targets']}": timer.within([r["gateway"]["window"] for r in fan["rounds"]])
                           for fan in results["fanout"]},
                    }
            progress("cleaning up")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["runtime_s"] = time.perf_counter() - started
    return results




# --- output ------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return percentile(values, 50)


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    env = results["environment"]
    lines = [
        (f"controlplane config-update benchmark, {env['date']}, code {env['code']} "
         f"(1-minute load average at start: {env['loadavg_1m']:.2f})"),
        (f"{env['cpus']} CPUs, {env['os']}, Python {env['python']}, {env['broker']}, "
         f"aio-pika {env['aio_pika']}, aiohttp {env['aiohttp']}"),
        "",
        (f"1. Config update, closed loop, spread over {args.bees} bees: POST /api/components/generator/<instance>/config "
         "-> ev.ready.config-update.generator.<instance> on a watcher"),
        (f"  {'concurrency':<12} {'path':<30} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'max ms':>8} "
         f"{'done/s':>8}"),
    ]
    for row in results["config_update"]["levels"]:
        g, b = row["gateway"], row["bare"]
        c = str(row["concurrency"])
        lines += [
            f"  {c:<12} {'gateway: POST -> ev.ready':<30} {g['n']:>5} {g['p50']:>8.1f} {g['p99']:>8.1f} "
            f"{g['mean']:>8.1f} {g['max']:>8.1f} {g['per_s']:>8.0f}",
            f"  {'':<12} {'  POST -> 202':<30} {'':>5} {g['accepted_p50']:>8.1f} {g['accepted_p99']:>8.1f}",
            f"  {'':<12} {'bare aio-pika request/reply':<30} {b['n']:>5} {b['p50']:>8.1f} {b['p99']:>8.1f} "
            f"{b['mean']:>8.1f} {b['max']:>8.1f} {b['per_s']:>8.0f}",
            (f"  {'':<12} ratio gateway / bare: p50 {row['ratio_p50']:.1f}x, done/s {row['ratio_per_s']:.2f}; "
             f"ev.ready seen before the 202: {g['event_before_202']} of {g['n']}"),
        ]
    lines += [
        "",
        (f"2. Bulk toggle: POST /api/controllers/config {{enabled: false}} to N simulated swarm-controllers, "
         f"one responder; median of {args.rounds} rounds [min-max], ms from the POST (bare: from the first publish)"),
        (f"  {'N':>5} {'path':<32} {'-> 202':>16} {'-> first ev.ready':>18} {'-> all N ev.ready':>18} "
         f"{'-> op closed':>18} {'-> GET succeeded':>18}"),
    ]

    def cell(rounds: list[dict[str, Any]], side: str, field: str, width: int) -> str:
        values = [ms(r[side][field]) for r in rounds]
        text = f"{median(values):.0f} [{min(values):.0f}-{max(values):.0f}]"
        return f"{text:>{width}}"

    for fan in results["fanout"]:
        rounds, n = fan["rounds"], fan["targets"]
        reg = fan["registration"]
        lines += [
            (f"  {n:>5} {'gateway':<32} {cell(rounds, 'gateway', 'accepted', 16)} {cell(rounds, 'gateway', 'first', 18)} "
             f"{cell(rounds, 'gateway', 'all', 18)} {cell(rounds, 'gateway', 'closed', 18)} "
             f"{cell(rounds, 'gateway', 'succeeded', 18)}"),
            (f"  {'':>5} {'bare publisher (all published)':<32} {cell(rounds, 'bare', 'published', 16)} "
             f"{cell(rounds, 'bare', 'first', 18)} {cell(rounds, 'bare', 'all', 18)}"),
            (f"  {'':>5} medians against the bare all N ev.ready: gateway all N ev.ready "
             f"{median([r['gateway']['all'] for r in rounds]) / median([r['bare']['all'] for r in rounds]):.1f}x, "
             f"op closed {median([r['gateway']['closed'] for r in rounds]) / median([r['bare']['all'] for r in rounds]):.1f}x"),
            (f"  {'':>5} op closed: when the tracker's record_outcome committed the close; GET: polled every "
             f"{POLL_S * 1000:.0f} ms after each answer, median {median([r['gateway']['polls'] for r in rounds]):.0f} GETs"),
            (f"  {'':>5} registration (untimed above): {reg['swarm_rows_s']:.1f} s for {n} swarm rows, "
             f"{reg['status_to_listed_s']:.1f} s from the statuses to GET /api/components listing {n}"),
        ]
    if "store_timing" in results:
        lines += ["", "Store calls of the gateway during the gateway runs (--store-timing):",
                  f"  {'run':<22} {'method':<22} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8}"]
        for phase, by_name in results["store_timing"].items():
            for name, f in by_name.items():
                lines.append(f"  {phase:<22} {name:<22} {f['n']:>6} {f['p50']:>8.2f} {f['p99']:>8.2f}")
    lines += ["", "Summary (bulk toggle: medians of the rounds, and their ratio)",
              f"  {'figure':<58} {'gateway':>10} {'bare':>10} {'ratio':>8}"]
    for row in results["config_update"]["levels"]:
        g, b, c = row["gateway"], row["bare"], row["concurrency"]
        lines += [f"  {f'config update c={c}, p50 ms':<58} {g['p50']:>10.1f} {b['p50']:>10.1f} {row['ratio_p50']:>7.1f}x",
                  f"  {f'config update c={c}, completed/s':<58} {g['per_s']:>10.0f} {b['per_s']:>10.0f} "
                  f"{row['ratio_per_s']:>8.2f}"]
    for fan in results["fanout"]:
        rounds, n = fan["rounds"], fan["targets"]
        # The 202 goes with the bare publisher's last confirm; the rest with its last ev.ready.
        for label, field, bare_field in (("202 (bare: all published)", "accepted", "published"),
                                         ("all N ev.ready", "all", "all"), ("op closed", "closed", "all"),
                                         ("GET reads succeeded", "succeeded", "all")):
            value = median([ms(r["gateway"][field]) for r in rounds])
            reference = median([ms(r["bare"][bare_field]) for r in rounds])
            lines.append(f"  {f'bulk toggle N={n}, POST -> {label}, ms':<58} {value:>10.0f} {reference:>10.0f} "
                         f"{value / reference:>7.1f}x")
    lines += ["", f"total run time: {results['runtime_s']:.0f} s"]
    return "\n".join(lines)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    if sys.argv[1:] == ["--client"]:
        client_main()
        return
    if sys.argv[1:2] == ["--responder"]:
        asyncio.run(responder_main(sys.argv[2], sys.argv[3:]))
        return

    parser = argparse.ArgumentParser(prog="python -m bench.config_update", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run: n 60, fan-out to 100 only, 1 round")
    parser.add_argument("--n", type=int, default=None, help="measured requests per concurrency and path (default 300)")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up requests per concurrency and path (default 20)")
    parser.add_argument("--levels", type=int_list, default=[1, 8, 32], help="concurrencies (default 1,8,32)")
    parser.add_argument("--bees", type=int, default=8, help="generator bees the patches are spread over (default 8)")
    parser.add_argument("--fanout", type=int_list, default=None, help="controllers per bulk toggle (default 100,1000)")
    parser.add_argument("--rounds", type=int, default=None, help="bulk toggles per size, median reported (default 3)")
    parser.add_argument("--store-timing", action="store_true", help="also time the gateway's store calls")
    parser.add_argument("--json", type=Path, help="also write the raw figures to this file")
    args = parser.parse_args()
    args.n = args.n or (60 if args.quick else 300)
    args.fanout = args.fanout or ([100] if args.quick else [100, 1000])
    args.rounds = args.rounds or (1 if args.quick else 3)
    run_and_print(args, run, render)


if __name__ == "__main__":
    main()
