"""A small system under test: an HTTP server that answers everything and counts what it got.

Not a bee: the swarm-controller runs it in a container of its own (``python -m bees.sut``)
for swarms that load HTTP, and tells the bees its address in ``CP_SUT_URL``.

Every method on every path outside ``/_sut/`` answers ``200 {"ok": true, "n": <count>}``,
after ``CP_SUT_LATENCY_MS``, or 500 for the fraction ``CP_SUT_ERROR_RATE`` of requests, and
is counted. ``GET /_sut/stats`` gives the counts, ``GET /_sut/healthz`` answers 200; neither
is counted. Settings: ``CP_SUT_HOST`` (0.0.0.0), ``CP_SUT_PORT`` (8080; 0 picks a free port),
``CP_SUT_LATENCY_MS`` (0), ``CP_SUT_ERROR_RATE`` (0 to 1, default 0).
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from aiohttp import web
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from controlplane.config import settings_or_exit
from controlplane.contract.models import utcnow
from controlplane.logs import configure, get_logger

CONTROL_PREFIX = "/_sut/"
# Paths counted one by one; beyond this many, the rest are counted together, so a caller
# sending random paths cannot grow the stats without bound.
MAX_PATHS = 1000
OTHER_PATHS = "(other)"

log = get_logger("sut")


class SutEnv(BaseSettings):
    # The CP_ prefix with sut_* names, so a bad value is reported under its real variable name.
    model_config = SettingsConfigDict(env_prefix="CP_", extra="ignore")

    sut_host: str = "0.0.0.0"
    sut_port: int = Field(8080, ge=0, le=65535)
    sut_latency_ms: float = Field(0.0, ge=0, le=600_000)
    sut_error_rate: float = Field(0.0, ge=0, le=1)
    log_level: str = "INFO"
    log_format: Literal["console", "json"] = "console"


@dataclass
class Counts:
    started_at: datetime = field(default_factory=utcnow)
    requests: int = 0
    by_path: Counter[str] = field(default_factory=Counter)
    by_method: Counter[str] = field(default_factory=Counter)
    by_status: Counter[str] = field(default_factory=Counter)

    def count(self, method: str, path: str, status: int) -> int:
        self.requests += 1
        if path not in self.by_path and len(self.by_path) >= MAX_PATHS:
            path = OTHER_PATHS
        self.by_path[path] += 1
        self.by_method[method] += 1
        self.by_status[str(status)] += 1
        return self.requests

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "byPath": dict(self.by_path), "byMethod": dict(self.by_method),
                "byStatus": dict(self.by_status), "startedAt": self.started_at.isoformat()}


COUNTS = web.AppKey("counts", Counts)


def build_app(env: SutEnv, rng: random.Random | None = None) -> web.Application:
    counts = Counts()
    chance = rng or random.Random()
    delay_s = env.sut_latency_ms / 1000

    async def stats(_request: web.Request) -> web.Response:
        return web.json_response(counts.as_dict())

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def answer(request: web.Request) -> web.Response:
        if request.path.startswith(CONTROL_PREFIX):
            raise web.HTTPNotFound()
        await request.read()  # a body left unread would cost the keep-alive connection
        failed = env.sut_error_rate > 0 and chance.random() < env.sut_error_rate
        status = 500 if failed else 200
        n = counts.count(request.method, request.path, status)
        if delay_s:
            await asyncio.sleep(delay_s)
        return web.json_response({"ok": not failed, "n": n}, status=status)

    app = web.Application()
    app[COUNTS] = counts
    app.router.add_get(CONTROL_PREFIX + "stats", stats, allow_head=False)
    app.router.add_get(CONTROL_PREFIX + "healthz", healthz, allow_head=False)
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def start(env: SutEnv, rng: random.Random | None = None) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner (``cleanup`` stops it) and the port bound."""
    runner = web.AppRunner(build_app(env, rng), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, env.sut_host, env.sut_port).start()
    return runner, runner.addresses[0][1]


async def serve(env: SutEnv) -> None:
    """Serve until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner, port = await start(env)
    log.info("system under test listening", host=env.sut_host, port=port, latency_ms=env.sut_latency_ms,
             error_rate=env.sut_error_rate)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        log.info("system under test stopped")


def main() -> None:
    env = settings_or_exit(SutEnv, "system under test environment")
    configure(env.log_level, env.log_format)
    asyncio.run(serve(env))


if __name__ == "__main__":
    main()
