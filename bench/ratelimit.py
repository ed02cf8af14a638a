"""Rate-limit benchmark: what counting every request of the services surface costs.

    .venv/bin/python -m bench.ratelimit            # about 1 minute
    .venv/bin/python -m bench.ratelimit --json /tmp/ratelimit.json

1. In this process: ``RateLimits.hit`` on one request, over and over, with the memory storage
   and with Redis (if it answers at ``--redis``): microseconds per call.
2. Over HTTP: a gateway process per storage (memory, and Redis if it answers), each measured
   with ``GET /api/system/stats`` (the services surface: its middleware, the limiter, the
   envelope, a read from memory) beside ``GET /healthz`` (no surface, no limiter) of the same
   gateway, rounds alternating, closed loop; the median rate of each and their ratio, and the
   gateway's CPU time per request.

The limit is 10^9 per hour, so no request is refused: every one is counted and answered 200.
The gateway runs as a process of its own (a RabbitMQ vhost and a SQLite file of its own, no
engine pool) and the HTTP client in another (``bench.httpload``). The counter the run leaves in
Redis (its key names the limit, so no other caller shares it) is deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import coredis
from aiohttp.test_utils import make_mocked_request
from limits import parse
from limits.aio.storage import RedisStorage
from limits.storage import storage_from_string

from bench.common import (
    BROKER, MANAGEMENT, BenchError, environment, gateway_process, header, http_load, progress, run_and_print,
)
from controlplane.bus.management import Management
from controlplane.gateway.surfaces.services.ratelimit import NAMESPACE, KnownKeys, RateLimits

LIMIT = "1000000000/hour"  # never reached: every request is counted, none refused
REDIS_URL = os.environ.get("CP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CALLER = "addr-127.0.0.1"  # the HTTP client's counter: no key, from loopback


# --- 1. the limiter alone ----------------------------------------------------------------------


async def hit_cost(storage_url: str, n: int) -> dict[str, float]:
    """``hit`` n times on one caller's request, in a row: microseconds per call."""
    limits = RateLimits(parse(LIMIT), storage_from_string(storage_url, wrap_exceptions=True), KnownKeys([]))
    address = "10." + ".".join(str(b) for b in uuid.uuid4().bytes[:3])  # a caller of this run only
    request = make_mocked_request("GET", "/api/system/stats").clone(remote=address)
    try:
        for _ in range(min(n, 200)):  # warm: connections made, code paths taken
            await limits.hit(request)
        started = time.perf_counter()
        for _ in range(n):
            quota = await limits.hit(request)
        elapsed = time.perf_counter() - started
        if not quota.allowed or quota.remaining == quota.limit:
            raise BenchError(f"the limiter did not count on {storage_url.split('://')[0]}: {quota}")
        await limits.storage.clear(limits.item.key_for(NAMESPACE, f"addr-{address}"))
    finally:
        await limits.close()
    return {"n": n, "us_per_hit": elapsed / n * 1e6}


# --- 2. the surface over HTTP ------------------------------------------------------------------


async def beside_healthz(base: str, cpu: Any, n: int, concurrency: int, rounds: int) -> dict[str, Any]:
    """``rounds`` x (n ``GET /healthz`` + n ``GET /api/system/stats``), order alternating; each
    job in a client process of its own so the gateway's CPU time is read around it."""
    jobs = {"healthz": f"{base}/healthz", "stats": f"{base}/api/system/stats"}
    await http_load([{"name": f"warmup-{name}", "method": "GET", "url": url, "n": n // 5,
                      "concurrency": concurrency} for name, url in jobs.items()])
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in jobs}
    for r in range(rounds):
        for name in list(jobs) if r % 2 == 0 else list(jobs)[::-1]:
            before = cpu()
            [res] = await http_load([{"name": name, "method": "GET", "url": jobs[name], "n": n,
                                      "concurrency": concurrency}])
            if res["errors"]:
                raise BenchError(f"{name}: {res['errors']} of {n} failed: {res['first_errors']}")
            res["cpu_us_per_request"] = (cpu() - before) / n * 1e6
            runs[name].append(res)
    return {name: {"rps": statistics.median(r["rps"] for r in got),
                   "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in got),
                   "cpu_us": statistics.median(r["cpu_us_per_request"] for r in got), "runs": got}
            for name, got in runs.items()}


async def redis_answers(url: str) -> bool:
    client = coredis.Redis.from_url(url, connect_timeout=2, stream_timeout=2)
    try:
        await client.ping()
        return True
    except (coredis.exceptions.RedisError, OSError):
        return False
    finally:
        client.connection_pool.disconnect()


async def forget_counter(url: str) -> None:
    """Delete the counter the HTTP part left in Redis."""
    client = coredis.Redis.from_url(url, connect_timeout=2, stream_timeout=2)
    try:
        await client.delete([f"{RedisStorage.PREFIX}:{parse(LIMIT).key_for(NAMESPACE, CALLER)}"])
    finally:
        client.connection_pool.disconnect()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    redis_up = await redis_answers(args.redis)
    results: dict[str, Any] = {"environment": environment(f"RabbitMQ at {BROKER}",
                                                         redis=args.redis if redis_up else "not reachable")}
    storages = {"memory": "async+memory://", **({"redis": f"async+{args.redis}"} if redis_up else {})}
    if not redis_up:
        progress(f"Redis does not answer at {args.redis}: memory only")
    started = time.perf_counter()
    progress(f"1. RateLimits.hit in this process: {args.hits} calls per storage")
    results["hit"] = {name: await hit_cost(url, args.hits if name == "memory" else args.hits // 10)
                      for name, url in storages.items()}
    results["http"] = {}
    async with Management(MANAGEMENT) as management, management.scratch_vhost("cp-bench") as vhost:
        with tempfile.TemporaryDirectory(prefix="cp-bench-ratelimit-") as folder:
            tmp = Path(folder)
            for name, url in storages.items():
                settings = {"amqp_url": f"amqp://guest:guest@{BROKER}/{vhost}",
                            "database_url": f"sqlite:///{tmp / f'{name}.db'}",
                            "instance_id": f"bench-{uuid.uuid4().hex[:6]}", "log_level": "WARNING",
                            "ace_pool_id": "", "broker_users": "false", "rate_limit": LIMIT,
                            "rate_limit_storage": url}
                progress(f"2. {name}: {args.rounds} x ({args.n} GET /healthz + {args.n} GET /api/system/stats), "
                         f"concurrency {args.concurrency}")
                try:
                    async with gateway_process(f"ratelimit-{name}", settings, tmp) as gateway:
                        results["http"][name] = await beside_healthz(gateway.base, gateway.cpu_seconds, args.n,
                                                                     args.concurrency, args.rounds)
                finally:
                    if name == "redis":
                        await forget_counter(args.redis)
    results["runtime_s"] = time.perf_counter() - started
    return results


# --- the table ---------------------------------------------------------------------------------


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    env = results["environment"]
    lines = [*header("rate-limit", env, f"Redis {env['redis']}"), "",
             "1. RateLimits.hit in one process, one caller, calls in a row"]
    for name, res in results["hit"].items():
        lines.append(f"   {name:<7} {res['us_per_hit']:8.1f} us per hit  (n={res['n']:,})")
    lines += ["", f"2. the same gateway over HTTP, concurrency {args.concurrency}, median of {args.rounds} rounds "
                  f"of {args.n:,}"]
    for name, res in results["http"].items():
        stats, health = res["stats"], res["healthz"]
        lines += [f"   {name:<7} GET /api/system/stats {stats['rps']:7,.0f} req/s  p50 {stats['p50_ms']:5.1f} ms  "
                  f"gateway CPU {stats['cpu_us']:5.0f} us/req",
                  f"   {'':<7} GET /healthz          {health['rps']:7,.0f} req/s  p50 {health['p50_ms']:5.1f} ms  "
                  f"gateway CPU {health['cpu_us']:5.0f} us/req",
                  f"   {'':<7} ratio stats / healthz: {stats['rps'] / health['rps']:.2f} of the rate, "
                  f"{stats['cpu_us'] - health['cpu_us']:+.0f} us of gateway CPU per request"]
    if "redis" not in results["http"]:
        lines.append("   redis   not measured: Redis did not answer")
    lines += ["", f"total run time: {results['runtime_s']:.0f} s"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ratelimit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hits", type=int, default=50_000, help="in-process hits, memory (Redis: a tenth)")
    parser.add_argument("--n", type=int, default=5000, help="requests per job (default 5000)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, median reported (default 3)")
    parser.add_argument("--redis", default=REDIS_URL, help=f"the Redis to measure (default {REDIS_URL})")
    parser.add_argument("--json", type=Path)
    run_and_print(parser.parse_args(), run, render)


if __name__ == "__main__":
    main()
