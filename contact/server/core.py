"""The server you use from your own code, with the rpcs of contact_server.py:
submit a task and get a handle to await its answer or cancel it, or `ask`
and await the answer; started and stopped by `async with`.

It holds the Router (which client gets which task) and one TaskStore
(contact/queue/store.py: what is kept, in memory or in a journal file), and turns
what the Router reports into log lines, task handles' outcomes, the
`on_answer` hook and the store's records. `listen` binds its port.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import grpc

from contact import contact_pb2_grpc
from contact.logtext import REPEATS, Quoted, retrieved, summarise_grpc_decode_errors
from contact.options import SERVER_OPTIONS
from contact.queue.journal import SYNC, Journal
from contact.queue.router import (
    MAX_ATTEMPTS,
    MAX_QUEUED,
    TASK_TIMEOUT_SECONDS,
    Router,
    Task,
)
from contact.queue.store import MemoryStore, TaskStore
from contact.server.checks import end_calls
from contact.server.handles import (
    LOOP_REPLY_SECONDS,
    Answer,
    TaskCancelledError,
    TaskError,
    TaskFailedError,
    TaskHandle,
    TaskNotAnsweredError,
    ThreadsafeHandle,
    check_task,
    on_loop,
)
from contact.signals import on_stop_signal
from contact.tls import warn_if_exposed

log = logging.getLogger("contact.server")

# Defaults of the command line and of the server.
PORT = 50051
MAX_IN_FLIGHT = 32  # unanswered tasks per client: enough to hide a round trip
GRACE_SECONDS = 3.0  # open calls get this long to finish at shutdown
HOUSEKEEPING_SECONDS = 0.5  # how often leases are checked (how late one may run out)


class Servicer(Protocol):
    """What the server needs of its servicer (a contact_pb2_grpc.ContactServicer
    with the three rpcs), beside the rpcs themselves."""

    calls: set[asyncio.Task[Any]]  # open calls to let finish at shutdown


ServerType = TypeVar("ServerType", bound="Server")  # `async with` gives the subclass


def open_store(journal: str | os.PathLike[str] | None, sync: str = SYNC) -> TaskStore:
    """The store the options ask for: a journal file, or memory. Raises
    JournalError if the file cannot be used."""
    return MemoryStore() if journal is None else Journal(journal, sync)


class Server:
    """The server as an async context manager: started on entry, shut down
    gracefully on exit (as Ctrl-C does on the command line). Its rpcs are
    those of `servicer`, which a subclass names (contact_server.py's
    ContactServer is the one to use).

        async with ContactServer(port=0) as server:
            answer = await server.ask("hello")

    With `journal` (a file name), every unfinished task is kept in that file
    (contact/queue/journal.py): a server started again on it, after a crash or a
    clean stop, queues them again. Entering raises JournalError if the file
    cannot be used. `on_answer(Answer)` is called on the server's loop for
    every answer and every failure, those to recovered tasks included. With
    `max_queued` tasks waiting for a client, `submit` waits for room.
    """

    servicer: Callable[[Router], Servicer]

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
        on_answer: Callable[[Answer], object] | None = None,
    ) -> None:
        if not hasattr(self, "servicer"):
            raise TypeError(f"{type(self).__name__} has no servicer: use ContactServer")
        self.host, self.port, self.grace = host, port, grace
        self._credentials = credentials
        self._journal_file, self._journal_sync = journal, journal_sync
        self._store: TaskStore = MemoryStore()  # the one asked for, while the server runs
        self._on_answer = on_answer
        self._router = Router(
            max_in_flight,
            self._answered,
            task_timeout=task_timeout,
            max_attempts=max_attempts,
            on_failed=self._failed,
            on_requeued=self._requeued,
            on_error=self._errored,
            max_queued=max_queued,
        )
        self._answers: dict[str, asyncio.Future[str]] = {}  # by task id, while awaited
        self._signals_back: Callable[[], None] | None = None  # ends serve_until_stopped's hold
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it runs on, once started

    @property
    def closed(self) -> bool:
        """Whether the server has begun shutting down (it takes no more tasks)."""
        return self._router.closed

    async def submit(
        self, text: str, target: str | None = None, *, wait: bool = True, **fields: Any
    ) -> TaskHandle:
        """Queue a task (for the client named `target` only, if given;
        `fields` fill more ServerMsg fields) and return its handle.

        It returns once the task is queued: with a journal, once it is
        committed there, so that no crash from then on loses it (it raises
        JournalError if that failed). Tasks submitted together share one
        commit, so submit many at once with asyncio.gather. With
        `max_queued` tasks queued it waits, in turn, until clients take
        some (or, if not `wait`, raises QueueFullError). It raises
        ValueError at once for a task that could never be sent, and
        RuntimeError before the server runs and once it is closing."""
        check_task(text, target, fields)
        if self.closed:
            raise RuntimeError("the server is closed: it takes no more tasks")
        if self._loop is None:  # (with a journal, there is nowhere to keep it yet)
            raise RuntimeError("the server is not running: enter `async with server` first")
        try:
            await self._router.reserve(wait)
        except RuntimeError:
            raise RuntimeError("the server closed while the task waited for room") from None
        try:
            task = self._router.new_task(text, target, **fields)
            await self._kept(task)
        except BaseException:
            self._router.unreserve()
            raise
        answer = asyncio.get_running_loop().create_future()
        answer.add_done_callback(retrieved)  # a handle nobody awaits is no error
        if self._router.closed:  # it closed while the task was being written
            answer.set_exception(self._not_answered(task))
            self._router.unreserve()
        else:
            self._answers[task.id] = answer
            self._router.queue(task, reserved=True)
        return TaskHandle(task.id, answer, lambda: self.cancel(task.id))

    async def ask(
        self, text: str, target: str | None = None, *, timeout: float | None = None, **fields: Any
    ) -> str:
        """`submit` a task and wait for its answer, at most `timeout` seconds
        in all, room in a full queue included (then raise
        asyncio.TimeoutError). A task it gives up on, or whose caller is
        cancelled, is withdrawn."""
        loop = asyncio.get_running_loop()
        ends = None if timeout is None else loop.time() + timeout
        handle = await asyncio.wait_for(self.submit(text, target, **fields), timeout)
        try:
            return await handle.result(None if ends is None else max(0.0, ends - loop.time()))
        except asyncio.TimeoutError:
            if handle.cancel():
                raise
            return await handle  # its outcome came as the time ran out
        except asyncio.CancelledError:
            handle.cancel()
            raise

    async def _kept(self, task: Task) -> None:
        """Wait until `task` is in the store. A journal's commit is shared
        with other tasks, so a cancelled caller must not cancel it: the task
        is written, then removed again."""
        if (kept := self._store.added(task)) is None:
            return
        try:
            await asyncio.shield(kept)
        except asyncio.CancelledError:
            self._store.finished(task)
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

        async def queued() -> ThreadsafeHandle:
            # Timed on the loop, where it is certain whether the task got
            # queued: given up on, it is not queued later with no handle.
            queued = await asyncio.wait_for(self.submit(text, target, **fields), LOOP_REPLY_SECONDS)
            return ThreadsafeHandle(queued, loop)

        # (Twice as long here: only a loop stuck for that long is not waited out.)
        return asyncio.run_coroutine_threadsafe(queued(), loop).result(2 * LOOP_REPLY_SECONDS)

    def cancel(self, task_id: str) -> bool:
        """Withdraw the task `task_id` (see TaskHandle.cancel); False if it
        has its outcome already, is no task of this server, or the server
        has begun shutting down (the task then stays in the journal, if any)."""
        task = None if self.closed else self._router.cancel(task_id)
        if task is None:
            return False
        log.info("task %s cancelled", task.id)
        self._settle(task, TaskCancelledError(f"task {task.id} was cancelled"))
        self._store.finished(task)
        return True

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

    def _answered(self, task: Task, name: str, text: str) -> None:
        log.info("task %s result from %s: %s", task.id, name, Quoted(text))
        self._conclude(task, text, name)

    def _errored(self, task: Task, name: str, error: str) -> None:
        log.warning("task %s failed at %s: %s", task.id, name, Quoted(error))
        reason = f"failed at {name}: {error}"
        self._conclude(task, TaskError(f"task {task.id} {reason}", name, error), name, reason)

    def _failed(self, task: Task, reason: str) -> None:
        self._conclude(task, TaskFailedError(f"task {task.id} failed: {reason}"), "", reason)

    def _conclude(
        self, task: Task, outcome: str | TaskNotAnsweredError, name: str, reason: str = ""
    ) -> None:
        """A task has its answer, or failed (`reason`): hand it to its
        submitter now; tell the hook and the journal on the loop's next turn,
        once the Router is done with this change (the hook may cancel tasks)."""
        self._settle(task, outcome)
        asyncio.get_running_loop().call_soon(self._record, task, outcome, name, reason)

    def _record(
        self, task: Task, outcome: str | TaskNotAnsweredError, name: str, reason: str
    ) -> None:
        failure = outcome if isinstance(outcome, TaskNotAnsweredError) else None
        text = None if failure else str(outcome)
        if self._on_answer is not None:
            answer = Answer(task.id, task.text, name or None, text, failure, task.recovered)
            try:
                self._on_answer(answer)
            except Exception:  # the hook is the user's code: it must not break the server
                log.exception("the on_answer hook failed on task %s", task.id)
        if failure is None:  # only now: a crash before this repeats the task
            self._store.finished(task)
        else:
            self._store.failed(task, reason)

    def _requeued(self, task: Task) -> None:
        self._store.requeued(task)  # its attempts count survives a restart

    def _not_answered(self, task: Task) -> TaskNotAnsweredError:
        return TaskNotAnsweredError(
            f"the server closed before task {task.id} was answered{self._store.kept()}"
        )

    def _settle(self, task: Task, outcome: str | Exception) -> None:
        """Hand the submitter of `task` its answer, or why there is none."""
        answer = self._answers.pop(task.id, None)
        if answer is None or answer.done():  # recovered from a journal, or nobody waits
            return
        if isinstance(outcome, Exception):
            answer.set_exception(outcome)
        else:
            answer.set_result(outcome)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_SECONDS)
            self._router.expire_leases()
            REPEATS.flush(log)

    async def __aenter__(self: ServerType) -> ServerType:
        store = open_store(self._journal_file, self._journal_sync)
        try:
            self._router.resume(store.run, store.earlier_runs, store.recovered)  # before any client
            summarise_grpc_decode_errors(log)
            self._server = grpc.aio.server(options=SERVER_OPTIONS)  # needs a running loop
            self._servicer = self.servicer(self._router)
            contact_pb2_grpc.add_ContactServicer_to_server(self._servicer, self._server)
            self.port = listen(self._server, self.host, self.port, self._credentials)
            await self._server.start()
        except BaseException:
            await store.close()  # (a journal's file is locked until then)
            raise
        self._store, self._loop = store, asyncio.get_running_loop()
        self._housekeeper = asyncio.create_task(self._housekeeping())
        warn_if_exposed(self.host, self._credentials)
        tls = "" if self._credentials is None else " with TLS"
        log.info("listening on %s:%d%s", self.host, self.port, tls)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        log.info(
            "shutting down: tasks queued: %d, in flight: %d; open calls get %.0f s to finish",
            self._router.queued(),
            self._router.in_flight(),
            self.grace,
        )
        self._housekeeper.cancel()
        self._router.close()  # every getTask call ends: UNAVAILABLE
        await end_calls(self._servicer.calls, self.grace)  # answers on their way still land
        await self._server.stop(self.grace)
        unanswered = self._router.unfinished()
        for task in unanswered:
            self._settle(task, self._not_answered(task))
        kept = self._store.kept() if unanswered else ""
        await self._store.close()  # makes durable what is pending: answers that just came
        self._store = MemoryStore()  # reports that come later are of no use to anyone
        REPEATS.flush(log, everything=True)  # no "... and N more" is left unsaid
        log.info("stopped; tasks never answered: %d%s", len(unanswered), kept)
        if self._signals_back is not None:  # a signal now is the program's again
            self._signals_back()


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
