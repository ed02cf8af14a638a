"""Pacing work at a steady rate: arithmetic over a monotonic clock, and a gate built on it.

Messages are due at ``origin + n / rate``; the producer sends what is due and sleeps
until the next one, so output is spread evenly instead of in once-a-second bursts.
``Gate`` does the same for many concurrent callers, handing out one slot at a time.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
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
        return self.take_upto(now, MAX_BATCH)

    def wait(self, now: float) -> float | None:
        """Seconds until the next message is due; None when the rate is 0."""
        if self.rate <= 0:
            return None
        return max(0.0, self.origin + self.sent / self.rate - now)

    def take_one(self, now: float) -> float | None:
        """Take the next message if it is due (returns 0.0, counted as sent); otherwise the
        seconds until it is, or None when the rate is 0."""
        if self.rate <= 0:
            return None
        if self.take_upto(now, 1):
            return 0.0
        return self.wait(now)

    def take_upto(self, now: float, most: int) -> int:
        """Like ``take``, but at most ``most`` messages."""
        if self.rate <= 0:
            return 0
        if now - (self.origin + self.sent / self.rate) > MAX_LAG_S:
            self.origin, self.sent = now, 0
        owed = math.floor((now - self.origin) * self.rate + _EPSILON) + 1 - self.sent
        count = max(0, min(owed, most))
        self.sent += count
        return count


class Gate:
    """Lets concurrent callers through one at a time, evenly at ``rate`` per second.

    ``rate`` None means no limit. Callers queue on a lock, so slots go out in arrival
    order; a rate change wakes the caller waiting for its slot, so it applies at once.
    ``clock`` and ``sleep`` are replaceable so the pacing can be tested without waiting.
    """

    def __init__(self, rate: float | None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._clock, self._sleep = clock, sleep
        self._rate = rate
        self._pacer = Pacer(rate or 0.0, clock())
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()

    @property
    def rate(self) -> float | None:
        return self._rate

    def set_rate(self, rate: float | None) -> None:
        if rate == self._rate:
            return
        if rate is not None:
            if self._rate is None:  # limited again: a fresh schedule, nothing owed from before
                self._pacer = Pacer(rate, self._clock())
            else:
                self._pacer.set_rate(rate, self._clock())
        self._rate = rate
        self._changed.set()

    async def acquire(self) -> None:
        """Return when the caller's slot has come."""
        async with self._lock:
            while self._rate is not None:
                self._changed.clear()
                delay = self._pacer.take_one(self._clock())
                if delay == 0.0:
                    return
                await self._pause(delay)

    async def _pause(self, delay: float | None) -> None:
        """Sleep ``delay`` seconds (None: until a change), ending early when the rate changes."""
        waits: list[asyncio.Future[object]] = [asyncio.ensure_future(self._changed.wait())]
        if delay is not None:
            waits.append(asyncio.ensure_future(self._sleep(delay)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
