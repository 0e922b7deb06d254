"""The task queue in an SQLite file (`--journal FILE`): `MemoryQueue` with
every change of a task written to the file too, so that a server killed at
any instant loses no task it took, and queues them again when it starts on
the same file.

One row per task, from submission until it is answered or cancelled (the
row is then deleted) or fails (the row is kept, state 'failed', for
inspection, up to KEEP_FAILED of them). Writes share transactions,
committed one at a time by a thread of its own: each takes what came since
the last. A new task that finds the writer idle is committed at once (its
submitter waits for that commit); otherwise commits begin at most every
BATCH_SECONDS, so under load each carries the writes of a few milliseconds.

The crash rule, kept here: an answered task's row is deleted only once its
answer is reported, handed on, and its log line written (MemoryQueue._end,
and `write_held_lines` before each commit), so a crash in between repeats
the task rather than losing its answer. See docs/guarantees.md ("After a
crash") for what survives which crash.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from contact import contact_pb2
from contact.logtext import counted, write_held_lines
from contact.queue.base import (
    MAX_ATTEMPTS,
    MAX_QUEUED,
    QueueError,
    Task,
    TaskCancelledError,
    TaskNotAnsweredError,
)
from contact.queue.memory import MemoryQueue

log = logging.getLogger("contact.journal")

# A contact journal says so in its header, and which layout it has, so that
# another SQLite file or one from an incompatible version is refused, never changed.
APPLICATION_ID = 0x636F6E74  # "cont"
VERSION = 1
# Failed tasks kept for inspection (the newest); older ones are deleted.
KEEP_FAILED = 1000
# The default of --journal-sync: "full" syncs the log to disk at every
# commit, so a commit also survives an OS crash or power loss; batched, it
# cost about 15% of one client's throughput here (docs/performance.md).
# "normal" syncs only at checkpoints: a killed process still loses nothing,
# but a power loss may undo every commit since the last checkpoint.
SYNC_MODES = ("full", "normal")
SYNC = "full"
# Under load commits begin at most this often: each costs a hand-off to the
# writer thread and a sync, so one commit carries the writes of a few
# milliseconds (a kill repeats at most those answers), and a submitter
# waits at most this long more. A task that finds the writer idle is
# committed at once: batching is for load, not for a lone task.
BATCH_SECONDS = 0.005

SCHEMA = (
    """CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY,  -- submission order
    id TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    target TEXT,  -- the only client that may take it; NULL: any
    fields BLOB NOT NULL,  -- further ServerMsg fields, as a serialized ServerMsg
    attempts INTEGER NOT NULL,  -- sends that ended without an answer
    state TEXT NOT NULL CHECK (state IN ('unfinished', 'failed')),
    reason TEXT,  -- why it failed
    failed_at REAL  -- when it failed (Unix time)
    )""",
    """CREATE TABLE runs (  -- one row: what makes each start's task ids new
    token TEXT NOT NULL,  -- random, chosen when the journal was made
    started INTEGER NOT NULL  -- how many times a server has started on it
    )""",
)
INSERT = "INSERT INTO tasks VALUES (NULL, ?, ?, ?, ?, 0, 'unfinished', NULL, NULL)"
REQUEUED = "UPDATE tasks SET attempts = ? WHERE id = ?"
FINISHED = "DELETE FROM tasks WHERE id = ?"
FAILED = "UPDATE tasks SET state = 'failed', attempts = ?, reason = ?, failed_at = ? WHERE id = ?"
PRUNE_FAILED = """DELETE FROM tasks WHERE state = 'failed' AND seq NOT IN
    (SELECT seq FROM tasks WHERE state = 'failed' ORDER BY seq DESC LIMIT ?)"""


class JournalError(QueueError):
    """The journal cannot be used; the message says which file and why, in one line."""


class SqliteQueue(MemoryQueue):
    """A queue kept in a file, held by this process alone until `close`.

    Opening it reads back the tasks earlier starts left unfinished
    (`recovered`) and queues them again first; new task ids start anew.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        sync: str = SYNC,
        *,
        max_attempts: int | None = MAX_ATTEMPTS,
        max_queued: int | None = MAX_QUEUED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"sync is one of {', '.join(SYNC_MODES)}")
        super().__init__(max_attempts=max_attempts, max_queued=max_queued, clock=clock)
        self.path = Path(path)
        self._ops: list[tuple[str, tuple[object, ...]]] = []  # not yet committed, in order
        self._batch: asyncio.Future[None] | None = None  # resolved when `_ops` commit
        # Commits run in a thread of their own, so that the event loop never
        # waits for the disk; one at a time, so they land in order.
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="journal")
        self._writing: asyncio.Future[None] | None = None  # the commit under way
        self._timer: asyncio.TimerHandle | None = None  # when the next commit begins
        self._last_commit = 0.0  # when the last commit began (loop time)
        self._db = self._open(sync)
        self._file = os.stat(self.path)  # which file it is: one put in its place is another
        self.lost: str | None = None  # why the file can no longer keep tasks, once it cannot
        self._let_go = False  # closed: written no more
        try:
            run, earlier_runs = self._start_run()
            self.recovered = self._read_unfinished()
        except sqlite3.Error as err:
            self._db.close()
            raise self._error(err) from None
        log.info(
            "journal %s: %s recovered", self.path, counted(len(self.recovered), "unfinished task")
        )
        self.recover(run, earlier_runs, self.recovered)

    # -- what the queue keeps --

    def _queued_level(self, task: Task) -> int:
        """Always INFO: the line is the receipt that the task is committed,
        so that after a kill the lines to type again are those logged
        neither as queued nor, at the restart, as recovered
        (docs/guarantees.md). A sent line would not do: a task may wait
        behind thousands, and those older than the newest RECOVERED_LISTED
        are recovered in one line."""
        return logging.INFO

    def _kept(self, task: Task) -> asyncio.Future[None]:
        """Record a new task; the future resolves once it is committed (and
        raises JournalError if that failed)."""
        fields = contact_pb2.ServerMsg(**task.fields).SerializeToString()
        return self._write(INSERT, task.id, task.text, task.target, fields)

    def _all_kept(self) -> None:
        """New tasks are recorded: if the writer is idle, commit them at
        once, not BATCH_SECONDS later (batching pays only under load)."""
        if self._writing is None:
            if self._timer is not None:
                self._timer.cancel()
            self._flush()

    def _requeued(self, task: Task) -> None:
        """A task given back unanswered (its holder left or hung): keep its attempts."""
        if not self._let_go:
            self._write(REQUEUED, task.attempts, task.id)

    def _forget(self, task: Task, outcome: str | TaskNotAnsweredError) -> None:
        """A task ended and was handed on: delete it, or keep a failed one,
        with why, among the newest KEEP_FAILED. Once the file is let go,
        nothing more is written (the task is kept, and comes back)."""
        if self._let_go:
            log.debug("journal closed: task %s stays in it", task.id)
        elif isinstance(outcome, (str, TaskCancelledError)):
            self._write(FINISHED, task.id)
        else:
            self._write(FAILED, task.attempts, outcome.reason, time.time(), task.id)
            self._write(PRUNE_FAILED, KEEP_FAILED)

    async def close(self) -> None:
        """Fail what is still awaited, commit what is pending and let go of the file."""
        await super().close()
        if self._timer is not None:
            self._timer.cancel()  # commit now instead
            self._timer = None
        while self._writing is not None or self._ops:
            if self._writing is None:
                self._flush()
            assert self._writing is not None
            await asyncio.wait([self._writing])
        self._writer.shutdown()
        self._db.close()
        self._let_go = True

    # -- batching: one writer thread, one transaction at a time --

    def _write(self, sql: str, *params: object) -> asyncio.Future[None]:
        """Queue a write for the next transaction; return that transaction's future."""
        self._ops.append((sql, params))
        if self._batch is None:
            self._batch = asyncio.get_running_loop().create_future()
            self._batch.add_done_callback(lambda batch: batch.cancelled() or batch.exception())
            self._schedule()
        return self._batch

    def _schedule(self) -> None:
        """Commit the pending writes once the writer is free, BATCH_SECONDS
        after the last commit began at the soonest."""
        if self._writing is None and self._timer is None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._last_commit + BATCH_SECONDS - loop.time())
            self._timer = loop.call_later(delay, self._flush)

    def _flush(self) -> None:
        """Hand the pending writes to the writer thread, as one transaction."""
        self._timer = None
        write_held_lines()  # answers are in the log before their rows leave
        ops, batch = self._ops, self._batch
        self._ops, self._batch = [], None
        loop = asyncio.get_running_loop()
        self._last_commit = loop.time()
        self._writing = loop.run_in_executor(self._writer, self._commit, ops)
        self._writing.add_done_callback(lambda writing: self._written(writing, batch))

    def _written(self, writing: asyncio.Future[None], batch: asyncio.Future[None] | None) -> None:
        self._writing = None
        failure = writing.exception()
        if failure is not None:
            log.error("%s", failure)
        if batch is not None and not batch.done():
            if failure is None:
                batch.set_result(None)
            else:
                batch.set_exception(failure)
        if self._ops:  # what came while this was written
            self._schedule()

    def _commit(self, ops: list[tuple[str, tuple[object, ...]]]) -> None:
        """In the writer thread: one transaction of `ops`, in order."""
        self._check_file()
        try:
            with self._transaction():
                for sql, group in itertools.groupby(ops, key=lambda op: op[0]):
                    self._db.executemany(sql, [params for _, params in group])
        except sqlite3.Error as err:
            raise self._error(err) from None

    def kept(self) -> str:
        trouble = self.trouble()
        if self.lost is not None:
            return f" (NOT kept: the journal file was {self.lost})"
        if trouble is not None:
            return f" (perhaps NOT kept: {trouble})"
        return " (kept in the journal for the next start)"

    def trouble(self) -> str | None:
        """None while the file is still the journal's, or what became of it
        (once it was deleted or replaced, what is written there is lost at exit)."""
        if self.lost is None:
            try:
                now = os.stat(self.path)
                if (now.st_dev, now.st_ino) != (self._file.st_dev, self._file.st_ino):
                    self.lost = "replaced by another file"
            except FileNotFoundError:
                self.lost = "deleted"
            except OSError as err:  # (its folder unreadable, say): maybe for a while only
                return f"journal {self.path} cannot be checked: {err}"
        return None if self.lost is None else f"journal {self.path} was {self.lost}"

    def _check_file(self) -> None:
        """Commit nothing into a file that is no longer the journal's."""
        self.trouble()  # (a file it cannot check now is left to the commit itself)
        if self.lost is not None:
            raise JournalError(
                f"journal {self.path} was {self.lost} while the server ran: "
                "tasks are no longer kept; restart the server to keep them again"
            )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK if the block raised."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- opening --

    def _open(self, sync: str) -> sqlite3.Connection:
        if not self.path.parent.is_dir():
            raise JournalError(
                f"journal {self.path}: the directory {self.path.parent} does not exist"
            )
        try:
            # timeout=0: a journal another server holds is an error now, not a wait.
            # check_same_thread=False: opened here, written by the writer
            # thread, closed here again; never two at once.
            db = sqlite3.connect(
                self.path, timeout=0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as err:
            raise self._error(err) from None
        try:
            # Held by this connection from the first write until it closes: a
            # second server on the same file is refused. It also keeps WAL's
            # index in memory, so no shared-memory file is needed.
            db.execute("PRAGMA locking_mode = EXCLUSIVE")
            db.execute("BEGIN IMMEDIATE")  # takes the lock before anything is read
            self._check_or_create(db)
            db.execute("COMMIT")
            # Commits append to a log file: no rewrite of the database per commit.
            db.execute("PRAGMA journal_mode = WAL")
            db.execute(f"PRAGMA synchronous = {sync.upper()}")
            # On macOS a plain fsync leaves the data in the drive's cache;
            # F_FULLFSYNC does not (SQLite ignores this elsewhere).
            db.execute(f"PRAGMA fullfsync = {int(sync == 'full')}")
        except (sqlite3.Error, JournalError) as err:
            db.close()
            raise err if isinstance(err, JournalError) else self._error(err) from None
        return db

    def _check_or_create(self, db: sqlite3.Connection) -> None:
        application_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if application_id == 0 and version == 0 and tables == 0:  # a new, empty file
            for statement in SCHEMA:  # (executescript would commit first)
                db.execute(statement)
            db.execute("INSERT INTO runs VALUES (?, 0)", (secrets.token_hex(3),))
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute(f"PRAGMA user_version = {VERSION}")
            return
        if application_id != APPLICATION_ID:
            raise JournalError(f"journal {self.path}: not a contact journal (another SQLite file)")
        if version != VERSION:
            raise JournalError(
                f"journal {self.path}: made by a contact of journal version {version}; "
                f"this server reads version {VERSION}"
            )
        problems = [row[0] for row in db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise JournalError(f"journal {self.path} is corrupt: {problems[0]}")

    def _start_run(self) -> tuple[str, list[str]]:
        """Count this start; return its id prefix and those of earlier starts.
        A prefix is never used twice on one journal (nor, but by a 1 in 16
        million chance, on two journals)."""
        with self._transaction():
            self._db.execute("UPDATE runs SET started = started + 1")
            token, started = self._db.execute("SELECT token, started FROM runs").fetchone()
        return f"{token}.{started}", [f"{token}.{n}" for n in range(1, started)]

    def _read_unfinished(self) -> list[Task]:
        rows = self._db.execute(
            "SELECT id, text, target, fields, attempts FROM tasks"
            " WHERE state = 'unfinished' ORDER BY seq"
        )
        return [recovered_task(*row) for row in rows]

    def _error(self, err: sqlite3.Error) -> JournalError:
        """Say in one line what went wrong with the file, and what it means."""
        text = str(err)
        if "locked" in text:
            return JournalError(f"journal {self.path} is in use by another server ({text})")
        if "not a database" in text or "malformed" in text:
            return JournalError(f"journal {self.path} is corrupt ({text})")
        return JournalError(f"journal {self.path}: {text}")


def recovered_task(
    task_id: str, text: str, target: str | None, fields: bytes, attempts: int
) -> Task:
    """A task as read back from the journal: it may have been sent, before
    the restart, to any client, and one taken back before is suspect."""
    message = contact_pb2.ServerMsg.FromString(fields)
    return Task(
        id=task_id,
        text=text,
        target=target,
        fields={field.name: value for field, value in message.ListFields()},
        attempts=attempts,
        suspect=attempts > 0,
        recovered=True,
    )
