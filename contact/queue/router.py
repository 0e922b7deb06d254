"""The work queue of the server, with no gRPC in it: which connected client
gets which task, and what happens when a client leaves or answers.

Import it, test it (tests/test_router.py says what it must do), or replace it
with a class backed by a broker that offers the same methods.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from contact import WITHDRAWN
from contact.logtext import REPEATS, Quoted

log = logging.getLogger("contact.router")

# Why a session ended.
LEFT, REPLACED, SHUTDOWN = "left", "replaced", "shutdown"

# A restart lists this many recovered tasks one by one, the newest (which
# include every line typed just before a kill but never logged as queued),
# and the rest in one line: 300,000 lines took 3.5 s of a 5.2 s restart.
RECOVERED_LISTED = 10_000

# Defaults of the server's --task-timeout, --max-attempts and --max-queued (see docs/limits.md).
TASK_TIMEOUT_SECONDS = 600.0  # a lease: ten minutes from sending (or beginning) to answer
MAX_ATTEMPTS = 5  # deliveries without an answer before a task fails for good
# Tasks waiting for a client, those for names connected nowhere included;
# past it, submit waits. A queued task costs about 1.3 KB beside its text,
# so this is some 130 MB of short tasks; it is three times what 1,000
# clients with full windows of 32 hold in flight.
MAX_QUEUED = 100_000


class QueueFullError(Exception):
    """The queue holds `max_queued` tasks, and the submitter asked not to wait."""


@dataclass(eq=False)
class Task:
    """One unit of work, from the moment it is submitted until a result arrives."""

    id: str
    text: str
    target: str | None = None  # the only client that may take it; None: any
    fields: dict[str, Any] = field(default_factory=dict)  # more ServerMsg fields, as given
    holder: Session | None = None  # the client it is in flight at, if any
    given_to: set[str] = field(default_factory=set)  # every client it was sent to
    attempts: int = 0  # how many times it was sent
    # Taken back unanswered at least once: it may be what made its holder
    # die or hang, so it is sent only to a client with nothing else in
    # flight, and that client gets nothing else until it is answered. Tasks
    # that merely waited beside it are then not charged for its attempts.
    suspect: bool = False
    lease_ends: float = 0.0  # while in flight: when it is taken back unanswered
    # Read back from a journal at start: before the restart it may have been
    # sent to any client, so a result for it is accepted from any client.
    recovered: bool = False
    # Set on the notice that tells a holder the task was withdrawn (a copy
    # of the task that goes down its stream after the task itself).
    cancelled: bool = False


class Session:
    """One registered client: the tasks in flight at it, oldest first, and the
    part of them still waiting to be written to its stream (the outbox)."""

    def __init__(
        self, name: str, window: int, accepts_cancel: bool = False, reports_start: bool = False
    ) -> None:
        self.name = name
        self.window = window  # the most tasks it may hold unanswered
        self.accepts_cancel = accepts_cancel  # told when a task it holds is withdrawn
        # Says when it begins each task: a lease then runs from that moment,
        # and tasks it holds but has not begun are not leased.
        self.reports_start = reports_start
        # A lease ran out at this client since it last answered: it is hung,
        # or far too slow, so it is sent nothing until it answers, whatever
        # its window.
        self.stalled = False
        # Stalled only because it was silent for two leases (no lease ran out
        # here): once it has dropped every task it held and holds nothing,
        # no worker of its is known to be busy, and the stall ends.
        self.silent = False
        self.suspects = 0  # suspect tasks in flight here (at most one, then alone)
        self.in_flight: dict[str, Task] = {}
        # Tasks withdrawn while this client held them: it may still be
        # working on them, so each keeps its place in the window taken until
        # the client sends a result for it (which is then ignored).
        self.withdrawn: set[str] = set()
        self.outbox: deque[Task] = deque()
        self.ended: str | None = None  # why the session ended, once it has
        self._wakeup = asyncio.Event()
        self._on_end: list[Callable[[], object]] = []

    async def next_task(self) -> Task | None:
        """Wait for the next task to write to this client; None once ended."""
        while self.ended is None:
            if self.outbox:
                return self.outbox.popleft()
            self._wakeup.clear()
            await self._wakeup.wait()
        return None

    def has_room(self) -> bool:
        held = len(self.in_flight) + len(self.withdrawn)
        return held < self.window and not self.suspects and not self.stalled

    def can_take(self, task: Task) -> bool:
        return self.has_room() and not (task.suspect and self.in_flight)

    def _push(self, task: Task) -> None:
        self.outbox.append(task)
        self._wakeup.set()

    def when_ended(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Call `callback` once the session ends; return what cancels that."""
        self._on_end.append(callback)
        return lambda: self._on_end.remove(callback) if callback in self._on_end else None

    def _end(self, reason: str) -> None:
        self.ended = reason
        self._wakeup.set()
        for callback in self._on_end:
            callback()
        self._on_end.clear()


class Outcome(enum.Enum):
    """What became of a result."""

    ACCEPTED = "accepted"  # the first result for a live task: it is finished
    DUPLICATE = "duplicate"  # the task was already finished by an earlier result
    UNKNOWN = "unknown"  # no task of this server ever had this id
    NOT_GIVEN = "not given"  # a live task that was never sent to this client


class Router:
    """Assigns each task to exactly one connected client and takes it back
    when that client leaves without answering.

    - A task for any client goes to the one with the fewest tasks in flight
      (ties: the one whose load changed longest ago, so equals take turns);
      a task for NAME waits for NAME.
    - No client holds more unanswered tasks than its window (what it asked
      for, at most `max_in_flight`); the rest wait in order, and tasks taken
      back from a departed client go to the front.
    - A task is finished by the first result from a client it was sent to;
      `on_answer(task, name, text)` is then called, or `on_error(task,
      name, error)` if the client reports that it could not do the task
      (which fails it at once: that is the client's verdict, not a hang).
    - `cancel` withdraws a task: a queued one is never sent; its holder, if
      any, is told if it asked to be, and keeps the task's place in its
      window taken until it sends a result for it, which is ignored.
    - A task sent to a client is leased to it for `task_timeout` seconds
      (None: for ever), from when it is sent, or from when the client
      reports (`started`) that it began it if it `reports_start`:
      `expire_leases` takes back those that ran out, as if their holder had
      left, and the holder gets no more work, whatever its window, until it
      answers again. A client that reports starts and has neither begun nor
      answered anything for two leases loses the tasks it has not begun
      (it is told, if it `accepts_cancel`), uncharged, and is stalled too.
      A send is an attempt when it ends
      with the task's lease running out or its holder's connection dying
      (not a takeover of the holder's name, nor a shutdown): a task with
      `max_attempts` such sends fails, `on_failed(task, reason)` is called
      and it is dropped; one taken back with attempts left calls
      `on_requeued(task)`.

    Everything lives in memory: delivery is at-least-once while the process
    runs (and across restarts, with a journal: contact/queue/journal.py). All
    methods are synchronous and must be called from one thread (the event
    loop's); `Session.next_task` is the only one that waits.
    """

    def __init__(
        self,
        max_in_flight: int = 32,
        on_answer: Callable[[Task, str, str], None] | None = None,
        *,
        task_timeout: float | None = TASK_TIMEOUT_SECONDS,
        max_attempts: int | None = MAX_ATTEMPTS,
        on_failed: Callable[[Task, str], None] | None = None,
        on_requeued: Callable[[Task], None] | None = None,
        on_error: Callable[[Task, str, str], None] | None = None,
        max_queued: int | None = MAX_QUEUED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if task_timeout is not None and not task_timeout > 0:
            raise ValueError("task_timeout must be more than 0, or None")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError("max_attempts must be at least 1, or None")
        if max_queued is not None and max_queued < 1:
            raise ValueError("max_queued must be at least 1, or None")
        self.max_in_flight = max_in_flight
        self.task_timeout, self.max_attempts = task_timeout, max_attempts
        self.max_queued = max_queued
        self._reserved = 0  # places held by submitters whose tasks are not queued yet
        self._room_waiters: deque[asyncio.Future[None]] = deque()  # for a place, in turn
        self._full_since: float | None = None  # when the queue last filled up, while it is full
        self.closed = False
        self._on_answer, self._on_failed, self._clock = on_answer, on_failed, clock
        self._on_requeued, self._on_error = on_requeued, on_error
        self._leases: dict[str, Task] = {}  # tasks in flight, the soonest to run out first
        # Clients that report starts, by when they last began or answered a
        # task (or were given one while idle), the longest silent first: the
        # tasks they hold but have not begun are leased by this.
        self._heard: dict[Session, float] = {}
        self._run = secrets.token_hex(3)  # keeps ids unique across restarts
        self._earlier_runs: set[str] = set()  # runs whose tasks `resume` took over
        self._issued = 0
        self._tasks: dict[str, Task] = {}  # every unfinished task, by id
        self._queue: deque[Task] = deque()  # tasks for any client, waiting
        self._waiting: dict[str, deque[Task]] = {}  # tasks for one client, waiting
        # How many tasks `_waiting` holds in all, kept rather than added up:
        # every status answer says it, and there may be many names waiting.
        self._waiting_count = 0
        self._sessions: dict[str, Session] = {}  # connected clients, by name
        # Connected clients with room, by how many tasks they have in flight
        # (only loads some client has); each bucket keeps the order its
        # clients arrived in, so the least loaded client with room is the
        # first of the lowest bucket, found without a scan of every client.
        self._by_load: dict[int, dict[Session, None]] = {}

    # -- what the server calls --

    def add(self, text: str, target: str | None = None, **fields: Any) -> Task:
        """Add a task; it is sent at once if a client has room."""
        task = self.new_task(text, target, **fields)
        self.queue(task)
        return task

    def new_task(self, text: str, target: str | None = None, **fields: Any) -> Task:
        """A task with a new id, not queued yet (`queue` does that, once it
        is safe elsewhere: in a journal, say)."""
        if self.closed:
            raise RuntimeError("the router is closed")
        self._issued += 1
        return Task(id=f"{self._run}-{self._issued}", text=text, target=target, fields=fields)

    def resume(self, run: str, earlier_runs: Iterable[str], tasks: Sequence[Task]) -> None:
        """Take over from earlier runs of the server (read back from a
        journal), before anything else: new ids start with `run`, results
        for the ids of `earlier_runs` are known to be late, and `tasks` are
        queued again, in their order."""
        if self._issued or self._tasks:
            raise RuntimeError("resume before any task is submitted")
        self._run, self._earlier_runs = run, set(earlier_runs)
        unlisted = len(tasks) - RECOVERED_LISTED
        if unlisted > 0:
            first, last = tasks[0].id, tasks[unlisted - 1].id
            log.info("tasks %s to %s recovered (%d, not listed one by one)", first, last, unlisted)
        for number, task in enumerate(tasks):
            if number >= unlisted:
                self._log_queued(task)
            self._enqueue(task)

    async def reserve(self, wait: bool = True) -> None:
        """Hold a place in the queue for one more task (`queue(task,
        reserved=True)` fills it, `unreserve` gives it back). With
        `max_queued` tasks queued or reserved, wait in turn for a place, or
        raise QueueFullError if not `wait`. Raise RuntimeError once closed."""
        if self.closed:
            raise RuntimeError("the router is closed")
        if not self._room_waiters and self._has_room():
            self._reserved += 1
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
        self._room_waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.unreserve()  # let in, then cancelled: the place goes to the next
            raise

    def unreserve(self) -> None:
        """Give back a place `reserve` held, its task not queued after all."""
        self._reserved -= 1
        self._let_in()

    def queue(self, task: Task, reserved: bool = False) -> None:
        """Queue a task from `new_task` (into the place `reserve` held for it,
        if `reserved`); it is sent at once if a client has room."""
        self._log_queued(task)
        self._reserved -= reserved
        self._enqueue(task)

    def connect(
        self,
        name: str,
        window: int | None = None,
        *,
        accepts_cancel: bool = False,
        reports_start: bool = False,
    ) -> Session:
        """Register a client that wants up to `window` tasks at once (None or
        more than `max_in_flight`: `max_in_flight`), is told of withdrawn
        tasks if it `accepts_cancel`, and says when it begins each task if
        it `reports_start`; an older session under the same name is ended
        (REPLACED) and its unanswered tasks taken back."""
        if self.closed:
            raise RuntimeError("the router is closed")
        if window is not None and window < 1:
            raise ValueError("a window is at least 1")
        old = self._sessions.get(name)
        if old is not None:
            self.disconnect(old, REPLACED)
        window = min(window or self.max_in_flight, self.max_in_flight)
        session = Session(name, window, accepts_cancel, reports_start)
        self._sessions[name] = session
        self._place(session)
        self._fill(session)
        return session

    def disconnect(self, session: Session, reason: str = LEFT) -> None:
        """End a session and queue its unanswered tasks again, at the front.
        Safe to call more than once."""
        if session.ended is not None:
            return
        session._end(reason)
        self._heard.pop(session, None)
        if self._sessions.get(session.name) is session:
            del self._sessions[session.name]
            self._unplace(session)
        for task in reversed(list(session.in_flight.values())):
            line = "task %s requeued (%s %s)"  # a peer can cause many: limited per name
            REPEATS.log(
                log, logging.INFO, "requeued", session.name, line, task.id, session.name, reason
            )
            # Only a holder that died is evidence against a task; a newer
            # client under its name, or our own shutdown, is none.
            self._take_back(task, charged=reason == LEFT)
        session.in_flight.clear()
        session.outbox.clear()
        self._spread()

    def started(self, session: Session, task_ids: Iterable[str]) -> None:
        """Client `session` (which `reports_start`) has begun the tasks
        `task_ids`: the lease of each runs from now. Ids it does not hold,
        or began already, are ignored."""
        if not session.reports_start or self.task_timeout is None:
            return
        ends, begun = self._clock() + self.task_timeout, False
        for task_id in task_ids:
            task = session.in_flight.get(task_id)
            if task is not None and task_id not in self._leases:
                task.lease_ends = ends
                self._leases[task_id] = task  # the newest lease runs out last
                begun = True
        if begun:  # (ids it does not hold are no sign of life)
            self._heard_from(session)

    def expire_leases(self) -> None:
        """Take back every task whose lease has run out, as if its holder had
        left; and the tasks not begun from a client silent for two leases."""
        now = self._clock()
        expired = []
        for task in self._leases.values():  # the soonest to run out first
            if task.lease_ends > now:
                break
            expired.append(task)
        holders = []
        for task in expired:
            holder = task.holder
            assert holder is not None
            log.warning(
                "task %s taken back from %s: no answer within %.0f s",
                task.id,
                holder.name,
                self.task_timeout,
            )
            self._release(holder, task, stalled=True)
            holders.append(holder)
        for task in reversed(expired):  # back to the front, in their order
            self._take_back(task, charged=True)
        for holder in dict.fromkeys(holders):
            self._fill(holder)  # a suspect task it held no longer closes its window
        if self.task_timeout is not None:  # (no leases: nothing is taken back)
            silent_since = now - 2 * self.task_timeout
            while self._heard and (oldest := next(iter(self._heard.items())))[1] <= silent_since:
                del self._heard[oldest[0]]
                self._take_back_unbegun(oldest[0])
        self._spread()

    def complete(self, name: str, task_id: str, text: str, error: str = "") -> Outcome:
        """Record the result `text` that client `name` sent for task `task_id`,
        or (`error`) why it could not do the task."""
        acknowledged = self._acknowledged_withdrawal(name, task_id)
        if error == WITHDRAWN:  # a drop, maybe told to an earlier registration: no verdict
            if not acknowledged:
                log.debug("withdrawal of task %s acknowledged late by %s", Quoted(task_id), name)
            return Outcome.DUPLICATE
        task = self._tasks.get(task_id)
        if task is None:
            outcome = Outcome.DUPLICATE if self._was_issued(task_id) else Outcome.UNKNOWN
            REPEATS.log(
                log,
                logging.INFO,
                "ignored result",
                name,
                "%s result for task %s from %s ignored",
                outcome.value,
                Quoted(task_id),
                name,
            )
            if outcome is Outcome.DUPLICATE:
                self._answers_again(name)  # late, but it is not hung
            return outcome
        if name not in task.given_to and not task.recovered:
            log.warning("result for task %s refused: %s was never given it", task_id, name)
            return Outcome.NOT_GIVEN
        self._finish(task)
        self._answers_again(name)
        if error and self._on_error is not None:
            self._on_error(task, name, error)
        elif not error and self._on_answer is not None:
            self._on_answer(task, name, text)
        return Outcome.ACCEPTED

    def cancel(self, task_id: str) -> Task | None:
        """Withdraw an unfinished task and return it; None if there is no
        such task (any more). Its holder, if any, is told when it asked to be."""
        task = self._tasks.get(task_id)
        if task is None:
            return None
        holder = task.holder
        if holder is not None and task not in holder.outbox:  # written: it may be working on it
            holder.withdrawn.add(task.id)
        self._finish(task)
        if holder is not None and task.id in holder.withdrawn and holder.accepts_cancel:
            holder._push(Task(id=task.id, text="", cancelled=True))
        return task

    def close(self) -> None:
        """Refuse new work and end every session (SHUTDOWN), taking back their
        unanswered tasks: all unfinished tasks are then queued. Results for
        them are still accepted from clients they were sent to."""
        self.closed = True
        for session in list(self._sessions.values()):
            self.disconnect(session, SHUTDOWN)
        while self._room_waiters:
            waiter = self._room_waiters.popleft()
            if not waiter.done():
                waiter.set_exception(RuntimeError("the router is closed"))

    def unfinished(self) -> list[Task]:
        """Every task not answered (nor failed) yet."""
        return list(self._tasks.values())

    def session(self, name: str) -> Session | None:
        """The live session of the client registered as `name`, if any."""
        return self._sessions.get(name)

    # -- counts, for logs and status answers --

    def queued(self) -> int:
        """How many tasks wait for a client."""
        return len(self._queue) + self._waiting_count

    def in_flight(self, name: str | None = None) -> int:
        """How many tasks are sent and unanswered, at `name` or at anyone."""
        if name is not None:
            session = self._sessions.get(name)
            return len(session.in_flight) if session else 0
        return len(self._tasks) - self.queued()

    # -- internals --

    def _has_room(self) -> bool:
        return self.max_queued is None or self.queued() + self._reserved < self.max_queued

    def _let_in(self) -> None:
        """Give the places that came free to submitters waiting for one, in turn."""
        if not self._room_waiters and self._full_since is None:
            return  # (the common case, on every assignment)
        while self._room_waiters and self._has_room():
            waiter = self._room_waiters.popleft()
            if not waiter.done():  # (cancelled while it waited)
                self._reserved += 1
                waiter.set_result(None)
        if self._full_since is not None and not self._room_waiters:
            assert self.max_queued is not None
            if self.queued() + self._reserved <= self.max_queued // 2:  # not at every task
                waited = self._clock() - self._full_since
                log.warning("the queue has room again, after %.1f s full", waited)
                self._full_since = None

    def _log_queued(self, task: Task) -> None:
        how = "recovered" if task.recovered else "queued"
        target = task.target or "any client"
        log.info("task %s %s for %s: %s", task.id, how, target, Quoted(task.text))

    def _enqueue(self, task: Task) -> None:
        if self.closed:
            raise RuntimeError("the router is closed")
        self._tasks[task.id] = task
        if task.target is None:
            self._queue.append(task)
            self._spread()
        else:
            self._waiting.setdefault(task.target, deque()).append(task)
            self._waiting_count += 1
            if task.target in self._sessions:
                self._fill(self._sessions[task.target])

    def _finish(self, task: Task) -> None:
        """Take a task that has its outcome out of the queue, or out of its
        holder's flight; what waited behind it may move now."""
        del self._tasks[task.id]
        self._leases.pop(task.id, None)
        holder = task.holder
        if holder is not None:
            self._release(holder, task)
            task.holder = None
            self._fill(holder)
        else:
            self._waiting_line(task).remove(task)
            self._waiting_count -= task.target is not None
            self._forget_empty_line(task.target)
            if task.target in self._sessions:
                self._fill(self._sessions[task.target])
            self._spread()

    def _place(self, session: Session) -> None:
        """Put `session` at the end of the bucket of its load, if it has room."""
        if session.has_room():
            self._by_load.setdefault(len(session.in_flight), {})[session] = None

    def _unplace(self, session: Session) -> None:
        """Take `session` out of the bucket of its load, if it is in one."""
        load = len(session.in_flight)
        bucket = self._by_load.get(load)
        if bucket is not None and session in bucket:
            del bucket[session]
            if not bucket:
                del self._by_load[load]

    def _assign(self, task: Task, session: Session) -> None:
        self._unplace(session)
        task.holder = session
        task.given_to.add(session.name)
        task.attempts += 1
        session.in_flight[task.id] = task
        session.suspects += task.suspect
        self._place(session)
        if self.task_timeout is not None and not session.reports_start:
            task.lease_ends = self._clock() + self.task_timeout
            self._leases[task.id] = task  # the newest lease runs out last
        elif session not in self._heard or (len(session.in_flight) == 1 and not session.withdrawn):
            self._heard_from(session)  # it held nothing until now: its silence starts here
        session._push(task)

    def _release(self, session: Session, task: Task, stalled: bool = False) -> None:
        """Take `task` out of `session`'s flight: answered, or (`stalled`) its
        lease ran out, which keeps its place in the window taken."""
        self._unplace(session)
        del session.in_flight[task.id]
        session.suspects -= task.suspect
        if stalled:
            session.stalled, session.silent = True, False
        self._place(session)
        if task in session.outbox:  # never written to it: no longer worth writing
            session.outbox.remove(task)

    def _take_back_unbegun(self, session: Session) -> None:
        """`session` has neither begun nor answered a task for two leases: it
        is hung, or every worker it has is busy with what it was told to
        drop. The tasks it holds but has not begun go to others, uncharged
        (they did it no harm), and it gets nothing new until it answers."""
        unbegun = [task for task in session.in_flight.values() if task.id not in self._leases]
        for task in unbegun:
            written = task not in session.outbox
            self._release(session, task)
            if written:  # it may begin it yet: its place stays taken until it answers
                session.withdrawn.add(task.id)
                if session.accepts_cancel:  # it drops the task, and says so
                    session._push(Task(id=task.id, text="", cancelled=True))
            line = "task %s taken back from %s before it began: %.0f s without a sign of life"
            timeout = 2 * (self.task_timeout or 0)
            REPEATS.log(
                log, logging.WARNING, "requeued", session.name, line, task.id, session.name, timeout
            )
        for task in reversed(unbegun):  # back to the front, in their order
            self._take_back(task, charged=False)
        if unbegun and not session.stalled:
            self._unplace(session)
            session.stalled = session.silent = True
            self._place(session)

    def _heard_from(self, session: Session) -> None:
        """`session` began or answered a task: its silence starts again."""
        if session.reports_start and not session.ended:
            self._heard.pop(session, None)
            self._heard[session] = self._clock()  # last: the most recently heard

    def _acknowledged_withdrawal(self, name: str, task_id: str) -> bool:
        """If `task_id` was withdrawn from client `name` while it held it, its
        result frees its place in the window; say whether it was."""
        session = self._sessions.get(name)
        if session is None or task_id not in session.withdrawn:
            return False
        log.debug("result for withdrawn task %s from %s ignored", Quoted(task_id), name)
        self._unplace(session)
        session.withdrawn.discard(task_id)
        if session.silent and not session.in_flight and not session.withdrawn:
            session.stalled = session.silent = False  # it dropped all it held: awake
        self._place(session)
        self._fill(session)
        return True

    def _answers_again(self, name: str) -> None:
        """Client `name` answered: its silence starts again, and if its leases
        ran out it is slow, not hung, so its whole window is open to it again."""
        session = self._sessions.get(name)
        if session is None:
            return
        self._heard_from(session)
        if session.stalled:
            self._unplace(session)
            session.stalled = session.silent = False
            self._place(session)
            self._fill(session)
            self._spread()

    def _take_back(self, task: Task, charged: bool) -> None:
        """Queue an unanswered task again, at the front. A `charged` send
        counts as an attempt: the task becomes suspect, and fails once it has
        had all its attempts; an uncharged one is as if it never happened."""
        task.holder = None
        self._leases.pop(task.id, None)
        task.suspect = task.suspect or charged
        if not charged:
            task.attempts -= 1
        elif self.max_attempts is not None and task.attempts >= self.max_attempts:
            del self._tasks[task.id]
            reason = f"sent {task.attempts} times without an answer"
            log.error("task %s failed: %s: %s", task.id, reason, Quoted(task.text))
            if self._on_failed is not None:
                self._on_failed(task, reason)
            return
        if task.target is None:
            self._queue.appendleft(task)
        else:
            self._waiting.setdefault(task.target, deque()).appendleft(task)
            self._waiting_count += 1
        if charged and self._on_requeued is not None:
            self._on_requeued(task)

    def _fill(self, session: Session) -> None:
        """Give `session` work up to its window: its own waiting tasks first."""
        own = self._waiting.get(session.name)
        took_shared = False
        while (line := own or self._queue) and session.can_take(line[0]):
            self._assign(line.popleft(), session)
            self._waiting_count -= line is own
            took_shared = took_shared or line is self._queue
        self._forget_empty_line(session.name)
        if took_shared:  # a suspect head another client could not take may be gone
            self._spread()
        self._let_in()

    def _spread(self) -> None:
        """Hand waiting tasks for any client to the least loaded ones with room
        (a suspect task only to one with nothing in flight)."""
        while self._queue and self._by_load:
            load = 0 if self._queue[0].suspect else min(self._by_load)
            if load not in self._by_load:
                break  # no client is idle: the suspect task waits for one
            self._assign(self._queue.popleft(), next(iter(self._by_load[load])))
        self._let_in()

    def _waiting_line(self, task: Task) -> deque[Task]:
        return self._queue if task.target is None else self._waiting[task.target]

    def _forget_empty_line(self, name: str | None) -> None:
        if name is not None and not self._waiting.get(name, True):
            del self._waiting[name]

    def _was_issued(self, task_id: str) -> bool:
        run, _, number = task_id.rpartition("-")
        if not (number.isascii() and number.isdigit() and len(number) <= 20):
            return False  # (int() refuses strings of thousands of digits)
        if run in self._earlier_runs:
            return int(number) > 0
        return run == self._run and 0 < int(number) <= self._issued
