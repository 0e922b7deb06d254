"""The server you use from your own code, with the rpcs of contact_server.py:
submit a task and get a handle to await its answer or cancel it, or `ask`
and await the answer; started and stopped by `async with`.

It holds one TaskQueue (contact/queue/base.py: the tasks, in memory or in a
journal file), never asking which kind, and a Dispatcher in front of it
(which connected client gets which task); it turns what the queue reports
into log lines and the `on_answer` hook. Beside its rpcs it serves the
standard health service (contact/server/health.py) and server reflection;
it counts what it does (contact/server/stats.py: `stats()`, `clients()`)
and, if asked, serves those counts over HTTP (contact/server/status.py).
`listen` binds its port.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from contact import contact_pb2_grpc
from contact.logtext import REPEATS, Quoted, summarise_grpc_decode_errors
from contact.options import SERVER_OPTIONS
from contact.queue.base import (
    DEAD_AFTER_SECONDS,
    MAX_ATTEMPTS,
    MAX_QUEUED,
    NewTask,
    Task,
    TaskError,
    TaskFailedError,
    TaskNotAnsweredError,
    TaskQueue,
)
from contact.queue.dispatcher import LEASE_EXPIRED, TASK_TIMEOUT_SECONDS, Dispatcher
from contact.queue.memory import MemoryQueue
from contact.queue.sqlite import SYNC, SqliteQueue
from contact.server.checks import end_calls
from contact.server.handles import (
    LOOP_REPLY_SECONDS,
    Answer,
    TaskHandle,
    ThreadsafeHandle,
    check_task,
    on_loop,
)
from contact.server.health import CONTACT_SERVICE, add_health
from contact.server.stats import STATS_NAMES, ClientView, RefusalCounter, Stats, Tally
from contact.server.status import PAGE_CLIENTS, Snapshot, StatusServer
from contact.signals import on_stop_signal
from contact.tls import warn_if_exposed
from contact.waits import within

log = logging.getLogger("contact.server")

# Defaults of the command line and of the server.
PORT = 50051
MAX_IN_FLIGHT = 32  # unanswered tasks per client: enough to hide a round trip
GRACE_SECONDS = 3.0  # open calls get this long to finish at shutdown
# How often leases and the queue's health are checked: how late a lease may
# run out, and a health check notice a queue that cannot keep tasks.
HOUSEKEEPING_SECONDS = 0.5


class Servicer(Protocol):
    """What the server needs of its servicer (a contact_pb2_grpc.ContactServicer
    with the three rpcs), beside the rpcs themselves."""

    calls: set[asyncio.Task[Any]]  # open calls to let finish at shutdown


ServerType = TypeVar("ServerType", bound="Server")  # `async with` gives the subclass


def open_queue(
    journal: str | os.PathLike[str] | None,
    sync: str = SYNC,
    *,
    queue: str | None = None,
    dead_after: float = DEAD_AFTER_SECONDS,
    max_attempts: int | None = MAX_ATTEMPTS,
    max_queued: int | None = MAX_QUEUED,
) -> TaskQueue:
    """The queue the options ask for: in a PostgreSQL database (`queue`, a
    URL), in a journal file, or in memory. Raises QueueError if it cannot
    be used (a database is connected to by the queue's `start`)."""
    limits: dict[str, Any] = {"max_attempts": max_attempts, "max_queued": max_queued}
    if queue is not None:
        if journal is not None:
            raise ValueError("a queue in a database, or a journal: not both")
        from contact.queue.postgres import PostgresQueue  # (its driver only if asked for)

        return PostgresQueue(queue, dead_after=dead_after, **limits)
    if journal is None:
        return MemoryQueue(**limits)
    return SqliteQueue(journal, sync, **limits)


class Server:
    """The server as an async context manager: started on entry, shut down
    gracefully on exit (as Ctrl-C does on the command line). Its rpcs are
    those of `servicer`, which a subclass names (contact_server.py's
    ContactServer is the one to use).

        async with ContactServer(port=0) as server:
            answer = await server.ask("hello")

    With `journal` (a file name), every unfinished task is kept in that file
    (contact/queue/sqlite.py): a server started again on it, after a crash or a
    clean stop, queues them again. With `queue` (a postgresql:// URL), the
    tasks live in that database, and every server started on it serves one
    fleet (docs/fleet.md): one silent for `dead_after` seconds is taken
    for dead, and its tasks are queued again. Entering raises QueueError
    (JournalError for a file) if the queue cannot be used.
    It answers server reflection (grpc.reflection.v1alpha) unless
    `reflection` is False. With `metrics_port`, it serves Prometheus metrics
    at /metrics and a status page at / on metrics_host:metrics_port
    (docs/operations.md); `stats()` and `clients()` give the same counts.
    `on_answer(Answer)` is called on the server's loop for every answer and
    every failure, those to recovered tasks included. With `max_queued`
    tasks waiting for a client, `submit` waits for room.
    """

    servicer: Callable[[Dispatcher], Servicer]

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = PORT,
        *,
        max_in_flight: int = MAX_IN_FLIGHT,
        task_timeout: float | None = TASK_TIMEOUT_SECONDS,
        max_attempts: int | None = MAX_ATTEMPTS,
        max_queued: int | None = MAX_QUEUED,
        grace: float = GRACE_SECONDS,
        credentials: grpc.ServerCredentials | None = None,
        journal: str | os.PathLike[str] | None = None,
        journal_sync: str = SYNC,
        queue: str | None = None,
        dead_after: float = DEAD_AFTER_SECONDS,
        on_answer: Callable[[Answer], object] | None = None,
        reflection: bool = True,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
    ) -> None:
        if not hasattr(self, "servicer"):
            raise TypeError(f"{type(self).__name__} has no servicer: use ContactServer")
        self.host, self.port, self.grace = host, port, grace
        self._credentials = credentials
        # The queue and its dispatcher are made as the server starts (a
        # journal is opened then), from these; made once here, they check them.
        self._new_queue = functools.partial(
            open_queue,
            journal,
            journal_sync,
            queue=queue,
            dead_after=dead_after,
            max_attempts=max_attempts,
            max_queued=max_queued,
        )
        if queue is not None and journal is not None:
            raise ValueError("a queue in a database, or a journal: not both")
        self._new_dispatcher = functools.partial(
            Dispatcher, max_in_flight=max_in_flight, task_timeout=task_timeout
        )
        self._new_dispatcher(MemoryQueue(max_attempts=max_attempts, max_queued=max_queued))
        self._on_answer = on_answer
        self.reflection = reflection
        self.metrics_port, self.metrics_host = metrics_port, metrics_host
        self._tally = Tally()
        # When each task submitted here was queued (loop time), by its
        # outcome future, for the histogram of answer times; read when the
        # task is reported answered. Weak: a task that ends unreported (a
        # fleet that took this server for dead adopted it) leaves nothing.
        # Not a done callback on each outcome: a callback per task to run.
        self._submitted_at: weakref.WeakKeyDictionary[asyncio.Future[str], float] = (
            weakref.WeakKeyDictionary()
        )
        self._status: StatusServer | None = None
        self._closed = False
        self._signals_back: Callable[[], None] | None = None  # ends serve_until_stopped's hold
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it runs on, once started

    @property
    def closed(self) -> bool:
        """Whether the server has begun shutting down (it takes no more tasks)."""
        return self._closed

    async def submit(
        self, text: str, target: str | None = None, *, wait: bool = True, **fields: Any
    ) -> TaskHandle:
        """Queue a task (for the client named `target` only, if given;
        `fields` fill more ServerMsg fields) and return its handle.

        It returns once the task is queued: with a journal, once it is
        committed there, so that no crash from then on loses it (it raises
        JournalError if that failed); `submit_many` queues many in one
        commit. With `max_queued` tasks queued it waits, in turn, until
        clients take some (or, if not `wait`, raises QueueFullError). It
        raises ValueError at once for a task that could never be sent, and
        RuntimeError before the server runs and once it is closing."""
        return (await self.submit_many([NewTask(text, target, fields)], wait=wait))[0]

    async def submit_many(
        self, tasks: Sequence[NewTask | str], *, wait: bool = True
    ) -> list[TaskHandle]:
        """Queue tasks together, each a text for any client or a
        NewTask(text, target, fields), and return their handles in order:
        with a journal, in one commit. As `submit`, but for all or none:
        if it raises, none is queued. A batch goes in whole once the queue
        has room for one task more (it may pass `max_queued` by one batch)."""
        if isinstance(tasks, (str, NewTask)):  # (a sequence too: a task per item)
            raise TypeError("submit_many takes a list of tasks; submit takes one")
        new = [NewTask(task) if isinstance(task, str) else task for task in tasks]
        for text, target, fields in new:
            check_task(text, target, fields or {})
        if self.closed:
            raise RuntimeError("the server is closed: it takes no more tasks")
        if self._loop is None:  # (with a journal, there is nowhere to keep it yet)
            raise RuntimeError("the server is not running: enter `async with server` first")
        try:
            queued = await self._queue.put_many(new, wait)
        except RuntimeError:
            raise RuntimeError("the server closed while the task waited for room") from None
        self._tally.submitted += len(queued)
        return [self._handle(task) for task in queued]

    def _handle(self, task: Task) -> TaskHandle:
        """The handle of a task just queued; its answer is timed from now."""
        outcome = self._queue.outcome(task.id)
        assert outcome is not None and self._loop is not None
        self._submitted_at[outcome] = self._loop.time()
        return TaskHandle(task.id, outcome, lambda: self.cancel(task.id))

    async def ask(
        self, text: str, target: str | None = None, *, timeout: float | None = None, **fields: Any
    ) -> str:
        """`submit` a task and wait for its answer, at most `timeout` seconds
        in all, room in a full queue included (then raise
        asyncio.TimeoutError). A task it gives up on, or whose caller is
        cancelled, is withdrawn."""
        loop = asyncio.get_running_loop()
        ends = None if timeout is None else loop.time() + timeout
        handle = await self._submit_within(timeout, text, target, fields)
        try:
            return await handle.result(None if ends is None else max(0.0, ends - loop.time()))
        except asyncio.TimeoutError:
            if handle.cancel():
                raise
            return await handle  # its outcome came as the time ran out
        except asyncio.CancelledError:
            handle.cancel()
            raise

    async def _submit_within(
        self, timeout: float | None, text: str, target: str | None, fields: dict[str, Any]
    ) -> TaskHandle:
        """`submit`, given up after `timeout` seconds (asyncio.TimeoutError):
        a task queued as its caller gives up, or is cancelled, is withdrawn."""
        submitting = asyncio.ensure_future(self.submit(text, target, **fields))
        try:
            return await within(asyncio.shield(submitting), timeout)
        except BaseException:
            submitting.cancel()
            submitting.add_done_callback(withdraw_if_queued)
            raise

    def submit_threadsafe(
        self, text: str, target: str | None = None, **fields: Any
    ) -> ThreadsafeHandle:
        """`submit`, from any thread other than the server's event loop's: it
        returns once the task is queued, with a concurrent.futures.Future of
        its answer that carries its `id`, and whose `cancel` withdraws it.
        Not queued within LOOP_REPLY_SECONDS (a full queue, say), the task
        is dropped and it raises TimeoutError."""
        loop = self._loop
        if loop is None or on_loop(loop):
            raise RuntimeError("the server is not running, or this is its loop: await submit")

        # The handle passes from the loop to this thread under a lock, so
        # that a task the loop queues after this thread gave up (the loop
        # was stuck) is withdrawn there, never left queued with no handle.
        lock, handed, gave_up = threading.Lock(), [], False

        async def queued() -> ThreadsafeHandle:
            # Timed on the loop too: a submit that waits for room gives up there.
            queued = await self._submit_within(LOOP_REPLY_SECONDS, text, target, fields)
            with lock:
                if gave_up:
                    queued.cancel()
                    raise asyncio.TimeoutError
                handed.append(ThreadsafeHandle(queued, loop))
            return handed[0]

        # (Twice as long here: only a loop stuck for that long is not waited out.)
        submitted = asyncio.run_coroutine_threadsafe(queued(), loop)
        try:
            return submitted.result(2 * LOOP_REPLY_SECONDS)
        except concurrent.futures.TimeoutError:
            with lock:
                gave_up = True
                if handed:  # queued as the time ran out: it counts
                    return handed[0]
            submitted.cancel()
            raise

    def cancel(self, task_id: str) -> bool:
        """Withdraw the task `task_id` (see TaskHandle.cancel); False if it
        has its outcome already, is no task of this server, or the server
        has begun shutting down (the task then stays in the journal, if any)."""
        running = self._loop is not None and not self.closed
        task = self._dispatcher.cancel(task_id) if running else None
        if task is None:
            return False
        log.info("task %s cancelled", task.id)
        self._tally.outcomes["cancelled"] += 1
        return True

    # -- what it counts (docs/operations.md) --

    def stats(self) -> Stats:
        """Counts since the server started: its clients, the queue (a
        fleet's: fleet-wide, as last counted), what became of its tasks,
        and the calls it refused. Call it on the server's loop, once it
        has started (RuntimeError before)."""
        self._check_started()
        return self._counts()

    def _counts(self) -> Stats:
        queued = self._queue.queued_by_target(STATS_NAMES)
        tally = self._tally
        return Stats(
            clients=len(self._dispatcher.sessions()),
            queued=self._queue.queued(),
            queued_for_any=queued.pop(None, 0),
            queued_for={name: count for name, count in queued.items() if name is not None},
            in_flight=sum(len(session.in_flight) for session in self._dispatcher.sessions()),
            submitted=tally.submitted,
            answered=tally.outcomes["answered"],
            failed=tally.outcomes["failed"],
            cancelled=tally.outcomes["cancelled"],
            requeued=dict(self._dispatcher.requeues),
            lease_expiries=self._dispatcher.requeues[LEASE_EXPIRED],
            refused=dict(tally.refused),
            durations=list(tally.durations),
            duration_sum=tally.duration_sum,
        )

    def clients(self) -> list[ClientView]:
        """The clients connected to this server, in the order they registered."""
        self._check_started()
        return self._clients()

    def _clients(self, most: int | None = None) -> list[ClientView]:
        return [
            ClientView(
                name=session.name,
                address=session.peer,
                window=session.window,
                in_flight=len(session.in_flight),
                answered=session.answered,
                connected_since=session.connected_at,
                last_heard=session.heard_at,
            )
            for session in self._dispatcher.sessions()[:most]
        ]

    def _check_started(self) -> None:
        if self._loop is None:
            raise RuntimeError("the server has not started: enter `async with server` first")

    async def serve_until_stopped(self) -> None:
        """Serve until SIGINT or SIGTERM arrives (Ctrl-C, or what kill,
        systemd and Kubernetes send), then return: leaving `async with`
        then shuts down gracefully, as the command line does. The signals
        are handled so until the shutdown is over; then as before."""
        if self._loop is None or self.closed:
            raise RuntimeError("serve_until_stopped: enter `async with server` first")
        stop = asyncio.Event()
        self._signals_back = on_stop_signal(stop.set)
        log.info("serving until Ctrl-C or SIGTERM")
        await stop.wait()

    # -- how each task ends --

    def _report(self, task: Task, client: str, outcome: str | TaskNotAnsweredError) -> None:
        """Log how a task ended (an answer, a client's failure, or no
        attempts left), and count it."""
        if isinstance(outcome, str):
            log.info("task %s result from %s: %s", task.id, client, Quoted(outcome))
            self._tally.answered()
            self._time_answer(task.id)
        elif isinstance(outcome, TaskError):
            log.warning("task %s failed at %s: %s", task.id, client, Quoted(outcome.error))
            self._tally.failed(task.id, client, outcome.error)
        elif isinstance(outcome, TaskFailedError):
            log.error("task %s failed: %s: %s", task.id, outcome.reason, Quoted(task.text))
            self._tally.failed(task.id, None, outcome.reason)

    def _time_answer(self, task_id: str) -> None:
        """Count how long after its submit a task submitted here was answered
        (its outcome is still the queue's while the answer is reported)."""
        outcome = self._queue.outcome(task_id)
        submitted = None if outcome is None else self._submitted_at.pop(outcome, None)
        if submitted is not None and self._loop is not None:
            self._tally.timed(self._loop.time() - submitted)

    def _hand_on(self, task: Task, client: str, outcome: str | TaskNotAnsweredError) -> None:
        """Give the `on_answer` hook what became of a task."""
        assert self._on_answer is not None
        failure = None if isinstance(outcome, str) else outcome
        text = None if failure else str(outcome)
        answer = Answer(task.id, task.text, client or None, text, failure, task.recovered)
        try:
            self._on_answer(answer)
        except Exception:  # the hook is the user's code: it must not break the server
            log.exception("the on_answer hook failed on task %s", task.id)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_SECONDS)
            self._dispatcher.expire_leases()
            self._health.queue_checked(self._queue.trouble())
            REPEATS.flush(log)

    async def __aenter__(self: ServerType) -> ServerType:
        queue = self._new_queue()
        queue.listen(self._report, None if self._on_answer is None else self._hand_on)
        self._queue, self._dispatcher = queue, self._new_dispatcher(queue)
        try:
            await queue.start()
            summarise_grpc_decode_errors(log)
            counter = RefusalCounter(self._tally.refused)
            self._server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[counter])
            self._servicer = self.servicer(self._dispatcher)
            contact_pb2_grpc.add_ContactServicer_to_server(self._servicer, self._server)
            self._health = add_health(self._server)
            if self.reflection:  # the proto is this server's public contract
                names = (CONTACT_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
                reflection.enable_server_reflection(names, self._server)
            self._status = self._serve_status()  # (first: a port it cannot have binds nothing)
            self.port = listen(self._server, self.host, self.port, self._credentials)
            await self._server.start()
        except BaseException:
            if self._status is not None:
                await self._status.stop()
            await queue.close()  # (a journal's file is locked until then)
            raise
        self._loop = asyncio.get_running_loop()
        self._housekeeper = asyncio.create_task(self._housekeeping())
        warn_if_exposed(self.host, self._credentials)
        tls = "" if self._credentials is None else " with TLS"
        log.info("listening on %s:%d%s", self.host, self.port, tls)
        if self._status is not None:
            host = f"[{self.metrics_host}]" if ":" in self.metrics_host else self.metrics_host
            where = f"http://{host}:{self.metrics_port}"
            log.info("status page at %s/, Prometheus metrics at %s/metrics", where, where)
        return self

    def _serve_status(self) -> StatusServer | None:
        """The status page and metrics, if asked for (OSError if the port is taken)."""
        if self.metrics_port is None:
            return None
        loop = asyncio.get_running_loop()
        status = StatusServer(
            self.metrics_host, self.metrics_port, loop, self._counts, self._snapshot
        )
        self.metrics_port = status.port  # (the one chosen, for port 0)
        return status

    def _snapshot(self) -> Snapshot:
        tally = self._tally
        clients = self._clients(PAGE_CLIENTS)
        return Snapshot(self._counts(), clients, list(tally.failures), tally.rate(), time.time())

    async def __aexit__(self, *exc_info: object) -> None:
        in_flight = sum(task.holder is not None for task in self._queue.unfinished())
        log.info(
            "shutting down: tasks queued: %d, in flight: %d; open calls get %.0f s to finish",
            self._queue.queued(),
            in_flight,
            self.grace,
        )
        self._closed = True
        self._health.not_serving()  # first: a balancer stops sending clients here
        self._housekeeper.cancel()
        self._dispatcher.close()  # every getTask call ends: UNAVAILABLE
        await end_calls(self._servicer.calls, self.grace)  # answers on their way still land
        self._health.end()  # watchers are not waited for
        await self._server.stop(self.grace)
        unanswered = len(self._queue.unfinished())
        kept = self._queue.kept() if unanswered else ""
        try:
            await self._queue.close()  # makes durable what is pending: answers that just came
        finally:
            if self._status is not None:
                await self._status.stop()
        REPEATS.flush(log, everything=True)  # no "... and N more" is left unsaid
        log.info("stopped; tasks never answered: %d%s", unanswered, kept)
        if self._signals_back is not None:  # a signal now is the program's again
            self._signals_back()


def withdraw_if_queued(submitting: asyncio.Future[TaskHandle]) -> None:
    """Withdraw the task of a `submit` its caller gave up on, if it got queued."""
    if not submitting.cancelled() and submitting.exception() is None:
        submitting.result().cancel()


def listen(
    server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None
) -> int:
    """Bind `server` to host:port, with TLS if there are credentials; return
    the port (the one chosen, for port 0). Raise OSError if it cannot."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if credentials is None:
            return int(server.add_insecure_port(address))
        return int(server.add_secure_port(address, credentials))
    except RuntimeError as err:  # how grpc says a port cannot be bound
        raise OSError(f"cannot listen on {address}: {err}") from err
