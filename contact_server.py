"""The contact server: pushes tasks to the clients that dialled in, and hears
their answers back.

    python contact_server.py [--host 127.0.0.1] [--port 50051] [--journal FILE]
                             [--tls-cert FILE --tls-key FILE [--client-ca FILE]]

Type one task per line: `TEXT` goes to any connected client, `@NAME TEXT`
only to the client registered as NAME. Ctrl-C (or SIGTERM) stops it.

Read it top-down: `ContactServicer` is the article's three rpcs, each a thin
translation to the gRPC-free `Router` (contact/router.py); `ContactServer`
is the server you can use from your own code (submit a task, get a handle
to await its answer or cancel it); `main` is the command line, feeding it
typed lines.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
from collections.abc import AsyncIterator, Callable
from logging import DEBUG, INFO
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from contact import (
    ACCEPTS_CANCEL_KEY,
    CLIENT_ID_KEY,
    REPORTS_START_KEY,
    cli,
    contact_pb2,
    contact_pb2_grpc,
    one_line_error,
    text_problem,
)
from contact.journal import SYNC, SYNC_MODES, Journal, JournalError
from contact.logtext import REPEATS, Quoted, summarise_grpc_decode_errors
from contact.metadata import (
    client_name,
    peer_host,
    refuse,
    refuse_malformed,
    requested_window,
    says_yes,
)
from contact.options import SERVER_OPTIONS
from contact.router import (
    MAX_ATTEMPTS,
    MAX_QUEUED,
    REPLACED,
    SHUTDOWN,
    TASK_TIMEOUT_SECONDS,
    Outcome,
    QueueFullError,
    Router,
    Task,
)
from contact.sessions import end_calls, owned_by, registration
from contact.signals import on_stop_signal
from contact.stdin import read_tasks
from contact.tasks import (
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
    retrieved,
)
from contact.tls import listen, warn_if_exposed

__all__ = [  # what code that uses the server imports from here
    "Answer",
    "ContactServer",
    "QueueFullError",
    "TaskCancelledError",
    "TaskError",
    "TaskFailedError",
    "TaskHandle",
    "TaskNotAnsweredError",
    "ThreadsafeHandle",
]

log = logging.getLogger("contact.server")

# Defaults of the command line and of ContactServer.
PORT = 50051
MAX_IN_FLIGHT = 32  # unanswered tasks per client: enough to hide a round trip
GRACE_SECONDS = 3.0  # open calls get this long to finish at shutdown
HOUSEKEEPING_SECONDS = 0.5  # how often leases are checked (how late one may run out)


class ContactServicer(contact_pb2_grpc.ContactServicer):
    """The three rpcs, each a thin translation between gRPC and the Router."""

    def __init__(self, router: Router) -> None:
        self._router = router
        self.calls: set[asyncio.Task[Any]] = set()  # open tellResult and sendStatus calls

    async def getTask(
        self, request: contact_pb2.Empty, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[contact_pb2.ServerMsg]:
        """Registration: keep the stream open and push each task down it."""
        name = await client_name(context)
        window = await requested_window(context)
        if self._router.closed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        session = self._router.connect(
            name,
            window,
            accepts_cancel=says_yes(context, ACCEPTS_CANCEL_KEY),
            reports_start=says_yes(context, REPORTS_START_KEY),
        )
        peer = context.peer()  # its lines are limited by host: a reconnect storm is said briefly
        REPEATS.log(
            log, INFO, "connect", peer_host(peer), "client %s connected from %s", name, peer
        )
        try:
            # Echoing the name tells the client its registration was accepted;
            # echoing reports-start, that its reports of starts are heard.
            echo: tuple[tuple[str, str], ...] = ((CLIENT_ID_KEY, name),)
            if session.reports_start:
                echo += ((REPORTS_START_KEY, "1"),)
            await context.send_initial_metadata(echo)
            while (task := await session.next_task()) is not None:
                log.info("task %s %s %s", task.id, WITHDRAWN if task.cancelled else SENT, name)
                yield message_for(task)
        finally:
            # Reached however the stream ends: client exit or crash, keepalive
            # timeout, takeover or shutdown. Unanswered tasks go back.
            self._router.disconnect(session)
            line = "client %s disconnected (%s)"
            REPEATS.log(log, INFO, "disconnect", peer_host(peer), line, name, session.ended)
        if session.ended == REPLACED:
            await context.abort(
                grpc.StatusCode.ABORTED, f"a newer client registered as {name} replaced this one"
            )
        if session.ended == SHUTDOWN:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")

    async def tellResult(
        self,
        request_iterator: AsyncIterator[contact_pb2.Result],
        context: grpc.aio.ServicerContext,
    ) -> contact_pb2.Empty:
        """The client's answers, one per task, each naming its task by id,
        and the tasks it has begun (if it reports that)."""
        name = await client_name(context)
        session = await registration(self._router, name, context)
        try:
            async with owned_by(session, context, self.calls):  # ends with its registration
                async for result in request_iterator:
                    if result.started:
                        self._router.started(session, result.started)
                        if not result.id:  # only that
                            continue
                    if problem := text_problem(result.ret):
                        await refuse(
                            context,
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"the answer to task {Quoted(result.id)} from {name}: {problem}",
                        )
                    error = one_line_error(result.error)
                    outcome = self._router.complete(name, result.id, result.ret, error)
                    if outcome is Outcome.NOT_GIVEN:
                        await context.abort(
                            grpc.StatusCode.PERMISSION_DENIED,
                            f"task {result.id} was never given to {name}",
                        )
        except DecodeError as err:
            await refuse_malformed(context, name, err)
        return contact_pb2.Empty()

    async def sendStatus(
        self,
        request_iterator: AsyncIterator[contact_pb2.ClientMsg],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[contact_pb2.Result]:
        """The client's own messages; each one is answered."""
        name = await client_name(context)
        session = await registration(self._router, name, context)
        try:
            async with owned_by(session, context, self.calls):  # ends with its registration
                async for status in request_iterator:
                    if log.isEnabledFor(DEBUG):  # not at INFO: idle clients would fill the terminal
                        line = Quoted(status.msg)
                        REPEATS.log(log, DEBUG, "status", name, "status from %s: %s", name, line)
                    yield contact_pb2.Result(
                        ret=f"{len(session.in_flight)} of your tasks in flight, "
                        f"{self._router.queued()} queued"
                    )
        except DecodeError as err:
            await refuse_malformed(context, name, err)


SENT, WITHDRAWN = "sent to", "withdrawn from"


def message_for(task: Task) -> contact_pb2.ServerMsg:
    """What getTask writes for `task`: the task, or the notice that it was withdrawn."""
    if task.cancelled:
        return contact_pb2.ServerMsg(id=task.id, cancelled=True)
    return contact_pb2.ServerMsg(task=task.text, id=task.id, attempt=task.attempts, **task.fields)


class ContactServer:
    """The server as an async context manager: started on entry, shut down
    gracefully on exit (as Ctrl-C does on the command line).

        async with ContactServer(port=0) as server:
            answer = await server.ask("hello")

    With `journal` (a file name), every unfinished task is kept in that file
    (contact/journal.py): a server started again on it, after a crash or a
    clean stop, queues them again. Entering raises JournalError if the file
    cannot be used. `on_answer(Answer)` is called on the server's loop for
    every answer and every failure, those to recovered tasks included. With
    `max_queued` tasks waiting for a client, `submit` waits for room.
    """

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
        self.host, self.port, self.grace = host, port, grace
        self._credentials = credentials
        self._journal_file, self._journal_sync = journal, journal_sync
        self._journal: Journal | None = None  # open while the server runs
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
        RuntimeError once the server is closing."""
        check_task(text, target, fields)
        if self.closed:
            raise RuntimeError("the server is closed: it takes no more tasks")
        try:
            await self._router.reserve(wait)
        except RuntimeError:
            raise RuntimeError("the server closed while the task waited for room") from None
        try:
            task = self._router.new_task(text, target, **fields)
            if self._journal is not None:
                await self._committed(task)
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

    async def _committed(self, task: Task) -> None:
        """Wait until `task` is in the journal. Its commit is shared with
        other tasks, so a cancelled caller must not cancel it: the task is
        written, then removed again."""
        assert self._journal is not None
        try:
            await asyncio.shield(self._journal.added(task))
        except asyncio.CancelledError:
            self._journal.finished(task)
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

        async def submit() -> ThreadsafeHandle:
            # Timed on the loop, where it is certain whether the task got
            # queued: given up on, it is not queued later with no handle.
            queued = await asyncio.wait_for(self.submit(text, target, **fields), LOOP_REPLY_SECONDS)
            return ThreadsafeHandle(queued, loop)

        # (Twice as long here: only a loop stuck for that long is not waited out.)
        return asyncio.run_coroutine_threadsafe(submit(), loop).result(2 * LOOP_REPLY_SECONDS)

    def cancel(self, task_id: str) -> bool:
        """Withdraw the task `task_id` (see TaskHandle.cancel); False if it
        has its outcome already, is no task of this server, or the server
        has begun shutting down (the task then stays in the journal, if any)."""
        task = None if self.closed else self._router.cancel(task_id)
        if task is None:
            return False
        log.info("task %s cancelled", task.id)
        self._settle(task, TaskCancelledError(f"task {task.id} was cancelled"))
        if self._journal is not None:
            self._journal.finished(task)
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
        if self._journal is None:
            return
        if failure is None:  # only now: a crash before this repeats the task
            self._journal.finished(task)
        else:
            self._journal.failed(task, reason)

    def _requeued(self, task: Task) -> None:
        if self._journal is not None:
            self._journal.requeued(task)  # its attempts count survives a restart

    def _not_answered(self, task: Task) -> TaskNotAnsweredError:
        return TaskNotAnsweredError(
            f"the server closed before task {task.id} was answered{self._kept()}"
        )

    def _kept(self) -> str:
        """What becomes of unanswered tasks at shutdown, for the log."""
        if self._journal is None:
            return ""
        if (lost := self._journal.check()) is not None:
            return f" (NOT kept: the journal file was {lost})"
        return " (kept in the journal for the next start)"

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

    async def __aenter__(self) -> ContactServer:
        if self._journal_file is not None:  # its unfinished tasks go first, before any client
            journal = self._journal = Journal(self._journal_file, self._journal_sync)
            self._router.resume(journal.run, journal.earlier_runs, journal.recovered)
        summarise_grpc_decode_errors(log)
        self._server = grpc.aio.server(options=SERVER_OPTIONS)  # needs a running loop
        self._servicer = ContactServicer(self._router)
        contact_pb2_grpc.add_ContactServicer_to_server(self._servicer, self._server)
        try:
            self.port = listen(self._server, self.host, self.port, self._credentials)
        except OSError:
            await self._close_journal()
            raise
        await self._server.start()
        self._loop = asyncio.get_running_loop()
        self._housekeeper = asyncio.create_task(self._housekeeping())
        warn_if_exposed(self.host, self._credentials)
        tls = "" if self._credentials is None else " with TLS"
        log.info("listening on %s:%d%s", self.host, self.port, tls)
        return self

    async def _close_journal(self) -> None:
        if self._journal is not None:
            await self._journal.close()  # commits what is pending: answers that just came
            self._journal = None

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
        kept = self._kept() if unanswered else ""
        await self._close_journal()
        REPEATS.flush(log, everything=True)  # no "... and N more" is left unsaid
        log.info("stopped; tasks never answered: %d%s", len(unanswered), kept)
        if self._signals_back is not None:  # a signal now is the program's again
            self._signals_back()


# --- The command line: tasks typed on standard input ---------------------------


async def serve(args: argparse.Namespace, credentials: grpc.ServerCredentials | None) -> int:
    """Serve until SIGINT or SIGTERM, feeding typed lines in as tasks."""
    server = ContactServer(
        args.host,
        args.port,
        max_in_flight=args.max_in_flight,
        task_timeout=args.task_timeout or None,
        max_attempts=args.max_attempts,
        max_queued=args.max_queued or None,
        grace=args.grace,
        credentials=credentials,
        journal=args.journal,
        journal_sync=args.journal_sync,
    )
    try:
        async with server:
            log.info("type a task per line (TEXT or @NAME TEXT)")
            read_tasks(asyncio.get_running_loop(), functools.partial(queue_line, server))
            await server.serve_until_stopped()
    except (OSError, JournalError) as err:
        log.error("%s", err)
        return 1
    return 0


async def queue_line(server: ContactServer, text: str, target: str | None) -> None:
    """Submit a typed task. Its answer is logged when it comes; nobody here waits for it."""
    try:
        if server.closed:
            raise RuntimeError("the server is shutting down")
        await server.submit(text, target)  # with a full queue, waits: reading stops meanwhile
    except ValueError as err:
        log.warning("ignored input line: %s", err)
    except JournalError as err:  # every line, once the journal is lost: said briefly
        REPEATS.log(log, logging.ERROR, "not queued", "stdin", "task not queued: %s", err)
    except RuntimeError as err:  # lines read as it stops: said briefly, however many
        REPEATS.log(log, logging.WARNING, "ignored", "stdin", "ignored input line: %s", err)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter
    )
    option = parser.add_argument
    option("--host", default="127.0.0.1", help="address to listen on")
    option("--port", type=int, default=PORT, help="port (0: any free port)")
    option(
        "--max-in-flight",
        type=cli.positive_int,
        default=MAX_IN_FLIGHT,
        metavar="TASKS",
        help="most unanswered tasks at one client",
    )
    option(
        "--task-timeout",
        type=cli.seconds,
        default=TASK_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="take a task back from a client that has worked on it this long (0: never)",
    )
    option(
        "--max-attempts",
        type=cli.positive_int,
        default=MAX_ATTEMPTS,
        metavar="N",
        help="sends of a task without an answer before it fails",
    )
    option(
        "--max-queued",
        type=cli.count,
        default=MAX_QUEUED,
        metavar="TASKS",
        help="most tasks waiting for a client; past it, typed input waits (0: no limit)",
    )
    option(
        "--grace",
        type=cli.positive_float,
        default=GRACE_SECONDS,
        metavar="SECONDS",
        help="at shutdown, how long open calls get to finish",
    )
    option("--journal", metavar="FILE", help="keep unfinished tasks in this SQLite file")
    option(
        "--journal-sync",
        choices=SYNC_MODES,
        default=SYNC,
        help="full: a queued task survives power loss; normal: only a crash of the server",
    )
    cli.add_common_arguments(parser, server=True)
    args = parser.parse_args()
    credentials = cli.server_tls(parser, args)
    cli.start_logging(args)
    return asyncio.run(serve(args, credentials))


if __name__ == "__main__":
    raise SystemExit(main())
