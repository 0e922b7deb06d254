"""Where a server keeps its tasks until each has its outcome: one interface,
held by the server without asking which kind it is.

- `MemoryStore` (the default) keeps nothing beyond the process: a restart
  starts empty.
- `Journal` (contact/queue/journal.py, `--journal FILE`) keeps every unfinished
  task in an SQLite file, so that a restart on it queues them again.

The server (contact/server/core.py) opens one from the option the scripts pass
through, and reports each change of a task to it in the order the crash
rule needs: a task is `added` (and durable) before it is logged as queued; it is
`finished` only once its answer is logged and handed on, so a crash in
between repeats the task rather than losing its answer.
"""

from __future__ import annotations

import abc
import asyncio
import secrets

from contact.queue.router import Task


class TaskStore(abc.ABC):
    """The tasks a server has not finished, as it reports them; every
    method is called from the event loop's thread."""

    run: str  # the prefix of this start's task ids, never used before on this store
    earlier_runs: list[str]  # those of earlier starts: their results are late
    recovered: list[Task]  # unfinished tasks of earlier starts, to queue again first

    @abc.abstractmethod
    def added(self, task: Task) -> asyncio.Future[None] | None:
        """Keep a new task: None if it is as durable as it gets already, or a
        future that resolves once it is."""

    @abc.abstractmethod
    def requeued(self, task: Task) -> None:
        """A task was taken back unanswered: keep its attempts."""

    @abc.abstractmethod
    def finished(self, task: Task) -> None:
        """A task was answered (and its answer handed on), or cancelled."""

    @abc.abstractmethod
    def failed(self, task: Task, reason: str) -> None:
        """A task failed for good, for `reason`."""

    @abc.abstractmethod
    def kept(self) -> str:
        """What becomes of unfinished tasks at shutdown: words to add after
        a count of them (with a leading space), or nothing."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Make what was reported durable, and let go."""


class MemoryStore(TaskStore):
    """Nothing is kept beyond the process: every report is already durable
    enough, and a restart recovers nothing."""

    def __init__(self) -> None:
        self.run = secrets.token_hex(3)  # ids of two runs differ all the same
        self.earlier_runs, self.recovered = [], []

    def added(self, task: Task) -> None:
        return None  # (a future per task, done at once, was 4% of the server's time)

    def requeued(self, task: Task) -> None:
        pass

    def finished(self, task: Task) -> None:
        pass

    def failed(self, task: Task, reason: str) -> None:
        pass

    def kept(self) -> str:
        return ""

    async def close(self) -> None:
        pass
