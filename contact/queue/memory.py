"""The task queue in memory (the default): nothing outlives the process,
and a restart starts empty. `SqliteQueue` (contact/queue/sqlite.py) is this
queue with every change also written to a file.

tests/test_dispatcher.py says what it must do, with the Dispatcher on top;
tests/test_journal.py what the SQLite queue adds.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from logging import DEBUG, INFO
from typing import Any

from contact.logtext import REPEATS, Quoted, retrieved
from contact.queue.base import (
    MAX_ATTEMPTS,
    MAX_QUEUED,
    Dispatching,
    NewTask,
    Outcome,
    QueueFullError,
    Report,
    Task,
    TaskCancelledError,
    TaskError,
    TaskFailedError,
    TaskNotAnsweredError,
    TaskQueue,
)

log = logging.getLogger("contact.queue")

# A restart lists this many recovered tasks one by one, the newest (which
# include every line typed just before a kill but never logged as queued),
# and the rest in one line: 300,000 lines took 3.5 s of a 5.2 s restart.
RECOVERED_LISTED = 10_000


def ignore(*args: object) -> None:
    """A listener nobody bound."""


def fail(outcome: asyncio.Future[str], error: Exception) -> None:
    """End a task's outcome with `error`, marked as seen: an outcome nobody
    awaits is no error. (Marked here, not by a done callback on every
    outcome: that cost a callback run by the loop per task, answered ones
    too.) An outcome that has ended keeps what it has."""
    if not outcome.done():
        outcome.set_exception(error)
        retrieved(outcome)


def write_failed(write: asyncio.Future[None] | None) -> bool:
    """Whether a task's write (from `_kept`) has failed: it was not kept."""
    return write is not None and write.done() and not write.cancelled() and bool(write.exception())


def serves_nobody(target: str | None) -> bool:
    """No dispatcher bound: no client may take any task."""
    return False


def client_failure(task: Task, client: str, error: str) -> TaskError:
    """What a client's failure of `task` is to its submitter."""
    failure = TaskError(f"task {task.id} failed at {client}: {error}", client, error)
    failure.reason = f"failed at {client}: {error}"
    return failure


class MemoryQueue(TaskQueue):
    """Tasks in memory: in order for any client, in a line of their own for
    each named client; attempts counted per task. Delivery is at-least-once
    while the process runs."""

    def __init__(
        self,
        *,
        max_attempts: int | None = MAX_ATTEMPTS,
        max_queued: int | None = MAX_QUEUED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_attempts is not None and max_attempts < 1:
            raise ValueError("max_attempts must be at least 1, or None")
        if max_queued is not None and max_queued < 1:
            raise ValueError("max_queued must be at least 1, or None")
        self.max_attempts, self.max_queued, self._clock = max_attempts, max_queued, clock
        self._ready: Callable[[str | None], object] = ignore
        self._serves: Callable[[str | None], bool] = serves_nobody
        self._report: Report = ignore
        self._hand_on: Report | None = None
        self._handing_on: set[str] = set()  # ids whose hand-on waits for the loop's next turn
        self._reserved = 0  # places held by submitters whose tasks are not queued yet
        # Submitters waiting for room, in turn, with the places each takes once let in.
        self._room_waiters: deque[tuple[asyncio.Future[None], int]] = deque()
        self._full_since: float | None = None  # when the queue last filled up, while it is full
        self.run = secrets.token_hex(3)  # the prefix of this start's ids: unique across restarts
        self._earlier_runs: set[str] = set()  # those of earlier starts: their results are late
        self._issued = 0
        self._tasks: dict[str, Task] = {}  # every unfinished task, by id
        self._outcomes: dict[str, asyncio.Future[str]] = {}  # by task id, until each ends
        self._queue: deque[Task] = deque()  # tasks for any client, waiting
        self._waiting: dict[str, deque[Task]] = {}  # tasks for one client, waiting
        # How many tasks `_waiting` holds in all, kept rather than added up:
        # every status answer says it, and there may be many names waiting.
        self._waiting_count = 0

    def bind(self, dispatcher: Dispatching) -> None:
        self._ready, self._serves = dispatcher.ready, dispatcher.serves

    def listen(self, report: Report, hand_on: Report | None = None) -> None:
        self._report, self._hand_on = report, hand_on

    # -- submitting --

    async def put_many(self, tasks: Sequence[NewTask], wait: bool = True) -> list[Task]:
        """A batch goes in whole once there is room for one task more: so
        `max_queued` is passed by at most one batch, and a batch larger than
        it never waits for room its own reserved places would hold."""
        if not tasks:
            return []
        await self.reserve(wait, len(tasks))
        try:
            new = [self.new_task(text, target, **(fields or {})) for text, target, fields in tasks]
            await self._durable(new)
        except BaseException:
            self.unreserve(len(tasks))
            raise
        loop = asyncio.get_running_loop()
        for task in new:
            outcome = self._outcomes[task.id] = loop.create_future()
            self._reserved -= 1
            if self.closed:  # it closed while the tasks were being written
                self._let_in()
                fail(outcome, self._not_answered(task))
            else:
                self._queued_new(task)
        return new

    def add(self, text: str, target: str | None = None, **fields: Any) -> Task:
        """Queue a task at once, with no room asked for, no outcome future,
        and no wait until it is durable: for tests and benchmarks."""
        task = self.new_task(text, target, **fields)
        self._kept(task)  # (a file's commit, not waited for)
        self._all_kept()
        self._queued_new(task)
        return task

    def new_task(self, text: str, target: str | None = None, **fields: Any) -> Task:
        if self.closed:
            raise RuntimeError("the queue is closed")
        self._issued += 1
        return Task(id=f"{self.run}-{self._issued}", text=text, target=target, fields=fields)

    def outcome(self, task_id: str) -> asyncio.Future[str] | None:
        return self._outcomes.get(task_id)

    async def reserve(self, wait: bool = True, places: int = 1) -> None:
        """Hold `places` places in the queue, for tasks to come. With
        `max_queued` tasks queued or reserved, wait in turn until there is
        room for one more (then take them all), or raise QueueFullError if
        not `wait`. Raise RuntimeError once closed."""
        if self.closed:
            raise RuntimeError("the queue is closed")
        if not self._room_waiters and self._has_room():
            self._reserved += places
            return
        if not wait:
            raise QueueFullError(f"the queue is full ({self.max_queued} tasks)")
        if self._full_since is None:
            self._full_since = self._clock()
            log.warning(
                "the queue is full (%d tasks): new tasks wait until clients take some",
                self.max_queued,
            )
        waiter = asyncio.get_running_loop().create_future()
        self._room_waiters.append((waiter, places))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.unreserve(places)  # let in, then cancelled: the places go to the next
            raise

    def unreserve(self, places: int = 1) -> None:
        """Give back places held for tasks not queued after all."""
        self._reserved -= places
        self._let_in()

    def recover(self, run: str, earlier_runs: Sequence[str], tasks: Sequence[Task]) -> None:
        """Take over from earlier starts (read back from a file), before
        anything else: new ids start with `run`, results for the ids of
        `earlier_runs` are known to be late, and `tasks` are queued again."""
        if self._issued or self._tasks:
            raise RuntimeError("recover before any task is submitted")
        self.run, self._earlier_runs = run, set(earlier_runs)
        unlisted = len(tasks) - RECOVERED_LISTED
        if unlisted > 0:
            first, last = tasks[0].id, tasks[unlisted - 1].id
            log.info("tasks %s to %s recovered (%d, not listed one by one)", first, last, unlisted)
        for number, task in enumerate(tasks):
            if number >= unlisted:
                self._log_queued(task)
            self._enqueue(task)

    # -- what the dispatcher asks --

    def head(self, name: str | None) -> Task | None:
        line = (name is not None and self._waiting.get(name)) or self._queue
        return line[0] if line else None

    def take(self, task: Task, name: str) -> None:
        if task.target is None:
            assert self._queue[0] is task, "take the task `head` gave"
            self._queue.popleft()
        else:
            line = self._waiting[task.target]
            assert line[0] is task, "take the task `head` gave"
            line.popleft()
            self._waiting_count -= 1
            if not line:
                del self._waiting[task.target]
        task.holder = name
        if name not in task.given_to:
            task.given_to += (name,)
        task.attempts += 1
        self._let_in()

    def release(self, task: Task, charged: bool) -> bool:
        """A `charged` send counts as an attempt: the task becomes suspect,
        and fails once it has had all its attempts; an uncharged one is as
        if it never happened. Queued again, it goes to the front."""
        task.holder = None
        task.suspect = task.suspect or charged
        if not charged:
            task.attempts -= 1
        elif self.max_attempts is not None and task.attempts >= self.max_attempts:
            del self._tasks[task.id]
            reason = f"sent {task.attempts} times without an answer"
            self._end(task, "", self._failure(TaskFailedError, task, f"failed: {reason}", reason))
            return False
        if task.target is None:
            self._queue.appendleft(task)
        else:
            self._waiting.setdefault(task.target, deque()).appendleft(task)
            self._waiting_count += 1
        if charged:
            self._requeued(task)
        return True

    def settle(
        self, name: str, task_id: str, text: str, error: str = ""
    ) -> tuple[Outcome, Task | None]:
        task = self._tasks.get(task_id)
        if task is None:
            outcome = Outcome.DUPLICATE if self._was_issued(task_id) else Outcome.UNKNOWN
            line = "%s result for task %s from %s ignored"
            REPEATS.log(
                log,
                logging.INFO,
                "ignored result",
                name,
                line,
                outcome.value,
                Quoted(task_id),
                name,
            )
            return outcome, None
        if name not in task.given_to and not task.recovered:
            log.warning("result for task %s refused: %s was never given it", task_id, name)
            return Outcome.NOT_GIVEN, None
        self._remove(task)
        if error:
            self._end(task, name, client_failure(task, name, error))
        else:
            self._end(task, name, text)
        return Outcome.ACCEPTED, task

    def cancel(self, task_id: str) -> Task | None:
        task = self._tasks.get(task_id)
        if task is None:
            return None
        self._remove(task)
        cancelled = self._failure(TaskCancelledError, task, "was cancelled", "cancelled")
        if (outcome := self._outcomes.pop(task.id, None)) is not None:
            fail(outcome, cancelled)
        self._forget(task, cancelled)
        return task

    # -- counts --

    def queued(self) -> int:
        return len(self._queue) + self._waiting_count

    def queued_by_target(self, names: int) -> dict[str | None, int]:
        most = heapq.nlargest(names, self._waiting.items(), key=lambda item: len(item[1]))
        return {None: len(self._queue), **{name: len(line) for name, line in most if line}}

    def in_flight(self) -> int:
        """How many tasks are taken and unanswered."""
        return len(self._tasks) - self.queued()

    def unfinished(self) -> list[Task]:
        return list(self._tasks.values())

    # -- closing --

    def stop(self) -> None:
        self.closed = True
        while self._room_waiters:
            waiter, _ = self._room_waiters.popleft()
            if not waiter.done():
                waiter.set_exception(RuntimeError("the queue is closed"))

    def kept(self) -> str:
        return ""

    async def close(self) -> None:
        self.stop()
        while self._handing_on:  # each runs on the next turn; none can begin once stopped
            await asyncio.sleep(0)
        for task in self.unfinished():
            if (outcome := self._outcomes.pop(task.id, None)) is not None:
                fail(outcome, self._not_answered(task))

    def _not_answered(self, task: Task) -> TaskNotAnsweredError:
        return TaskNotAnsweredError(
            f"the server closed before task {task.id} was answered{self.kept()}"
        )

    async def _durable(self, tasks: list[Task]) -> None:
        """Wait until `tasks` are kept. A file's commit is shared with other
        tasks, so a cancelled caller must not cancel it: its tasks are
        written, then removed again. So are those of a batch that failed
        in part (a task a database refuses, after others were written);
        a task whose write failed is not there to remove."""
        kept: list[tuple[Task, asyncio.Future[None] | None]] = []
        try:
            for task in tasks:
                kept.append((task, self._kept(task)))
            if writes := {future for _, future in kept if future is not None}:
                self._all_kept()
                await asyncio.shield(asyncio.gather(*writes))
        except BaseException:
            for task, future in kept:
                if not write_failed(future):
                    self._forget(task, "")
            raise

    # -- what a file keeps (nothing, here) --

    def _queued_new(self, task: Task) -> None:
        """A new task is kept: log it, and queue it here."""
        self._log_queued(task)
        self._enqueue(task)

    def _kept(self, task: Task) -> asyncio.Future[None] | None:
        """Keep a new task: None if it is as durable as it gets already, or
        a future that resolves once it is."""
        return None  # (a future per task, done at once, was 4% of the server's time)

    def _all_kept(self) -> None:
        """The tasks of a batch are all given to `_kept`: a file may commit them now."""

    def _requeued(self, task: Task) -> None:
        """A task was given back, charged: keep its attempts."""

    def _forget(self, task: Task, outcome: str | TaskNotAnsweredError) -> None:
        """A task ended and was handed on: it need not be kept any longer."""

    # -- internals --

    def _end(self, task: Task, client: str, outcome: str | TaskNotAnsweredError) -> None:
        """Report how a task ended and resolve its future now; hand it on at
        the loop's next turn, once the caller is done with this change, and
        only then forget it: a crash before that repeats the task."""
        self._report(task, client, outcome)
        if (future := self._outcomes.pop(task.id, None)) is not None:
            if isinstance(outcome, str):
                future.set_result(outcome)
            else:
                fail(future, outcome)
        if self._hand_on is None:
            self._forget(task, outcome)
        else:
            self._handing_on.add(task.id)
            asyncio.get_running_loop().call_soon(self._handed_on, task, client, outcome)

    def _handed_on(self, task: Task, client: str, outcome: str | TaskNotAnsweredError) -> None:
        assert self._hand_on is not None
        self._handing_on.discard(task.id)
        self._hand_on(task, client, outcome)
        self._forget(task, outcome)  # not if the hand-on raised: the task is kept

    @staticmethod
    def _failure(
        kind: type[TaskNotAnsweredError], task: Task, words: str, reason: str
    ) -> TaskNotAnsweredError:
        failure = kind(f"task {task.id} {words}")
        failure.reason = reason
        return failure

    def _has_room(self) -> bool:
        return self.max_queued is None or self.queued() + self._reserved < self.max_queued

    def _let_in(self) -> None:
        """Give the places that came free to submitters waiting for one, in turn."""
        if not self._room_waiters and self._full_since is None:
            return  # (the common case, on every take)
        while self._room_waiters and self._has_room():
            waiter, places = self._room_waiters.popleft()
            if not waiter.done():  # (cancelled while it waited)
                self._reserved += places
                waiter.set_result(None)
        if self._full_since is not None and not self._room_waiters:
            assert self.max_queued is not None
            if self.queued() + self._reserved <= self.max_queued // 2:  # not at every task
                waited = self._clock() - self._full_since
                log.warning("the queue has room again, after %.1f s full", waited)
                self._full_since = None

    def _log_queued(self, task: Task) -> None:
        level = self._queued_level(task)
        if log.isEnabledFor(level):
            how = "recovered" if task.recovered else "queued"
            target = task.target or "any client"
            log.log(level, "task %s %s for %s: %s", task.id, how, target, Quoted(task.text))

    def _queued_level(self, task: Task) -> int:
        """A new task is said at INFO only if no client connected here may
        take it: otherwise its "sent to" line, with its text, says it once
        a client takes it (a busy or stalled one may not for a while; the
        queue's counts in stats() and on the status page show it meanwhile),
        and a line less is a tenth of a typed task's CPU time."""
        return INFO if task.recovered or not self._serves(task.target) else DEBUG

    def _enqueue(self, task: Task) -> None:
        if self.closed:
            raise RuntimeError("the queue is closed")
        self._tasks[task.id] = task
        if task.target is None:
            self._queue.append(task)
        else:
            self._waiting.setdefault(task.target, deque()).append(task)
            self._waiting_count += 1
        self._ready(task.target)

    def _remove(self, task: Task) -> None:
        """Take a task that has its outcome out of the queue: out of its
        line, if it waits in one (the dispatcher frees its holder)."""
        del self._tasks[task.id]
        if task.holder is None:
            line = self._queue if task.target is None else self._waiting[task.target]
            line.remove(task)
            if task.target is not None:
                self._waiting_count -= 1
                if not line:
                    del self._waiting[task.target]
            self._let_in()

    def _was_issued(self, task_id: str) -> bool:
        run, _, number = task_id.rpartition("-")
        if not (number.isascii() and number.isdigit() and len(number) <= 20):
            return False  # (int() refuses strings of thousands of digits)
        if run in self._earlier_runs:
            return int(number) > 0
        return run == self.run and 0 < int(number) <= self._issued
