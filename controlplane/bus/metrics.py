"""Prometheus metrics of the bus, served with the process's others at ``/metrics``."""

from __future__ import annotations

from typing import Final, Literal

from prometheus_client import Counter

DeadLetterReason = Literal["unparseable", "invalid", "handler-failed"]
DEAD_LETTER_REASONS: Final[tuple[DeadLetterReason, ...]] = ("unparseable", "invalid", "handler-failed")

DEAD_LETTERED = Counter("cp_messages_dead_lettered_total",
                        "Messages a consumer rejected to the dead-letter exchange", ["reason"])
# Every series exists from the start, so a rate over it reads 0 rather than "no data".
for _reason in DEAD_LETTER_REASONS:
    DEAD_LETTERED.labels(_reason)

MessageKind = Literal["signal", "outcome", "status"]
KEY_MISMATCHES = Counter("cp_messages_key_mismatch_total",
                         "Messages dropped because their body disagrees with their routing key", ["kind"])
for _kind in ("signal", "outcome", "status"):
    KEY_MISMATCHES.labels(_kind)
