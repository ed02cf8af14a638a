"""Pacing a producer at a steady rate: pure arithmetic over a monotonic clock.

Messages are due at ``origin + n / rate``; the producer sends what is due and sleeps
until the next one, so output is spread evenly instead of in once-a-second bursts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# After a stall longer than this (the bee was disabled, the broker was away) the schedule
# restarts instead of sending everything it missed in one burst.
MAX_LAG_S = 0.5
# Most messages one step sends; the rest stay due for the next step.
MAX_BATCH = 500
_EPSILON = 1e-9


@dataclass
class Pacer:
    rate: float  # messages per second; 0 sends nothing
    origin: float  # clock time the first message of the schedule was due
    sent: int = 0  # messages sent since ``origin``

    def set_rate(self, rate: float, now: float) -> None:
        """Switch rate at once: the next message is due one new interval after the last one
        (or now, if that is already past), never a backlog of the time before the change."""
        if rate == self.rate:
            return
        next_due = now
        if self.sent and self.rate > 0 and rate > 0:
            last = self.origin + (self.sent - 1) / self.rate
            next_due = max(now, last + 1 / rate)
        self.rate, self.origin, self.sent = rate, next_due, 0

    def take(self, now: float) -> int:
        """How many messages to send now; they are counted as sent."""
        if self.rate <= 0:
            return 0
        if now - (self.origin + self.sent / self.rate) > MAX_LAG_S:
            self.origin, self.sent = now, 0
        owed = math.floor((now - self.origin) * self.rate + _EPSILON) + 1 - self.sent
        count = max(0, min(owed, MAX_BATCH))
        self.sent += count
        return count

    def wait(self, now: float) -> float | None:
        """Seconds until the next message is due; None when the rate is 0."""
        if self.rate <= 0:
            return None
        return max(0.0, self.origin + self.sent / self.rate - now)
