"""A large swarm plan at the gateway, against ``GET /healthz`` in the same run.

``POST /api/swarms/{id}/template`` with a plan of 1,000 bees (the most a plan may hold: valid,
so it is checked whole, image by image, then answered 404 for the unknown swarm) and of
1,001 bees (refused 422 ``invalid-plan``). Half the bees consume one work queue and half
produce to it, the shape that made ordering quadratic before. The gateway runs as a process
of its own; the goal is the 422 within 100 ms.

    .venv/bin/python -m bench.plans [--n 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

from bench.common import BROKER, MANAGEMENT, environment, gateway_process, progress
from controlplane import logs
from controlplane.bus.management import Management

GOAL_MS = 100.0


def plan_body(bees: int) -> bytes:
    half = bees // 2
    plan = [{"name": f"c{i}", "role": "generator", "image": "controlplane:local", "work": {"in": "q"}}
            for i in range(half)]
    plan += [{"name": f"p{i}", "role": "generator", "image": "controlplane:local", "work": {"out": "q"}}
             for i in range(bees - half)]
    return json.dumps({"idempotencyKey": str(uuid.uuid4()), "swarmPlan": {"bees": plan}}).encode()


async def timed(http: aiohttp.ClientSession, method: str, url: str, body: bytes | None, status: int,
                n: int) -> list[float]:
    """Milliseconds of ``n`` requests in a row, each checked for ``status``."""
    times = []
    for _ in range(n):
        started = time.perf_counter()
        async with http.request(method, url, data=body) as response:
            await response.read()
            if response.status != status:
                raise RuntimeError(f"{method} {url}: {response.status}, expected {status}")
        times.append((time.perf_counter() - started) * 1000)
    return times


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="requests of each kind")
    args = parser.parse_args()
    async with Management(MANAGEMENT) as management, management.scratch_vhost("cp-bench") as vhost:
        with tempfile.TemporaryDirectory() as tmp:
            settings = {"amqp_url": f"amqp://guest:guest@{BROKER}/{vhost}", "log_level": "WARNING",
                        "database_url": f"sqlite:///{Path(tmp) / 'plans.db'}"}
            async with gateway_process("plans", settings, Path(tmp)) as gateway, aiohttp.ClientSession() as http:
                progress("warm-up")
                url = f"{gateway.base}/api/swarms/bench/template"
                await timed(http, "POST", url, plan_body(1001), 422, 2)
                rows: list[tuple[str, list[float]]] = []
                for label, method, target, body, status in (
                        ("GET /healthz", "GET", f"{gateway.base}/healthz", None, 200),
                        ("plan of 1,000 bees (valid, 404)", "POST", url, plan_body(1000), 404),
                        ("plan of 1,001 bees (422)", "POST", url, plan_body(1001), 422)):
                    progress(label)
                    rows.append((label, await timed(http, method, target, body, status, args.n)))
    print("  ".join(f"{k}={v}" for k, v in environment(BROKER).items()))
    reference = statistics.median(rows[0][1])
    print(f"\nA large plan at the gateway, {args.n} requests each, one at a time")
    print(f"  {'request':<34} {'p50 ms':>8} {'max ms':>8} {'p50 / healthz':>14}")
    for label, times in rows:
        p50 = statistics.median(times)
        print(f"  {label:<34} {p50:8.1f} {max(times):8.1f} {p50 / reference:13.1f}x   all: {' '.join(f'{t:.0f}' for t in times)}")
    refused = statistics.median(rows[2][1])
    verdict = "met" if max(rows[2][1]) < GOAL_MS else "missed"
    print(f"  goal: the 422 within {GOAL_MS:.0f} ms: p50 {refused:.1f} ms, max {max(rows[2][1]):.1f} ms: {verdict}")


if __name__ == "__main__":
    logs.configure("WARNING")
    asyncio.run(main())
