"""``wait_set``: the wait of the control plane's forever loops, which must stop when cancelled."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.aio import wait_set


async def test_it_says_whether_the_event_was_set_in_time() -> None:
    event = asyncio.Event()
    assert await wait_set(event, 0.01) is False
    asyncio.get_running_loop().call_soon(event.set)
    assert await wait_set(event, 10) is True


async def test_a_cancel_that_meets_the_event_being_set_still_stops_the_loop() -> None:
    # On Python 3.11, asyncio.wait_for loses this cancellation: the loop would run on forever.
    event = asyncio.Event()
    rounds = 0

    async def forever() -> None:
        nonlocal rounds
        while True:
            await wait_set(event, 10)
            event.clear()
            rounds += 1

    task = asyncio.create_task(forever())
    await asyncio.sleep(0)  # the loop now waits on the event
    event.set()
    task.cancel()  # in the same turn of the event loop as the set
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert rounds == 0
