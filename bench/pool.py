"""Engine-pool benchmark: provisioning, GET /engines, stream event ingest, each beside a
reference measured in the same run.

    .venv/bin/python -m bench.pool             # about 1.5 minutes
    .venv/bin/python -m bench.pool --json /tmp/pool.json

1. Provisioning: 20 engines (``controlplane-fake-engine:local``), 5 at a time, through
   ``POST /ace/provision/acestream`` until every one is listed healthy by ``GET /ace/engines``;
   reference: the same 20 ``docker run -d`` of the same image with the same CONF and a
   published port, 5 at a time; rounds alternate, the median is reported. Goal: at most 1.15x,
   with no failure.
2. ``GET /ace/engines`` with 10 engines at concurrency 16 (goal: at least 1,600 req/s), beside
   ``GET /healthz``; and with 1,000 engines in the read model (simulated: a pool status with
   1,000 rows published as its controller would), p99 under 50 ms.
3. ``POST /ace/events/stream_started`` then ``stream_ended``, N each at concurrency 16, with the
   stats collector polling every started stream: at least 1,000 events/s each, p99 under 50 ms.

The control plane runs split as in production (``controlplane gateway`` and ``controlplane
host-controller``, each a process, with a vhost and a SQLite file of their own), the HTTP
client in a process of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp

from bench.httpload import percentile
from bench.common import (
    BROKER, MANAGEMENT, REPO_ROOT, BenchError, environment, free_port, header, http_load, log_tail, progress,
    run_and_print,
)
from controlplane.bus.management import Management
from controlplane.contract.models import Status, utcnow

IMAGE = "controlplane-fake-engine:local"
DOCKER = "docker"
START_TIMEOUT_S = 90
CHUNK = 160  # streams started before they are ended (bench 3): 16 per engine, each polled


@asynccontextmanager
async def control_plane(vhost: str, owner: str, tmp: Path, pool_id: str, host_ports: str,
                        with_host: bool = True, **pool: Any) -> AsyncIterator[dict[str, Any]]:
    """The production split: ``controlplane gateway`` and ``controlplane host-controller`` (which
    runs the pool's controller), each a process of its own. Yields the base URL and their pids
    once the pool serves (without a host controller: once the gateway answers)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CP_") or k.startswith("CP_TEST_")}
    env.update({
        "CP_AMQP_URL": f"amqp://guest:guest@{BROKER}/{vhost}", "CP_DATABASE_URL": f"sqlite:///{tmp / f'{pool_id}.db'}",
        "CP_HOST": "127.0.0.1", "CP_PORT": str(port), "CP_INSTANCE_ID": owner, "CP_ACE_POOL_ID": pool_id,
        "CP_ACE_IMAGE": IMAGE, "CP_LOG_LEVEL": "WARNING", "CP_BROKER_USERS": "false",
        "CP_ACE_POOL": json.dumps({"hostPorts": host_ports, "maxReplicas": 40, "idleGraceS": 3600,
                                   "health": {"intervalS": 2, "failures": 3}, **pool}),
    })
    procs: dict[str, asyncio.subprocess.Process] = {}
    logs: dict[str, Path] = {}
    base = f"http://127.0.0.1:{port}"
    try:
        for command in ("gateway", "host-controller")[: 2 if with_host else 1]:
            logs[command] = tmp / f"{command}-{pool_id}.log"
            with logs[command].open("wb") as out:
                procs[command] = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "controlplane.cli", command, cwd=str(REPO_ROOT), env=env,
                    stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                for command, proc in procs.items():
                    if proc.returncode is not None:
                        raise BenchError(f"{command} exited with {proc.returncode}:\n{log_tail(logs[command])}")
                try:
                    async with http.get(f"{base}/api/swarms/{pool_id}") as resp:
                        if resp.status == 200 and (not with_host or (await resp.json())["status"] == "Running"):
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise BenchError(f"the pool did not serve within {START_TIMEOUT_S} s:\n"
                                     + "\n".join(log_tail(log) for log in logs.values()))
                await asyncio.sleep(0.2)
        yield {"base": base, "pids": {command: proc.pid for command, proc in procs.items()}}
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.terminate()
        for proc in procs.values():
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def docker(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(DOCKER, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise BenchError(f"docker {' '.join(args[:2])} failed: {err.decode()[-500:]}")
    return out.decode().strip()


async def remove_labelled(label: str) -> None:
    ids = (await docker("ps", "-aq", "--filter", f"label={label}")).split()
    if ids:
        await docker("rm", "-f", *ids)


async def five_at_a_time(n: int, concurrency: int, one: Any) -> tuple[float, int]:
    """Run ``one(i)`` for i in range(n), ``concurrency`` at a time; (seconds, failures)."""
    gate = asyncio.Semaphore(concurrency)
    failures = 0

    async def run(i: int) -> None:
        nonlocal failures
        async with gate:
            try:
                await one(i)
            except Exception as exc:  # noqa: BLE001 - counted, the figure says how many failed
                failures += 1
                progress(f"  failure: {exc!r}"[:300])

    started = time.perf_counter()
    await asyncio.gather(*(run(i) for i in range(n)))
    return time.perf_counter() - started, failures


async def bare_runs(n: int, concurrency: int, run_id: str, first_port: int) -> tuple[float, int]:
    """The reference: ``docker run -d`` of the same image, with the same kind of CONF and port."""
    label = f"cp-bench-ref={run_id}"

    async def one(i: int) -> None:
        http, https = 40000 + i, 45000 + i
        conf = f"--http-port={http}\n--https-port={https}\n--bind-all"
        await docker("run", "-d", "--label", label, "--name", f"cp-bench-ref-{run_id}-{i}", "-e", f"CONF={conf}",
                     "-p", f"127.0.0.1:{first_port + i}:{http}", IMAGE)

    try:
        return await five_at_a_time(n, concurrency, one)
    finally:
        await remove_labelled(label)


async def provision_until_healthy(base: str, n: int, concurrency: int) -> tuple[float, int, list[str]]:
    made: list[str] = []
    async with aiohttp.ClientSession() as http:
        async def one(_: int) -> None:
            async with http.post(f"{base}/ace/provision/acestream", json={}) as resp:
                body = await resp.json()
                if resp.status != 200:
                    raise BenchError(f"{resp.status}: {body}")
                made.append(body["container_id"])

        started = time.perf_counter()
        _, failures = await five_at_a_time(n, concurrency, one)
        deadline = time.monotonic() + 60
        while True:
            async with http.get(f"{base}/ace/engines") as resp:
                listed = {e["container_id"]: e["health_status"] for e in await resp.json()}
            if all(listed.get(cid) == "healthy" for cid in made):
                break
            if time.monotonic() > deadline:
                raise BenchError("engines not all healthy within 60 s")
            await asyncio.sleep(0.02)
        return time.perf_counter() - started, failures, made


async def simulate_engines(amqp_url: str, pool_id: str, n: int) -> None:
    """A pool status with ``n`` engine rows, as a controller would publish it."""
    now = utcnow().isoformat()
    engines = [{"container_id": uuid.uuid4().hex * 2, "container_name": f"cp-sim-{pool_id}-e{i}", "host": "127.0.0.1",
                "port": 20000 + i, "labels": {"stream_id": f"ch-{i}"}, "first_seen": now, "last_seen": now,
                "health_status": "healthy", "last_health_check": now, "kind": "acestream"} for i in range(n)]
    status = Status(kind="status-full", role="swarm-controller", instance=pool_id, swarm_id=pool_id, enabled=True,
                    state="Running", data={"pool": {"engines": engines, "vpn": {"enabled": False, "status": "disabled"}}})
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange("ph.control")
        await exchange.publish(aio_pika.Message(status.to_json(), content_type="application/json"),
                               routing_key=status.routing_key())


async def run(args: argparse.Namespace) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:6]
    owner = f"bench-{run_id}"
    tmp = Path(tempfile.mkdtemp(prefix="cp-bench-pool-"))
    results: dict[str, Any] = {"environment": environment(f"RabbitMQ at {BROKER}",
                                                          docker=await docker("version", "-f", "{{.Server.Version}}"))}
    started = time.perf_counter()
    try:
        async with Management(MANAGEMENT) as management, management.scratch_vhost("cp-bench") as vhost:
            amqp_url = f"amqp://guest:guest@{BROKER}/{vhost}"
            async with AsyncExitStack() as stack:
                # 1. Provisioning, beside bare docker run -d, alternating, the median of the rounds.
                plane = await stack.enter_async_context(control_plane(vhost, owner, tmp, "bench", "21100-21199"))
                base = plane["base"]
                rounds: list[dict[str, Any]] = []
                progress("warm-up: 5 docker run -d and 5 provisions, untimed")
                await bare_runs(5, args.concurrency, f"{run_id}-warm", 21000)
                _, _, warm = await provision_until_healthy(base, 5, args.concurrency)
                async with aiohttp.ClientSession() as http:
                    for cid in warm:
                        async with http.delete(f"{base}/ace/containers/{cid}") as resp:
                            await resp.read()
                for r in range(args.rounds):
                    progress(f"round {r + 1}: {args.engines} docker run -d, then {args.engines} provisions until "
                             f"listed healthy, {args.concurrency} at a time")
                    ref_s, ref_failures = await bare_runs(args.engines, args.concurrency, f"{run_id}-{r}", 21000)
                    cp_s, cp_failures, made = await provision_until_healthy(base, args.engines, args.concurrency)
                    rounds.append({"control_plane_s": cp_s, "failures": cp_failures, "reference_s": ref_s,
                                   "reference_failures": ref_failures, "ratio": cp_s / ref_s})
                    keep = 10 if r == args.rounds - 1 else 0  # the next figure reads 10 engines
                    async with aiohttp.ClientSession() as http:
                        for cid in made[keep:]:
                            async with http.delete(f"{base}/ace/containers/{cid}") as resp:
                                await resp.read()
                middle = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]
                results["provision"] = {"n": args.engines, "concurrency": args.concurrency, "rounds": rounds,
                                        **middle, "failures": sum(r["failures"] for r in rounds),
                                        "reference_failures": sum(r["reference_failures"] for r in rounds)}
                # 2. GET /engines with 10 engines, beside GET /healthz.
                progress("GET /ace/engines with 10 engines, and GET /healthz")
                jobs = [{"name": "warmup", "method": "GET", "url": f"{base}/ace/engines", "n": 500, "concurrency": 16}]
                for r in range(args.rounds):
                    pair = [{"name": "engines", "method": "GET", "url": f"{base}/ace/engines", "n": args.http_n,
                             "concurrency": 16},
                            {"name": "healthz", "method": "GET", "url": f"{base}/healthz", "n": args.http_n,
                             "concurrency": 16}]
                    jobs += pair if r % 2 == 0 else pair[::-1]
                measured = [r for r in await http_load(jobs) if r["name"] != "warmup"]
                results["engines_10"] = [r for r in measured if r["name"] == "engines"]
                results["healthz"] = [r for r in measured if r["name"] == "healthz"]
                # 3. Stream events with the collector polling every started stream.
                engines_now = made[:10]
                progress(f"stream_started x{args.events}, then stream_ended x{args.events}, concurrency 16")
                results["events"] = await stream_events(base, engines_now, args.events)
                stack.push_async_callback(remove_labelled, f"controlplane.owner={owner}")
            # 2b. 1,000 simulated engines in a gateway whose pool has no controller.
            async with AsyncExitStack() as stack:
                progress("GET /ace/engines with 1,000 simulated engines")
                plane = await stack.enter_async_context(control_plane(vhost, owner + "b", tmp, "sim", "21200-21299",
                                                                      with_host=False))
                base = plane["base"]
                await simulate_engines(amqp_url, "sim", 1000)
                async with aiohttp.ClientSession() as http:
                    deadline = time.monotonic() + 30
                    while True:
                        async with http.get(f"{base}/ace/engines") as resp:
                            if len(await resp.json()) >= 1000:
                                break
                        if time.monotonic() > deadline:
                            raise BenchError("the 1,000 simulated engines never showed")
                        await asyncio.sleep(0.1)
                jobs = [{"name": "engines-1000", "method": "GET", "url": f"{base}/ace/engines", "n": args.big_n,
                         "concurrency": 16}]
                results["engines_1000"] = await http_load(jobs)
    finally:
        await remove_labelled(f"controlplane.owner={owner}")
    results["runtime_s"] = time.perf_counter() - started
    return results


async def stream_events(base: str, engines: list[str], n: int) -> dict[str, Any]:
    """Every started stream's stat URL points at a live engine, so the collector works for real."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/ace/engines") as resp:
            ports = {e["container_id"]: e["port"] for e in await resp.json()}
    bodies_started, bodies_ended = [], []
    for i in range(n):
        cid = engines[i % len(engines)]
        port = ports[cid]
        sid = f"bench-{i}"
        bodies_started.append({"container_id": cid, "engine": {"host": "127.0.0.1", "port": port},
                               "stream": {"key_type": "infohash", "key": f"{i:040x}"},
                               "session": {"playback_session_id": sid,
                                           "stat_url": f"http://127.0.0.1:{port}/ace/stat/{i:040x}/{sid}",
                                           "command_url": f"http://127.0.0.1:{port}/ace/cmd/{i:040x}/{sid}",
                                           "is_live": 1},
                               "labels": {"stream_id": sid}})
        bodies_ended.append({"container_id": cid, "stream_id": sid, "reason": "bench"})
    # Chunks of starts then their ends: at most CHUNK streams play at once (10 engines with
    # CHUNK / 10 streams each), all of them polled by the collector.
    jobs = []
    for first in range(0, n, CHUNK):
        part = slice(first, min(first + CHUNK, n))
        jobs += [{"name": "stream_started", "method": "POST", "url": f"{base}/ace/events/stream_started",
                  "bodies": bodies_started[part], "n": len(bodies_started[part]), "concurrency": 16,
                  "keep_latencies": True},
                 {"name": "stream_ended", "method": "POST", "url": f"{base}/ace/events/stream_ended",
                  "bodies": bodies_ended[part], "n": len(bodies_ended[part]), "concurrency": 16,
                  "keep_latencies": True}]
    results = await http_load(jobs)
    for res in results:
        if res["errors"]:
            raise BenchError(f"{res['name']}: {res['errors']} of {res['n']} failed: {res['first_errors']}")
    return {"started": merged([r for r in results if r["name"] == "stream_started"]),
            "ended": merged([r for r in results if r["name"] == "stream_ended"])}


def merged(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of one kind as one: events over the time they took, percentiles over every
    event's latency."""
    n, elapsed = sum(r["n"] for r in runs), sum(r["elapsed_s"] for r in runs)
    latencies = [value for r in runs for value in r["latencies_ms"]]
    return {"n": n, "elapsed_s": elapsed, "rps": n / elapsed,
            "latency_ms": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99)}}


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    env = results["environment"]
    lines = [*header("engine pool", env, f"Docker {env['docker']}"), ""]
    p = results["provision"]
    lines += [
        f"1. {p['n']} engines, {p['concurrency']} at a time ({len(p['rounds'])} rounds alternating with the "
        f"reference; the round of median ratio, failures over all rounds; ratios "
        f"{', '.join(format(r['ratio'], '.2f') for r in p['rounds'])})",
        f"  control plane: POST /ace/provision/acestream until all listed healthy  {p['control_plane_s']:7.2f} s"
        f"  failures {p['failures']}",
        f"  reference: docker run -d of the same image                            {p['reference_s']:7.2f} s"
        f"  failures {p['reference_failures']}",
        f"  ratio: {p['ratio']:.2f}x (goal <= 1.15x, 0 failures)",
        "",
    ]

    def rps(runs: list[dict[str, Any]]) -> str:
        values = sorted(r["rps"] for r in runs)
        p99 = sorted(r["latency_ms"]["p99"] for r in runs)
        return f"{values[len(values) // 2]:8.0f} req/s (min {values[0]:.0f}, max {values[-1]:.0f}), p99 {p99[len(p99) // 2]:.1f} ms"

    big = results["engines_1000"][0]
    lines += [
        "2. GET /ace/engines at concurrency 16, client in its own process",
        f"  10 engines:            {rps(results['engines_10'])}  (goal >= 1,600 req/s)",
        f"  GET /healthz:          {rps(results['healthz'])}",
        f"  ratio engines/healthz: {sorted(r['rps'] for r in results['engines_10'])[len(results['engines_10']) // 2] / sorted(r['rps'] for r in results['healthz'])[len(results['healthz']) // 2]:.2f}",
        f"  1,000 engines:         {big['rps']:8.0f} req/s, p50 {big['latency_ms']['p50']:.1f} ms, "
        f"p99 {big['latency_ms']['p99']:.1f} ms  (goal p99 < 50 ms)",
        "",
    ]
    ev = results["events"]
    lines += [
        "3. Stream events at concurrency 16, the collector polling every started stream",
        *(f"  {name:<15} {r['rps']:8.0f} events/s, p50 {r['latency_ms']['p50']:.1f} ms, p99 {r['latency_ms']['p99']:.1f} ms"
          "  (goal >= 1,000/s, p99 < 50 ms)" for name, r in (("stream_started", ev["started"]), ("stream_ended", ev["ended"]))),
        "",
        f"total run time: {results['runtime_s']:.0f} s",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pool", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=5)
    parser.add_argument("--http-n", type=int, default=4000, help="GET /engines per round (default 4000)")
    parser.add_argument("--big-n", type=int, default=1000, help="GET /engines with 1,000 engines (default 1000)")
    parser.add_argument("--events", type=int, default=3000, help="stream events of each kind (default 3000)")
    parser.add_argument("--rounds", type=int, default=5, help="provisioning rounds and GET rounds, median reported (default 5)")
    parser.add_argument("--json", type=Path)
    run_and_print(parser.parse_args(), run, render)


if __name__ == "__main__":
    main()
