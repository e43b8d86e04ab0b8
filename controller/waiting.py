"""Bounded waits that never swallow a cancellation.

On Python 3.11, `asyncio.wait_for` loses a `Task.cancel()` that arrives while the awaited future is completing
(CPython gh-86296, fixed in 3.12 by building `wait_for` on `asyncio.timeout`): a cancelled predict then kept
waiting on its Pending pod for ten minutes. Every bounded wait in the controller goes through here instead.
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until `event` is set (True) or `timeout_s` passes (False); a cancellation always propagates."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True
