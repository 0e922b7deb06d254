"""The bounded waits of both sides (contact/waits.py `within`): a
cancellation is never lost, which asyncio.wait_for before Python 3.12 may
do when the awaited thing finishes in the same instant."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from contact.waits import within


async def cancelled_as_it_finishes(wait: Callable[[Awaitable[int], float], Awaitable[int]]) -> bool:
    """Whether a caller cancelled in the same loop turn as its awaited
    future gets its result ends cancelled."""
    answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    caller = asyncio.ensure_future(wait(answer, 10))
    await asyncio.sleep(0)  # the caller now waits for `answer`
    answer.set_result(1)
    caller.cancel()
    try:
        await caller
    except asyncio.CancelledError:
        return True
    return False


def test_a_cancellation_that_arrives_as_the_wait_ends_is_not_lost() -> None:
    assert asyncio.run(cancelled_as_it_finishes(within))


def test_a_wait_that_runs_out_cancels_what_it_awaited_and_raises_timeout() -> None:
    async def scenario() -> asyncio.Future[int]:
        never: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        with pytest.raises(asyncio.TimeoutError):
            await within(never, 0.01)
        return never

    assert asyncio.run(scenario()).cancelled()


def test_a_result_in_time_is_returned() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 7

    assert asyncio.run(within(answer(), 5)) == 7
