"""A fixed set of daemon threads that run the client's task handler, so a
slow handler never blocks the event loop and the client works on at most
`size` tasks at once.

Not concurrent.futures.ThreadPoolExecutor: its threads are joined at exit,
so Ctrl-C would wait for a task that may take hours. Daemon threads end
with the process. Finished jobs are handed back to the loop in batches: one
wake-up of the loop per batch, not per job, which is what keeps many fast
tasks fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class DaemonPool:
    """`size` daemon threads taking jobs in turn, for one event loop."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a pool needs at least one thread")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: queue.SimpleQueue[tuple[Callable[[Any], Any], Any, Callable[[Any], None]]]
        self._jobs = queue.SimpleQueue()
        self._finished: deque[tuple[Callable[[Any], None], Any]] = deque()
        self._delivery_scheduled = False
        for number in range(size):
            threading.Thread(target=self._work, name=f"handler-{number}", daemon=True).start()

    def submit(self, work: Callable[[T], R], argument: T, done: Callable[[R], None]) -> None:
        """Run `work(argument)` in one of the threads (waiting while all are
        busy), then call `done(result)` on the loop's thread. `work` must not
        raise: catch inside it whatever it may raise."""
        self._loop = asyncio.get_running_loop()
        self._jobs.put((work, argument, done))

    def _work(self) -> None:
        while True:
            work, argument, done = self._jobs.get()
            self._finished.append((done, work(argument)))
            if not self._delivery_scheduled:
                self._delivery_scheduled = True
                assert self._loop is not None
                with contextlib.suppress(RuntimeError):  # the loop has closed: we are exiting
                    self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        """On the loop's thread: hand every finished job to its `done`."""
        self._delivery_scheduled = False  # first, so a job finishing now schedules anew
        while self._finished:
            done, result = self._finished.popleft()
            done(result)
