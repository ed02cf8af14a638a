"""The postprocessor bee: turns the processor's results into latency percentiles and error counts.

Config (camelCase on the wire): ``window``, how many of the most recent latencies the
percentiles are computed over (default 10000). Its status ``data`` carries
``latency`` (``count`` of every result seen, ``p50``/``p95``/``p99``/``max`` in ms over the
window), ``errors`` by kind, ``ok`` and ``failed``. A message without a numeric
``latencyMs`` is not a result: it counts as an error of kind ``invalid-result`` and is acked.
Run it with ``python -m bees.postprocessor``.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import Field

from controlplane.contract.models import Strict
from bees.http import ERROR_KINDS
from bees.sdk import BeeContext, Worker, run_bee

INVALID_RESULT = "invalid-result"
PERCENTILES = (50, 95, 99)
DEFAULT_WINDOW = 10_000


class PostprocessorConfig(Strict):
    window: int = Field(DEFAULT_WINDOW, ge=1, le=1_000_000)


def nearest_rank(ordered: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile (0-100) of already sorted values by nearest rank; None if empty."""
    if not ordered:
        return None
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be between 0 and 100, not {p}")
    rank = max(1, math.ceil(p * len(ordered) / 100))  # p * n first: exact for whole numbers
    return ordered[rank - 1]


def latency_summary(samples: Iterable[float], count: int) -> dict[str, Any]:
    """``count`` results seen, and the percentiles and maximum of ``samples``."""
    ordered = sorted(samples)
    summary: dict[str, Any] = {"count": count}
    for p in PERCENTILES:
        summary[f"p{p}"] = nearest_rank(ordered, p)
    summary["max"] = ordered[-1] if ordered else None
    return summary


def result_latency(body: dict[str, Any]) -> float | None:
    """The latency of a result message; None when the message is not a result."""
    value = body.get("latencyMs")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


class Postprocessor(Worker[PostprocessorConfig]):
    Config = PostprocessorConfig

    def __init__(self) -> None:
        self.samples: deque[float] = deque(maxlen=DEFAULT_WINDOW)
        self.seen = 0
        self.ok = 0
        self.failed = 0
        self.errors: Counter[str] = Counter()

    async def setup(self, ctx: BeeContext[PostprocessorConfig]) -> None:
        self._resize(ctx.config.window)

    async def on_config(self, ctx: BeeContext[PostprocessorConfig], previous: PostprocessorConfig) -> None:
        self._resize(ctx.config.window)

    def _resize(self, window: int) -> None:
        if self.samples.maxlen != window:
            self.samples = deque(self.samples, maxlen=window)  # keeps the most recent

    async def handle(self, ctx: BeeContext[PostprocessorConfig], body: dict[str, Any]) -> None:
        latency = result_latency(body)
        if latency is None:
            self.errors[INVALID_RESULT] += 1
            ctx.totals.errors += 1
            return
        self.seen += 1
        self.samples.append(latency)
        if body.get("ok") is True:
            self.ok += 1
        else:
            self.failed += 1
            # A closed set: a message cannot grow the report with kinds of its own.
            kind = body.get("errorKind")
            self.errors[kind if kind in ERROR_KINDS else "other"] += 1

    def report(self, ctx: BeeContext[PostprocessorConfig]) -> dict[str, Any]:
        return {"latency": latency_summary(self.samples, self.seen), "errors": dict(self.errors),
                "ok": self.ok, "failed": self.failed}


def main() -> None:
    run_bee(Postprocessor)


if __name__ == "__main__":
    main()
