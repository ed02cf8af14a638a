"""Replies a handler waits for: one future per key, owned by whoever expects it.

A controller's handler that needs an answer (a controller's handshake, a bee's outcome or
first status) registers the key before it sends, then awaits. Replies arrive on a consumer
of their own, never the one that carries commands, so a handler holding a command unacked
cannot block the reply it waits for. A future leaves the table when it is done, answered or
timed out; a reply nobody waits for is dropped; ``fail_all`` releases every waiter on stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Generic, TypeVar

from controlplane.logs import get_logger

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

log = get_logger("replies")


class Replies(Generic[K, V]):
    def __init__(self, what: str) -> None:
        self.what = what
        self._pending: dict[K, asyncio.Future[V]] = {}

    def expect(self, key: K) -> asyncio.Future[V]:
        """The future for ``key``, registered before the request goes out; one waiter per key
        (a waiter that times out cancels it)."""
        future = self._pending.get(key)
        if future is None or future.done():
            future = asyncio.get_running_loop().create_future()
            self._pending[key] = future
            future.add_done_callback(lambda f, k=key: self._forget(k, f))
        return future

    def _forget(self, key: K, future: asyncio.Future[V]) -> None:
        if self._pending.get(key) is future:
            del self._pending[key]

    async def wait(self, key: K, timeout_s: float) -> V:
        """Await the reply for ``key``; ``TimeoutError`` when none comes in time."""
        async with asyncio.timeout(timeout_s):
            return await self.expect(key)

    def resolve(self, key: K, value: V) -> bool:
        """Hand ``value`` to whoever waits for ``key``; False when nobody does."""
        future = self._pending.get(key)
        if future is None or future.done():
            log.debug("reply nobody waits for dropped", what=self.what, key=repr(key))
            return False
        future.set_result(value)
        return True

    def waiting(self, key: K) -> bool:
        future = self._pending.get(key)
        return future is not None and not future.done()

    def fail_all(self, exc: BaseException | None = None) -> None:
        """Release every waiter: with ``exc``, or cancelled (the receiver is going away and
        its unacked commands go back to the queue for the next one)."""
        for future in list(self._pending.values()):
            if not future.done():
                if exc is None:
                    future.cancel()
                else:
                    future.set_exception(exc)
        self._pending.clear()

    def __len__(self) -> int:
        return len(self._pending)
