"""The moderator bee: forwards work-in to work-out unchanged, as it comes or at a fixed rate.

Config (camelCase on the wire): ``mode``, ``pass-through`` (default) or ``fixed-rate``, and
``ratePerSec`` (above 0, at most 10000), which ``fixed-rate`` requires. At a fixed rate
messages are forwarded evenly spaced; the rest wait in RabbitMQ, where the backlog shows in
the queue's depth, because only a few messages are taken from the queue at a time. A new
rate applies at once. Run it with ``python -m bees.moderator``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from controlplane.contract.models import Strict
from bees.pacing import Gate
from bees.sdk import BeeContext, Worker, run_bee

# Messages held at once: in pass-through as many as keep forwarding busy; at a fixed rate
# about HELD_S worth of them (at least FIXED_RATE_MIN_PREFETCH), so the backlog stays in the
# queue while publisher confirms still overlap enough to reach high rates.
PASS_THROUGH_PREFETCH = 64
FIXED_RATE_MIN_PREFETCH = 4
HELD_S = 0.01


def prefetch_for(rate: float | None) -> int:
    """How many messages the moderator takes from its queue at once at ``rate`` (None: no limit)."""
    if rate is None:
        return PASS_THROUGH_PREFETCH
    return max(FIXED_RATE_MIN_PREFETCH, min(PASS_THROUGH_PREFETCH, math.ceil(rate * HELD_S)))


class ModeratorConfig(Strict):
    mode: Literal["pass-through", "fixed-rate"] = "pass-through"
    rate_per_sec: float | None = Field(None, gt=0, le=10_000, validate_default=True)

    @field_validator("rate_per_sec")
    @classmethod
    def _rate_for_fixed_rate(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None and info.data.get("mode") == "fixed-rate":
            raise ValueError("required when mode is fixed-rate")
        return value

    def limit(self) -> float | None:
        """Messages per second to forward; None for no limit."""
        return self.rate_per_sec if self.mode == "fixed-rate" else None


class Moderator(Worker[ModeratorConfig]):
    Config = ModeratorConfig

    def __init__(self) -> None:
        self.gate: Gate | None = None

    async def setup(self, ctx: BeeContext[ModeratorConfig]) -> None:
        self.gate = Gate(ctx.config.limit(), clock=ctx.now)
        self._follow(ctx.config)

    async def on_config(self, ctx: BeeContext[ModeratorConfig], previous: ModeratorConfig) -> None:
        self._follow(ctx.config)

    def _follow(self, config: ModeratorConfig) -> None:
        assert self.gate is not None, "setup has not run"
        self.gate.set_rate(config.limit())
        self.prefetch = prefetch_for(config.limit())

    async def handle(self, ctx: BeeContext[ModeratorConfig], body: dict[str, Any]) -> None:
        assert self.gate is not None, "setup has not run"
        await self.gate.acquire()
        await ctx.publish(body)

    def report(self, ctx: BeeContext[ModeratorConfig]) -> dict[str, Any]:
        return {"moderation": {"mode": ctx.config.mode, "ratePerSec": ctx.config.limit()}}


def main() -> None:
    run_bee(Moderator)


if __name__ == "__main__":
    main()
