"""What code that submits tasks gets back: a handle for each task (its id,
its answer to await, a way to withdraw it), the outcome handed to an
`on_answer` hook, and the errors a task that gets no answer raises."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from contact import CLIENT_NAME, MAX_MESSAGE_BYTES, contact_pb2, text_problem
from contact.queue.base import TaskNotAnsweredError
from contact.waits import within

# How long plain code in another thread waits for the server's loop to do
# what it asked (take a task, withdraw one): a journal commit takes
# milliseconds, a slow disk's a few seconds; a loop that has not answered in
# this long is stuck, and the call raises TimeoutError.
LOOP_REPLY_SECONDS = 30.0
# ServerMsg fields the server fills itself: `submit` refuses them as fields.
SERVER_FIELDS = ("task", "id", "attempt", "cancelled")
# A task's message, its own fields included, leaves this much of the message
# cap for the id and the attempt (an id is a few dozen bytes).
MAX_TASK_MESSAGE_BYTES = MAX_MESSAGE_BYTES - 1024


@dataclass(frozen=True)
class Answer:
    """What became of a task, as the `on_answer` hook of ContactServer sees it:
    its answer (`text`) or why it failed (`error`)."""

    id: str
    task: str  # the task's text
    client: str | None  # the client that answered or failed it; None if none did
    text: str | None = None  # the answer, if there is one
    error: TaskNotAnsweredError | None = None  # TaskError or TaskFailedError, if it failed
    recovered: bool = False  # submitted before a restart, and read back from the journal

    def result(self) -> str:
        """The answer's text; raise `error` if the task failed."""
        if self.error is not None:
            raise self.error
        assert self.text is not None
        return self.text


def check_task(text: str, target: str | None, fields: dict[str, Any]) -> None:
    """Raise ValueError for a task that could never be sent: so it is refused
    at the door, before a journal or a client sees anything of it."""
    if problem := text_problem(text):
        raise ValueError(f"task not submitted: {problem}")
    if target is not None and not CLIENT_NAME.fullmatch(target):
        raise ValueError(f"task not submitted: the target {target!r} is no client name")
    if not fields:  # (the text alone is within MAX_TASK_MESSAGE_BYTES: text_problem said so)
        return
    if SERVER_FIELDS & fields.keys():
        raise ValueError(f"task not submitted: {', '.join(SERVER_FIELDS)} are the server's to fill")
    try:
        message = contact_pb2.ServerMsg(**fields)
    except (TypeError, ValueError) as err:  # a field the proto lacks, or a value it cannot hold
        raise ValueError(f"task not submitted: {err}") from None
    if message.ByteSize() + len(text.encode()) > MAX_TASK_MESSAGE_BYTES:
        limit = MAX_TASK_MESSAGE_BYTES
        raise ValueError(f"task not submitted: with its fields it is over {limit} bytes")


class TaskHandle:
    """A submitted task: `id` is the id the server logs for it; `await
    handle` (or `result`) gives its answer; `cancel` withdraws it.

    Awaiting raises TaskError, TaskFailedError or TaskCancelledError when
    the task has no answer, and TaskNotAnsweredError if the server closed
    first. Cancelling the code that awaits does not withdraw the task;
    `cancel` does (`ContactServer.ask` does both for you)."""

    def __init__(self, task_id: str, answer: asyncio.Future[str], withdraw: Callable[[], bool]):
        self.id = task_id
        self._answer = answer
        self._withdraw = withdraw

    def __await__(self) -> Generator[Any, None, str]:
        # Shielded: a cancelled awaiter must not cancel the answer itself.
        return asyncio.shield(self._answer).__await__()

    async def result(self, timeout: float | None = None) -> str:
        """The answer; raise asyncio.TimeoutError (TimeoutError) if it has
        not come within `timeout` seconds. The task stays queued then."""
        return await within(asyncio.shield(self._answer), timeout)

    def done(self) -> bool:
        """Whether the task has its outcome (an answer, or why it has none)."""
        return self._answer.done()

    def cancel(self) -> bool:
        """Withdraw the task: one still queued is never sent, and an answer to
        one in flight is ignored (its client is told, if it listens). Return
        False if it already had its outcome."""
        return self._withdraw()

    def __repr__(self) -> str:
        return f"<TaskHandle {self.id} {'done' if self.done() else 'pending'}>"


class ThreadsafeHandle(concurrent.futures.Future[str]):
    """A TaskHandle for plain code in another thread: a concurrent.futures
    Future of the answer, with the task's `id`, whose `cancel` withdraws
    the task. A withdrawn task's `result` raises TaskCancelledError, like an
    awaited handle's; `cancelled()` stays False (the Future itself is not
    cancelled: its outcome is that error)."""

    def __init__(self, handle: TaskHandle, loop: asyncio.AbstractEventLoop) -> None:
        """Made on `loop`'s thread, where `handle` lives."""
        super().__init__()
        self.id, self._handle, self._loop = handle.id, handle, loop
        handle._answer.add_done_callback(self._copy)

    def _copy(self, answer: asyncio.Future[str]) -> None:
        if (error := answer.exception()) is not None:
            self.set_exception(error)
        else:
            self.set_result(answer.result())

    def cancel(self) -> bool:
        """Withdraw the task, waiting for the server's loop to do it; return
        False if it already had its outcome."""
        if self.done():
            return False
        if on_loop(self._loop):  # waiting for the loop from its own thread would hang
            return self._handle.cancel()

        async def withdraw() -> bool:
            return self._handle.cancel()

        return asyncio.run_coroutine_threadsafe(withdraw(), self._loop).result(LOOP_REPLY_SECONDS)


def on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether this code runs on `loop`'s thread, inside it."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
