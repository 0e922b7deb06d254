"""A Dispatcher over a queue of either kind (in memory, or SQLite), whose
reports are heard the way the dispatcher tests listen for them: an answer,
a client's failure, a task out of attempts, a task given back charged.

A test picks the kind with the `queue_kind` fixture (tests/conftest.py,
which sets `Kind`); SQLite queues are made in the test's own folder, and
the test runs on an event loop, which their writes need.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from contact.queue.base import (
    MAX_ATTEMPTS,
    MAX_QUEUED,
    Task,
    TaskError,
    TaskFailedError,
    TaskNotAnsweredError,
)
from contact.queue.dispatcher import TASK_TIMEOUT_SECONDS, Dispatcher
from contact.queue.memory import MemoryQueue
from contact.queue.sqlite import SqliteQueue


class Heard:
    """Says when a task is given back charged."""

    on_requeued: Callable[[Task], object] | None = None

    def _requeued(self, task: Task) -> None:
        super()._requeued(task)  # type: ignore[misc]
        if self.on_requeued is not None:
            self.on_requeued(task)


class HeardMemoryQueue(Heard, MemoryQueue):
    pass


class HeardSqliteQueue(Heard, SqliteQueue):
    pass


class ProbedDispatcher(Dispatcher):
    """A Dispatcher whose queue the tests reach into: in memory, or SQLite."""

    queue: MemoryQueue


class Kind:
    """Which kind of queue `make_dispatcher` makes, and the SQLite queues it made."""

    name = "memory"
    folder: Path | None = None
    made: ClassVar[list[SqliteQueue]] = []


def make_queue(**options: Any) -> MemoryQueue:
    if Kind.name == "memory":
        return HeardMemoryQueue(**options)
    assert Kind.folder is not None
    queue = HeardSqliteQueue(Kind.folder / f"tasks{len(Kind.made)}.journal", **options)
    Kind.made.append(queue)
    return queue


def make_dispatcher(
    max_in_flight: int = 32,
    on_answer: Callable[[Task, str, str], object] | None = None,
    *,
    task_timeout: float | None = TASK_TIMEOUT_SECONDS,
    max_attempts: int | None = MAX_ATTEMPTS,
    on_failed: Callable[[Task, str], object] | None = None,
    on_requeued: Callable[[Task], object] | None = None,
    on_error: Callable[[Task, str, str], object] | None = None,
    max_queued: int | None = MAX_QUEUED,
    clock: Callable[[], float] = time.monotonic,
) -> ProbedDispatcher:
    queue = make_queue(max_attempts=max_attempts, max_queued=max_queued, clock=clock)
    assert isinstance(queue, Heard)
    queue.on_requeued = on_requeued

    def report(task: Task, client: str, outcome: str | TaskNotAnsweredError) -> None:
        if isinstance(outcome, str):
            if on_answer is not None:
                on_answer(task, client, outcome)
        elif isinstance(outcome, TaskError):
            if on_error is not None:
                on_error(task, client, outcome.error)
        elif isinstance(outcome, TaskFailedError) and on_failed is not None:
            on_failed(task, outcome.reason)

    queue.listen(report)
    return ProbedDispatcher(queue, max_in_flight, task_timeout=task_timeout, clock=clock)


async def check_what_the_files_kept() -> None:
    """Close each SQLite queue made, and check that its file, opened again,
    gives back exactly the tasks it had unfinished."""
    made, Kind.made = Kind.made, []
    for queue in made:
        unfinished = {task.id for task in queue.unfinished()}
        await queue.close()
        reopened = SqliteQueue(queue.path)
        try:
            assert {task.id for task in reopened.recovered} == unfinished
        finally:
            await reopened.close()
