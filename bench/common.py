"""What every benchmark shares: the machine it ran on, progress lines, the main-function tail,
the gateway as a process of its own, and the HTTP load client's process."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import uvloop

from controlplane import logs

REPO_ROOT = Path(__file__).resolve().parent.parent
BROKER = os.environ.get("CP_TEST_BROKER", "127.0.0.1:5672")
MANAGEMENT = os.environ.get("CP_TEST_MANAGEMENT", "http://127.0.0.1:15672")
GATEWAY_START_TIMEOUT_S = 60
GATEWAY_STOP_TIMEOUT_S = 20


class BenchError(RuntimeError):
    pass


def ms(seconds: float) -> float:
    return seconds * 1000


# CLOCK_MONOTONIC is shared by every process on Linux: the client processes a benchmark starts
# inherit its start time and stamp their progress lines on the same scale.
_STARTED = float(os.environ.setdefault("BENCH_STARTED_MONOTONIC", str(time.monotonic())))


def progress(text: str) -> None:
    """A progress line on stderr, stamped with the seconds since the benchmark started."""
    print(f"[bench {time.monotonic() - _STARTED:6.1f}s] {text}", file=sys.stderr, flush=True)


def environment(broker: str, **more: str) -> dict[str, Any]:
    """The machine, the code and the versions a run measured, printed with its figures."""
    return {"date": date.today().isoformat(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "loadavg_1m": os.getloadavg()[0], "code": code_version(), "os": os_name(), "broker": broker,
            "aio_pika": aio_pika.__version__, "aiohttp": aiohttp.__version__, **more}


def header(name: str, env: dict[str, Any], *versions: str) -> list[str]:
    """The first lines of a benchmark's report: what ran, where, and on which versions."""
    stack = ", ".join([env["broker"], *versions, f"aio-pika {env['aio_pika']}", f"aiohttp {env['aiohttp']}"])
    return [f"controlplane {name} benchmark, {env['date']}, code {env['code']} "
            f"(1-minute load average at start: {env['loadavg_1m']:.2f})",
            f"{env['cpus']} CPUs, {env['os']}, Python {env['python']}, {stack}"]


def code_version() -> str:
    """The commit measured, and whether the code (not bench/ or docs/) differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench", ":!docs"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' + local changes' if dirty else ''}"


def os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def run_and_print(args: argparse.Namespace, run: Callable[[argparse.Namespace], Awaitable[dict[str, Any]]],
                  render: Callable[[dict[str, Any], argparse.Namespace], str]) -> None:
    """Run a benchmark, print its table, and write the raw figures to ``--json`` if given."""
    logs.configure("WARNING")  # warnings to stderr; stdout keeps the table
    # uvloop, as in the HTTP client: what runs here (responders, bare references) shares the
    # machine with what it measures. The gateway runs on asyncio's own loop.
    results = uvloop.run(run(args))
    print(render(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


# --- the gateway as a process of its own ------------------------------------------------------


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class GatewayProcess:
    """A running ``controlplane gateway``: its base URL, process id and log file."""

    name: str
    base: str
    pid: int
    log: Path

    def cpu_seconds(self) -> float:
        """User plus system CPU time the gateway has used so far (from /proc), its running
        child processes included: the store's writer process is the gateway's work too."""
        try:
            return sum(cpu_seconds(pid) for pid in (self.pid, *child_pids(self.pid)))
        except OSError:
            return float("nan")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time process ``pid`` has used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The processes ``pid`` started that still run."""
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@asynccontextmanager
async def gateway_process(name: str, settings: dict[str, Any], log_dir: Path) -> AsyncIterator[GatewayProcess]:
    """Run ``python -m controlplane.cli gateway`` on a free port of 127.0.0.1, configured only
    through ``CP_*`` variables (``settings`` names them without the prefix), until it answers
    ``GET /readyz``; SIGTERM on exit. The benchmark then reaches it only over HTTP and AMQP,
    as any caller would, and its event loop serves nothing but the gateway."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CP_") or k.startswith("CP_TEST_")}
    env.update({f"CP_{key.upper()}": str(value) for key, value in settings.items()})
    env.update(CP_HOST="127.0.0.1", CP_PORT=str(port))
    log = log_dir / f"gateway-{name}.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controlplane.cli", "gateway", cwd=str(REPO_ROOT), env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    ready = False
    try:
        await wait_ready(base, proc, log)  # its error carries the log's tail
        ready = True
        yield GatewayProcess(name=name, base=base, pid=proc.pid, log=log)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), GATEWAY_STOP_TIMEOUT_S)
            except TimeoutError:
                progress(f"gateway {name} did not stop within {GATEWAY_STOP_TIMEOUT_S} s; killing it")
                proc.kill()
                await proc.wait()
        if not ready:
            pass
        elif proc.returncode not in (0, -signal.SIGTERM):
            progress(f"gateway {name} exited with {proc.returncode}; the end of its log:\n{log_tail(log)}")
        elif log.stat().st_size:  # it logs warnings and errors only
            lines = log.read_text(errors="replace").count("\n")
            progress(f"gateway {name} logged {lines} lines of warnings or errors; the last of them:\n"
                     f"{log_tail(log, 12)}")


async def wait_ready(base: str, proc: asyncio.subprocess.Process, log: Path) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GATEWAY_START_TIMEOUT_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while loop.time() < deadline:
            if proc.returncode is not None:
                raise BenchError(f"the gateway exited with {proc.returncode} while starting:\n{log_tail(log)}")
            try:
                async with http.get(f"{base}/readyz") as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.1)
    raise BenchError(f"the gateway at {base} was not ready within {GATEWAY_START_TIMEOUT_S} s:\n{log_tail(log)}")


# --- the HTTP load client's process ----------------------------------------------------------


async def http_load(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``bench.httpload`` jobs in a client process of their own; one result per job."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.httpload", "-", cwd=str(REPO_ROOT), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate(json.dumps(jobs).encode())  # on stdin: bodies may be many
    if proc.returncode != 0:
        raise BenchError(f"load client failed ({proc.returncode}): {err.decode()[-2000:]}")
    return [json.loads(line) for line in out.decode().splitlines() if line.strip()]


async def replay_against_healthz(base: str, replay: dict[str, Any], n: int, concurrency: int, rounds: int,
                                 warmup: int) -> dict[str, Any]:
    """``rounds`` x (``n`` replays of one action + ``n`` ``GET /healthz``) at ``concurrency``, in
    alternating order so drift favours neither. ``replay`` is a ``bench.httpload`` job (method,
    url, body) whose every answer must be a 202 marked ``Idempotent-Replayed: true``."""
    replay = {**replay, "concurrency": concurrency, "expect_status": 202,
              "expect_header": ["Idempotent-Replayed", "true"]}
    health = {"method": "GET", "url": f"{base}/healthz", "concurrency": concurrency, "expect_status": 200}
    jobs = [{**health, "name": "warmup-healthz", "n": warmup}, {**replay, "name": "warmup-replay", "n": warmup}]
    for r in range(rounds):
        pair = [{**health, "name": "healthz", "n": n}, {**replay, "name": "replay", "n": n}]
        jobs += pair if r % 2 == 0 else pair[::-1]
    results = [res for res in await http_load(jobs) if not res["name"].startswith("warmup")]
    for res in results:
        if res["errors"]:
            raise BenchError(f"{res['name']}: {res['errors']} of {res['n']} requests failed: {res['first_errors']}")
    return {"healthz": [r for r in results if r["name"] == "healthz"],
            "replay": [r for r in results if r["name"] == "replay"]}


# --- a scratch PostgreSQL database -------------------------------------------------------------


@asynccontextmanager
async def scratch_postgres_database() -> AsyncIterator[str]:
    """The test suite's scratch PostgreSQL database (its URL, in the suite's form), dropped at the
    end also when the benchmark fails half-way."""
    import asyncpg
    from sqlalchemy.engine import make_url

    from tests.conftest import PG_ADMIN_URL, fresh_postgres_database

    url = ""
    try:
        async with fresh_postgres_database() as url:
            yield url
    finally:
        if url:
            dsn = PG_ADMIN_URL.set(drivername="postgresql").render_as_string(hide_password=False)
            admin = await asyncpg.connect(dsn)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')
            finally:
                await admin.close()
