"""A fixed set of daemon threads that run the client's task handler, so a
slow handler never blocks the event loop and the client works on at most
`size` tasks at once.

Not concurrent.futures.ThreadPoolExecutor: its threads are joined at exit,
so Ctrl-C would wait for a task that may take hours. Daemon threads end
with the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

Job = tuple[Callable[[Any], Any], Any, asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class DaemonPool:
    """`size` daemon threads taking jobs in turn; `run` awaits one job."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a pool needs at least one thread")
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        for number in range(size):
            threading.Thread(target=self._work, name=f"handler-{number}", daemon=True).start()

    async def run(self, work: Callable[[T], R], argument: T) -> R:
        """Run `work(argument)` in one of the threads and return its result
        (or raise its exception); waits while every thread is busy."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[R] = loop.create_future()
        self._jobs.put((work, argument, loop, done))
        return await done

    def _work(self) -> None:
        while True:
            work, argument, loop, done = self._jobs.get()
            if done.cancelled():
                continue  # nobody waits for it any more: skip the work
            try:
                outcome: tuple[bool, Any] = (True, work(argument))
            except BaseException as err:  # handed to the waiter, whatever it is
                outcome = (False, err)
            with contextlib.suppress(RuntimeError):  # the loop has closed: we are exiting
                loop.call_soon_threadsafe(settle, done, outcome)


def settle(done: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    """Give the waiter its result or exception, unless it stopped waiting."""
    if done.done():
        return
    succeeded, value = outcome
    if succeeded:
        done.set_result(value)
    else:
        done.set_exception(value)
