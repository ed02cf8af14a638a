"""Many small events as few messages: what arrives while one batch is on its way to the broker
goes out together in the next.

A caller adds its item and awaits the publish of the batch that carries it, so it is answered
only once the broker has confirmed it; a thousand events a second cost as many confirmed
messages as there are publishes in flight, not a thousand. When nothing is in flight a lone
item goes out at once (on the loop's next turn, with whatever came in the same turn).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    """A batch is bounded by its callers: each waits for its own, so at most as many items as
    requests in flight."""

    def __init__(self, publish: Callable[[list[T]], Awaitable[None]]) -> None:
        self._publish = publish
        self._items: list[T] = []
        self._next: asyncio.Future[None] | None = None  # resolved when the pending items are published
        self._running: asyncio.Task[None] | None = None

    def add(self, item: T) -> asyncio.Future[None]:
        """Queue ``item``; the future resolves once the batch carrying it is published (or
        fails with the publish's error)."""
        self._items.append(item)
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        future = self._next
        if self._running is None:
            self._running = asyncio.ensure_future(self._run())
        return future

    async def _run(self) -> None:
        try:
            await asyncio.sleep(0)  # what the other requests of this turn add goes in the same batch
            while self._items:
                items, self._items = self._items, []
                done, self._next = self._next, None
                try:
                    await self._publish(items)
                except Exception as exc:
                    if done is not None and not done.done():
                        done.set_exception(exc)
                else:
                    if done is not None and not done.done():
                        done.set_result(None)
        finally:
            self._running = None
