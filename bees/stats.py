"""Counters a bee reports in its status, and the rates derived from them."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Totals:
    processed: int = 0  # work messages handled
    errors: int = 0  # handling or publishing failures
    published: int = 0  # work messages published

    def snapshot(self) -> Totals:
        return Totals(**asdict(self))

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def rates(before: Totals, after: Totals, elapsed_s: float) -> dict[str, float]:
    """Messages per second of each counter between two snapshots."""
    if elapsed_s <= 0:
        return {k: 0.0 for k in asdict(after)}
    old = asdict(before)
    return {k: round((v - old[k]) / elapsed_s, 3) for k, v in asdict(after).items()}
