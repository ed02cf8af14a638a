"""The generator bee: publishes a templated JSON message at a steady rate while enabled.

Config (camelCase on the wire): ``ratePerSec`` messages per second, 0 to 10000, and
``message``, the object every message starts from; each message adds ``seq`` and ``ts``.
``singleRequest: true`` is a command rather than a setting: the bee publishes one message at
once, enabled or not, and its config reads ``singleRequest: false`` again (reported configs
leave the field out).
Run it with ``python -m bees.generator``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import Field

from controlplane.contract.models import Strict, utcnow
from bees.pacing import Pacer
from bees.sdk import BeeContext, Worker, run_bee


class GeneratorConfig(Strict):
    rate_per_sec: float = Field(1.0, ge=0, le=10000)
    message: dict[str, Any] = Field(default_factory=lambda: {"hello": "world"})
    # A command, never a state: it is false again as soon as it has been carried out, so it is
    # left out of the config a bee reports (absent reads as false).
    single_request: bool = Field(False, exclude=True)


def make_message(template: dict[str, Any], seq: int) -> dict[str, Any]:
    return {**template, "seq": seq, "ts": utcnow().isoformat()}


class Generator(Worker[GeneratorConfig]):
    Config = GeneratorConfig

    def __init__(self) -> None:
        self.seq = 0
        self.pacer: Pacer | None = None

    async def setup(self, ctx: BeeContext[GeneratorConfig]) -> None:
        await self._single_request(ctx)

    async def on_config(self, ctx: BeeContext[GeneratorConfig], previous: GeneratorConfig) -> None:
        await self._single_request(ctx)

    async def _single_request(self, ctx: BeeContext[GeneratorConfig]) -> None:
        """Carry out a ``singleRequest`` and clear it, so the stored config does not repeat it."""
        if not ctx.config.single_request:
            return
        ctx.config = ctx.config.model_copy(update={"single_request": False})
        await self._send(ctx, 1)

    async def tick(self, ctx: BeeContext[GeneratorConfig]) -> float | None:
        rate = ctx.config.rate_per_sec
        if self.pacer is None:
            self.pacer = Pacer(rate, ctx.now())
        else:
            self.pacer.set_rate(rate, ctx.now())
        count = self.pacer.take(ctx.now())
        if count:
            await self._send(ctx, count)
        return self.pacer.wait(ctx.now())

    async def _send(self, ctx: BeeContext[GeneratorConfig], count: int) -> None:
        """Publish ``count`` messages concurrently so confirms overlap; raise the first failure."""
        first, self.seq = self.seq + 1, self.seq + count
        template = ctx.config.message
        results = await asyncio.gather(*(ctx.publish(make_message(template, first + i)) for i in range(count)),
                                       return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]


def main() -> None:
    run_bee(Generator)


if __name__ == "__main__":
    main()
