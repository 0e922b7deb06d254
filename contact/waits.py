"""Bounded waits that never lose the caller's cancellation, for both sides:
the client's answers and hang-ups, the server's `ask` and task handles.

asyncio.wait_for, before Python 3.12, returns the result when the caller's
cancellation arrives as the awaited thing finishes: the caller then runs on
as if never cancelled (a Ctrl-C, or a task group's shutdown, is lost).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from contact.logtext import retrieved

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float | None) -> T:
    """Await `awaitable` for at most `seconds` (None: as long as it takes),
    then cancel it (without waiting for it to end: bounded) and raise
    asyncio.TimeoutError. A cancellation of the caller cancels it too, and
    is never lost."""
    future = asyncio.ensure_future(awaitable)
    future.add_done_callback(retrieved)  # given up on, its error is no news
    try:
        done, _ = await asyncio.wait({future}, timeout=seconds)
    except asyncio.CancelledError:
        future.cancel()
        raise
    if not done:
        future.cancel()
        raise asyncio.TimeoutError
    return future.result()
