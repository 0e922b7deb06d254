"""Running the client's task handler: a fixed set of daemon threads, so a
slow handler never blocks the event loop and the client works on at most
`size` tasks at once, and a guard that turns whatever the handler does
into an answer.

Not concurrent.futures.ThreadPoolExecutor: its threads are joined at exit,
so Ctrl-C would wait for a task that may take hours. Daemon threads end
with the process. Finished tasks are handed back to the loop in batches:
one wake-up of the loop per batch, not per task, which is what keeps many
fast tasks fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable

from contact import MAX_TEXT_BYTES, contact_pb2

log = logging.getLogger("contact.handler")

Handler = Callable[[contact_pb2.ServerMsg], str]
Done = Callable[[contact_pb2.ServerMsg, str], None]


class HandlerPool:
    """`size` daemon threads that run `handler` on one task each at a time."""

    def __init__(self, handler: Handler, size: int) -> None:
        if size < 1:
            raise ValueError("a pool needs at least one thread")
        self._handler = handler
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: queue.SimpleQueue[tuple[contact_pb2.ServerMsg, Done] | None]
        self._tasks = queue.SimpleQueue()  # None: the thread that takes it ends
        self._finished: deque[tuple[Done, contact_pb2.ServerMsg, str]] = deque()
        self._delivery_scheduled = False
        self._size = size
        for number in range(size):
            threading.Thread(target=self._work, name=f"handler-{number}", daemon=True).start()

    def submit(self, task: contact_pb2.ServerMsg, done: Done) -> None:
        """Answer `task` in one of the threads (it waits while all are busy),
        then call `done(task, answer)` on the event loop's thread."""
        self._loop = asyncio.get_running_loop()
        self._tasks.put((task, done))

    def answer(self, task: contact_pb2.ServerMsg) -> str:
        """The handler's answer, or `error: ...` whatever goes wrong: one bad
        task must not stop the client or come back forever."""
        try:
            answer = self._handler(task)
            if not isinstance(answer, str):
                return f"error: the handler returned {type(answer).__name__}, not str"
            if len(answer.encode()) > MAX_TEXT_BYTES:  # also raises for lone surrogates
                return f"error: the answer is longer than {MAX_TEXT_BYTES} bytes"
            return answer
        except BaseException as err:  # even SystemExit: it would only end this thread
            log.exception("the handler failed on task %s", task.id)
            return f"error: {type(err).__name__}: {err}"

    def close(self) -> None:
        """Drop the tasks not started yet, and end each thread after its
        current task (whose answer then goes nowhere)."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._tasks.get_nowait()
        for _ in range(self._size):
            self._tasks.put(None)

    def _work(self) -> None:
        while (job := self._tasks.get()) is not None:
            task, done = job
            self._finished.append((done, task, self.answer(task)))
            if not self._delivery_scheduled:
                self._delivery_scheduled = True
                assert self._loop is not None
                with contextlib.suppress(RuntimeError):  # the loop has closed: we are exiting
                    self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        """On the loop's thread: hand every finished task to its `done`."""
        self._delivery_scheduled = False  # first, so a task finishing now schedules anew
        while self._finished:
            done, task, answer = self._finished.popleft()
            done(task, answer)
