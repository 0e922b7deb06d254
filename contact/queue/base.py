"""The task queue's interface, `TaskQueue`: the source of truth for tasks
(queued, in flight, attempts, outcomes), held by the server without asking
which kind it is; and what a task is and how it can end.

Three implementations: `MemoryQueue` (contact/queue/memory.py, the default:
nothing outlives the process), `SqliteQueue` (contact/queue/sqlite.py,
`--journal FILE`: every unfinished task in a file, for one server that
survives crashes) and `PostgresQueue` (contact/queue/postgres.py, `--queue
postgresql://...`: several servers serving one fleet). Which connected
client gets which task is not the queue's business but the Dispatcher's
(contact/queue/dispatcher.py): it takes tasks from the queue for its
clients with room, and gives back those a client left unanswered.

Several servers on one queue (the database one): `head` shows only what
this server claimed for its clients, and a `head` that finds nothing for a
client with room is what makes it claim more; `ready` is called when a
task queued anywhere can be claimed here.
"""

from __future__ import annotations

import abc
import asyncio
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

# Defaults of the server's --max-attempts and --max-queued (see docs/limits.md).
MAX_ATTEMPTS = 5  # deliveries without an answer before a task fails for good
# Tasks waiting for a client, those for names connected nowhere included;
# past it, submit waits. A queued task costs about 1.3 KB beside its text,
# so this is some 130 MB of short tasks; it is three times what 1,000
# clients with full windows of 32 hold in flight.
MAX_QUEUED = 100_000
# The default of --dead-after, for a fleet on one database: a server whose
# heartbeat (every 2 s) is this old is taken for dead, and the tasks it held
# are queued again. A few missed beats, so that a busy database or a long
# pause is not a death; well inside the 15 s a fleet promises.
DEAD_AFTER_SECONDS = 10.0


class QueueError(Exception):
    """The queue cannot keep tasks (its file or database cannot be used);
    the message says which and why, in one line."""


class QueueFullError(Exception):
    """The queue holds `max_queued` tasks, and the submitter asked not to wait."""


class TaskNotAnsweredError(Exception):
    """The task will never be answered; the message says why (here: the
    server closed first). The errors below say more."""

    reason = ""  # why, without the task's id: what a journal keeps


class TaskError(TaskNotAnsweredError):
    """The client could not do the task (its handler raised, say); the
    message is the client's, and the task is not sent again."""

    def __init__(self, message: str, client: str, error: str) -> None:
        super().__init__(message)
        self.client = client  # the name of the client that reported it
        self.error = error  # its reason, as it sent it


class TaskFailedError(TaskNotAnsweredError):
    """The task was sent too many times without an answer (it may be what
    kills or hangs the clients that take it)."""


class TaskCancelledError(TaskNotAnsweredError):
    """The task was withdrawn with `cancel()` before it had an answer."""


@dataclass(eq=False)
class Task:
    """One unit of work, from the moment it is submitted until it has its outcome."""

    id: str
    text: str
    target: str | None = None  # the only client that may take it; None: any
    fields: dict[str, Any] = field(default_factory=dict)  # more ServerMsg fields, as given
    holder: str | None = None  # the name of the client it is in flight at, if any
    # Every client it was sent to: a few names at most. A tuple, not a set:
    # a tuple of strings is left out of the garbage collector's passes once
    # it has been through one, where a set per queued task was walked by
    # each of them (up to half their time with 60,000 typed tasks queued;
    # docs/performance.md).
    given_to: tuple[str, ...] = ()
    attempts: int = 0  # how many times it was sent: with the id, its lease's token
    # Taken back unanswered at least once: it may be what made its holder
    # die or hang, so it is sent only to a client with nothing else in
    # flight, and that client gets nothing else until it is answered. Tasks
    # that merely waited beside it are then not charged for its attempts.
    suspect: bool = False
    lease_ends: float = 0.0  # while in flight and leased: when it is taken back unanswered
    # Read back from a journal at start: before the restart it may have been
    # sent to any client, so a result for it is accepted from any client.
    recovered: bool = False
    # Set on the notice that tells a holder the task was withdrawn (a copy
    # of the task that goes down its stream after the task itself).
    cancelled: bool = False


class NewTask(NamedTuple):
    """A task to submit: its text, the only client that may take it (None:
    any), and more ServerMsg fields."""

    text: str
    target: str | None = None
    fields: dict[str, Any] | None = None


class Outcome(enum.Enum):
    """What became of a result."""

    ACCEPTED = "accepted"  # the first result for a live task: it is finished
    DUPLICATE = "duplicate"  # the task was already finished by an earlier result
    UNKNOWN = "unknown"  # no task of this queue ever had this id
    NOT_GIVEN = "not given"  # a live task that was never sent to this client


# How a task ended, as the queue reports it: the task, the client that
# answered or failed it ("" if none did), and its answer or why it has none.
Report = Callable[[Task, str, "str | TaskNotAnsweredError"], object]


class Dispatching(Protocol):
    """What a queue tells the dispatcher in front of it (contact/queue/dispatcher.py)."""

    def ready(self, target: str | None) -> None:
        """A task for `target` (None: for any client) can be taken."""

    def serves(self, target: str | None) -> bool:
        """Whether a client connected here may be given tasks for `target`
        (None: any client's)."""

    def room(self) -> int:
        """How many more tasks this server's clients can take now, in all."""

    def lightest(self) -> int | None:
        """The tasks in flight at this server's least loaded client with
        room (None: no client has room)."""

    def moved(self, name: str) -> None:
        """NAME registered on another server of the fleet: its session here ends."""

    def complete(self, name: str, task_id: str, text: str, error: str = "") -> Outcome:
        """Client `name` answered `task_id` through another server of the fleet."""

    def forget_sessions(self) -> None:
        """The fleet took this server for dead and forgot its clients: every
        session ends, and its client registers again."""


class TaskQueue(abc.ABC):
    """Every task from `put` until its outcome. Its methods are called from
    the event loop's thread; only `put` and `close` wait.

    - `put_many` queues tasks together and returns once all are as durable
      as this queue makes tasks (committed together, for a file), or raises
      with none queued; with `max_queued` tasks queued it waits in turn for
      room. `put` is one task. Tasks for NAME wait for NAME; the others are
      taken in order, and tasks given back unanswered go to the front.
    - `head(name)` is the task a client named `name` would take next (its
      own first); `take` gives it to that client, one attempt more.
    - `settle` records a client's answer, or its failure, and `release`
      gives back a task its client left unanswered: `charged`, the send
      counts as an attempt, and a task out of attempts fails for good.
    - Each answer or failure is reported (`report`, at once: the log
      line), resolves the task's `outcome` future, and is handed on
      (`hand_on`, if one is bound) on the loop's next turn; only after the
      hand-on returns does the queue forget the task, so a crash before
      that repeats the task rather than losing its answer. A cancelled
      task is forgotten at once.
    """

    closed = False  # it takes no more tasks; answers are still settled

    @abc.abstractmethod
    def bind(self, dispatcher: Dispatching) -> None:
        """Tell `dispatcher` when a task can be taken (and, in a fleet, of
        what other servers heard): the dispatcher's to bind."""

    async def start(self) -> None:  # noqa: B027 (most queues need no start)
        """Connect to what keeps the tasks, if that needs waiting for (a
        database); raise QueueError, in one line, if it cannot be used."""

    async def register(self, name: str) -> int:
        """Record, where the fleet can see it, that NAME is connected here
        (its older session on another server then ends); return this
        registration's number, for `unregister`. Alone, nothing to record."""
        return 0

    async def registered_elsewhere(self, name: str) -> bool:
        """Whether NAME is registered on another server of a fleet (then its
        result and status calls are served here too). Alone: never."""
        return False

    def unregister(self, name: str, registration: int) -> None:  # noqa: B027 (as register)
        """NAME's session `registration` (from `register`) ended here."""

    @abc.abstractmethod
    def listen(self, report: Report, hand_on: Report | None = None) -> None:
        """Call `report` as each task ends, and `hand_on` on the loop's next
        turn (it may withdraw tasks): the server's to bind."""

    @abc.abstractmethod
    async def put_many(self, tasks: Sequence[NewTask], wait: bool = True) -> list[Task]:
        """Queue new tasks once all are durable; if it raises, none is
        queued. A batch goes in whole once the queue has room for one task
        more; with none, it waits in turn, or raises QueueFullError if not
        `wait`. Raise RuntimeError once closed."""

    async def put(
        self,
        text: str,
        target: str | None = None,
        fields: dict[str, Any] | None = None,
        wait: bool = True,
    ) -> Task:
        """Queue one new task once it is durable (see put_many)."""
        return (await self.put_many([NewTask(text, target, fields)], wait))[0]

    @abc.abstractmethod
    def outcome(self, task_id: str) -> asyncio.Future[str] | None:
        """The future of a task `put` since this start, until it ends. It may
        end with nobody awaiting it: a failure is set already marked as
        seen (memory.fail), or asyncio logs it as never retrieved."""

    @abc.abstractmethod
    def head(self, name: str | None) -> Task | None:
        """The next task for client `name` (None: for any client), not taken."""

    @abc.abstractmethod
    def take(self, task: Task, name: str) -> None:
        """Give `task`, from `head`, to client `name`."""

    @abc.abstractmethod
    def release(self, task: Task, charged: bool) -> bool:
        """Give back a task taken and not answered; False if that failed it."""

    @abc.abstractmethod
    def settle(
        self, name: str, task_id: str, text: str, error: str = ""
    ) -> tuple[Outcome, Task | None]:
        """Client `name` answered `task_id` with `text`, or could not do it
        (`error`); return what became of that, and the task if it ended."""

    @abc.abstractmethod
    def cancel(self, task_id: str) -> Task | None:
        """Withdraw an unfinished task; None if there is none (any more)."""

    @abc.abstractmethod
    def queued(self) -> int:
        """How many tasks wait for a client."""

    @abc.abstractmethod
    def queued_by_target(self, names: int) -> dict[str | None, int]:
        """How many tasks wait for any client (key None), and for each of
        the `names` names with the most waiting (a fleet's: as last counted)."""

    @abc.abstractmethod
    def unfinished(self) -> list[Task]:
        """Every task that has no outcome yet."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Take no more tasks (`closed`); submitters waiting for room get RuntimeError."""

    def trouble(self) -> str | None:
        """Why this queue cannot keep tasks now (its file was deleted, its
        database cannot be reached), or None. The server says NOT_SERVING
        to health checks while there is one. Asked on the event loop at
        every housekeeping tick: it must be cheap and never block (a
        database queue reports what its connection last saw)."""
        return None

    @abc.abstractmethod
    def kept(self) -> str:
        """What becomes of unfinished tasks at shutdown: words to add after
        a count of them (with a leading space), or nothing."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Fail every outcome still awaited (TaskNotAnsweredError: the server
        closed first), make what was recorded durable, and let go."""
