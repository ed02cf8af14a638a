"""A small closed-loop HTTP load client, run in its own process by ``bench.lifecycle``.

Keeping the client out of the gateway's process means the server's event loop only serves;
the client's own CPU cost lands on the machine's other core instead of inside the figure.

Usage (what ``bench.lifecycle`` does): ``python -m bench.httpload JOBS_JSON`` (or ``-``: the JSON on stdin) where JOBS_JSON
is a list of ``{"name", "method", "url", "body"? or "bodies"?, "n", "concurrency", "expect_status",
"expect_header"?}``; the jobs run one after the other and one JSON line per job is printed:
``{"name", "n", "ok", "errors", "elapsed_s", "rps", "latency_ms": {...}}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp


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
    method, url, n, concurrency = job["method"], job["url"], int(job["n"]), int(job["concurrency"])
    body = job.get("body")
    data = json.dumps(body).encode() if body is not None else None
    # "bodies": one body per request, sent in order (events that must each be new).
    each = [json.dumps(b).encode() for b in job["bodies"]] if job.get("bodies") else None
    headers = {"Content-Type": "application/json"} if data is not None or each else {}
    expect_status = int(job.get("expect_status", 200))
    expect_header = job.get("expect_header")  # [name, value] every answer must carry
    remaining = n
    latencies: list[float] = []
    errors: list[str] = []
    ok_count = 0

    async def worker() -> None:
        nonlocal remaining, ok_count
        while remaining > 0:
            remaining -= 1
            payload = each[(n - remaining - 1) % len(each)] if each else data
            started = time.perf_counter()
            try:
                async with session.request(method, url, data=payload, headers=headers) as resp:
                    await resp.read()
                    ok = resp.status == expect_status and (
                        expect_header is None or resp.headers.get(expect_header[0]) == expect_header[1])
                    ok_count += ok
                    if not ok:
                        errors.append(f"{resp.status} {resp.headers.get(expect_header[0]) if expect_header else ''}")
            except Exception as exc:  # noqa: BLE001 - counted, not fatal: the figure says how many failed
                errors.append(repr(exc))
                continue
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "name": job["name"], "n": n, "ok": ok_count, "errors": len(errors),
        "first_errors": errors[:3], "elapsed_s": elapsed, "rps": n / elapsed,
        "latency_ms": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
                       "p99": percentile(latencies, 99), "mean": sum(latencies) / max(len(latencies), 1)},
        # Every latency, when the caller merges several jobs into one figure.
        **({"latencies_ms": latencies} if job.get("keep_latencies") else {}),
    }


async def main(jobs: list[dict[str, Any]]) -> None:
    limit = max(int(j["concurrency"]) for j in jobs)
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit)
    async with aiohttp.ClientSession(connector=connector) as session:
        for job in jobs:
            result = await run_job(session, job)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.stdin.read() if sys.argv[1] == "-" else sys.argv[1])))
