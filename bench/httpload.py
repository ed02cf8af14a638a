"""A small HTTP load client, run in its own process by the benchmarks (``bench.common.http_load``).

Keeping the client out of the gateway's process means the server's event loop only serves;
the client's own CPU cost lands on the machine's other core instead of inside the figure.

Usage: ``python -m bench.httpload JOBS_JSON`` (or ``-``: the JSON on stdin) where JOBS_JSON is a
list of jobs; the jobs run one after the other and one JSON line per job is printed:
``{"name", "n", "ok", "errors", "first_errors", "elapsed_s", "rps", "latency_ms": {...},
"response_bytes"}``. A job's keys:

- ``name``, ``method``, ``n`` (requests), ``concurrency`` (at most this many in flight);
- ``url``, or ``urls``: a list cycled through, request i going to ``urls[i % len(urls)]``;
- ``body`` (JSON, every request) or ``bodies`` (cycled through like ``urls``: events that must
  each be new);
- ``expect_status`` (default 200) and ``expect_header`` (``[name, value]`` every answer must
  carry); other answers are counted as errors (and timed: they were answered); a request
  that fails without an answer is counted, not timed;
- ``rate`` (requests per second): open loop instead of closed. Request i is due at
  start + i / rate and starts then, or as soon as one of the ``concurrency`` slots frees when
  all are taken; its latency is counted from when it was due, so a server that falls behind
  shows it in the latencies, not only in the rate. The result adds ``late`` (requests that
  started more than 10 ms after they were due); ``rps`` is the achieved rate;
- ``keep_latencies``: the result adds ``latencies_ms``, every latency, for a caller that
  merges several jobs into one figure.

``response_bytes`` is the mean size of the answers' bodies.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp
import uvloop

LATE_S = 0.010  # an open-loop request this far behind its due time counts as late


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


async def run_job(session: aiohttp.ClientSession, job: dict[str, Any]) -> dict[str, Any]:
    method, n, concurrency = job["method"], int(job["n"]), int(job["concurrency"])
    urls: list[str] = job.get("urls") or [job["url"]]
    body = job.get("body")
    data = json.dumps(body).encode() if body is not None else None
    each = [json.dumps(b).encode() for b in job["bodies"]] if job.get("bodies") else None
    headers = {"Content-Type": "application/json"} if data is not None or each else {}
    expect_status = int(job.get("expect_status", 200))
    expect_header = job.get("expect_header")  # [name, value] every answer must carry
    latencies: list[float] = []
    errors: list[str] = []
    ok_count = 0
    received = 0

    async def one(i: int, since: float) -> None:
        """Request i; its latency counted from ``since``."""
        nonlocal ok_count, received
        payload = each[i % len(each)] if each else data
        try:
            async with session.request(method, urls[i % len(urls)], data=payload, headers=headers) as resp:
                answer = await resp.read()
                ok = resp.status == expect_status and (
                    expect_header is None or resp.headers.get(expect_header[0]) == expect_header[1])
                ok_count += ok
                received += len(answer)
                if not ok:
                    errors.append(f"{resp.status} {resp.headers.get(expect_header[0]) if expect_header else ''}"
                                  f" {answer[:200]!r}")
        except Exception as exc:  # noqa: BLE001 - counted, not fatal: the figure says how many failed
            errors.append(repr(exc))
            return
        latencies.append((time.perf_counter() - since) * 1000)

    started = time.perf_counter()
    late = 0
    if job.get("rate"):
        late = await open_loop(one, n, concurrency, float(job["rate"]), started)
    else:
        await closed_loop(one, n, concurrency)
    elapsed = time.perf_counter() - started
    return {
        "name": job["name"], "n": n, "ok": ok_count, "errors": len(errors),
        "first_errors": errors[:3], "elapsed_s": elapsed, "rps": n / elapsed,
        "latency_ms": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
                       "p99": percentile(latencies, 99), "mean": sum(latencies) / max(len(latencies), 1),
                       "max": max(latencies, default=float("nan"))},
        "response_bytes": received // max(ok_count + len(errors), 1),
        **({"rate": float(job["rate"]), "late": late} if job.get("rate") else {}),
        **({"latencies_ms": latencies} if job.get("keep_latencies") else {}),
    }


async def closed_loop(one: Any, n: int, concurrency: int) -> None:
    """``concurrency`` workers, each sending its next request as soon as the last is answered."""
    next_i = 0

    async def worker() -> None:
        nonlocal next_i
        while next_i < n:
            i, next_i = next_i, next_i + 1
            await one(i, time.perf_counter())

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def open_loop(one: Any, n: int, concurrency: int, rate: float, start: float) -> int:
    """Request i started at ``start + i / rate`` (later when every slot is taken); how many
    started late."""
    slots = asyncio.Semaphore(concurrency)
    running: set[asyncio.Task[None]] = set()
    late = 0

    async def send(i: int, due: float) -> None:
        try:
            await one(i, due)
        finally:
            slots.release()

    for i in range(n):
        due = start + i / rate
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        await slots.acquire()
        late += time.perf_counter() - due > LATE_S
        task = asyncio.create_task(send(i, due))
        running.add(task)
        task.add_done_callback(running.discard)
    await asyncio.gather(*running)
    return late


async def main(jobs: list[dict[str, Any]]) -> None:
    limit = max(int(j["concurrency"]) for j in jobs)
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit)
    async with aiohttp.ClientSession(connector=connector) as session:
        for job in jobs:
            result = await run_job(session, job)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    # uvloop: a client that costs less leaves more of the shared cores to what it measures.
    uvloop.run(main(json.loads(sys.stdin.read() if sys.argv[1] == "-" else sys.argv[1])))
