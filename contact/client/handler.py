"""Running the client's task handler on at most `size` tasks at once, and
turning whatever it does into a Result: its answer, or why it failed.

A plain function runs in a fixed set of daemon threads, so a slow handler
never blocks the event loop; an `async def` handler runs on the loop. Not
concurrent.futures.ThreadPoolExecutor: its threads are joined at exit, so
Ctrl-C would wait for a task that may take hours; daemon threads end with
the process. Finished tasks are handed back to the loop in batches: one
wake-up of the loop per batch, not per task, which keeps many fast tasks
fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import queue
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from contact import contact_pb2, one_line_error, text_problem

log = logging.getLogger("contact.handler")

# The handler: a plain function or an `async def`, given the task, returning the answer.
Handler = Callable[[contact_pb2.ServerMsg], str] | Callable[[contact_pb2.ServerMsg], Awaitable[str]]
Done = Callable[[contact_pb2.ServerMsg, contact_pb2.Result], None]
Started = Callable[[contact_pb2.ServerMsg], None]


def is_async(handler: Handler) -> bool:
    """Whether `handler` is an `async def` (or an object whose __call__ is)."""
    call = getattr(handler, "__call__", None)  # noqa: B004 (an object with async __call__)
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)


def result_of(task: contact_pb2.ServerMsg, answer: object) -> contact_pb2.Result:
    """The Result for what the handler returned: the answer, or why it cannot be one."""
    if not isinstance(answer, str):
        return failure(task, f"the handler returned {type(answer).__name__}, not str")
    if problem := text_problem(answer):
        return failure(task, f"the answer cannot be sent: {problem}")
    return contact_pb2.Result(id=task.id, ret=answer)


def failure(task: contact_pb2.ServerMsg, reason: str) -> contact_pb2.Result:
    return contact_pb2.Result(id=task.id, error=one_line_error(reason))


def raised(task: contact_pb2.ServerMsg, err: BaseException) -> contact_pb2.Result:
    """The Result for a handler that raised: one bad task must not stop the client."""
    log.error("the handler failed on task %s", task.id, exc_info=err)
    return failure(task, f"{type(err).__name__}: {err}")


class HandlerPool(Protocol):
    """Runs the handler on up to `size` tasks at once; `started(task)` hears
    when each begins, and each Result goes to `done(task, result)`, both on
    the event loop's thread and in the order they happened."""

    def work_on(self, task: contact_pb2.ServerMsg) -> None:
        """Work on `task` as soon as a worker is free."""

    def withdraw(self, task_id: str) -> str | None:
        """Stop `task_id` (submitted, not yet done) if it can be, and say how;
        None if it runs to the end (its Result then comes as usual)."""

    def drop_waiting(self) -> list[str]:
        """Drop the tasks not started yet; return their ids."""

    def close(self) -> None:
        """Drop the tasks not started yet, and stop or abandon the rest:
        their answers go nowhere."""


def handler_pool(handler: Handler, size: int, done: Done, started: Started) -> HandlerPool:
    """The pool for `handler`: threads for a plain function, the loop for an `async def`."""
    if size < 1:
        raise ValueError("a pool needs at least one worker")
    if is_async(handler):
        return AsyncHandlers(handler, size, done, started)  # type: ignore[arg-type]
    return ThreadHandlers(handler, size, done, started)  # type: ignore[arg-type]


class ThreadHandlers:
    """A plain handler in `size` daemon threads. They take tasks from a queue
    themselves, so one that finishes a task starts the next without waiting
    for the loop."""

    def __init__(
        self,
        handler: Callable[[contact_pb2.ServerMsg], str],
        size: int,
        done: Done,
        started: Started,
    ) -> None:
        self._handler, self._size, self._done, self._started = handler, size, done, started
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: queue.SimpleQueue[contact_pb2.ServerMsg | None] = queue.SimpleQueue()
        # Under `_lock`: the ids a thread has taken and not yet handed back,
        # and those withdrawn before a thread took them (it skips them).
        self._lock = threading.Lock()
        self._taken: set[str] = set()
        self._dropped: set[str] = set()
        # Tasks begun (no Result yet) and finished, for the loop, in order.
        self._events: deque[tuple[contact_pb2.ServerMsg, contact_pb2.Result | None]] = deque()
        self._delivery_scheduled = False
        for number in range(size):
            threading.Thread(target=self._work, name=f"handler-{number}", daemon=True).start()

    def work_on(self, task: contact_pb2.ServerMsg) -> None:
        self._loop = asyncio.get_running_loop()
        self._jobs.put(task)

    def withdraw(self, task_id: str) -> str | None:
        with self._lock:
            if task_id in self._taken:
                return None  # a thread cannot be stopped
            self._dropped.add(task_id)
        return "dropped before it started"

    def drop_waiting(self) -> list[str]:
        dropped = []
        with contextlib.suppress(queue.Empty):
            while True:
                job = self._jobs.get_nowait()
                if job is not None:
                    dropped.append(job.id)
        with self._lock:  # gone from the queue: a task sent again under its id must run
            self._dropped.difference_update(dropped)
        return dropped

    def close(self) -> None:
        self.drop_waiting()
        for _ in range(self._size):
            self._jobs.put(None)  # each thread ends after its current task

    def _work(self) -> None:
        while (task := self._jobs.get()) is not None:
            with self._lock:
                if task.id in self._dropped:
                    self._dropped.discard(task.id)
                    continue
                self._taken.add(task.id)
            self._hand_on(task, None)
            try:
                result = result_of(task, self._handler(task))
            except BaseException as err:  # even SystemExit: it would only end this thread
                result = raised(task, err)
            self._hand_on(task, result)

    def _hand_on(self, task: contact_pb2.ServerMsg, result: contact_pb2.Result | None) -> None:
        """From a worker thread: tell the loop that `task` began (no
        `result`) or finished. A task that finishes as the next begins
        costs the loop one wake-up for both."""
        self._events.append((task, result))
        if not self._delivery_scheduled:
            self._delivery_scheduled = True
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop has closed: we are exiting
                self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        """On the loop's thread: hand every begun and finished task on."""
        self._delivery_scheduled = False  # first, so a task finishing now schedules anew
        while self._events:
            task, result = self._events.popleft()
            if result is None:
                self._started(task)
                continue
            with self._lock:  # only now: until it is handed on, withdraw() must wait it out
                self._taken.discard(task.id)
            self._done(task, result)


class AsyncHandlers:
    """An `async def` handler as asyncio tasks on the loop, `size` at most at once."""

    def __init__(
        self,
        handler: Callable[[contact_pb2.ServerMsg], Awaitable[str]],
        size: int,
        done: Done,
        started: Started,
    ) -> None:
        self._handler, self._free, self._done, self._started = handler, size, done, started
        self._waiting: deque[contact_pb2.ServerMsg] = deque()  # for a free worker
        self._running: dict[str, asyncio.Task[None]] = {}  # by task id, not withdrawn
        # Runs withdrawn and not yet ended: no Result from them. By run, not
        # id: the server may send the id again before a run that delays its
        # cancellation ends, and the new run answers.
        self._stopped: set[asyncio.Task[None]] = set()
        self._closed = False

    def work_on(self, task: contact_pb2.ServerMsg) -> None:
        self._waiting.append(task)
        self._start_waiting()

    def withdraw(self, task_id: str) -> str | None:
        for task in self._waiting:
            if task.id == task_id:
                self._waiting.remove(task)
                return "dropped before it started"
        running = self._running.get(task_id)
        if running is None or running.done():  # done, and its Result on its way
            return None
        running.cancel()
        self._stopped.add(running)
        del self._running[task_id]
        return "cancelled while it ran"

    def drop_waiting(self) -> list[str]:
        dropped = [task.id for task in self._waiting]
        self._waiting.clear()
        return dropped

    def close(self) -> None:
        self._closed = True
        self._waiting.clear()
        for running in [*self._running.values(), *self._stopped]:  # (withdrawn, slow to end)
            running.cancel()

    def _start_waiting(self) -> None:
        while self._free and self._waiting:
            self._free -= 1
            task = self._waiting.popleft()
            running = asyncio.ensure_future(self._answer(task))
            self._running[task.id] = running
            # Bookkeeping in a done callback: it runs even for a task
            # cancelled before its first step, which its own code never sees.
            running.add_done_callback(functools.partial(self._finished, task))

    async def _answer(self, task: contact_pb2.ServerMsg) -> None:
        # Begun and done are told from the task's own steps: a handler that
        # answers at once has both go out in one message.
        self._started(task)
        try:
            result = result_of(task, await self._handler(task))
        except asyncio.CancelledError as err:
            if self._ours(asyncio.current_task()):
                raise  # our own doing: no Result
            result = raised(task, err)  # the handler's own: a failure, like any other
        except BaseException as err:  # even SystemExit: one bad task must not stop the client
            result = raised(task, err)
        if not self._ours(asyncio.current_task()):  # (a handler may swallow our cancel)
            self._done(task, result)

    def _ours(self, run: asyncio.Task[Any] | None) -> bool:
        """Whether `run` was cancelled by us: withdrawn, or the pool closed."""
        return self._closed or run in self._stopped

    def _finished(self, task: contact_pb2.ServerMsg, running: asyncio.Task[None]) -> None:
        if self._running.get(task.id) is running:
            del self._running[task.id]
        self._stopped.discard(running)
        self._free += 1
        self._start_waiting()
