"""LatestSaver: a burst of changes costs few saves, and each change is covered by a save that
started after it."""

from __future__ import annotations

import asyncio

from controlplane.bus.snapshot import LatestSaver


class RecordingSave:
    """A save that reads ``state`` when it starts and finishes when released."""

    def __init__(self) -> None:
        self.state = 0
        self.saved: list[int] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self) -> None:
        seen = self.state
        self.started.set()
        await self.release.wait()
        self.release.clear()
        self.saved.append(seen)


async def test_changes_during_a_save_share_the_next_one() -> None:
    save = RecordingSave()
    saver = LatestSaver(save)
    save.state = 1
    first = saver.request()
    await asyncio.wait_for(save.started.wait(), 1)
    save.started.clear()
    later = []
    for state in (2, 3, 4):  # arrive while the first save is out
        save.state = state
        later.append(saver.request())
    assert len({id(f) for f in later}) == 1  # one future: one save covers them all
    save.release.set()
    await asyncio.wait_for(first, 1)
    assert not later[0].done()  # the first save started before these changes
    await asyncio.wait_for(save.started.wait(), 1)
    save.release.set()
    await asyncio.wait_for(later[0], 1)
    assert save.saved == [1, 4]


async def test_a_failed_save_still_settles_its_waiters_and_the_next_runs() -> None:
    calls: list[str] = []

    async def flaky() -> None:
        calls.append("save")
        if len(calls) == 1:
            raise RuntimeError("broker away")

    saver = LatestSaver(flaky)
    await asyncio.wait_for(saver.request(), 1)
    await asyncio.wait_for(saver.request(), 1)
    assert calls == ["save", "save"]
