"""Config-update benchmark: the gateway's hot path, measured from outside, each figure against a
bare aio-pika reference measured in the same run, on the same broker.

    .venv/bin/python -m bench.config_update [--quick] [--n 300] [--warmup 20] [--levels 1,8,32]
                                             [--bees 8] [--fanout 100,1000] [--rounds 3]
                                             [--early-n 50] [--http-n 500] [--http-c 20]
                                             [--pg-levels 1,32] [--parts sqlite,fanout,postgres]
                                             [--json FILE]

The gateway runs as a process of its own (``python -m controlplane.cli gateway``, configured by
``CP_*`` variables, on a free port of 127.0.0.1) and is reached only over HTTP and AMQP, the way
a caller reaches it; nothing here imports or wraps its internals. Each part gets a RabbitMQ vhost
and a database of its own. Swarms are created through ``POST /api/swarms/{id}/create``, answered
by a stand-in host controller, and their components register by their own status events. The
parts:

1. config update: ``POST /api/components/generator/<instance>/config`` with a new key and a
   ``{"ratePerSec": n}`` patch, until the matching ``ev.ready.config-update.generator.<instance>``
   (same correlationId) reaches a watcher bound before the first POST. Closed loop at each
   concurrency, spread over 8 generator bees (``bees.generator.Generator``, disabled, ratePerSec
   0: they only answer control signals) in this process. Reference: the same Signal and Outcome
   bodies as a bare aio-pika request/reply to 8 responders of the bees' shape (one durable queue
   each, prefetch 1, confirmed reply before the ack), same concurrency.
2. outcome before the 202: 50 more config updates at concurrency 1; how many outcome events
   reached the watcher before the 202 reached the caller.
3. idempotent replay: the same key and body re-POSTed, against ``GET /healthz``, both at
   concurrency 20 from the HTTP load client (``bench.httpload``).
4. registration and bulk toggle, for each N (100 and 1,000), on a fresh gateway: N simulated
   swarm-controllers publish one ``ev.status-full.swarm-controller.<instance>`` each, timed until
   ``GET /api/components?role=swarm-controller`` lists all N; then ``POST /api/controllers/config
   {"enabled": false}`` without targets, answered by one aio-pika consumer, timed to the 202, to
   the first and the last of the N ``ev.ready``, and to ``GET /api/operations/{cid}`` reading
   ``succeeded``. Reference: the same responder answering the same N signals from a bare
   publisher, until the last ``ev.ready``.
5. two gateways on one PostgreSQL database (a scratch database, dropped afterwards), with the
   config updates of part 1 sent to them in turn; reference: the bare request/reply, same run.

The callers and the watcher run in a process of their own (this module with ``--client``),
the fan-out responder in another (``--responder``), so neither the gateway's nor the bees' event
loop can delay their clocks; all stamp with ``time.perf_counter()``, which processes on Linux
share. Vhosts, databases and processes are removed at the end, also after a failure.
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
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp

from bench.common import (MANAGEMENT, REPO_ROOT, BenchError, GatewayProcess, environment, header, gateway_process, ms,
                          progress, replay_against_healthz, run_and_print, scratch_postgres_database)
from bench.httpload import percentile
from controlplane.contract import keys
from controlplane.contract.models import (CommandTarget, Outcome, OutcomeState, Signal, Status, SwarmStatus,
                                          new_id)


ROLE = "generator"
SIGNAL = "config-update"
TEMPLATE = "generator-demo"         # any shipped template: the stand-in host controller only answers
TIMEOUT_MS = 60_000                 # the config-update timeoutMs the gateway puts on its signals
BEE_STATUS_INTERVAL_S = 1.0
# Simulated controllers report once; a long interval keeps them healthy for the whole part.
FANOUT_STATUS_INTERVAL_S = 600.0
RESPONDER_PREFETCH = 64             # the fan-out responder: one consumer, this many unacked at once
CREATE_CONCURRENCY = 16             # swarms are created (untimed) by this many callers
POLL_S = 0.1                        # GET /api/operations/{cid} again after an open answer, until all N
FAST_POLL_S = 0.01                  # ev.ready are in; then after this long
REGISTER_POLL_S = 0.02              # GET /api/components?role=swarm-controller this often
HTTP_WARMUP = 100
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


def answerer(exchange: aio_pika.abc.AbstractExchange, answered: Counter[str] | None = None, status: str = "idle"
             ) -> Callable[[aio_pika.abc.AbstractIncomingMessage], Awaitable[None]]:
    """A responder's handler: the signal's success outcome (``state.status`` = ``status``) on
    ``outcome.routing_key()``, confirmed by the broker, then the ack."""

    async def answer(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        sig = Signal.model_validate_json(message.body)
        patch = sig.args.get("patch") or {}
        outcome = Outcome.for_signal(sig, result="success",
                                     state=OutcomeState(status=status, enabled=bool(patch.get("enabled", False))))
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


async def closed_loop(n: int, concurrency: int, one: Callable[[int], Awaitable[dict[str, Any]]]) -> list[dict[str, Any]]:
    """``n`` calls of ``one(i)`` by ``concurrency`` callers, each starting its next call when
    the previous one has finished."""
    counter = itertools.count()
    out: list[dict[str, Any]] = []

    async def caller() -> None:
        while (i := next(counter)) < n:
            out.append(await one(i))

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return out


def level_figures(all_calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Latency percentiles and completions per second of the calls that succeeded; the others
    are counted under ``errors``."""
    calls = [c for c in all_calls if "failed" not in c]
    failed = Counter(c["failed"] for c in all_calls if "failed" in c)
    if not calls:
        raise BenchError(f"all {len(all_calls)} calls failed: {dict(failed)}")
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
    figures["errors"] = sum(failed.values())
    figures["error_kinds"] = dict(failed)
    return figures


async def client_levels(job: dict[str, Any]) -> dict[str, Any]:
    """Parts 1, 2 and 5, client side: gateway and bare round trips at each concurrency (the
    gateway's requests go to the job's gateways in turn), then the outcome-before-202 count."""
    bases, instances, swarm_id = job["bases"], job["instances"], job["swarm_id"]
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

            async def via_gateway(i: int) -> dict[str, Any]:
                instance = instances[i % len(instances)]
                base = bases[i % len(bases)]
                payload = json.dumps({"idempotencyKey": str(uuid.uuid4()), "patch": {"ratePerSec": i % 100 + 1}})
                sent = time.perf_counter()
                async with http.post(f"{base}/api/components/{ROLE}/{instance}/config", data=payload,
                                     headers=JSON_HEADERS) as resp:
                    answer = await resp.json()
                    answered = time.perf_counter()
                if resp.status != 202:  # counted and shown with the figures; the run goes on
                    return {"sent": sent, "answered": answered, "failed": f"{resp.status} {answer.get('error')}"}
                expected = keys.ready_key(SIGNAL, keys.component_scope(ROLE, instance))
                if (answer.get("watch") or {}).get("successTopic") != expected:
                    raise BenchError(f"POST config {instance}: envelope watches {answer.get('watch')}, not {expected}")
                done = await seen.wait(answer["correlationId"], 1, TIMEOUT_MS / 1000)
                return {"sent": sent, "answered": answered, "done": done}

            async def signal_to(exchange: aio_pika.abc.AbstractExchange, i: int) -> dict[str, float]:
                instance = instances[i % len(instances)]
                sig = Signal(signal=SIGNAL, correlation_id=new_id(), idempotency_key=new_id(), swarm_id=swarm_id,
                             role=ROLE, instance=instance, command_target=CommandTarget.INSTANCE,
                             args={"patch": {"ratePerSec": i % 100 + 1}, "timeoutMs": TIMEOUT_MS})
                sent = time.perf_counter()
                await exchange.publish(persistent(sig.to_json(), sig.correlation_id), routing_key=sig.routing_key())
                done = await seen.wait(sig.correlation_id, 1, TIMEOUT_MS / 1000)
                return {"sent": sent, "done": done}

            control = await publishing.declare_exchange(keys.CONTROL_EXCHANGE, type="topic", durable=True)
            # The bare reference's own exchange and responders; and the same signal published
            # straight to the bee, the way the gateway does: the bees' share, without the gateway's.
            bare_request = partial(signal_to, bare)
            to_bees = partial(signal_to, control)

            results: list[dict[str, Any]] = []
            for index, level in enumerate(job["levels"]):
                row: dict[str, Any] = {"concurrency": level}
                runs = [("gateway", via_gateway), ("bees", to_bees), ("bare", bare_request)]
                for name, one in runs if index % 2 == 0 else runs[::-1]:  # alternate which goes first
                    warmup = max(job["warmup"], 2 * level)
                    progress(f"{job['label']}, concurrency {level}: {name}, {warmup} warm-up + {job['n']} measured")
                    await closed_loop(warmup, level, one)
                    row[name] = level_figures(await closed_loop(job["n"], level, one))
                row["ratio_p50"] = row["gateway"]["p50"] / row["bare"]["p50"]
                row["ratio_per_s"] = row["gateway"]["per_s"] / row["bare"]["per_s"]
                results.append(row)
            early: dict[str, Any] | None = None
            if job.get("early_n"):
                progress(f"{job['label']}: {job['early_n']} config updates at concurrency 1, outcome before the 202?")
                early = level_figures(await closed_loop(job["early_n"], 1, via_gateway))
    return {"levels": results, "early": early, "duplicates": seen.duplicates}


async def client_register(job: dict[str, Any]) -> dict[str, Any]:
    """Part 4a, client side: every simulated controller publishes its first status at once (with
    publisher confirms, as the bus does), timed until the registry lists all of them."""
    base, n = job["base"], len(job["instances"])
    statuses = [Status(kind="status-full", role=keys.CONTROLLER_ROLE, instance=instance, swarm_id=swarm_id,
                       enabled=True, state=SwarmStatus.RUNNING.value, data={"bees": []})
                for instance, swarm_id in zip(job["instances"], job["swarm_ids"], strict=True)]
    connection = await aio_pika.connect(job["amqp_url"], client_properties={"connection_name": "bench-cu-statuses"})
    async with connection, aiohttp.ClientSession() as http:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(keys.CONTROL_EXCHANGE, type="topic", durable=True)
        started = time.perf_counter()
        await asyncio.gather(*(exchange.publish(
            aio_pika.Message(s.to_json(), content_type="application/json"), routing_key=s.routing_key())
            for s in statuses))
        published = time.perf_counter()
        polls, listed, slowest = 0, 0, 0.0
        deadline = started + max(60.0, n * 0.1)
        while time.perf_counter() < deadline:
            asked = time.perf_counter()
            listed = len(await registered(http, base, keys.CONTROLLER_ROLE))
            answered = time.perf_counter()
            polls += 1
            slowest = max(slowest, answered - asked)
            if listed >= n:
                return {"published": published - started, "listed": answered - started, "polls": polls,
                        "slowest_get": slowest}
            # Listing N components is not free: poll at most a third of the time.
            await asyncio.sleep(max(REGISTER_POLL_S, 2 * (answered - asked)))
    raise BenchError(f"GET /api/components?role={keys.CONTROLLER_ROLE} lists {listed} of {n} after "
                     f"{deadline - started:.0f} s")


async def client_fanout(job: dict[str, Any]) -> dict[str, Any]:
    """Part 4b, client side: the bulk toggle through the gateway and the bare reference, in
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
                all_in = asyncio.Event()
                polling = asyncio.create_task(poll_operation(http, base, cid, timeout, all_in))
                try:
                    last = await seen.wait(cid, n, timeout)
                    all_in.set()
                    succeeded, op, polls = await polling
                finally:
                    polling.cancel()
                if set(seen.ready[cid]) != expected:
                    raise BenchError(f"the ev.ready keys of {cid} are not the registered controllers'")
                done_targets = Counter(t["status"] for t in op.get("targets") or [])
                if done_targets and done_targets != Counter({"succeeded": n}):
                    raise BenchError(f"operation {cid} succeeded with targets {dict(done_targets)}")
                return {"accepted": accepted - sent, "first": seen.first(cid) - sent, "all": last - sent,
                        "succeeded": succeeded - sent, "polls": polls}

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


async def poll_operation(http: aiohttp.ClientSession, base: str, cid: str, timeout: float,
                         all_in: asyncio.Event) -> tuple[float, dict[str, Any], int]:
    """``GET /api/operations/{cid}?wait=...`` until it reads succeeded. The gateway holds a
    long-poll until the operation closes, so the answer says when a caller learns it; should
    an answer come back open (a gateway without ``?wait``), the next GET follows after
    ``POLL_S``, or ``FAST_POLL_S`` once the watcher has all N outcomes (``all_in``). Returns
    (when the answer that said succeeded arrived, the operation, how many GETs it took)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    polls = 0
    last: dict[str, Any] = {}
    while (remaining := deadline - loop.time()) > 0:
        async with http.get(f"{base}/api/operations/{cid}", params={"wait": f"{min(remaining, 60):.0f}"}) as resp:
            last = await resp.json()
            seen_at = time.perf_counter()
        polls += 1
        if resp.status != 200:
            raise BenchError(f"GET /api/operations/{cid}: {resp.status} {last}")
        if last["status"] == "succeeded":
            return seen_at, last, polls
        if last["status"] in ("failed", "timed_out"):
            raise BenchError(f"operation {cid} ended {last['status']}: {last.get('outcome')}")
        try:
            await asyncio.wait_for(all_in.wait(), POLL_S) if not all_in.is_set() else await asyncio.sleep(FAST_POLL_S)
        except TimeoutError:
            pass
    open_targets = Counter(t["status"] for t in last.get("targets") or [])
    raise BenchError(f"operation {cid} still {last.get('status')} after {timeout:g}s (targets: {dict(open_targets)})")


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


def client_main() -> None:
    """``--client``: read one job (JSON) from stdin, print its figures (JSON) to stdout."""
    job = json.loads(sys.stdin.read())
    run = {"levels": client_levels, "register": client_register, "fanout": client_fanout}[job["mode"]]
    print(json.dumps(asyncio.run(run(job))), flush=True)


async def registered(http: aiohttp.ClientSession, base: str, role: str, swarm_id: str | None = None) -> list[dict[str, Any]]:
    params = {"role": role, **({"swarmId": swarm_id} if swarm_id else {})}
    async with http.get(f"{base}/api/components", params=params) as resp:
        body = await resp.json()
        if resp.status != 200:
            raise BenchError(f"GET /api/components: {resp.status} {body}")
    return body["components"]


# =====================================================================================
# The benchmark process: vhosts, databases, gateway processes, bees, stand-in controllers.
# =====================================================================================


async def run_client(job: dict[str, Any]) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.config_update", "--client", cwd=str(REPO_ROOT),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate(json.dumps(job).encode())
    if proc.returncode != 0:
        raise BenchError(f"the client process failed ({proc.returncode}); its error is above")
    return json.loads(out)


@dataclass(frozen=True)
class Deployment:
    """One part's world: a vhost, a database, and the gateway processes serving it."""

    amqp_url: str
    gateways: list[GatewayProcess]

    @property
    def bases(self) -> list[str]:
        return [g.base for g in self.gateways]


@asynccontextmanager
async def deployment(management: Any, tmp: Path, label: str, owner: str, *, gateways: int = 1,
                     database_url: str | None = None, status_interval_s: float = BEE_STATUS_INTERVAL_S
                     ) -> AsyncIterator[Deployment]:
    """A scratch vhost, ``gateways`` gateway processes on one database (a SQLite file of the
    test suite's kind unless ``database_url`` is given), and the stand-in host controller."""
    from tests.conftest import make_settings

    async with management.scratch_vhost("cp-bench") as vhost, AsyncExitStack() as stack:
        folder = tmp / label
        folder.mkdir()
        settings = make_settings(vhost, owner, folder)
        amqp_url = settings.amqp_url.get_secret_value()
        # The registration and bulk-toggle parts create a swarm per simulated controller: past
        # the default bound on swarms (CP_MAX_SWARMS), which this benchmark raises.
        common = {"amqp_url": amqp_url,
                  "database_url": database_url or settings.database_url.get_secret_value(),
                  "instance_id": owner, "status_interval_s": status_interval_s, "log_level": "WARNING",
                  "max_swarms": 100_000}
        started: list[GatewayProcess] = []
        for i in range(gateways):  # one after the other: the first one migrates the database
            name = f"{label}-{'ab'[i] if gateways > 1 else 'gw'}"
            progress(f"start gateway {name}")
            started.append(await stack.enter_async_context(
                gateway_process(name, {**common, "gateway_id": name}, folder)))
        await stack.enter_async_context(stand_in_host(amqp_url))
        yield Deployment(amqp_url=amqp_url, gateways=started)


@asynccontextmanager
async def stand_in_host(amqp_url: str) -> AsyncIterator[None]:
    """Answers each ``sig.swarm-create`` at once, from a queue of its own, with
    ``ev.ready.swarm-create`` (status Ready): the swarm exists for the gateway, no container runs."""
    connection = await aio_pika.connect(amqp_url, client_properties={"connection_name": "bench-cu-host"})
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=RESPONDER_PREFETCH)
        exchange = await channel.declare_exchange(keys.CONTROL_EXCHANGE, type="topic", durable=True)
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key=keys.signal_key("swarm-create", "*"))

        await queue.consume(answerer(exchange, status=SwarmStatus.READY.value))
        yield
    finally:
        await connection.close()


async def create_swarms(http: aiohttp.ClientSession, base: str, swarm_ids: list[str]) -> None:
    """``POST /api/swarms/{id}/create`` for each id (untimed), until ``GET /api/swarms`` shows
    them all Ready."""
    pending = iter(swarm_ids)

    async def caller() -> None:
        for swarm_id in pending:
            body = {"idempotencyKey": str(uuid.uuid4()), "templateId": TEMPLATE}
            async with http.post(f"{base}/api/swarms/{swarm_id}/create", json=body) as resp:
                if resp.status != 202:
                    raise BenchError(f"POST create {swarm_id}: {resp.status} {await resp.text()}")

    await asyncio.gather(*(caller() for _ in range(CREATE_CONCURRENCY)))
    wanted = set(swarm_ids)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(60.0, len(swarm_ids) * 0.1)
    ready: set[str] = set()
    while loop.time() < deadline:
        async with http.get(f"{base}/api/swarms") as resp:
            listed = await resp.json()
        ready = {s["swarmId"] for s in listed if s.get("status") == SwarmStatus.READY.value} & wanted
        if ready == wanted:
            return
        await asyncio.sleep(0.2)
    raise BenchError(f"{len(ready)} of {len(wanted)} created swarms read Ready on GET /api/swarms")


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


@asynccontextmanager
async def bees_of_a_swarm(http: aiohttp.ClientSession, world: Deployment, swarm_id: str,
                          count: int) -> AsyncIterator[list[str]]:
    """A created swarm with ``count`` bees that every gateway of ``world`` lists."""
    await create_swarms(http, world.bases[0], [swarm_id])
    progress(f"start {count} generator bees and wait for the registry to list them")
    async with running_bees(world.amqp_url, swarm_id, count) as (instances, tasks):
        for base in world.bases:
            await wait_registered(http, base, ROLE, count, swarm_id, tasks=tasks)
        yield instances
        progress("stop the bees")


async def config_updates(http: aiohttp.ClientSession, world: Deployment, run_id: str, label: str,
                         args: argparse.Namespace, levels: list[int], early_n: int = 0) -> dict[str, Any]:
    """Parts 1 and 2 (or 5) on ``world``: the levels job, run while its bees are up."""
    swarm_id = f"bcu-{label}-{run_id}"
    async with bees_of_a_swarm(http, world, swarm_id, args.bees) as instances:
        bare_exchange = f"bench.cu-{label}-{run_id}"
        async with bare_responders(world.amqp_url, bare_exchange, instances):
            cpu = [g.cpu_seconds() for g in world.gateways]
            figures = await run_client({
                "mode": "levels", "label": label, "amqp_url": world.amqp_url, "bases": world.bases,
                "swarm_id": swarm_id, "instances": instances, "bare_exchange": bare_exchange, "levels": levels,
                "n": args.n, "warmup": args.warmup, "early_n": early_n})
            figures["gateway_cpu_s"] = sum(g.cpu_seconds() for g in world.gateways) - sum(cpu)
    return figures


async def replays(http: aiohttp.ClientSession, world: Deployment, run_id: str, args: argparse.Namespace
                  ) -> dict[str, Any]:
    """Part 3: one config update, then the same key and body again and again, against /healthz."""
    base = world.bases[0]
    swarm_id = f"brp-{run_id}"
    async with bees_of_a_swarm(http, world, swarm_id, 1) as instances:
        url = f"{base}/api/components/{ROLE}/{instances[0]}/config"
        body = {"idempotencyKey": str(uuid.uuid4()), "patch": {"ratePerSec": 7}}
        async with http.post(url, json=body) as resp:
            if resp.status != 202:
                raise BenchError(f"POST config for the replay key: {resp.status} {await resp.text()}")
        await asyncio.sleep(0.5)  # its outcome comes and goes before the timed replays
        progress(f"idempotent replays: {args.rounds} x ({args.http_n} replays + {args.http_n} healthz), "
                 f"concurrency {args.http_c}")
        figures = await replay_against_healthz(base, {"method": "POST", "url": url, "body": body}, args.http_n,
                                               args.http_c, args.rounds, HTTP_WARMUP)
    replay_rps = median([r["rps"] for r in figures["replay"]])
    health_rps = median([r["rps"] for r in figures["healthz"]])
    return {**figures, "replay_rps": replay_rps, "healthz_rps": health_rps, "ratio": replay_rps / health_rps}


async def fanout(http: aiohttp.ClientSession, world: Deployment, run_id: str, n: int,
                 args: argparse.Namespace) -> dict[str, Any]:
    """Part 4 for one N: create N swarms, register their controllers by status, toggle them."""
    base = world.bases[0]
    swarm_ids = [f"bfc-{run_id}-{i}" for i in range(n)]
    instances = [keys.controller_instance(s) for s in swarm_ids]
    progress(f"create {n} swarms (untimed)")
    await create_swarms(http, base, swarm_ids)
    progress(f"register {n} simulated swarm-controllers by their first status")
    registration = await run_client({"mode": "register", "amqp_url": world.amqp_url, "base": base,
                                     "instances": instances, "swarm_ids": swarm_ids})
    bare_exchange = f"bench.fan-{run_id}-{n}"
    async with responder_process(world.amqp_url, [keys.CONTROL_EXCHANGE, bare_exchange]) as answered:
        figures = await run_client({"mode": "fanout", "amqp_url": world.amqp_url, "base": base,
                                    "instances": instances, "swarm_ids": swarm_ids, "bare_exchange": bare_exchange,
                                    "rounds": args.rounds})
    runs = 2 * (args.rounds + 1)  # gateway and bare, warm-up included
    if answered.get("answered") != runs * n or answered.get("signals") != runs:
        raise BenchError(f"the responder answered {answered}, not {runs} x {n} signals")
    return {**figures, "registration": registration, "responder": answered}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from controlplane.bus.management import Management

    run_id = uuid.uuid4().hex[:6]
    owner = f"bench-{run_id}"
    tmp = Path(tempfile.mkdtemp(prefix="cp-bench-cu-"))
    results: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        async with Management(MANAGEMENT) as management, aiohttp.ClientSession() as http:
            overview = await management.overview()
            results["environment"] = environment(
                f"RabbitMQ {overview.get('rabbitmq_version')} (Erlang {overview.get('erlang_version')})")

            if "sqlite" in args.parts:
                progress("parts 1-3: one gateway on SQLite")
                async with deployment(management, tmp, "sqlite", owner) as world:
                    results["config_update"] = await config_updates(http, world, run_id, "sqlite", args,
                                                                     args.levels, args.early_n)
                    results["replay"] = await replays(http, world, run_id, args)

            results["fanout"] = []
            for n in args.fanout if "fanout" in args.parts else ():
                progress(f"part 4: registration and bulk toggle to {n}, on a fresh gateway")
                async with deployment(management, tmp, f"fan-{n}", owner,
                                      status_interval_s=FANOUT_STATUS_INTERVAL_S) as world:
                    results["fanout"].append(await fanout(http, world, run_id, n, args))

            if "postgres" in args.parts:
                progress("part 5: two gateways on PostgreSQL")
                async with scratch_postgres_database() as url, \
                        deployment(management, tmp, "pg", owner, gateways=2, database_url=url) as world:
                    results["postgres"] = await config_updates(http, world, run_id, "pg", args, args.pg_levels)
            progress("cleaning up")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["runtime_s"] = time.perf_counter() - started
    return results


# --- output ------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return percentile(values, 50)


def level_lines(part: dict[str, Any]) -> list[str]:
    lines = [f"  {'concurrency':<12} {'path':<30} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'max ms':>8} "
             f"{'done/s':>8}"]
    for row in part["levels"]:
        g, b = row["gateway"], row["bare"]
        c = str(row["concurrency"])
        lines += [
            f"  {c:<12} {'gateway: POST -> ev.ready':<30} {g['n']:>5} {g['p50']:>8.1f} {g['p99']:>8.1f} "
            f"{g['mean']:>8.1f} {g['max']:>8.1f} {g['per_s']:>8.0f}",
            f"  {'':<12} {'  POST -> 202':<30} {'':>5} {g['accepted_p50']:>8.1f} {g['accepted_p99']:>8.1f}",
            *([f"  {'':<12} {'signal straight to the bees':<30} {row['bees']['n']:>5} {row['bees']['p50']:>8.1f} "
               f"{row['bees']['p99']:>8.1f} {row['bees']['mean']:>8.1f} {row['bees']['max']:>8.1f} "
               f"{row['bees']['per_s']:>8.0f}"] if "bees" in row else []),
            f"  {'':<12} {'bare aio-pika request/reply':<30} {b['n']:>5} {b['p50']:>8.1f} {b['p99']:>8.1f} "
            f"{b['mean']:>8.1f} {b['max']:>8.1f} {b['per_s']:>8.0f}",
            (f"  {'':<12} gateway / bare: p50 {row['ratio_p50']:.1f}x ({g['p50'] - b['p50']:+.1f} ms), "
             f"done/s {row['ratio_per_s']:.2f}x; ev.ready seen before the 202: {g['event_before_202']} of {g['n']}"),
        ]
        if g["errors"]:
            lines.append(f"  {'':<12} NOT 202 (left out of the figures above): {g['errors']} requests, "
                         f"{g['error_kinds']}; see the gateway's log")
    return lines


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    env = results["environment"]
    lines = [
        *header("config-update", env),
        "The gateway runs as a process of its own (python -m controlplane.cli gateway), reached over HTTP and AMQP only.",
    ]
    if "config_update" in results:
        lines += ["", render_sqlite(results, args)]
    if results.get("fanout"):
        lines += ["", render_fanout(results, args)]
    if "postgres" in results:
        lines += ["", (f"5. Config update, two gateways on one PostgreSQL database, requests alternated between them, "
                       f"closed loop over {args.bees} bees"),
                  *level_lines(results["postgres"]),
                  f"  both gateway processes' CPU during part 5: {results['postgres']['gateway_cpu_s']:.1f} s"]
    lines += ["", summary(results), "", f"total run time: {results['runtime_s']:.0f} s"]
    return "\n".join(lines)


def render_sqlite(results: dict[str, Any], args: argparse.Namespace) -> str:
    """Parts 1 to 3."""
    part = results["config_update"]
    lines = [
        (f"1. Config update, one gateway on SQLite, closed loop over {args.bees} bees: "
         "POST /api/components/generator/<instance>/config -> ev.ready.config-update.generator.<instance> on a watcher"),
        *level_lines(part),
        f"  gateway process CPU during parts 1 and 2: {part['gateway_cpu_s']:.1f} s (warm-ups included)",
    ]
    early = part.get("early")
    if early:
        lines += ["", (f"2. Outcome before the 202: {early['event_before_202']} of {early['n']} config updates at "
                       f"concurrency 1 had their ev.ready reach the watcher before the 202 reached the caller "
                       f"(POST -> 202 p50 {early['accepted_p50']:.1f} ms, POST -> ev.ready p50 {early['p50']:.1f} ms)")]
    rp = results["replay"]
    lines += [
        "",
        (f"3. Idempotent replay: the same key and body re-POSTed to /api/components/generator/<instance>/config, "
         f"against GET /healthz, {args.http_n} requests each at concurrency {args.http_c}, median of {args.rounds} rounds"),
        f"  {'path':<36} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}",
    ]
    for name, label, rate in (("replay", "POST config, replayed (202)", rp["replay_rps"]),
                              ("healthz", "GET /healthz", rp["healthz_rps"])):
        p50 = median([r["latency_ms"]["p50"] for r in rp[name]])
        p99 = median([r["latency_ms"]["p99"] for r in rp[name]])
        lines.append(f"  {label:<36} {rate:>8.0f} {p50:>8.1f} {p99:>8.1f}")
    lines.append(f"  ratio replay / healthz: {rp['ratio']:.2f}x")
    return "\n".join(lines)


def render_fanout(results: dict[str, Any], args: argparse.Namespace) -> str:
    """Part 4."""
    lines = [("4. Registration and bulk toggle, a fresh gateway per N: N simulated swarm-controllers report once; "
              "POST /api/controllers/config {enabled: false}, one responder; "
              f"median of {args.rounds} rounds [min-max], ms from the POST (bare: from the first publish)"),
             (f"  {'N':>5} {'path':<32} {'-> 202':>16} {'-> first ev.ready':>18} {'-> all N ev.ready':>18} "
              f"{'-> GET succeeded':>18}")]

    def cell(rounds: list[dict[str, Any]], side: str, field: str, width: int) -> str:
        values = [ms(r[side][field]) for r in rounds]
        text = f"{median(values):.0f} [{min(values):.0f}-{max(values):.0f}]"
        return f"{text:>{width}}"

    for fan in results["fanout"]:
        rounds, n, reg = fan["rounds"], fan["targets"], fan["registration"]
        bare_all = median([r["bare"]["all"] for r in rounds])
        lines += [
            (f"  {n:>5} {'gateway':<32} {cell(rounds, 'gateway', 'accepted', 16)} {cell(rounds, 'gateway', 'first', 18)} "
             f"{cell(rounds, 'gateway', 'all', 18)} {cell(rounds, 'gateway', 'succeeded', 18)}"),
            (f"  {'':>5} {'bare publisher (all published)':<32} {cell(rounds, 'bare', 'published', 16)} "
             f"{cell(rounds, 'bare', 'first', 18)} {cell(rounds, 'bare', 'all', 18)}"),
            (f"  {'':>5} against the bare all N ev.ready: gateway all N ev.ready "
             f"{median([r['gateway']['all'] for r in rounds]) / bare_all:.2f}x, "
             f"GET succeeded {median([r['gateway']['succeeded'] for r in rounds]) / bare_all:.2f}x"),
            (f"  {'':>5} GET /api/operations/{{cid}}?wait=60 sent after the 202, again (after {POLL_S * 1000:.0f} ms, "
             f"{FAST_POLL_S * 1000:.0f} ms once all N ev.ready were in) while it answers open; median "
             f"{median([r['gateway']['polls'] for r in rounds]):.0f} GETs"),
            (f"  {'':>5} registration: {reg['listed']:.2f} s from the first of N statuses to GET /api/components "
             f"listing all {n} (all published after {reg['published']:.2f} s; {reg['polls']} GETs, the slowest "
             f"{ms(reg['slowest_get']):.0f} ms, each {REGISTER_POLL_S * 1000:.0f} ms or twice its time after the last)"),
        ]
    return "\n".join(lines)


def summary(results: dict[str, Any]) -> str:
    """Each goal's figure beside its reference from the same run; nothing is asserted."""
    rows: list[tuple[str, str, str, str, str]] = []
    for part, where in (("config_update", "SQLite, 1 gateway"), ("postgres", "PostgreSQL, 2 gateways")):
        for row in (results.get(part) or {}).get("levels", []):
            g, b, c = row["gateway"], row["bare"], row["concurrency"]
            goal_p50 = "<= bare + 3 ms" if part == "config_update" and c == 1 else "report"
            goal_rate = ">= 0.8x" if part == "config_update" and c == 32 else "report"
            failed = f" ({g['errors']} not 202)" if g["errors"] else ""
            rows += [(f"config update c={c}, p50 ms ({where}){failed}", f"{g['p50']:.1f}", f"{b['p50']:.1f}",
                      f"{g['p50'] - b['p50']:+.1f} ms", goal_p50),
                     (f"config updates completed/s c={c} ({where})", f"{g['per_s']:.0f}", f"{b['per_s']:.0f}",
                      f"{row['ratio_per_s']:.2f}x", goal_rate)]
    if "replay" in results:
        rp = results["replay"]
        rows.append(("idempotent replay req/s (ref: GET /healthz)", f"{rp['replay_rps']:.0f}",
                     f"{rp['healthz_rps']:.0f}", f"{rp['ratio']:.2f}x", ">= 0.5x"))
    for fan in results["fanout"]:
        rounds, n = fan["rounds"], fan["targets"]
        value, reference = (median([ms(r["gateway"]["succeeded"]) for r in rounds]),
                            median([ms(r["bare"]["all"]) for r in rounds]))
        rows.append((f"bulk toggle N={n}: POST -> GET succeeded, ms (ref: bare all ev.ready)", f"{value:.0f}",
                     f"{reference:.0f}", f"{value / reference:.2f}x", "<= 1.5x"))
    for fan in results["fanout"]:
        n = fan["targets"]
        rows.append((f"{n} controllers: first status -> all listed, s", f"{fan['registration']['listed']:.2f}", "-",
                     "-", "< 1 s" if n >= 1000 else "report"))
    early = (results.get("config_update") or {}).get("early")
    if early:
        rows.append(("outcome event before the 202", f"{early['event_before_202']} of {early['n']}", "-", "-", "0"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    head = ("figure", "gateway", "reference", "ratio", "goal")
    widths = [max(w, len(h)) for w, h in zip(widths, head, strict=True)]

    def fmt(cells: tuple[str, ...]) -> str:
        return "  " + "  ".join([cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))])

    return "\n".join(["Summary against the goals (each reference measured in the same run)", fmt(head), *map(fmt, rows)])


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
    parser.add_argument("--quick", action="store_true",
                        help="a short run: n 60, levels 1,32, fan-out to 100 only, 1 round, 200 replays")
    parser.add_argument("--n", type=int, default=None, help="measured requests per concurrency and path (default 300)")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up requests per concurrency and path (default 20)")
    parser.add_argument("--levels", type=int_list, default=None, help="concurrencies (default 1,8,32)")
    parser.add_argument("--early-n", type=int, default=50, help="config updates counted for outcome-before-202 (50)")
    parser.add_argument("--bees", type=int, default=8, help="generator bees the patches are spread over (default 8)")
    parser.add_argument("--http-n", type=int, default=None, help="replays and healthz requests per round (default 500)")
    parser.add_argument("--http-c", type=int, default=20, help="replay and healthz concurrency (default 20)")
    parser.add_argument("--fanout", type=int_list, default=None, help="controllers per bulk toggle (100,1000)")
    parser.add_argument("--rounds", type=int, default=None, help="bulk toggles and replay rounds, median reported (3)")
    parser.add_argument("--pg-levels", type=int_list, default=None, help="concurrencies on PostgreSQL (default 1,32)")
    parser.add_argument("--parts", type=lambda t: set(t.split(",")), default={"sqlite", "fanout", "postgres"},
                        help="which parts to run: sqlite (1-3), fanout (4), postgres (5); default all")
    parser.add_argument("--json", type=Path, help="also write the raw figures to this file")
    args = parser.parse_args()
    args.n = args.n or (60 if args.quick else 300)
    args.levels = args.levels or ([1, 32] if args.quick else [1, 8, 32])
    args.pg_levels = args.pg_levels or [1, 32]
    args.fanout = args.fanout or ([100] if args.quick else [100, 1000])
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.http_n = args.http_n or (200 if args.quick else 500)
    run_and_print(args, run, render)


if __name__ == "__main__":
    main()
