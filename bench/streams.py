"""Streams registry benchmark: advertisement, heartbeats, listing, negotiation and the
gateway's memory with 10,000 streams, each beside a reference measured in the same run.

    .venv/bin/python -m bench.streams              # about 2 minutes
    .venv/bin/python -m bench.streams --json /tmp/streams.json

1. Advertise 10,000 streams (``POST /streams/advertise``) at concurrency 32.
2. ``POST /streams/{id}/heartbeat``, closed loop at concurrency 32, cycling over the 10,000
   ids, beside ``GET /healthz`` (the gateway's bare HTTP rate) at the same concurrency; rounds
   alternate, the median is reported. Goal: at least 3,000 heartbeats/s.
3. Heartbeats at 1,000/s, open loop (request i due at t0 + i/1000, at most 64 in flight,
   latency counted from when it was due), and meanwhile, from a second client process,
   ``GET /streams`` and ``GET /streams/state`` one at a time. Goal: ``GET /streams`` of the
   10,000 streams with p99 under 150 ms. The same reads on an idle gateway are shown too.
4. ``POST /streams/{id}/request`` at concurrency 16 over 200 of the streams, each answered
   ``{"accepted": true}`` by one responder in this process (an exclusive queue bound to
   ``sig.stream-request.*``), beside a bare aio-pika request-reply (mandatory publish with
   confirms on ``ph.control``, the reply to a queue of its own bound there, the same
   responder); and, of the requests' time, how much the gateway waited for the answer (its
   ``cp_stream_negotiation_seconds``).
   Goal: at least 1,000 negotiations/s, p50 under 15 ms. Then the same negotiations for 5 s
   with wrk as the client, when it is installed: a C client takes less of the two cores the
   gateway shares with it than the Python one (``bench.wrk``). Three rounds of the three,
   the median round of each reported. The same at concurrency 2, for the latency a caller
   sees on a machine that is not full.
5. The gateway's resident memory (VmRSS) idle, after the 10,000 advertisements, and at the end
   with the sessions of part 4. Goal: under 150 MB with 10,000 streams.

The gateway runs as a process of its own (``controlplane gateway``, with a vhost and a SQLite
file of its own, no engine pool), the HTTP clients in processes of their own. Its stream TTL
is 600 s so that no stream expires during the run: expiry is not measured here. The
reference column "earlier" is the best existing implementation of this API, measured before.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
from aio_pika.abc import AbstractIncomingMessage
from aiormq import spec
from aiormq.abc import DeliveredMessage

from bench import wrk
from bench.common import (
    BROKER, MANAGEMENT, BenchError, GatewayProcess, child_pids, environment, gateway_process, header, http_load,
    progress, run_and_print,
)
from bench.httpload import percentile
from controlplane.bus.management import Management
from controlplane.contract import keys

STREAM_TTL_S = 600  # longer than the run: no stream expires while it is measured
BARE_REPLY_KEY = "reply.bench.bare"
BARE_KEY = "bench.bare-request"  # no gateway queue binds it: only the responder's queue
SETTLE_TIMEOUT_S = 30
# Figures of the best existing implementation of this API, measured earlier.
EARLIER = {"heartbeats_rps": 1366, "list_ms": 3700, "negotiations_rps": 93, "negotiation_p50_ms": 154,
           "rss_mib": 108}
GOALS = {"heartbeats_rps": 3000, "list_p99_ms": 150, "negotiations_rps": 1000, "negotiation_p50_ms": 15,
         "rss_mb": 150}


# --- the gateway from outside ----------------------------------------------------------------


def memory(pid: int) -> dict[str, float]:
    """Resident memory now (VmRSS) and at its peak (VmHWM), in MiB, from /proc; and that of the
    processes it runs (the store's writer process), apart."""
    def rss(of: int, key: str) -> float:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{of}/status").read_text().splitlines() if ":" in line)
        return int(fields[key].split()[0]) / 1024

    return {"rss_mib": rss(pid, "VmRSS"), "peak_mib": rss(pid, "VmHWM"),
            "children_rss_mib": sum(rss(child, "VmRSS") for child in child_pids(pid))}


async def settle(gateway: GatewayProcess) -> None:
    """Wait until the gateway is idle (under 10 % of a CPU over half a second): the store's
    detached writes of one part must not land in the next part's figures."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        before = gateway.cpu_seconds()
        await asyncio.sleep(0.5)
        if gateway.cpu_seconds() - before < 0.05:
            return
    progress(f"the gateway was still busy after {SETTLE_TIMEOUT_S} s; measuring anyway")


class Phases:
    """Wall and gateway CPU seconds of each part."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        self.spent: dict[str, dict[str, float]] = {}

    @asynccontextmanager
    async def phase(self, name: str) -> AsyncIterator[None]:
        cpu, wall = self.gateway.cpu_seconds(), time.perf_counter()
        yield
        self.spent[name] = {"wall_s": time.perf_counter() - wall, "cpu_s": self.gateway.cpu_seconds() - cpu}


def checked(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for res in results:
        if res["errors"]:
            raise BenchError(f"{res['name']}: {res['errors']} of {res['n']} requests failed: {res['first_errors']}")
    return results


def job(name: str, method: str, target: str | list[str], n: int, concurrency: int, status: int = 200,
        **more: Any) -> dict[str, Any]:
    """A ``bench.httpload`` job; a list of targets is cycled through."""
    where = {"urls": target} if isinstance(target, list) else {"url": target}
    return {"name": name, "method": method, **where, "n": n, "concurrency": concurrency, "expect_status": status,
            **more}


# --- 1. advertise ----------------------------------------------------------------------------


def advert(i: int) -> dict[str, Any]:
    return {"name": f"bench-camera-{i}", "stream_type": "ndi", "publisher_id": f"bench-publisher-{i % 100}",
            "protocol": "ndi", "address": f"10.0.{i // 250 % 250}.{i % 250 + 1}", "port": 5960 + i % 1000}


async def advertise(base: str, n: int, concurrency: int) -> tuple[dict[str, Any], list[str]]:
    """``n`` advertisements; their result and the ids ``GET /streams`` then lists."""
    bodies = [advert(i) for i in range(n)]
    [result] = checked(await http_load([job("advertise", "POST", f"{base}/streams/advertise", n, concurrency, 201,
                                            bodies=bodies)]))
    async with aiohttp.ClientSession() as http, http.get(f"{base}/streams") as resp:
        ids = [s["id"] for s in await resp.json()]
    if len(ids) != n:
        raise BenchError(f"{n} streams advertised, GET /streams lists {len(ids)}")
    return result, ids


# --- 2. heartbeats, closed loop --------------------------------------------------------------


async def heartbeats_beside_healthz(base: str, beats: list[str], n: int, concurrency: int,
                                    rounds: int) -> dict[str, list[dict[str, Any]]]:
    """``rounds`` x (``n`` heartbeats + ``n`` ``GET /healthz``), alternating so drift favours neither."""
    health = f"{base}/healthz"
    jobs = [job("warmup", "POST", beats, 2000, concurrency), job("warmup", "GET", health, 2000, concurrency)]
    for r in range(rounds):
        pair = [job("heartbeat", "POST", beats, n, concurrency), job("healthz", "GET", health, n, concurrency)]
        jobs += pair if r % 2 == 0 else pair[::-1]
    measured = [r for r in checked(await http_load(jobs)) if r["name"] != "warmup"]
    return {name: [r for r in measured if r["name"] == name] for name in ("heartbeat", "healthz")}


# --- 3. heartbeats at a steady rate, and the reads meanwhile ---------------------------------


def reads(base: str, n: int) -> list[dict[str, Any]]:
    """``GET /streams`` then ``GET /streams/state``, ``n`` each, one at a time."""
    return [job("list", "GET", f"{base}/streams", n, 1), job("state", "GET", f"{base}/streams/state", n, 1)]


async def sustained(base: str, beats: list[str], rate: float, seconds: float, in_flight: int, n_reads: int,
                    reads_after_s: float) -> dict[str, Any]:
    """Heartbeats at ``rate``/s for ``seconds``, open loop; the reads from a second client
    process once the heartbeats have run ``reads_after_s``."""
    n = int(rate * seconds)
    started = time.perf_counter()

    async def heartbeats() -> tuple[dict[str, Any], float]:
        [result] = checked(await http_load([job("sustained", "POST", beats, n, in_flight, rate=rate)]))
        return result, time.perf_counter() - started

    async def reads_meanwhile() -> tuple[list[dict[str, Any]], float]:
        await asyncio.sleep(reads_after_s)
        return checked(await http_load(reads(base, n_reads))), time.perf_counter() - started

    (beat, beats_done), (read, reads_done) = await asyncio.gather(heartbeats(), reads_meanwhile())
    if reads_done > beats_done:
        progress(f"the reads ended {reads_done - beats_done:.1f} s after the heartbeats: not all under load")
    return {"heartbeat": beat, "list": read[0], "state": read[1], "reads_under_load": reads_done <= beats_done}


# --- 4. negotiations, and the bare request-reply ---------------------------------------------


@asynccontextmanager
async def responder(amqp_url: str, *bindings: str) -> AsyncIterator[dict[str, int]]:
    """A publisher answering every request on ``bindings`` with ``{"accepted": true}``, on
    ``ph.control`` with the request's reply-to as the key; yields its count of answers.

    It shares the machine's two cores with the gateway, so it costs as little as a publisher
    can: aiormq's channel underneath aio-pika's, each request answered from its callback
    without confirms (a lost answer shows as a failed request anyway)."""
    answered = {"n": 0}
    connection = await aio_pika.connect(amqp_url, client_properties={"connection_name": "bench-streams-publisher"})
    try:
        channel = await connection.channel(publisher_confirms=False)
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        for key in bindings:
            await queue.bind(keys.CONTROL_EXCHANGE, routing_key=key)
        raw = await channel.get_underlay_channel()
        answer = json.dumps({"accepted": True}).encode()

        async def on_request(message: DeliveredMessage) -> None:
            asked = message.header.properties
            await raw.basic_publish(answer, exchange=keys.CONTROL_EXCHANGE, routing_key=asked.reply_to or "",
                                    properties=spec.Basic.Properties(content_type="application/json",
                                                                     correlation_id=asked.correlation_id),
                                    wait=False)
            answered["n"] += 1

        # no_ack: the broker pushes without waiting for acks (prefetch does not apply).
        await raw.basic_consume(queue.name, on_request, no_ack=True)
        yield answered
    finally:
        await connection.close()


async def bare_round_trips(amqp_url: str, n: int, concurrency: int, body: dict[str, Any]) -> dict[str, Any]:
    """What the gateway's requester does, alone: publish mandatory with confirms on
    ``ph.control``, the reply to an exclusive queue of its own bound there, wait for the answer
    with the same correlation id."""
    connection = await aio_pika.connect(amqp_url, client_properties={"connection_name": "bench-streams-bare"})
    try:
        channel = await connection.channel()  # confirms on, as the requester's channel
        pending: dict[str, asyncio.Future[bytes]] = {}

        async def on_reply(message: AbstractIncomingMessage) -> None:
            future = pending.pop(message.correlation_id or "", None)
            if future is not None and not future.done():
                future.set_result(message.body)

        exchange = await channel.get_exchange(keys.CONTROL_EXCHANGE, ensure=False)
        replies = await channel.declare_queue("", exclusive=True)
        await replies.bind(exchange, routing_key=BARE_REPLY_KEY)
        await replies.consume(on_reply, no_ack=True)
        latencies: list[float] = []
        next_i = 0

        async def worker() -> None:
            nonlocal next_i
            while next_i < n:
                next_i += 1
                correlation_id = uuid.uuid4().hex
                future = pending[correlation_id] = asyncio.get_running_loop().create_future()
                started = time.perf_counter()
                confirmed = await exchange.publish(
                    aio_pika.Message(json.dumps({**body, "session_id": correlation_id}).encode(),
                                     content_type="application/json", correlation_id=correlation_id,
                                     message_id=correlation_id, reply_to=BARE_REPLY_KEY, expiration=5),
                    routing_key=BARE_KEY, mandatory=True)
                if isinstance(confirmed, DeliveredMessage):
                    raise BenchError(f"the bare request was returned: nothing bound to {BARE_KEY}")
                json.loads(await asyncio.wait_for(future, 5))
                latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        await connection.close()
    return {"n": n, "elapsed_s": elapsed, "rps": n / elapsed,
            "latency_ms": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99)}}


async def negotiation_seconds(base: str) -> tuple[float, float]:
    """The gateway's own ``cp_stream_negotiation_seconds`` (from the request's publish to its
    answer): its sum and count so far."""
    async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    found = {name: float(value) for name, value in (line.split() for line in text.splitlines()
             if line.startswith(("cp_stream_negotiation_seconds_sum ", "cp_stream_negotiation_seconds_count ")))}
    return found["cp_stream_negotiation_seconds_sum"], found["cp_stream_negotiation_seconds_count"]


async def negotiations(gateway: GatewayProcess, amqp_url: str, ids: list[str], n: int, concurrency: int,
                       warmup: int, rounds: int = 1, wrk_s: float = 0) -> dict[str, Any]:
    """``rounds`` x (``n`` negotiations from the Python client, ``n`` bare round trips and, with
    ``wrk_s``, that long of negotiations from wrk); each figure is its median round, as the
    machine's pace drifts within a run."""
    base = gateway.base
    asks = [f"{base}/streams/{stream_id}/request" for stream_id in ids]
    body = {"consumer_id": "bench-consumer", "consumer_address": "10.1.0.1"}
    question = {"stream_id": ids[0], "stream_name": "bench-camera-0", "consumer_port": None, "config": {}, **body}
    measured: list[dict[str, Any]] = []
    by_wrk: list[dict[str, Any]] = []
    bare: list[dict[str, Any]] = []
    async with responder(amqp_url, keys.signal_key(keys.STREAM_REQUEST, "*"), BARE_KEY) as answered:
        # The same warm-up for both, then each measured alone.
        checked(await http_load([job("warmup", "POST", asks, warmup, concurrency, 201, body=body)]))
        await bare_round_trips(amqp_url, warmup, concurrency, question)
        for _ in range(rounds):
            measured.append(await negotiations_by_python_client(gateway, asks, body, n, concurrency))
            bare.append(await bare_round_trips(amqp_url, n, concurrency, question))
            if wrk_s:
                by_wrk.append(await negotiations_by_wrk(gateway, asks, body, concurrency, wrk_s))
    made = 2 * (rounds * n + warmup) + sum(r["n"] for r in by_wrk)
    # wrk stops with up to ``concurrency`` requests in flight, answered but not counted.
    if not made <= answered["n"] <= made + concurrency * len(by_wrk):
        raise BenchError(f"the responder answered {answered['n']} requests, {made} were made")
    return {"gateway": middle(measured), "wrk": middle(by_wrk) if by_wrk else None, "bare": middle(bare),
            "rounds": {"gateway": measured, "wrk": by_wrk, "bare": bare}, "streams": len(ids),
            "sessions": rounds * n + warmup + sum(r["n"] for r in by_wrk)}


async def negotiations_by_python_client(gateway: GatewayProcess, asks: list[str], body: dict[str, Any], n: int,
                                        concurrency: int) -> dict[str, Any]:
    before, cpu = await negotiation_seconds(gateway.base), gateway.cpu_seconds()
    [measured] = checked(await http_load([job("negotiate", "POST", asks, n, concurrency, 201, body=body)]))
    cpu, after = gateway.cpu_seconds() - cpu, await negotiation_seconds(gateway.base)
    # Of each request's time in the gateway, how much went to the round trip to the publisher.
    measured["round_trip_mean_ms"] = (after[0] - before[0]) / max(after[1] - before[1], 1) * 1000
    # What one negotiation costs the gateway, whatever the machine lets the rate be.
    measured["cpu_ms"] = cpu / n * 1000
    return measured


async def negotiations_by_wrk(gateway: GatewayProcess, asks: list[str], body: dict[str, Any], concurrency: int,
                              duration_s: float) -> dict[str, Any]:
    """The same negotiations with wrk as the client: what the gateway does when the client
    takes less of the two cores (``bench.wrk``)."""
    cpu = gateway.cpu_seconds()
    [measured] = checked([await wrk.load("negotiate-wrk", "POST", asks, body, concurrency, duration_s, 201)])
    measured["cpu_ms"] = (gateway.cpu_seconds() - cpu) / max(measured["n"], 1) * 1000
    return measured


# --- the run ---------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"environment": environment(f"RabbitMQ at {BROKER}")}
    started = time.perf_counter()
    async with Management(MANAGEMENT) as management, management.scratch_vhost("cp-bench") as vhost:
        amqp_url = f"amqp://guest:guest@{BROKER}/{vhost}"
        with tempfile.TemporaryDirectory(prefix="cp-bench-streams-") as folder:
            tmp = Path(folder)
            settings = {"amqp_url": amqp_url, "database_url": f"sqlite:///{tmp / 'streams.db'}",
                        "instance_id": f"bench-{uuid.uuid4().hex[:6]}", "log_level": "WARNING", "ace_pool_id": "",
                        "broker_users": "false", "stream_ttl_s": STREAM_TTL_S}
            async with gateway_process("streams", settings, tmp) as gateway:
                base, phases = gateway.base, Phases(gateway)
                mem = results["memory"] = {"idle": memory(gateway.pid)}
                progress(f"1. advertise {args.streams} streams, concurrency {args.concurrency}")
                async with phases.phase("advertise"):
                    results["advertise"], ids = await advertise(base, args.streams, args.concurrency)
                    await settle(gateway)
                mem["streams"] = memory(gateway.pid)
                beats = [f"{base}/streams/{stream_id}/heartbeat" for stream_id in ids]
                progress(f"2. {args.rounds} x ({args.hb_n} heartbeats + {args.hb_n} GET /healthz), "
                         f"concurrency {args.concurrency}")
                async with phases.phase("heartbeats"):
                    results["heartbeats"] = await heartbeats_beside_healthz(base, beats, args.hb_n, args.concurrency,
                                                                            args.rounds)
                    await settle(gateway)
                progress(f"3. GET /streams and /streams/state idle, {args.idle_reads} each")
                listing, state = checked(await http_load(reads(base, args.idle_reads)))
                results["idle_reads"] = {"list": listing, "state": state}
                progress(f"3. heartbeats at {args.rate:.0f}/s for {args.sustain_s:.0f} s, the reads meanwhile")
                async with phases.phase("sustained"):
                    results["sustained"] = await sustained(base, beats, args.rate, args.sustain_s, args.in_flight,
                                                           args.reads, 2.0)
                    await settle(gateway)
                progress(f"4. {args.neg_rounds} x ({args.neg_n} negotiations over {args.neg_streams} streams, as "
                         f"many bare round trips"
                         f"{f', {args.neg_wrk_s:g} s of negotiations from wrk' if wrk.available() else ''}), "
                         f"concurrency {args.neg_c}")
                async with phases.phase("negotiations"):
                    results["negotiations"] = await negotiations(
                        gateway, amqp_url, ids[:args.neg_streams], args.neg_n, args.neg_c, args.neg_warmup,
                        args.neg_rounds, args.neg_wrk_s if wrk.available() else 0)
                    await settle(gateway)
                    # The same at low concurrency: the latency a caller sees when the machine is not full.
                    results["negotiations_low"] = await negotiations(gateway, amqp_url, ids[:args.neg_streams],
                                                                     args.neg_n // 5, args.neg_c_low, 50)
                    await settle(gateway)
                mem["end"] = memory(gateway.pid)
                results["phases"] = phases.spent
    results["runtime_s"] = time.perf_counter() - started
    return results


# --- the table -------------------------------------------------------------------------------


def verdict(met: bool, figure: float, goal: float) -> str:
    """"met", or "MISSED" and by how much (the figure as a share of the goal)."""
    return "met" if met else f"MISSED ({figure / goal:.0%} of the goal)"


def lat(res: dict[str, Any]) -> str:
    return f"p50 {res['latency_ms']['p50']:6.1f} ms, p99 {res['latency_ms']['p99']:6.1f} ms"


def middle(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median rate."""
    return sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]


def render_heartbeats(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    hb, hz = results["heartbeats"]["heartbeat"], results["heartbeats"]["healthz"]
    beat, health = middle(hb), middle(hz)
    goal = GOALS["heartbeats_rps"]
    met = verdict(beat["rps"] >= goal, beat["rps"], goal)
    rounds = (f"heartbeats {', '.join(format(r['rps'], ',.0f') for r in hb)}; "
              f"healthz {', '.join(format(r['rps'], ',.0f') for r in hz)}")
    return [
        f"2. heartbeats, closed loop, concurrency {args.concurrency}, {len(hb)} rounds of {hb[0]['n']:,} over "
        f"{results['advertise']['n']:,} streams alternating with GET /healthz (the median round)",
        f"  POST /streams/{{id}}/heartbeat  {beat['rps']:7,.0f} req/s, {lat(beat)}   "
        f"earlier {EARLIER['heartbeats_rps']:,}/s   goal >= {goal:,}/s: {met}",
        f"  GET /healthz                   {health['rps']:7,.0f} req/s, {lat(health)}",
        f"  ratio heartbeat/healthz: {beat['rps'] / health['rps']:.2f}   (rounds: {rounds})",
    ]


def render_sustained(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    st, idle = results["sustained"], results["idle_reads"]
    beat, listing, state = st["heartbeat"], st["list"], st["state"]
    p99, goal = listing["latency_ms"]["p99"], GOALS["list_p99_ms"]
    under_load = "" if st["reads_under_load"] else " (NOT all under load)"
    return [
        f"3. heartbeats at {beat['rate']:,.0f}/s, open loop ({beat['n']:,} requests, at most {args.in_flight} "
        "in flight, latency from when each was due)",
        f"  heartbeats                     {beat['rps']:7,.0f} req/s achieved, {lat(beat)}, "
        f"late (> 10 ms) {beat['late']}",
        f"  meanwhile, one at a time, from a second client{under_load}:",
        f"  GET /streams        x{listing['n']:<3} {lat(listing)}, max {listing['latency_ms']['max']:6.1f} ms, "
        f"{listing['response_bytes'] / 1e6:.2f} MB",
        f"    earlier {EARLIER['list_ms'] / 1000:.1f} s   goal p99 < {goal} ms: {verdict(p99 < goal, p99, goal)}",
        f"  GET /streams/state  x{state['n']:<3} {lat(state)}, max {state['latency_ms']['max']:6.1f} ms, "
        f"{state['response_bytes'] / 1e6:.2f} MB",
        f"  idle gateway: GET /streams x{idle['list']['n']} {lat(idle['list'])}; "
        f"GET /streams/state x{idle['state']['n']} {lat(idle['state'])}",
    ]


def render_negotiations(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    neg = results["negotiations"]
    gw, by_wrk, bare = neg["gateway"], neg.get("wrk"), neg["bare"]
    by_wrk_lines = [
        f"  the same, wrk as the client    {by_wrk['rps']:7,.0f} req/s, {lat(by_wrk)}   ({by_wrk['n']:,} in "
        f"{by_wrk['elapsed_s']:.0f} s; {by_wrk['cpu_ms']:.2f} ms of the gateway's CPU each)",
        f"    {_negotiation_goals(by_wrk)}",
    ] if by_wrk else ["  (not driven by wrk: it is not installed (apt-get install wrk), or --neg-wrk-s is 0)"]
    ratio_wrk = f"; wrk {by_wrk['rps'] / bare['rps']:.2f} (rate)" if by_wrk else ""
    return [
        f"4. negotiations, concurrency {args.neg_c}, over {neg['streams']} streams, one responder in the "
        f"benchmark's process, {len(neg['rounds']['bare'])} rounds (the median round of each)",
        f"  POST /streams/{{id}}/request    {gw['rps']:7,.0f} req/s, {lat(gw)}   ({gw['n']:,} from the Python "
        f"client; earlier {EARLIER['negotiations_rps']}/s at p50 {EARLIER['negotiation_p50_ms']} ms)",
        f"    {_negotiation_goals(gw)}",
        f"    mean {gw['latency_ms']['mean']:.1f} ms, of which {gw['round_trip_mean_ms']:.1f} ms from the request's "
        "publish to the answer, inside the gateway (its cp_stream_negotiation_seconds); "
        f"{gw['cpu_ms']:.2f} ms of the gateway's CPU each",
        *by_wrk_lines,
        f"  bare aio-pika request-reply    {bare['rps']:7,.0f} req/s, {lat(bare)}",
        f"  ratio control plane/bare: {gw['rps'] / bare['rps']:.2f} (rate), "
        f"{gw['latency_ms']['p50'] / bare['latency_ms']['p50']:.2f} (p50){ratio_wrk}",
        f"  (rounds, req/s: {_rounds(neg['rounds'])})",
        *_low(results["negotiations_low"], args.neg_c_low),
    ]


def _rounds(rounds: dict[str, list[dict[str, Any]]]) -> str:
    names = {"gateway": "Python client", "wrk": "wrk", "bare": "bare"}
    return "; ".join(f"{names[name]} {', '.join(format(r['rps'], ',.0f') for r in runs)}"
                     for name, runs in rounds.items() if runs)


def _negotiation_goals(res: dict[str, Any]) -> str:
    rps, p50 = res["rps"], res["latency_ms"]["p50"]
    rps_goal, p50_goal = GOALS["negotiations_rps"], GOALS["negotiation_p50_ms"]
    p50_verdict = "met" if p50 < p50_goal else f"MISSED ({p50 / p50_goal:.1f}x the goal)"
    return f"goal >= {rps_goal:,}/s: {verdict(rps >= rps_goal, rps, rps_goal)}; goal p50 < {p50_goal} ms: {p50_verdict}"


def _low(neg: dict[str, Any], concurrency: int) -> list[str]:
    gw, bare = neg["gateway"], neg["bare"]
    return [f"  at concurrency {concurrency}: POST /streams/{{id}}/request {gw['rps']:7,.0f} req/s, {lat(gw)}; "
            f"bare {bare['rps']:,.0f} req/s, {lat(bare)}"]


def render_memory(results: dict[str, Any]) -> list[str]:
    mem, streams = results["memory"], results["advertise"]["n"]
    with_streams_mb = mem["streams"]["rss_mib"] * 1.048576
    goal = GOALS["rss_mb"]
    return [
        "5. gateway resident memory (VmRSS)",
        f"  idle {mem['idle']['rss_mib']:.0f} MiB; with {streams:,} streams {mem['streams']['rss_mib']:.0f} MiB "
        f"({with_streams_mb:.0f} MB); at the end, with "
        f"{results['negotiations']['sessions'] + results['negotiations_low']['sessions']:,} sessions too, "
        f"{mem['end']['rss_mib']:.0f} MiB (peak {mem['end']['peak_mib']:.0f} MiB); besides, its store writer "
        f"process {mem['streams']['children_rss_mib']:.0f} MiB with the streams, "
        f"{mem['end']['children_rss_mib']:.0f} MiB at the end",
        f"  earlier {EARLIER['rss_mib']} MiB   goal < {goal} MB with {streams:,} streams: "
        f"{verdict(with_streams_mb < goal, with_streams_mb, goal)}",
    ]


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    adv = results["advertise"]
    cpu = "; ".join(f"{name} {p['cpu_s']:.1f} s in {p['wall_s']:.1f} s ({p['cpu_s'] / p['wall_s']:.0%})"
                    for name, p in results["phases"].items())
    return "\n".join([
        *header("streams registry", results["environment"]), "",
        f"1. advertise {adv['n']:,} streams, concurrency {args.concurrency}: {adv['rps']:,.0f} req/s, {lat(adv)}", "",
        *render_heartbeats(results, args), "",
        *render_sustained(results, args), "",
        *render_negotiations(results, args), "",
        *render_memory(results), "",
        f"gateway CPU per part: {cpu}",
        f"total run time: {results['runtime_s']:.0f} s",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=10_000, help="streams advertised (default 10000)")
    parser.add_argument("--concurrency", type=int, default=32, help="advertisements and heartbeats (default 32)")
    parser.add_argument("--hb-n", type=int, default=10_000,
                        help="heartbeats and GET /healthz per round (default 10000)")
    parser.add_argument("--rounds", type=int, default=3, help="heartbeat rounds, median reported (default 3)")
    parser.add_argument("--rate", type=float, default=1000, help="sustained heartbeats per second (default 1000)")
    parser.add_argument("--sustain-s", type=float, default=20, help="how long (default 20 s)")
    parser.add_argument("--in-flight", type=int, default=64, help="sustained heartbeats in flight at most (default 64)")
    parser.add_argument("--reads", type=int, default=30, help="GET /streams and /streams/state under load (default 30)")
    parser.add_argument("--idle-reads", type=int, default=10, help="the same on an idle gateway (default 10)")
    parser.add_argument("--neg-n", type=int, default=5000, help="negotiations and bare round trips (default 5000)")
    parser.add_argument("--neg-c", type=int, default=16, help="their concurrency (default 16)")
    parser.add_argument("--neg-c-low", type=int, default=2, help="the low concurrency also measured (default 2)")
    parser.add_argument("--neg-streams", type=int, default=200, help="streams negotiated (default 200)")
    parser.add_argument("--neg-warmup", type=int, default=200, help="untimed negotiations first (default 200)")
    parser.add_argument("--neg-rounds", type=int, default=3,
                        help="rounds of negotiations and bare round trips, median reported (default 3)")
    parser.add_argument("--neg-wrk-s", type=float, default=5,
                        help="the negotiations driven by wrk for this long, when it is installed (default 5 s; 0: not)")
    parser.add_argument("--json", type=Path)
    run_and_print(parser.parse_args(), run, render)


if __name__ == "__main__":
    main()
