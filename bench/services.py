"""Services dashboard benchmark: 200 containers as services, listed and their stats read
through the gateway, beside the Docker SDK asked the same in the same run.

    .venv/bin/python -m bench.services              # about 3 minutes, most of it starting containers
    .venv/bin/python -m bench.services --containers 50 --json /tmp/services.json

1. Start ``--containers`` (200) small containers labelled ``controlplane.service=true``, a host
   controller and a gateway (processes of their own, a vhost and a SQLite file of their own),
   and wait until the gateway lists every one of them with a stats sample.
2. ``GET /api/services`` one request at a time, beside ``docker ps`` of the same containers
   through the SDK (``containers(filters=label)``, the call the list would otherwise make):
   p50 and p99 of each, and their ratio. Then at concurrency 8, for the rate.
3. Stats of all 200: ``GET /api/services/{id}/stats`` of each, at concurrency 8, beside one
   round of ``docker stats`` (one-shot) of each through the SDK at the same concurrency: the
   time to have every figure, and their ratio. The gateway answers from its read model, which
   the host controller's sampler keeps within its interval (``CP_SERVICES_STATS_INTERVAL_S``).
4. The host controller's CPU while it samples 200 containers every ``--stats-interval`` s.

The webhook fan-out rate is measured by ``bench.webhooks``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import docker

from bench.common import (
    BROKER, MANAGEMENT, REPO_ROOT, BenchError, cpu_seconds, environment, gateway_process, header, http_load,
    log_tail, progress, run_and_print,
)
from bench.httpload import percentile
from controlplane.bus.management import Management

IMAGE = "controlplane:local"
BENCH_LABEL = "controlplane.bench"


def start_containers(engine: docker.APIClient, run_id: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        created = engine.create_container(
            IMAGE, command=["sleep", "infinity"], name=f"bench-svc-{run_id}-{i:03d}",
            labels={"controlplane.service": "true", BENCH_LABEL: run_id,
                    "org.opencontainers.image.version": "1.0.0"},
            host_config=engine.create_host_config(mem_limit="64m", init=True))
        engine.start(created["Id"])
        ids.append(created["Id"])
        if (i + 1) % 50 == 0:
            progress(f"  {i + 1} containers started")
    return ids


def remove_containers(engine: docker.APIClient, run_id: str) -> None:
    for found in engine.containers(all=True, filters={"label": f"{BENCH_LABEL}={run_id}"}):
        engine.remove_container(found["Id"], force=True)


def timed(fn: Any, n: int) -> dict[str, float]:
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        latencies.append((time.perf_counter() - started) * 1000)
    return {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99), "mean": sum(latencies) / n}


async def sdk_stats_round(engine: docker.APIClient, ids: list[str], concurrency: int) -> float:
    """Seconds for one one-shot stats reading of every container through the SDK."""
    loop = asyncio.get_running_loop()
    bound = asyncio.Semaphore(concurrency)

    async def one(cid: str) -> None:
        async with bound:
            await loop.run_in_executor(None, lambda: engine.stats(cid, stream=False, one_shot=True))

    started = time.perf_counter()
    await asyncio.gather(*(one(cid) for cid in ids))
    return time.perf_counter() - started


async def sample_ages(base: str, ids: list[str]) -> dict[str, float]:
    """How old the readings the gateway answers with are: bounded by the sampler's interval
    plus one round over every service."""
    now = time.time()
    ages = []
    async with aiohttp.ClientSession() as http:
        for cid in ids:
            async with http.get(f"{base}/api/services/{cid}/stats") as resp:
                stamp = (await resp.json())["data"]["timestamp"].replace("Z", "+00:00")
            ages.append(now - datetime.fromisoformat(stamp).timestamp())
    return {"p50": percentile(ages, 50), "max": max(ages)}


@asynccontextmanager
async def host_controller(settings: dict[str, Any], log_dir: Path) -> AsyncIterator[int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CP_")}
    env.update({f"CP_{key.upper()}": str(value) for key, value in settings.items()})
    log = log_dir / "host-controller.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controlplane.cli", "host-controller", cwd=str(REPO_ROOT), env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc.pid
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
        if proc.returncode not in (0, -signal.SIGTERM, None):
            progress(f"host controller exited with {proc.returncode}:\n{log_tail(log)}")


async def wait_listed(base: str, n: int, run_id: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            async with http.get(f"{base}/api/services?filter=running") as resp:
                data = (await resp.json())["data"]
            ours = [s for s in data if s["id"].startswith(f"bench-svc-{run_id}")]
            sampled = sum(1 for s in ours if s["stats"]["memory"] > 0)
            if len(ours) == n and sampled == n:
                return
            await asyncio.sleep(1)
    raise BenchError(f"the gateway did not list {n} sampled services within {timeout:g}s")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    engine = docker.APIClient(base_url="unix:///var/run/docker.sock", version="auto")
    run_id = uuid.uuid4().hex[:6]
    results: dict[str, Any] = {"env": environment(BROKER, docker=engine.version().get("Version", "?")),
                               "containers": args.containers}
    progress(f"1. starting {args.containers} containers")
    try:
        ids = await asyncio.get_running_loop().run_in_executor(None, start_containers, engine, run_id,
                                                                 args.containers)
        async with Management(MANAGEMENT) as management, management.scratch_vhost("cp-bench") as vhost, \
                _scratch() as tmp:
            common = {"amqp_url": f"amqp://guest:guest@{BROKER}/{vhost}", "database_url": f"sqlite:///{tmp}/cp.db",
                      "instance_id": f"bench-{run_id}", "log_level": "WARNING", "broker_users": "false",
                      "services_stats_interval_s": args.stats_interval, "ace_pool_id": ""}
            async with host_controller(common, tmp) as host_pid, \
                    gateway_process("services", {**common, "rate_limit": "1000000/hour"}, tmp) as gw:
                await wait_listed(gw.base, args.containers, run_id)
                progress("2. GET /api/services beside docker ps through the SDK")
                listing = f"{gw.base}/api/services"
                [serial, parallel] = await http_load([
                    {"name": "list", "method": "GET", "url": listing, "n": args.n, "concurrency": 1},
                    {"name": "list-c8", "method": "GET", "url": listing, "n": args.n * 4, "concurrency": 8}])
                sdk = timed(lambda: engine.containers(all=True, filters={"label": f"{BENCH_LABEL}={run_id}"}),
                            max(args.n // 10, 10))
                results["list"] = {"gateway": serial, "gateway_c8": parallel, "sdk_ps_ms": sdk}
                progress("3. stats of every service beside a round of docker stats")
                [stats] = await http_load([{"name": "stats", "method": "GET", "n": len(ids), "concurrency": 8,
                                            "urls": [f"{gw.base}/api/services/{cid}/stats" for cid in ids]}])
                results["stats"] = {"gateway": stats, "sdk_round_s": await sdk_stats_round(engine, ids, 8),
                                    "sample_age_s": await sample_ages(gw.base, ids)}
                progress(f"4. the host controller's CPU over {args.cpu_window:g} s of sampling")
                before = cpu_seconds(host_pid)
                await asyncio.sleep(args.cpu_window)
                results["host_cpu_share"] = (cpu_seconds(host_pid) - before) / args.cpu_window
    finally:
        remove_containers(engine, run_id)
        engine.close()
    return results


@asynccontextmanager
async def _scratch() -> AsyncIterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bench-services-") as tmp:
        yield Path(tmp)


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    listing, stats = results["list"], results["stats"]
    gw, sdk = listing["gateway"]["latency_ms"], listing["sdk_ps_ms"]
    lines = header("services dashboard", results["env"]) + [
        f"{results['containers']} services, stats sampled every {args.stats_interval:g} s", "",
        f"GET /api/services, one at a time   p50 {gw['p50']:7.2f} ms   p99 {gw['p99']:7.2f} ms "
        f"({listing['gateway']['response_bytes']:,} bytes)",
        f"docker ps through the SDK          p50 {sdk['p50']:7.2f} ms   p99 {sdk['p99']:7.2f} ms",
        f"  ratio (SDK / gateway, p50)       {sdk['p50'] / gw['p50']:.1f}x",
        f"GET /api/services at concurrency 8 {listing['gateway_c8']['rps']:8.0f}/s   "
        f"p99 {listing['gateway_c8']['latency_ms']['p99']:.1f} ms", "",
        f"stats of all {results['containers']} through the gateway (c=8)   {stats['gateway']['elapsed_s'] * 1000:8.1f} ms"
        f"   p50 {stats['gateway']['latency_ms']['p50']:.2f} ms",
        f"one round of docker stats through the SDK (c=8)  {stats['sdk_round_s'] * 1000:8.1f} ms",
        f"  ratio (SDK / gateway)                          {stats['sdk_round_s'] / stats['gateway']['elapsed_s']:.1f}x",
        f"age of the readings answered: p50 {stats['sample_age_s']['p50']:.1f} s, max {stats['sample_age_s']['max']:.1f} s",
        "", f"host controller CPU while sampling: {results['host_cpu_share'] * 100:.1f} % of one core",
    ]
    for name in ("list", "gateway_c8"):
        res = listing["gateway"] if name == "list" else listing[name]
        if res["errors"]:
            lines.append(f"ERRORS in {name}: {res['errors']} {res['first_errors']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--containers", type=int, default=200)
    parser.add_argument("--n", type=int, default=500, help="list requests one at a time (default 500)")
    parser.add_argument("--stats-interval", type=float, default=10.0)
    parser.add_argument("--cpu-window", type=float, default=30.0)
    parser.add_argument("--json", type=Path)
    run_and_print(parser.parse_args(), run, render)


if __name__ == "__main__":
    main()
