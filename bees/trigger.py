"""The trigger bee: calls one HTTP endpoint every ``intervalS`` seconds while enabled.

Config (camelCase on the wire): ``intervalS`` (default 10), ``url``, the whole address to
call (default: the bee's ``CP_SUT_URL`` followed by ``path``), ``path``, ``method``, ``body``
(JSON), ``headers`` and ``timeoutMs``. Calls are classified like the processor's
(``bees.http``); with a work-out queue every result is published, ``seq`` counting the calls.
Its status ``data`` carries ``trigger``: the last call's status, latency and error kind, and
calls by kind (``ok`` or an error kind). Run it with ``python -m bees.trigger``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import aiohttp
from pydantic import Field, ValidationInfo, field_validator
from yarl import URL

from controlplane.contract.models import utcnow
from bees.env import BeeEnv
from bees.http import (HttpCallConfig, HttpRequest, HttpResult, call, egress_of, join_url, new_session,
                       url_or_sut)
from bees.sdk import BeeContext, Worker, run_bee


class TriggerConfig(HttpCallConfig):
    interval_s: float = Field(10.0, gt=0, le=86_400)
    url: str | None = Field(None, validate_default=True)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None, info: ValidationInfo) -> str | None:
        return url_or_sut(value, info, "url")

    def request(self, env: BeeEnv) -> HttpRequest:
        """The call to make: ``url`` as it is, or ``path`` on the system under test."""
        if self.url is not None:
            url, path = self.url, URL(self.url).path_qs or "/"
        else:
            assert env.sut_url is not None  # validation made sure of it
            url, path = join_url(env.sut_url, self.path), self.path
        return HttpRequest(method=self.method, url=url, path=path, body=self.body, headers=dict(self.headers),
                           timeout_s=self.timeout_ms / 1000)


class Trigger(Worker[TriggerConfig]):
    Config = TriggerConfig

    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None
        self.calls = 0
        self.by_kind: Counter[str] = Counter()
        self.last: HttpResult | None = None
        self.last_at: str | None = None
        self._started: float | None = None  # clock time of the last call

    async def setup(self, ctx: BeeContext[TriggerConfig]) -> None:
        self.session = new_session(2, egress_of(ctx.env))

    async def teardown(self, ctx: BeeContext[TriggerConfig]) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def tick(self, ctx: BeeContext[TriggerConfig]) -> float | None:
        interval = ctx.config.interval_s
        now = ctx.now()
        if self._started is not None and now < self._started + interval:
            return self._started + interval - now  # woken by a config change: keep the schedule
        assert self.session is not None, "setup has not run"
        self._started = now
        result = await call(self.session, ctx.config.request(ctx.env))
        self.calls += 1
        self.by_kind[result.error_kind or "ok"] += 1
        self.last, self.last_at = result, utcnow().isoformat()
        if not result.ok:
            ctx.totals.errors += 1
        if ctx.env.work_out:
            await ctx.publish(result.message(self.calls))
        return max(0.0, self._started + interval - ctx.now())

    def report(self, ctx: BeeContext[TriggerConfig]) -> dict[str, Any]:
        last = self.last
        return {"trigger": {
            "calls": self.calls,
            "byKind": dict(self.by_kind),
            "lastStatus": last.status if last else None,
            "lastLatencyMs": last.latency_ms if last else None,
            "lastErrorKind": last.error_kind if last else None,
            "lastAt": self.last_at,
        }}


def main() -> None:
    run_bee(Trigger)


if __name__ == "__main__":
    main()
