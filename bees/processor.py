"""The processor bee: turns every work-in message into one HTTP call to the system under test.

Config (camelCase on the wire): ``baseUrl`` (default: the bee's ``CP_SUT_URL``), ``method``,
``path``, ``body`` (JSON), ``headers``, ``timeoutMs`` and ``maxConnections``, which bounds
both the connection pool and the messages handled at once. A message may change its own
call with ``{"request": {"method", "path", "body", "headers"}}``; its headers are added to
the config's. Messages are acked whatever the call's result, because this is load, not a
job queue: failures count as errors. With a work-out queue every call's result is published
(``bees.http.HttpResult.message``). Run it with ``python -m bees.processor``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from pydantic import Field, ValidationError, ValidationInfo, field_validator

from controlplane.contract.models import Strict
from bees.env import BeeEnv
from bees.http import (INVALID_REQUEST, METHOD_PATTERN, PATH_PATTERN, HttpCallConfig, HttpRequest, HttpResult,
                       HttpStats, call, close_later, egress_of, join_url, new_session, url_or_sut)
from bees.sdk import BeeContext, Worker, run_bee


class ProcessorConfig(HttpCallConfig):
    base_url: str | None = Field(None, validate_default=True)
    max_connections: int = Field(50, ge=1, le=10_000)

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        return url_or_sut(value, info, "baseUrl")

    def target(self, env: BeeEnv) -> str:
        """The address calls go to; validation made sure there is one."""
        base = self.base_url or env.sut_url
        assert base is not None
        return base


class RequestOverride(Strict):
    """What a work message may change about its own call."""

    method: str | None = Field(None, pattern=METHOD_PATTERN)
    path: str | None = Field(None, pattern=PATH_PATTERN)
    body: Any = None
    headers: dict[str, str] = Field(default_factory=dict)


class InvalidRequest(ValueError):
    """A work message whose ``request`` cannot be used."""


def request_for(config: ProcessorConfig, base_url: str, message: dict[str, Any]) -> HttpRequest:
    """The call a message asks for: the config, overridden by the message's ``request``."""
    raw = message.get("request")
    try:
        override = RequestOverride.model_validate({} if raw is None else raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in exc.errors())
        raise InvalidRequest(f"request: {problems}") from None
    path = override.path or config.path
    return HttpRequest(
        method=(override.method or config.method).upper(),
        url=join_url(base_url, path),
        path=path,
        body=override.body if "body" in override.model_fields_set else config.body,
        headers={**config.headers, **override.headers},
        timeout_s=config.timeout_ms / 1000,
    )


class Processor(Worker[ProcessorConfig]):
    Config = ProcessorConfig

    def __init__(self) -> None:
        self.stats = HttpStats()
        self.session: aiohttp.ClientSession | None = None
        self._base_url = ""
        self._closing: set[asyncio.Task[None]] = set()

    async def setup(self, ctx: BeeContext[ProcessorConfig]) -> None:
        self._open(ctx)

    async def on_config(self, ctx: BeeContext[ProcessorConfig], previous: ProcessorConfig) -> None:
        config = ctx.config
        if config.target(ctx.env) != self._base_url or config.max_connections != previous.max_connections:
            old = self.session
            self._open(ctx)
            if old is not None:
                # Calls already on their way finish on the old session, within their timeout.
                task = asyncio.create_task(close_later(old, previous.timeout_ms / 1000 + 1))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def teardown(self, ctx: BeeContext[ProcessorConfig]) -> None:
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
        if self.session is not None:
            await self.session.close()
            self.session = None

    def _open(self, ctx: BeeContext[ProcessorConfig]) -> None:
        self._base_url = ctx.config.target(ctx.env)
        self.session = new_session(ctx.config.max_connections, egress_of(ctx.env))
        self.prefetch = ctx.config.max_connections

    async def handle(self, ctx: BeeContext[ProcessorConfig], body: dict[str, Any]) -> None:
        config, session = ctx.config, self.session
        assert session is not None, "setup has not run"
        try:
            request = request_for(config, self._base_url, body)
        except InvalidRequest:
            result = HttpResult.failed(INVALID_REQUEST, config.method, config.path)
        else:
            result = await call(session, request)
        self.stats.add(result)
        if not result.ok:
            ctx.totals.errors += 1
        if ctx.env.work_out:
            await ctx.publish(result.message(body.get("seq")))

    def report(self, ctx: BeeContext[ProcessorConfig]) -> dict[str, Any]:
        return {"http": self.stats.report()}


def main() -> None:
    run_bee(Processor)


if __name__ == "__main__":
    main()
