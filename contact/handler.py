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
import inspect
import logging
import queue
import threading
from collections import deque
from collections.abc import Awaitable, Callable

from contact import contact_pb2, one_line_error, text_problem

log = logging.getLogger("contact.handler")

# The handler: a plain function or an `async def`, given the task, returning the answer.
Handler = Callable[[contact_pb2.ServerMsg], str] | Callable[[contact_pb2.ServerMsg], Awaitable[str]]
Done = Callable[[contact_pb2.ServerMsg, contact_pb2.Result], None]


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


class HandlerPool:
    """Runs `handler` on up to `size` tasks at once; each Result goes to
    `done(task, result)` on the event loop's thread."""

    def __init__(self, handler: Handler, size: int, done: Done) -> None:
        if size < 1:
            raise ValueError("a pool needs at least one worker")
        self._handler, self._size, self._done = handler, size, done
        self._async = is_async(handler)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Async handlers: tasks wait here for one of `size` free workers.
        self._waiting: deque[contact_pb2.ServerMsg] = deque()
        self._free = size
        self._running: dict[str, asyncio.Task[None]] = {}  # by task id
        # Plain handlers: threads take tasks from `_jobs` themselves (None:
        # end), so a thread that finishes a task starts the next without
        # waiting for the loop. Under `_lock`: the ids a thread has taken and
        # not yet handed back, and those withdrawn before a thread took them.
        self._jobs: queue.SimpleQueue[contact_pb2.ServerMsg | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._taken: set[str] = set()
        self._dropped: set[str] = set()
        self._finished: deque[tuple[contact_pb2.ServerMsg, contact_pb2.Result]] = deque()
        self._delivery_scheduled = False
        if not self._async:
            for number in range(size):
                threading.Thread(target=self._work, name=f"handler-{number}", daemon=True).start()

    def submit(self, task: contact_pb2.ServerMsg) -> None:
        """Work on `task` as soon as a worker is free."""
        self._loop = asyncio.get_running_loop()
        if self._async:
            self._waiting.append(task)
            self._start_waiting()
        else:
            self._jobs.put(task)

    def withdraw(self, task_id: str) -> str | None:
        """Stop `task_id`, a task submitted and not yet done, if it can be:
        dropped if it waits, cancelled if an async handler runs it. Say which,
        or None if neither (a plain handler runs it to the end)."""
        if not self._async:
            with self._lock:
                if task_id in self._taken:
                    return None
                self._dropped.add(task_id)  # the thread that takes it skips it
            return "dropped before it started"
        for task in self._waiting:
            if task.id == task_id:
                self._waiting.remove(task)
                return "dropped before it started"
        self._running[task_id].cancel()
        return "cancelled while it ran"

    def close(self) -> None:
        """Drop the tasks not started yet, cancel async handlers, and end each
        thread after its current task (whose answer then goes nowhere)."""
        self._waiting.clear()
        for running in self._running.values():
            running.cancel()
        if not self._async:
            with contextlib.suppress(queue.Empty):
                while True:
                    self._jobs.get_nowait()
            for _ in range(self._size):
                self._jobs.put(None)

    # -- async handlers, on the loop --

    def _start_waiting(self) -> None:
        while self._free and self._waiting:
            self._free -= 1
            task = self._waiting.popleft()
            self._running[task.id] = asyncio.ensure_future(self._run(task))

    async def _run(self, task: contact_pb2.ServerMsg) -> None:
        result: contact_pb2.Result | None = None
        try:
            result = result_of(task, await self._handler(task))  # type: ignore[misc]
        except asyncio.CancelledError:
            pass  # withdrawn, or the client is stopping: nobody takes this answer
        except Exception as err:
            result = raised(task, err)
        finally:
            del self._running[task.id]
            self._free += 1
        if result is not None:
            self._done(task, result)
        self._start_waiting()

    # -- plain handlers, in threads --

    def _work(self) -> None:
        while (task := self._jobs.get()) is not None:
            with self._lock:
                if task.id in self._dropped:
                    self._dropped.discard(task.id)
                    continue
                self._taken.add(task.id)
            try:
                result = result_of(task, self._handler(task))
            except BaseException as err:  # even SystemExit: it would only end this thread
                result = raised(task, err)
            self._finished.append((task, result))
            if not self._delivery_scheduled:
                self._delivery_scheduled = True
                assert self._loop is not None
                with contextlib.suppress(RuntimeError):  # the loop has closed: we are exiting
                    self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        """On the loop's thread: hand every finished task on."""
        self._delivery_scheduled = False  # first, so a task finishing now schedules anew
        while self._finished:
            task, result = self._finished.popleft()
            with self._lock:  # only now: until it is handed on, withdraw() must wait it out
                self._taken.discard(task.id)
            self._done(task, result)
