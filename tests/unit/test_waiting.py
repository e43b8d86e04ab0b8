"""A bounded wait that is cancelled just as its event fires still ends cancelled (controller.waiting).

On Python 3.11 `asyncio.wait_for` returns normally in that case: a cancelled predict then kept waiting on its
Pending pod until its 600 s timeout (seen in CI). Each case below sets the event and cancels in one step.
"""

from __future__ import annotations

import asyncio

import pytest

from controller.waiting import wait_event

pytestmark = pytest.mark.anyio


async def _cancel_as_the_event_fires(wait: asyncio.Task[bool], event: asyncio.Event) -> None:
    await asyncio.sleep(0)  # the waiter is now parked on event.wait()
    await asyncio.sleep(0)
    event.set()
    wait.cancel()


async def test_a_cancel_that_races_the_event_is_not_swallowed() -> None:
    for _ in range(20):
        event = asyncio.Event()
        wait = asyncio.ensure_future(wait_event(event, 30))
        await _cancel_as_the_event_fires(wait, event)
        with pytest.raises(asyncio.CancelledError):
            await wait


async def test_the_wait_says_whether_the_event_fired_or_the_time_ran_out() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    event.set()
    assert await wait_event(event, 0.01) is True
