"""This server's side of the queue, with no gRPC in it: its connected
clients (sessions), how many tasks each may hold, and which gets which
task it takes from the TaskQueue (contact/queue/base.py).

Import it, test it (tests/test_dispatcher.py says what it must do), or put it
in front of another TaskQueue: it only asks the queue for tasks and gives
back the ones a client left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable

from contact import WITHDRAWN
from contact.logtext import REPEATS, Quoted
from contact.queue.base import Outcome, Task, TaskQueue

log = logging.getLogger("contact.dispatcher")

# Why a session ended. FORGOTTEN: its server's fleet took the server for
# dead, and forgot the registration (contact/queue/postgres.py).
LEFT, REPLACED, SHUTDOWN, FORGOTTEN = "left", "replaced", "shutdown", "forgotten"
# Why else a task is taken back from a client (counted beside the above).
LEASE_EXPIRED, SILENT = "lease_expired", "silent"
REQUEUE_REASONS = (LEFT, REPLACED, SHUTDOWN, FORGOTTEN, LEASE_EXPIRED, SILENT)

# The default of the server's --task-timeout (see docs/limits.md): a lease,
# ten minutes from sending (or beginning) to answer.
TASK_TIMEOUT_SECONDS = 600.0


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
        # For the server's view of its clients (Server.clients()): wall-clock
        # times, and the answers it accepted from this session.
        self.peer = ""
        self.connected_at = self.heard_at = time.time()
        self.answered = 0
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

    def heard(self) -> None:
        """It sent something (an answer, a start, a status line)."""
        self.heard_at = time.time()

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


class Dispatcher:
    """Gives each task the queue has to exactly one connected client, and
    gives it back when that client leaves without answering.

    - A task for any client goes to the one with the fewest tasks in flight
      (ties: the one whose load changed longest ago, so equals take turns);
      a task for NAME waits for NAME.
    - No client holds more unanswered tasks than its window (what it asked
      for, at most `max_in_flight`); a client with room takes its own tasks
      first, then the queue's.
    - A task is finished by the first result from a client it was sent to
      (the queue checks that, and reports it).
    - `cancel` withdraws a task: a queued one is never sent; its holder, if
      any, is told if it asked to be, and keeps the task's place in its
      window taken until it sends a result for it, which is ignored.
    - A task sent to a client is leased to it for `task_timeout` seconds
      (None: for ever), from when it is sent, or from when the client
      reports (`started`) that it began it if it `reports_start`:
      `expire_leases` gives back those that ran out, as if their holder had
      left, and the holder gets no more work, whatever its window, until it
      answers again. A client that reports starts and has neither begun nor
      answered anything for two leases loses the tasks it has not begun
      (it is told, if it `accepts_cancel`), uncharged, and is stalled too.
      A send is charged as an attempt when it ends with the task's lease
      running out or its holder's connection dying (not a takeover of the
      holder's name, nor a shutdown).

    All methods are synchronous and must be called from one thread (the
    event loop's); `Session.next_task` is the only one that waits.
    """

    def __init__(
        self,
        queue: TaskQueue,
        max_in_flight: int = 32,
        *,
        task_timeout: float | None = TASK_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if task_timeout is not None and not task_timeout > 0:
            raise ValueError("task_timeout must be more than 0, or None")
        self.queue = queue
        self.max_in_flight, self.task_timeout, self._clock = max_in_flight, task_timeout, clock
        self.closed = False
        self._leases: dict[str, Task] = {}  # tasks in flight, the soonest to run out first
        # Clients that report starts, by when they last began or answered a
        # task (or were given one while idle), the longest silent first: the
        # tasks they hold but have not begun are leased by this.
        self._heard: dict[Session, float] = {}
        self._sessions: dict[str, Session] = {}  # connected clients, by name
        # Connected clients with room, by how many tasks they have in flight
        # (only loads some client has); each bucket keeps the order its
        # clients arrived in, so the least loaded client with room is the
        # first of the lowest bucket, found without a scan of every client.
        # Each maps to the room it had when placed, and `_room` is their sum.
        self._by_load: dict[int, dict[Session, int]] = {}
        self._room = 0
        # Tasks taken back from clients, by why (each why from 0).
        self.requeues: Counter[str] = Counter(dict.fromkeys(REQUEUE_REASONS, 0))
        queue.bind(self)

    # -- what the server calls --

    def connect(
        self,
        name: str,
        window: int | None = None,
        *,
        accepts_cancel: bool = False,
        reports_start: bool = False,
        peer: str = "",
    ) -> Session:
        """Register a client that wants up to `window` tasks at once (None or
        more than `max_in_flight`: `max_in_flight`), is told of withdrawn
        tasks if it `accepts_cancel`, and says when it begins each task if
        it `reports_start`; an older session under the same name is ended
        (REPLACED) and its unanswered tasks given back. `peer`: where it
        connected from, for Server.clients()."""
        if self.closed:
            raise RuntimeError("the dispatcher is closed")
        if window is not None and window < 1:
            raise ValueError("a window is at least 1")
        old = self._sessions.get(name)
        if old is not None:
            self.disconnect(old, REPLACED)
        window = min(window or self.max_in_flight, self.max_in_flight)
        session = Session(name, window, accepts_cancel, reports_start)
        session.peer = peer
        self._sessions[name] = session
        self._place(session)
        self._fill(session)
        return session

    def disconnect(self, session: Session, reason: str = LEFT) -> None:
        """End a session and give its unanswered tasks back to the queue, at
        the front. Safe to call more than once."""
        if session.ended is not None:
            return
        session._end(reason)
        self._heard.pop(session, None)
        if self._sessions.get(session.name) is session:
            del self._sessions[session.name]
            self._unplace(session)
        self.requeues[reason] += len(session.in_flight)
        for task in reversed(list(session.in_flight.values())):
            line = "task %s requeued (%s %s)"  # a peer can cause many: limited per name
            REPEATS.log(
                log, logging.INFO, "requeued", session.name, line, task.id, session.name, reason
            )
            # Only a holder that died is evidence against a task; a newer
            # client under its name, or our own shutdown, is none.
            self._give_back(task, charged=reason == LEFT)
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
            session.heard()

    def expire_leases(self) -> None:
        """Give back every task whose lease has run out, as if its holder had
        left; and the tasks not begun from a client silent for two leases."""
        now = self._clock()
        expired = []
        for task in self._leases.values():  # the soonest to run out first
            if task.lease_ends > now:
                break
            expired.append(task)
        self.requeues[LEASE_EXPIRED] += len(expired)
        holders = []
        for task in expired:
            holder = self._holder(task)
            log.warning(
                "task %s taken back from %s: no answer within %.0f s",
                task.id,
                holder.name,
                self.task_timeout,
            )
            self._release(holder, task, stalled=True)
            holders.append(holder)
        for task in reversed(expired):  # back to the front, in their order
            self._give_back(task, charged=True)
        for holder in dict.fromkeys(holders):
            self._fill(holder)  # a suspect task it held no longer closes its window
        if self.task_timeout is not None:  # (no leases: nothing is taken back)
            silent_since = now - 2 * self.task_timeout
            while self._heard and (oldest := next(iter(self._heard.items())))[1] <= silent_since:
                del self._heard[oldest[0]]
                self._take_back_unbegun(oldest[0])
        self._spread()

    def complete(self, name: str, task_id: str, text: str, error: str = "") -> Outcome:
        """Client `name` sent the result `text` for task `task_id`, or
        (`error`) why it could not do the task: settle it in the queue."""
        acknowledged = self._acknowledged_withdrawal(name, task_id)
        if error == WITHDRAWN:  # a drop, maybe told to an earlier registration: no verdict
            if not acknowledged:
                log.debug("withdrawal of task %s acknowledged late by %s", Quoted(task_id), name)
            return Outcome.DUPLICATE
        outcome, task = self.queue.settle(name, task_id, text, error)
        if task is not None:
            self._ended(task)
        if outcome in (Outcome.ACCEPTED, Outcome.DUPLICATE):  # late, but it is not hung
            self._answers_again(name, outcome is Outcome.ACCEPTED and not error)
        return outcome

    def cancel(self, task_id: str) -> Task | None:
        """Withdraw an unfinished task and return it; None if there is no
        such task (any more). Its holder, if any, is told when it asked to be."""
        task = self.queue.cancel(task_id)
        if task is None:
            return None
        holder = self._sessions.get(task.holder) if task.holder is not None else None
        if holder is not None and task not in holder.outbox:  # written: it may be working on it
            holder.withdrawn.add(task.id)
        self._ended(task)
        if holder is not None and task.id in holder.withdrawn and holder.accepts_cancel:
            holder._push(Task(id=task.id, text="", cancelled=True))
        return task

    def close(self) -> None:
        """Take no new work and end every session (SHUTDOWN), giving back
        their unanswered tasks. Results for them are still accepted from
        clients they were sent to."""
        self.closed = True
        self.queue.stop()
        for session in list(self._sessions.values()):
            self.disconnect(session, SHUTDOWN)

    def session(self, name: str) -> Session | None:
        """The live session of the client registered as `name`, if any."""
        return self._sessions.get(name)

    def sessions(self) -> list[Session]:
        """Every live session, in the order their clients registered."""
        return list(self._sessions.values())

    # -- counts, for logs and status answers --

    def queued(self) -> int:
        """How many tasks wait for a client."""
        return self.queue.queued()

    def room(self) -> int:
        """How many more tasks the connected clients can take now, in all."""
        return self._room

    def lightest(self) -> int | None:
        """The tasks in flight at the least loaded client with room, if any."""
        return min(self._by_load) if self._by_load else None

    def in_flight(self, name: str) -> int:
        """How many tasks are sent and unanswered at client `name`."""
        session = self._sessions.get(name)
        return len(session.in_flight) if session else 0

    # -- internals --

    def serves(self, target: str | None) -> bool:
        """Whether a client connected here may be given tasks for `target`
        (None: any client's), now or once it has room."""
        return bool(self._sessions) if target is None else target in self._sessions

    def ready(self, target: str | None) -> None:
        """The queue has a task for `target` (None: for any client)."""
        if target is None:
            self._spread()
        elif (session := self._sessions.get(target)) is not None:
            self._fill(session)

    def forget_sessions(self) -> None:
        """End every session (FORGOTTEN): their clients register again."""
        for session in list(self._sessions.values()):
            self.disconnect(session, FORGOTTEN)

    def moved(self, name: str) -> None:
        """NAME registered on another server of the fleet: its session here
        ends as if a newer one had registered here."""
        session = self._sessions.get(name)
        if session is not None:
            self.disconnect(session, REPLACED)

    def _holder(self, task: Task) -> Session:
        holder = self._sessions[task.holder] if task.holder is not None else None
        assert holder is not None and task.id in holder.in_flight
        return holder

    def _ended(self, task: Task) -> None:
        """A task has its outcome: free its holder's place, or let what
        waited behind it in the queue move."""
        self._leases.pop(task.id, None)
        if task.holder is not None:
            holder = self._holder(task)
            self._release(holder, task)
            task.holder = None
            self._fill(holder)
        else:
            self.ready(task.target)
            if task.target is not None:
                self._spread()  # (a suspect head may have been what blocked it)

    def _place(self, session: Session) -> None:
        """Put `session` at the end of the bucket of its load, if it has room."""
        if session.has_room():
            room = session.window - len(session.in_flight) - len(session.withdrawn)
            self._by_load.setdefault(len(session.in_flight), {})[session] = room
            self._room += room

    def _unplace(self, session: Session) -> None:
        """Take `session` out of the bucket of its load, if it is in one."""
        load = len(session.in_flight)
        bucket = self._by_load.get(load)
        if bucket is not None and session in bucket:
            self._room -= bucket.pop(session)
            if not bucket:
                del self._by_load[load]

    def _assign(self, task: Task, session: Session) -> None:
        """Take `task` from the queue for `session`, and send it."""
        self.queue.take(task, session.name)
        self._unplace(session)
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

    def _give_back(self, task: Task, charged: bool) -> None:
        """Give an unanswered task back to the queue (charged: an attempt)."""
        self._leases.pop(task.id, None)
        self.queue.release(task, charged)

    def _take_back_unbegun(self, session: Session) -> None:
        """`session` has neither begun nor answered a task for two leases: it
        is hung, or every worker it has is busy with what it was told to
        drop. The tasks it holds but has not begun go to others, uncharged
        (they did it no harm), and it gets nothing new until it answers."""
        unbegun = [task for task in session.in_flight.values() if task.id not in self._leases]
        self.requeues[SILENT] += len(unbegun)
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
            self._give_back(task, charged=False)
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

    def _answers_again(self, name: str, answered: bool) -> None:
        """Client `name` answered: its silence starts again, and if its leases
        ran out it is slow, not hung, so its whole window is open to it again."""
        session = self._sessions.get(name)
        if session is None:
            return
        session.answered += answered
        session.heard()
        self._heard_from(session)
        if session.stalled:
            self._unplace(session)
            session.stalled = session.silent = False
            self._place(session)
            self._fill(session)
            self._spread()

    def _fill(self, session: Session) -> None:
        """Give `session` work up to its window: its own waiting tasks first."""
        took_shared = False
        while (
            session.has_room()  # (asked first: a queue may claim for a `head` it has not)
            and (task := self.queue.head(session.name)) is not None
            and session.can_take(task)
        ):
            took_shared = took_shared or task.target is None
            self._assign(task, session)
        if took_shared:  # a suspect head another client could not take may be gone
            self._spread()

    def _spread(self) -> None:
        """Hand waiting tasks for any client to the least loaded ones with room
        (a suspect task only to one with nothing in flight)."""
        while self._by_load and (task := self.queue.head(None)) is not None:
            load = 0 if task.suspect else min(self._by_load)
            if load not in self._by_load:
                break  # no client is idle: the suspect task waits for one
            self._assign(task, next(iter(self._by_load[load])))
