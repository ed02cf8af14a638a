"""Webhook fan-out benchmark: how many signed deliveries per second the gateway makes to a local
receiver, beside the same number of bare aiohttp POSTs to the same receiver, in the same run.

    .venv/bin/python -m bench.webhooks                 # about half a minute
    .venv/bin/python -m bench.webhooks --events 1000 --webhooks 20 --json /tmp/webhooks.json

The gateway runs as a process of its own (``controlplane gateway``, a vhost and a SQLite file of
its own, no engine pool, ``CP_WEBHOOK_ALLOWED_TARGETS=["127.0.0.1"]``). ``--webhooks`` webhooks
are registered over HTTP, all to one receiver, itself a process of its own (this module with
``--receiver``: it counts what arrives, checks each signature by hand and times each delivery
from its event's timestamp). Events reach the gateway as a host controller's would: service
reports on ``ph.control`` (``ev.ready.service-report.<owner>``), ``--batch`` transitions each,
published from this process. So a delivery here is the whole path: the broker, the services
surface's projection, the queueing commit, the delivery loop's claim, the signed POST, the
record of its outcome.

Each round times ``--events`` x ``--webhooks`` deliveries from the first report's publish to
the last arrival, then the same number of bare POSTs of a payload of the same size at
``CP_WEBHOOK_CONCURRENCY`` from a load client process (``bench.httpload``); rounds alternate,
the median round is reported with the ratio of the two rates. A round counts only once the
gateway has recorded every delivery as delivered.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
from aiohttp import web

from bench.common import (
    BROKER, MANAGEMENT, REPO_ROOT, BenchError, GatewayProcess, environment, free_port, gateway_process, header,
    http_load, progress, run_and_print,
)
from bench.httpload import percentile
from controlplane.bus.management import Management
from controlplane.contract import keys

SECRET = "bench-webhook-secret"  # a plain secret: its UTF-8 bytes are the key
ARRIVAL_TIMEOUT_S = 300
RECORD_TIMEOUT_S = 60
OWNER = "bench-host"


# --- the receiver, a process of its own ----------------------------------------------------------


def receiver_app() -> web.Application:
    """``POST /hook`` counts, checks the signature when there is one, and times the delivery
    from its payload's timestamp; ``GET /count`` says so far; ``POST /reset`` starts again."""
    key = SECRET.encode()
    seen: dict[str, Any] = {"n": 0, "bad": 0, "ids": set(), "latencies": []}

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        seen["n"] += 1
        signature = request.headers.get("webhook-signature")
        if signature is not None:
            msg_id, stamp = request.headers["webhook-id"], request.headers["webhook-timestamp"]
            mac = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
            seen["bad"] += signature != "v1," + base64.b64encode(mac).decode()
            seen["ids"].add(msg_id)
            sent_at = datetime.fromisoformat(json.loads(body)["timestamp"].replace("Z", "+00:00")).timestamp()
            seen["latencies"].append((time.time() - sent_at) * 1000)
        return web.Response(text="ok")

    async def count(_: web.Request) -> web.Response:
        lat = seen["latencies"]
        return web.json_response({"n": seen["n"], "bad": seen["bad"], "distinct": len(seen["ids"]),
                                  "latency_ms": {"p50": percentile(lat, 50), "p99": percentile(lat, 99),
                                                 "max": max(lat, default=float("nan"))}})

    async def reset(_: web.Request) -> web.Response:
        seen.update(n=0, bad=0, ids=set(), latencies=[])
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_get("/count", count)
    app.router.add_post("/reset", reset)
    return app


def serve_receiver(port: int) -> None:
    async def main() -> None:
        runner = web.AppRunner(receiver_app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


@asynccontextmanager
async def receiver_process() -> AsyncIterator[str]:
    """The receiver's base URL while it runs."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.webhooks", "--receiver", str(port), cwd=str(REPO_ROOT),
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        if (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() != b"ready":
            raise BenchError("the receiver did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        await proc.wait()


# --- the run ---------------------------------------------------------------------------------------


async def register(http: aiohttp.ClientSession, base: str, receiver: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        body = {"url": f"{receiver}/hook?webhook={i}", "events": ["service:start"], "secret": SECRET}
        async with http.post(f"{base}/api/webhooks", json=body) as resp:
            answer = await resp.json()
            if resp.status != 201:
                raise BenchError(f"registering a webhook: {resp.status} {answer}")
            ids.append(answer["data"]["id"])
    return ids


def report(batch: list[str]) -> bytes:
    """A host controller's service report with one ``service:start`` transition per event id."""
    now = datetime.now(timezone.utc).isoformat()
    return json.dumps({"host": OWNER, "transitions": [
        {"event": "service:start", "eventId": event_id, "containerId": f"c{event_id}", "name": f"svc-{event_id[:8]}",
         "at": now, "reason": "started", "details": {}} for event_id in batch]}).encode()


async def until(what: str, timeout_s: float, check: Any) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.02)
    raise BenchError(f"{what}: not within {timeout_s:g} s")


async def fan_out(http: aiohttp.ClientSession, exchange: aio_pika.abc.AbstractExchange, gateway: GatewayProcess,
                  receiver: str, hooks: list[str], events: int, batch: int) -> dict[str, Any]:
    """``events`` events for every webhook: from the first publish to the last arrival, and to
    the last outcome recorded."""
    async with http.post(f"{receiver}/reset"):
        pass
    expected = events * len(hooks)
    ids = [uuid.uuid4().hex for _ in range(events)]
    key = keys.service_report_key(OWNER)
    cpu = gateway.cpu_seconds()
    started = time.perf_counter()
    for i in range(0, events, batch):
        await exchange.publish(aio_pika.Message(report(ids[i:i + batch]), content_type="application/json"),
                               routing_key=key)

    async def arrived() -> dict[str, Any] | None:
        async with http.get(f"{receiver}/count") as resp:
            seen = await resp.json()
        return seen if seen["n"] >= expected else None

    seen = await until(f"{expected} deliveries arriving", ARRIVAL_TIMEOUT_S, arrived)
    elapsed = time.perf_counter() - started

    async def recorded() -> bool:
        for hook in hooks:
            async with http.get(f"{gateway.base}/api/webhooks/{hook}/deliveries?status=pending&limit=1") as resp:
                if (await resp.json())["data"]:
                    return False
        return True

    await until("every delivery recorded", RECORD_TIMEOUT_S, recorded)
    settled = time.perf_counter() - started
    cpu = gateway.cpu_seconds() - cpu
    if seen["bad"] or seen["distinct"] != expected or seen["n"] != expected:
        raise BenchError(f"the receiver saw {seen['n']} deliveries, {seen['distinct']} distinct, {seen['bad']} "
                         f"with a bad signature; {expected} were due")
    return {"n": expected, "elapsed_s": elapsed, "rps": expected / elapsed, "recorded_s": settled,
            "latency_ms": seen["latency_ms"], "gateway_cpu_s": cpu}


async def bare_posts(receiver: str, n: int, concurrency: int) -> dict[str, Any]:
    """The same number of POSTs of a payload of the same shape, from a load client process."""
    sample = {"type": "service:start", "timestamp": datetime.now(timezone.utc).isoformat(),
              "data": {"containerId": "c" + uuid.uuid4().hex, "name": "svc-bench", "reason": "started",
                       "service": None}}
    [result] = await http_load([{"name": "bare", "method": "POST", "url": f"{receiver}/hook?bare=1", "n": n,
                                 "concurrency": concurrency, "body": sample, "expect_status": 200}])
    if result["errors"]:
        raise BenchError(f"bare POSTs: {result['errors']} of {n} failed: {result['first_errors']}")
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"environment": environment(f"RabbitMQ at {BROKER}"), "rounds": []}
    started = time.perf_counter()
    async with Management(MANAGEMENT) as management, management.scratch_vhost("cp-bench") as vhost, \
            receiver_process() as receiver:
        amqp_url = f"amqp://guest:guest@{BROKER}/{vhost}"
        with tempfile.TemporaryDirectory(prefix="cp-bench-webhooks-") as folder:
            tmp = Path(folder)
            settings = {"amqp_url": amqp_url, "database_url": f"sqlite:///{tmp / 'webhooks.db'}",
                        "instance_id": f"bench-{uuid.uuid4().hex[:6]}", "log_level": "WARNING", "ace_pool_id": "",
                        "broker_users": "false", "webhook_allowed_targets": '["127.0.0.1"]',
                        "webhook_concurrency": args.concurrency, "rate_limit": "100000/minute"}
            async with gateway_process("webhooks", settings, tmp) as gateway, aiohttp.ClientSession() as http:
                connection = await aio_pika.connect(amqp_url, client_properties={"connection_name": "bench-webhooks"})
                try:
                    channel = await connection.channel()
                    exchange = await channel.get_exchange(keys.CONTROL_EXCHANGE, ensure=False)
                    hooks = await register(http, gateway.base, receiver, args.webhooks)
                    progress(f"warm-up: {args.warmup} events x {args.webhooks} webhooks")
                    await fan_out(http, exchange, gateway, receiver, hooks, args.warmup, args.batch)
                    await bare_posts(receiver, args.warmup * args.webhooks, args.concurrency)
                    for r in range(args.rounds):
                        progress(f"round {r + 1}/{args.rounds}: {args.events} events x {args.webhooks} webhooks, "
                                 "and as many bare POSTs")
                        pair: dict[str, Any] = {}
                        for part in (("gateway", "bare") if r % 2 == 0 else ("bare", "gateway")):
                            if part == "gateway":
                                pair[part] = await fan_out(http, exchange, gateway, receiver, hooks, args.events,
                                                           args.batch)
                            else:
                                pair[part] = await bare_posts(receiver, args.events * args.webhooks,
                                                              args.concurrency)
                        results["rounds"].append(pair)
                finally:
                    await connection.close()
    results["runtime_s"] = time.perf_counter() - started
    return results


# --- the table -------------------------------------------------------------------------------------


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    rounds = sorted(results["rounds"], key=lambda r: r["gateway"]["rps"])
    middle = rounds[len(rounds) // 2]
    gw, bare = middle["gateway"], middle["bare"]
    per_delivery_us = gw["gateway_cpu_s"] / gw["n"] * 1e6
    return "\n".join([
        *header("webhooks", results["environment"]), "",
        f"fan-out: {args.events:,} events x {args.webhooks} webhooks = {gw['n']:,} signed deliveries to one receiver "
        f"on 127.0.0.1, CP_WEBHOOK_CONCURRENCY {args.concurrency}, {len(rounds)} rounds (the median round)",
        f"  through the gateway   {gw['rps']:8,.0f} deliveries/s   event to arrival p50 {gw['latency_ms']['p50']:7.1f} ms, "
        f"p99 {gw['latency_ms']['p99']:7.1f} ms; every outcome recorded after {gw['recorded_s']:.2f} s",
        f"  bare aiohttp POSTs    {bare['rps']:8,.0f} requests/s     "
        f"p50 {bare['latency_ms']['p50']:7.1f} ms, p99 {bare['latency_ms']['p99']:7.1f} ms (concurrency "
        f"{args.concurrency})",
        f"  ratio gateway/bare: {gw['rps'] / bare['rps']:.2f}   (rounds: gateway "
        f"{', '.join(format(r['gateway']['rps'], ',.0f') for r in results['rounds'])}; bare "
        f"{', '.join(format(r['bare']['rps'], ',.0f') for r in results['rounds'])})",
        f"  gateway CPU: {gw['gateway_cpu_s']:.2f} s for the round, {per_delivery_us:,.0f} us per delivery", "",
        f"total run time: {results['runtime_s']:.0f} s",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.webhooks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--webhooks", type=int, default=10, help="webhooks registered, all to one receiver (default 10)")
    parser.add_argument("--events", type=int, default=300, help="events per round, each to every webhook (default 300)")
    parser.add_argument("--batch", type=int, default=50, help="transitions per service report (default 50)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="CP_WEBHOOK_CONCURRENCY, and the bare POSTs' concurrency (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the median reported (default 3)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed events first (default 20)")
    parser.add_argument("--receiver", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.receiver:
        serve_receiver(args.receiver)
        return
    run_and_print(args, run, render)


if __name__ == "__main__":
    main()
