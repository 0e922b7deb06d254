"""The client's work across reconnections: the handlers, the tasks they are
on, and the answers (and reports of tasks begun) not yet sent.

contact_client.py's calls drive it: `start` each task getTask pushes,
`next_message` for tellResult to write, `connection_ended` when the
connection is lost. It holds the client's side of the window: never more
than `window` tasks of one registration, whatever the server sends.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from typing import Any

import grpc

from contact import BATCHES_ANSWERS_KEY, REPORTS_START_KEY, WITHDRAWN, contact_pb2
from contact.client.handler import Handler, handler_pool
from contact.client.streams import HANG_UP_SECONDS, StreamEndedError
from contact.logtext import Quoted

log = logging.getLogger("contact.client")

# Defaults of the client's command line and of run().
SERVER = "localhost:50051"
CONCURRENCY = 1  # tasks worked on at once, each in a thread of its own (a plain handler)
PREFETCH = 3  # tasks held ready beyond those: hides the round trip for fast tasks
STATUS_EVERY = 5.0  # seconds between status lines
MAX_BACKOFF = 10.0  # the longest wait between retries, seconds
# Answers ready while the last message was written go in one message, up to
# this many bytes (a larger answer goes alone): far under the 1 MiB message
# cap, and enough for hundreds of short answers.
BATCH_BYTES = 64 * 1024


class Work:
    """The client's work, across reconnections: the handlers, the tasks they
    are on, and answers not yet sent."""

    def __init__(
        self,
        handler: Handler,
        concurrency: int,
        window: int,
        max_tasks: int | None,
        status_every: float = STATUS_EVERY,
    ) -> None:
        self.handlers = handler_pool(handler, concurrency, self._finished, self._started)
        self.window = window  # the most tasks we ask the server for at once
        self.running: set[str] = set()  # ids of the tasks being worked on, or waiting to be
        self.held: set[str] = set()  # ids this registration gave us, not yet answered
        # The server leases each task from when we begin it (it echoed
        # reports-start): the ids begun, to tell it with the next message.
        self.reports_start = False
        self.begun: list[str] = []
        # The server takes several answers to a message (it echoed batches-answers).
        self.batches = False
        self.connected = False  # registered, and the connection not yet over
        self.unsent: deque[contact_pb2.Result] = deque()
        self.in_message = 0  # how many of `unsent` the message being written carries
        self.answer_ready = asyncio.Event()
        self.answered = 0  # answers and failures sent
        self.max_tasks = max_tasks  # return once this many are answered; None: never
        self.status_every = status_every  # seconds between status lines

    def done(self) -> bool:
        """Whether the task limit is reached: every answer it asks for is written."""
        return self.max_tasks is not None and self.answered >= self.max_tasks

    def connection_began(self, echoed: grpc.aio.Metadata) -> None:
        """A registration is confirmed, with the metadata the server echoed:
        its tasks are taken from now on. (Older servers neither lease from a
        task's start nor take answers in batches: they do not echo those.)"""
        self.connected = True
        self.reports_start = echoed.get(REPORTS_START_KEY) == "1"
        self.batches = echoed.get(BATCHES_ANSWERS_KEY) == "1"

    def connection_ended(self) -> None:
        """The tasks the connection gave us that have not started are the
        server's again (it sends them to someone, maybe us, anew), and so
        are those it pushes from now on: they are not started. The next
        registration's window starts empty. The writer stops after the
        message it is writing, if any."""
        for task_id in self.handlers.drop_waiting():
            self.running.discard(task_id)
        self.held.clear()
        self.connected, self.reports_start, self.batches, self.begun = False, False, False, []
        self.answer_ready.set()

    def start(self, message: contact_pb2.ServerMsg) -> None:
        """Work on a task unless it is already running (the server sent it
        again after a reconnect), or stop one the server withdrew."""
        if not self.connected:
            return  # read after the connection ended: the server gives it out again
        if message.cancelled:
            self.withdraw(message.id)
        elif message.id in self.held:  # sent again while running, after it was withdrawn
            self._started(message)  # (its new lease runs from now)
        else:
            if len(self.held) >= self.window:  # memory is ours to protect
                raise StreamEndedError(f"the server sent more than the {self.window} tasks asked")
            self.held.add(message.id)
            if message.id not in self.running:
                self.running.add(message.id)
                self.handlers.work_on(message)
            else:  # still running from the last connection: it began long ago
                self._started(message)

    def withdraw(self, task_id: str) -> None:
        """The server no longer wants an answer to `task_id`: stop it if we
        can. Either way a Result for it goes back, which the server ignores
        but for freeing the task's place in our window."""
        if task_id not in self.running:
            return  # answered already
        how = self.handlers.withdraw(task_id)
        if how is None:
            how = "it runs to the end (a thread cannot be stopped); the server ignores its answer"
        else:
            self.running.discard(task_id)
            self.held.discard(task_id)
            self._send(contact_pb2.Result(id=task_id, error=WITHDRAWN))
        log.info("task %s withdrawn by the server: %s", task_id, how)

    def _started(self, task: contact_pb2.ServerMsg) -> None:
        if self.reports_start and task.id in self.held:
            self.begun.append(task.id)
            self.answer_ready.set()

    def _finished(self, task: contact_pb2.ServerMsg, result: contact_pb2.Result) -> None:
        self.running.discard(task.id)
        self.held.discard(task.id)
        if result.error:
            log.warning("task %s: %s failed: %s", task.id, Quoted(task.task), Quoted(result.error))
        else:
            log.info("task %s: %s -> %s", task.id, Quoted(task.task), Quoted(result.ret))
        self._send(result)

    async def message_ready(self) -> bool:
        """Wait until an answer, or the start of a task, is to be sent (True),
        or until the task limit is reached or the connection ended (False)."""
        while self.connected and not self.done():
            if self.unsent or self.begun:
                return True
            self.answer_ready.clear()
            await self.answer_ready.wait()
        return False

    def next_message(self) -> contact_pb2.Result:
        """The first unsent answer, carrying the ids begun since the last
        message (alone, if no answer is ready): one message for an answer
        and the start of the next task. To a server that takes batches, the
        answers behind it ride along, up to BATCH_BYTES."""
        if not self.unsent:
            self.unsent.append(contact_pb2.Result())
        first = self.unsent[0]
        first.started[:] = self.begun  # (not those of a write that failed: another registration)
        self.begun.clear()
        del first.more[:]  # (built for a write that failed, maybe to another server)
        self.in_message = 1
        if self.batches:
            room = BATCH_BYTES - first.ByteSize()
            for answer in itertools.islice(self.unsent, 1, None):
                room -= answer.ByteSize()
                if room < 0:
                    break
                self.in_message += 1
            first.more.extend(itertools.islice(self.unsent, 1, self.in_message))
        return first

    def written(self) -> None:
        """The message `next_message` gave went out: forget what it carried."""
        for _ in range(self.in_message):
            sent = self.unsent.popleft()
            self.answered += bool(sent.id) and sent.error != WITHDRAWN  # answers only
        self.in_message = 0

    async def last_write_settled(self, writer: asyncio.Future[Any]) -> None:
        """When the connection fails: wait (briefly) for the `writer` to
        end if the message it writes holds the last answer asked for. A
        server that stops as it reads that answer fails the other calls
        first, and a client that decided before the write ended retried for
        ever."""
        limit = self.max_tasks
        last = limit is not None and self.answered < limit <= self.answered + self.in_message
        if last and not writer.done():
            await asyncio.wait({writer}, timeout=HANG_UP_SECONDS)

    def _send(self, result: contact_pb2.Result) -> None:
        self.unsent.append(result)
        self.answer_ready.set()
