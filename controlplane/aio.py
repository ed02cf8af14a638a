"""Waiting with a deadline, without what Python 3.11's ``asyncio.wait_for`` gets wrong.

``asyncio.wait_for`` on 3.11 can swallow a cancellation that arrives as the awaited thing
completes: the task goes on as if never cancelled, and a loop built on it never stops (a
stop that cancels it and waits then hangs). ``asyncio.timeout`` does not have this flaw, so
the control plane waits with it everywhere; ``wait_set`` is its form for an event.
"""

from __future__ import annotations

import asyncio


async def wait_set(event: asyncio.Event, timeout: float) -> bool:
    """Whether ``event`` is set within ``timeout`` seconds; a cancellation always propagates."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
